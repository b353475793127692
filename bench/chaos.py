"""Reliability under faults: one table of lines, answered, lost, duplicated and usage drift per scenario.

    python bench/chaos.py --lines 3000 --soak-lines 1000000 --markdown docs/reliability.md

Each scenario runs a batch job on its own pool (private Redis with AOF, scheduler, workers: real
processes) while something is broken on purpose, then reads every output line back:

- answered: distinct request ids with a result; lost = lines - answered; duplicated = results beyond
  one per request id or per custom_id (both must be 0);
- usage drift: |requests counted in the job's usage - lines| + |prompt and completion tokens counted -
  the tokens the answers carry| (must be 0).

Scenarios: worker SIGKILLed mid-chunk (5 times), scheduler SIGKILLed (3 times), Redis SIGKILLed and
restarted from its AOF, provider faults (429, 500, timeouts, garbled bodies, 20% of calls, through the
OpenAI emulator and the official SDK), hostile lines (10% of the input), SIGTERM during a chunk, and a
soak (``--soak-lines``) with the RSS of the client, scheduler, worker and Redis sampled every second.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from inferpool import Client, JobStatus
from inferpool.emulators import EmulatorConfig, ProviderEmulator
from inferpool.plumbing.local_pool import LocalPool, start_scheduler_process, start_worker_process

BENCH = Path(__file__).resolve().parent
REGISTRY = BENCH / "chaos_registry.yaml"
KEY = "sk-chaos-bench"


@dataclass
class Row:
    scenario: str
    lines: int
    answered: int = 0
    lost: int = 0
    duplicated: int = 0
    usage_drift: int = 0
    seconds: float = 0.0
    note: str = ""
    peaks_mb: dict[str, float] = field(default_factory=dict)


def line(i: int, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": f"chaos line {i}"}], "max_tokens": 8}
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


def hostile(i: int) -> str:
    kinds = ["{not json", "[" * 50_000 + "]" * 50_000, '{"custom_id": "x' + str(i) + '", "body": ' + "9" * 5000 + "}",
             json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}}),
             json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "echo-chaos", "messages": [{"role": "user"}]}})]  # fmt: skip
    return kinds[i % len(kinds)]


def verify(client: Client, job_id: str, lines: int, started: float, timeout_s: float) -> Row:
    """Wait for the job, then read every result back (streamed: a million results never sit in memory)."""
    job = client.batches.wait(job_id, timeout=timeout_s, poll_s=0.5)
    seconds = time.monotonic() - started
    request_ids: set[str] = set()
    custom_ids: set[str] = set()
    results = twice = prompt = completion = 0
    for result in client.batches.request_results(job_id):
        results += 1
        request_ids.add(result.request_id)
        if result.custom_id is not None:
            twice += result.custom_id in custom_ids
            custom_ids.add(result.custom_id)
        if result.usage is not None:
            prompt += result.usage.prompt_tokens
            completion += result.usage.completion_tokens
    # One result per request id; a line written twice would show its request id (or custom_id) twice.
    answered = len(request_ids)
    counted_requests = sum(row.requests for row in job.usage)
    counted_prompt = sum(row.prompt_tokens for row in job.usage)
    counted_completion = sum(row.completion_tokens for row in job.usage)
    drift = abs(counted_requests - lines) + abs(counted_prompt - prompt) + abs(counted_completion - completion)
    row = Row("", lines, answered, max(0, lines - answered), max(results - answered, twice), drift, seconds)
    row.note = f"{job.status.value}: {job.request_counts.completed} ok, {job.request_counts.failed} errors"
    if job.status != JobStatus.COMPLETED:
        row.note += " (not completed!)"
    return row


@contextmanager
def pool(models: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[LocalPool, Client]]:
    full_env = {"INFERPOOL_REGISTRY": str(REGISTRY), "INFERPOOL_VISIBILITY_TIMEOUT_S": "4",
                "INFERPOOL_RESEND_STALE_AFTER_S": "10", "INFERPOOL_LOG_LEVEL": "WARNING", **(env or {})}  # fmt: skip
    os.environ["INFERPOOL_REGISTRY"] = str(REGISTRY)  # the client routes with the same registry
    with LocalPool(models, env=full_env, redis_appendonly=True) as local, Client(local.redis_url) as client:
        yield local, client


def wait_done(client: Client, job_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 120
    while client.batches.retrieve(job_id).finished < at_least and time.monotonic() < deadline:
        time.sleep(0.05)


def run_job(name: str, n: int, models: list[str], fault: Callable[[LocalPool, Client, str], str],
            env: dict[str, str] | None = None, model: str = "echo-chaos",
            make_lines: Callable[[int], list[str]] | None = None) -> Row:  # fmt: skip
    with pool(models, env) as (local, client):
        lines = make_lines(n) if make_lines else [line(i, model) for i in range(n)]
        started = time.monotonic()
        job = client.batches.create(lines)
        note = fault(local, client, job.id)
        row = verify(client, job.id, n, started, timeout_s=600)
    row.scenario, row.note = name, f"{note}; {row.note}"
    return row


def kill_workers(times: int, sig: signal.Signals = signal.SIGKILL) -> Callable[[LocalPool, Client, str], str]:
    def fault(local: LocalPool, client: Client, job_id: str) -> str:
        total = client.batches.retrieve(job_id).request_counts.total or 1
        for k in range(times):
            wait_done(client, job_id, min(total - 1, (k + 1) * total // (times + 2)))
            victim = local.workers[0]
            os.killpg(victim.proc.pid, sig)
            victim.proc.wait(timeout=60)
            local.workers[0] = start_worker_process(victim.model, local.redis_url,
                                                    local.workdir / f"worker-{k}.log", env=local.env)  # fmt: skip
        return f"{times} x {sig.name} to the worker"

    return fault


def kill_scheduler(local: LocalPool, client: Client, job_id: str) -> str:
    for k in range(3):
        wait_done(client, job_id, (k + 1) * 500)
        assert local.scheduler is not None
        os.killpg(local.scheduler.proc.pid, signal.SIGKILL)
        local.scheduler.proc.wait(timeout=10)
        local.scheduler = start_scheduler_process(local.redis_url, local.workdir / f"scheduler-{k}.log", local.env)
    return "3 x SIGKILL to the scheduler"


def kill_redis(local: LocalPool, client: Client, job_id: str) -> str:
    wait_done(client, job_id, 800)
    time.sleep(1.1)  # appendfsync everysec: what the last second wrote may be lost, as in production
    assert local.redis.proc is not None
    os.killpg(local.redis.proc.pid, signal.SIGKILL)
    local.redis.proc.wait(timeout=10)
    local.redis.proc = None
    time.sleep(2.0)
    local.redis.start()
    return "Redis SIGKILLed, restarted from its AOF 2 s later"


def no_fault(local: LocalPool, client: Client, job_id: str) -> str:
    return "none"


def provider_faults(n: int) -> Row:
    config = EmulatorConfig(api_keys=[KEY], faults={"429": 0.05, "500": 0.05, "timeout": 0.05, "garbage": 0.05},
                            timeout_sleep_s=3.0)  # fmt: skip
    emulator = ProviderEmulator(config).start()
    try:
        env = {"OPENAI_BASE_URL": emulator.openai_base_url, "OPENAI_API_KEY": KEY}
        row = run_job("provider faults 20%", n, ["gpt-chaos"], no_fault, env, model="gpt-chaos")
        row.note = f"{sum(v for k, v in emulator.counts.items() if k.startswith('fault_'))} faults injected; {row.note}"
    finally:
        emulator.stop()
    return row


def hostile_lines(n: int) -> list[str]:
    rng = random.Random(7)
    return [hostile(i) if rng.random() < 0.1 else line(i, "echo-chaos") for i in range(n)]


def sample_rss(local: LocalPool, client_proc: psutil.Process, stop: threading.Event, peaks: dict[str, float]) -> None:
    while not stop.is_set():
        procs = {"client": client_proc, "redis": psutil.Process(local.redis.proc.pid) if local.redis.proc else None,
                 "scheduler": psutil.Process(local.scheduler.proc.pid) if local.scheduler else None,
                 "worker": psutil.Process(local.workers[0].proc.pid) if local.workers else None}  # fmt: skip
        for name, proc in procs.items():
            try:
                if proc is not None:
                    peaks[name] = max(peaks.get(name, 0.0), proc.memory_info().rss / 2**20)
            except psutil.Error:
                continue
        stop.wait(1.0)


def soak(n: int) -> Row:
    with pool(["echo-chaos-fast"]) as (local, client):
        peaks: dict[str, float] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(local, psutil.Process(), stop, peaks), daemon=True)
        sampler.start()
        started = time.monotonic()
        job = client.batches.create(line(i, "echo-chaos-fast") for i in range(n))
        client.batches.wait(job.id, timeout=3600, poll_s=1.0)
        stop.set()  # RSS while the job runs; reading a million results back below is the bench's own work
        row = verify(client, job.id, n, started, timeout_s=60)
        memory = client.redis.info("memory")
        redis_peak, redis_end = int(memory["used_memory_peak"]) / 2**20, int(memory["used_memory"]) / 2**20
    row.scenario = f"soak {n:,} lines"
    row.peaks_mb = {**peaks, "redis used_memory_peak": redis_peak, "redis used_memory at the end": redis_end}
    row.note = "peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in row.peaks_mb.items()) + f"; {row.note}"
    return row


def table(rows: list[Row]) -> str:
    out = ["| scenario | lines | answered | lost | duplicated | usage drift | time s | notes |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    out += [f"| {r.scenario} | {r.lines} | {r.answered} | {r.lost} | {r.duplicated} | {r.usage_drift} | "
            f"{r.seconds:.1f} | {r.note} |" for r in rows]  # fmt: skip
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=3000, help="lines per fault scenario")
    parser.add_argument("--soak-lines", type=int, default=1_000_000, help="lines of the soak (0: no soak)")
    parser.add_argument("--only", nargs="*", default=None, help="run only scenarios whose name starts so")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    n = args.lines
    scenarios: list[tuple[str, Callable[[], Row]]] = [
        ("worker", lambda: run_job("worker SIGKILL x5", n, ["echo-chaos"], kill_workers(5))),
        ("scheduler", lambda: run_job("scheduler SIGKILL x3", n, ["echo-chaos"], kill_scheduler)),
        ("redis", lambda: run_job("Redis SIGKILL + AOF restart", n, ["echo-chaos"], kill_redis)),
        ("provider", lambda: provider_faults(n)),
        ("hostile", lambda: run_job("hostile lines 10%", n, ["echo-chaos"], no_fault, make_lines=hostile_lines)),
        ("sigterm", lambda: run_job("worker SIGTERM x3", n, ["echo-chaos"], kill_workers(3, signal.SIGTERM))),
    ]
    if args.soak_lines:
        scenarios.append(("soak", lambda: soak(args.soak_lines)))
    rows = []
    for name, scenario in scenarios:
        if args.only is None or any(name.startswith(prefix) for prefix in args.only):
            rows.append(scenario())
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
          f"{sys.version.split()[0]}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    bad = [r.scenario for r in rows if r.lost or r.duplicated or r.usage_drift]
    if bad:
        raise SystemExit(f"lost, duplicated or drifted: {', '.join(bad)}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
