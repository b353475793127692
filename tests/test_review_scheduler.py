"""Review defects of the scheduler (issue 17, items 1, 2, 5 and 7), each on real Redis and real processes.

1. A job naming a model the scheduler's registry lacks used to stop the scheduler (and every batch job
   of the pool with it, after each restart).
2. Recovery recounted the per-model in-flight counts non-atomically, and re-ran (re-sending every
   in-flight request) after any Redis error.
5. A cancelling job whose chunk was lost never finished.
7. Live-worker counts and pending-list lookups scanned the whole keyspace.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from inferpool import Client, JobStatus, Registry, Settings
from inferpool.constants import (
    JOBS_ACTIVE_KEY,
    MODEL_INFLIGHT_KEY,
    job_inflight_since_key,
    job_items_key,
    job_key,
    model_queues,
)
from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.local_pool import (
    EmbeddedRedis,
    WorkerProcess,
    start_scheduler_process,
    start_worker_process,
    stop_process,
    wait_for_workers,
)
from inferpool.scheduler.service import MAX_JOB_FAULTS, Scheduler
from inferpool.state.jobs import JobStore, NewJob
from inferpool.state.load import read_model_load
from inferpool.state.results import ResultRecord, ResultWriter
from inferpool.wire import ChatRequest, TaskItem, new_id

REPO = Path(__file__).resolve().parent.parent


def _line(custom_id: str, model: str, text: str = "hi") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def _queued(client: redis.Redis, model: str) -> int:
    return sum(int(client.llen(queue)) for queue in model_queues(model))


def _wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


# -- 1: nothing a client submits stops the scheduler ----------------------------------------------------


@pytest.mark.usefixtures("echo_worker")
def test_a_model_unknown_to_the_scheduler_fails_its_lines_not_the_scheduler(
    settings: Settings, scheduler: WorkerProcess, tmp_path: Path
) -> None:
    private = tmp_path / "private.yaml"
    private.write_text(
        "models:\n  - name: private-echo\n    backend: echo\n"
        "    capabilities: {context_window: 4096, max_output_tokens: 512}\n"
    )
    # The client knows private-echo (its own INFERPOOL_REGISTRY); the scheduler does not.
    registry = Registry.load([REPO / "tests" / "registry.yaml", private])
    with Client(settings=settings, registry=registry) as client:
        job = client.batches.create([_line("p1", "private-echo"), _line("e1", "echo"), _line("p2", "private-echo")])
        done = client.batches.wait(job.id, timeout=60, poll_s=0.1)
        output = {line.custom_id: line for line in client.batches.results(job.id)}
        assert scheduler.proc.poll() is None, scheduler.log_path.read_text()[-2000:]
        # The pool goes on running jobs.
        after = client.batches.create([_line("e2", "echo")])
        assert client.batches.wait(after.id, timeout=60, poll_s=0.1).status == JobStatus.COMPLETED
    assert done.status == JobStatus.COMPLETED
    assert done.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
    assert output["e1"].response is not None
    for custom_id in ("p1", "p2"):
        error = output[custom_id].error
        assert error is not None
        assert error.code == "model_not_found"
        assert "'private-echo' is not in the registry the scheduler uses" in error.message
        assert "tests/registry.yaml" in error.message  # names the scheduler's registry files


@pytest.mark.usefixtures("echo_worker")
def test_a_job_the_scheduler_cannot_read_is_failed_alone(
    client: Client, redis_client: redis.Redis, scheduler: WorkerProcess
) -> None:
    job_id = new_id("batch")
    redis_client.hset(job_key(job_id), mapping={"status": "no-such-status", "created_at": 1, "models": "echo"})
    redis_client.zadd(JOBS_ACTIVE_KEY, {job_id: time.time()})
    _wait_for(lambda: redis_client.hget(job_key(job_id), "status") == b"failed", "the broken job to be failed")
    broken = client.batches.retrieve(job_id)
    assert broken.errors
    assert "could not run this job" in broken.errors[0]
    assert "no-such-status" in broken.errors[0]
    assert scheduler.proc.poll() is None
    assert f"fault {MAX_JOB_FAULTS} of {MAX_JOB_FAULTS}" in scheduler.log_path.read_text()
    job = client.batches.create([_line("ok", "echo")])
    assert client.batches.wait(job.id, timeout=60, poll_s=0.1).status == JobStatus.COMPLETED


# -- 2: recovery recounts atomically, and runs once ----------------------------------------------------


def test_recovery_runs_at_start_up_only_and_recounts_atomically(private_redis: EmbeddedRedis) -> None:
    settings = Settings(redis_url=private_redis.url)
    registry = Registry.from_settings(settings)
    client = redis.Redis.from_url(private_redis.url)
    celery = create_celery_app(settings)
    store = JobStore(client, settings.result_ttl_s)
    # No worker serves echo here: dispatched chunks stay in the queue, where they can be counted.
    with Client(settings=settings) as pool_client:
        job = pool_client.batches.create([_line(f"r{i}", "echo") for i in range(30)])
    service = Scheduler(client, settings, registry, celery)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), kwargs={"idle_sleep_s": 0.05})
    thread.start()
    try:
        _wait_for(lambda: client.zcard(job_inflight_since_key(job.id)) == 30, "the job to be dispatched")
        queued = _queued(client, "echo")
        time.sleep(1.5)  # appendfsync everysec
        private_redis.restart()  # the scheduler's next calls fail; it waits and carries on
        time.sleep(4.0)
        assert _queued(client, "echo") == queued  # nothing re-sent: recovery did not run again
        assert client.zcard(job_inflight_since_key(job.id)) == 30
    finally:
        stop.set()
        thread.join(timeout=30)

    # Results written while recovery recounts never leave a count that nothing frees.
    job_id = new_id("batch")
    store.create(job_id, NewJob(window_s=3600, window_label="1h"))
    items = [TaskItem(request_id=new_id("req"), custom_id=f"q{i}", request=_request(i)) for i in range(600)]
    store.add_pending(job_id, items, ["echo"])
    taken = store.take_pending(job_id, "echo", 600)
    assert len(taken) == 600
    writer = ResultWriter(client)
    done = threading.Event()

    def answer_all() -> None:
        for start in range(0, 600, 10):
            records = [_error_record(item.request_id) for item in items[start : start + 10]]
            writer.write_records(job_id, "echo", records, 600)
            time.sleep(0.002)
        done.set()

    writer_thread = threading.Thread(target=answer_all)
    writer_thread.start()
    recounts = 0
    while not done.is_set():
        service.recover()
        recounts += 1
    writer_thread.join()
    assert recounts > 1
    assert client.hlen(job_items_key(job_id)) == 0
    counts = {k.decode(): int(v) for k, v in client.hgetall(MODEL_INFLIGHT_KEY).items()}
    assert counts.get("echo", 0) == client.zcard(job_inflight_since_key(job.id))  # only the first job's 30
    celery.close()
    client.close()


def _request(i: int) -> ChatRequest:
    return ChatRequest.model_validate({"model": "echo", "messages": [{"role": "user", "content": f"r {i}"}]})


def _error_record(request_id: str) -> ResultRecord:
    payload = json.dumps({"request_id": request_id, "error": {"code": "x", "message": "y"}}).encode()
    return ResultRecord(request_id, False, 0, 0, 0.0, 0.01, payload)


# -- 5: a cancelling job whose chunk was lost still finishes ---------------------------------------------


def test_a_cancelling_job_with_a_lost_chunk_finishes(private_redis: EmbeddedRedis, tmp_path: Path) -> None:
    env = {"INFERPOOL_RESEND_STALE_AFTER_S": "1"}
    scheduler = start_scheduler_process(private_redis.url, tmp_path / "scheduler.log", env)
    worker: WorkerProcess | None = None
    client = Client(settings=Settings(redis_url=private_redis.url))
    try:
        job = client.batches.create([_line(f"c{i}", "echo-slow") for i in range(20)])
        _wait_for(lambda: client.redis.zcard(job_inflight_since_key(job.id)) == 20, "the job to be dispatched")
        client.redis.delete(*model_queues("echo-slow"))  # its chunks are lost (a Redis without AOF, say)
        assert client.batches.cancel(job.id).status == JobStatus.CANCELLING
        worker = start_worker_process("echo-slow", private_redis.url, tmp_path / "worker.log")
        wait_for_workers(client.redis, [worker], 120)
        done = client.batches.wait(job.id, timeout=90, poll_s=0.2)
        output = list(client.batches.results(job.id))
    finally:
        client.close()
        if worker is not None:
            stop_process(worker.proc, grace_s=10)
        stop_process(scheduler.proc, grace_s=10)
    assert done.status == JobStatus.CANCELLED
    assert done.request_counts.model_dump() == {"total": 20, "completed": 0, "failed": 20}
    assert sorted(line.custom_id or "" for line in output) == sorted(f"c{i}" for i in range(20))
    assert {line.error.code for line in output if line.error} == {"batch_cancelled"}


# -- 7: no keyspace scans on hot paths --------------------------------------------------------------------


def _scans(client: redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


@pytest.mark.usefixtures("echo_worker", "scheduler")
def test_scheduling_and_load_reads_never_scan_the_keyspace(client: Client, redis_client: redis.Redis) -> None:
    before = _scans(redis_client)
    job = client.batches.create([_line(f"s{i}", "echo") for i in range(50)])
    client.batches.wait(job.id, timeout=60, poll_s=0.1)
    # No worker serves echo-vision-cheap: the cancelled job drops its pending lines, then expires.
    cancelled = client.batches.create([_line(f"x{i}", "echo-vision-cheap") for i in range(30)], completion_window="3s")
    client.batches.cancel(cancelled.id)
    loads = read_model_load(redis_client, ["echo", "echo-slow"])
    assert loads[0].live_workers >= 1
    assert client.batches.wait(cancelled.id, timeout=30, poll_s=0.2).status == JobStatus.CANCELLED
    time.sleep(2.5)  # the scheduler refreshes live-worker counts every 2 s
    assert _scans(redis_client) == before
