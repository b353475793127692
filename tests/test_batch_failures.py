"""Killing things for real in the middle of a batch job: every line still ends exactly once.

Each test runs its own pool (private Redis, scheduler, worker) with a short broker visibility timeout, so
a chunk held by a killed worker is redelivered within seconds instead of an hour.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from inferpool import Client, JobStatus
from inferpool.constants import MODEL_INFLIGHT_KEY, job_items_key, model_queues
from inferpool.plumbing.local_pool import LocalPool, start_scheduler_process, start_worker_process

N_LINES = 1500
# A killed scheduler's lease lapses after 1 s, so its replacement leads (and recovers) soon after it starts.
POOL_ENV = {"INFERPOOL_VISIBILITY_TIMEOUT_S": "4", "INFERPOOL_SCHEDULER_LEASE_S": "1"}


def _lines(n: int) -> list[str]:
    return [
        json.dumps(
            {
                "custom_id": f"k{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "echo-slow",
                    "messages": [{"role": "user", "content": f"kill test {i}"}],
                    "max_tokens": 8,
                },
            }
        )
        for i in range(n)
    ]


@pytest.fixture
def pool() -> Iterator[LocalPool]:
    with LocalPool(["echo-slow"], env=POOL_ENV) as local:
        yield local


def _wait_until_some_done(client: Client, job_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 120
    while client.batches.retrieve(job_id).finished < at_least:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.02)


def _assert_exactly_once(client: Client, job_id: str) -> None:
    done = client.batches.wait(job_id, timeout=240, poll_s=0.2)
    assert done.status == JobStatus.COMPLETED
    assert done.request_counts.model_dump() == {"total": N_LINES, "completed": N_LINES, "failed": 0}
    output = list(client.batches.results(job_id))
    assert Counter(o.custom_id for o in output) == Counter(f"k{i}" for i in range(N_LINES))
    assert all(o.response is not None and o.response.body.text == f"echo: kill test {o.custom_id[1:]}"
               for o in output if o.custom_id)  # fmt: skip
    assert len({r.request_id for r in client.batches.request_results(job_id)}) == N_LINES  # one result each
    [usage] = done.usage
    assert (usage.model, usage.requests, usage.errors) == ("echo-slow", N_LINES, 0)
    assert usage.prompt_tokens == 3 * N_LINES
    assert usage.completion_tokens == 4 * N_LINES  # "echo: kill test N"
    # The pool-wide daily counters agree (this pool's Redis saw only this job).
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    [daily] = client.usage(yesterday)
    assert (daily.tenant, daily.model, daily.requests, daily.errors) == ("default", "echo-slow", N_LINES, 0)
    assert (daily.prompt_tokens, daily.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert client.redis.hlen(job_items_key(job_id)) == 0
    assert int(client.redis.hget(MODEL_INFLIGHT_KEY, "echo-slow") or 0) == 0


def test_sigkilled_worker_mid_job(pool: LocalPool) -> None:
    with Client(pool.redis_url) as client:
        job = client.batches.create(_lines(N_LINES))
        _wait_until_some_done(client, job.id, 200)
        victim = pool.workers[0]
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        at_kill = client.batches.retrieve(job.id).finished
        assert at_kill < N_LINES
        # Requests the dead worker held are still in flight: nobody answers them until redelivery.
        assert client.redis.hlen(job_items_key(job.id)) > 0
        pool.workers[0] = start_worker_process("echo-slow", pool.redis_url, pool.workdir / "worker-2.log", env=POOL_ENV)
        _assert_exactly_once(client, job.id)


def test_scheduler_killed_and_restarted_mid_job(pool: LocalPool) -> None:
    assert pool.scheduler is not None
    with Client(pool.redis_url) as client:
        job = client.batches.create(_lines(N_LINES))
        _wait_until_some_done(client, job.id, 200)
        os.killpg(pool.scheduler.proc.pid, signal.SIGKILL)
        pool.scheduler.proc.wait(timeout=10)
        time.sleep(1.0)  # in-flight chunks drain; nothing new is dispatched while the scheduler is down
        stalled = client.batches.retrieve(job.id).finished
        assert stalled < N_LINES
        pool.scheduler = start_scheduler_process(pool.redis_url, pool.workdir / "scheduler-2.log", POOL_ENV)
        _assert_exactly_once(client, job.id)


def test_redelivered_chunk_counts_usage_once(pool: LocalPool) -> None:
    """A restarted scheduler re-sends in-flight requests; answered ones are skipped, not counted again."""
    assert pool.scheduler is not None
    with Client(pool.redis_url) as client:
        job = client.batches.create(_lines(N_LINES))
        _wait_until_some_done(client, job.id, 100)
        for _ in range(3):  # restart it several times while work is in flight
            os.killpg(pool.scheduler.proc.pid, signal.SIGKILL)
            pool.scheduler.proc.wait(timeout=10)
            pool.scheduler = start_scheduler_process(pool.redis_url, pool.workdir / "scheduler-n.log", POOL_ENV)
            time.sleep(2.0)  # the killed one's lease lapses (1 s) and this one leads and re-sends what is in flight
        _assert_exactly_once(client, job.id)


def test_redis_restart_mid_job() -> None:
    """Redis (with AOF) stops and comes back mid-job: workers, scheduler and client ride through it."""
    env = {**POOL_ENV, "INFERPOOL_RESEND_STALE_AFTER_S": "10"}
    with LocalPool(["echo-slow"], env=env, redis_appendonly=True) as pool, Client(pool.redis_url) as client:
        job = client.batches.create(_lines(N_LINES))
        _wait_until_some_done(client, job.id, 200)
        pool.redis.restart()
        _assert_exactly_once(client, job.id)
        assert all(worker.proc.poll() is None for worker in pool.workers)
        assert pool.scheduler is not None
        assert pool.scheduler.proc.poll() is None


def test_lost_chunks_are_resent_after_the_stale_limit() -> None:
    """Chunks that vanish from the broker (here: deleted with their worker killed) are re-sent."""
    env = {**POOL_ENV, "INFERPOOL_RESEND_STALE_AFTER_S": "3"}
    with LocalPool(["echo-slow"], env=env) as pool, Client(pool.redis_url) as client:
        job = client.batches.create(_lines(N_LINES))
        _wait_until_some_done(client, job.id, 200)
        victim = pool.workers[0]
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        # kombu's Redis transport keeps queued messages in a list named after the queue and unacked ones
        # in these two keys: without them, no redelivery can happen.
        client.redis.delete(*model_queues("echo-slow"), "unacked", "unacked_index")
        assert client.redis.hlen(job_items_key(job.id)) > 0
        pool.workers[0] = start_worker_process("echo-slow", pool.redis_url, pool.workdir / "worker-2.log", env=env)
        _assert_exactly_once(client, job.id)


def test_a_pipeline_through_killed_schedulers_and_a_killed_worker(pool: LocalPool) -> None:
    """The pipeline driver lives in the scheduler: killed while rows flow between steps (and a worker with it),
    every row's every step still runs once and the pipeline completes."""
    assert pool.scheduler is not None
    rows = 300
    steps = [{"name": f"s{n}", "model": "echo-slow", "params": {"max_tokens": 64},
              "messages": [{"role": "user", "content": f"s{n} {{{{ {source} }}}}"}]}
             for n, source in enumerate(["text", "steps.s0.answer", "steps.s1.answer"])]  # fmt: skip
    with Client(pool.redis_url) as client:
        run = client.pipelines.create({"steps": steps}, [{"text": f"r{i}"} for i in range(rows)])
        deadline = time.monotonic() + 120
        while client.pipelines.retrieve(run.id).steps[1].settled < 30:
            assert time.monotonic() < deadline, "the pipeline made no progress"
            time.sleep(0.02)
        assert client.pipelines.retrieve(run.id).steps[2].settled < rows
        for _ in range(3):  # the driver dies between reading results and deciding rows, at some point
            os.killpg(pool.scheduler.proc.pid, signal.SIGKILL)
            pool.scheduler.proc.wait(timeout=10)
            pool.scheduler = start_scheduler_process(pool.redis_url, pool.workdir / "scheduler-p.log", POOL_ENV)
            time.sleep(1.5)
        os.killpg(pool.workers[0].proc.pid, signal.SIGKILL)
        pool.workers[0].proc.wait(timeout=10)
        pool.workers[0] = start_worker_process("echo-slow", pool.redis_url, pool.workdir / "worker-p.log", env=POOL_ENV)
        final = client.pipelines.wait(run.id, timeout=240, poll_s=0.2)
        assert final.status.value == "completed"
        for step in final.steps:
            job = client.batches.retrieve(step.job_id)
            assert job.request_counts.model_dump() == {"total": rows, "completed": rows, "failed": 0}
            ids = [r.custom_id for r in client.batches.request_results(step.job_id)]
            assert Counter(ids) == Counter(str(n) for n in range(1, rows + 1))  # each row's step answered once
        for row in client.pipelines.results(run.id):
            last = row.steps["s2"]
            assert last is not None
            assert last.answer == f"echo: s2 echo: s1 echo: s0 r{row.row_number - 1}"
