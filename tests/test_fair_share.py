"""Fair share between tenants (issue 30): a model's window is divided between the tenants with work waiting,
by weight, however many jobs each submitted; a tenant alone gets everything. Shares are counted from the
jobs' completion streams (entry ids are Redis times), while both tenants had work."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inferpool import Client, JobStatus, Settings
from inferpool.constants import job_completed_stream_key
from inferpool.plumbing.local_pool import WorkerProcess, start_worker_process, stop_process, wait_for_workers
from inferpool.state.budgets import TenantWeights
from inferpool.state.results import stored_results

pytestmark = pytest.mark.usefixtures("scheduler")


@pytest.fixture(scope="module")
def fair_worker(redis_url: str, session_dir: Path) -> Iterator[WorkerProcess]:
    worker = start_worker_process("echo-fair", redis_url, session_dir / "worker-echo-fair.log")
    wait_for_workers(redis.Redis.from_url(redis_url), [worker], 120)
    yield worker
    stop_process(worker.proc, grace_s=30)


def _lines(tag: str, count: int) -> list[dict[str, object]]:
    return [{"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "echo-fair", "messages": [{"role": "user", "content": f"{tag} {i}"}]}}
            for i in range(count)]  # fmt: skip


def _answered_at(client: redis.Redis, job_id: str) -> list[int]:
    """When each of the job's results was written (ms, Redis time: the stream entry's id), one per result."""
    times: list[int] = []
    for entry_id, fields in client.xrange(job_completed_stream_key(job_id)):
        times += [int(entry_id.split(b"-")[0])] * len(stored_results(fields))
    return times


def _wait(client: Client, job_ids: list[str]) -> None:
    for job_id in job_ids:
        assert client.batches.wait(job_id, timeout=300).status is JobStatus.COMPLETED


@pytest.mark.usefixtures("fair_worker")
def test_a_tenant_with_one_job_gets_half_against_one_with_many(settings: Settings,
                                                                redis_client: redis.Redis) -> None:  # fmt: skip
    many = settings.model_copy(update={"tenant": "fair-many"})
    one = settings.model_copy(update={"tenant": "fair-one"})
    with Client(settings=many) as a, Client(settings=one) as b:
        a_jobs = [a.batches.create(_lines(f"a{j}-", 150)).id for j in range(4)]
        deadline = time.monotonic() + 60
        while sum(a.batches.retrieve(job).request_counts.completed for job in a_jobs) < 20:
            assert time.monotonic() < deadline, "tenant fair-many's jobs did not start"
            time.sleep(0.05)
        b_job = b.batches.create(_lines("b", 60)).id
        _wait(a, [*a_jobs, b_job])
    b_times = _answered_at(redis_client, b_job)
    start, end = min(b_times), max(b_times)
    a_during = sum(start <= t <= end for job in a_jobs for t in _answered_at(redis_client, job))
    share = len(b_times) / (len(b_times) + a_during)
    # Sharing by job would give fair-one 1/5 of the answers while it waited; by tenant, half.
    assert share >= 0.45, f"fair-one got {share:.2f} of the answers while both had work ({a_during} to fair-many)"
    assert max(t for job in a_jobs for t in _answered_at(redis_client, job)) > end  # fair-many still had work


@pytest.mark.usefixtures("fair_worker")
def test_weights_divide_the_window(settings: Settings, redis_client: redis.Redis) -> None:
    weights = TenantWeights(redis_client)
    weights.set("fair-heavy", 2)
    weights.set("fair-light", 1)
    try:
        with Client(settings=settings.model_copy(update={"tenant": "fair-heavy"})) as heavy, \
                Client(settings=settings.model_copy(update={"tenant": "fair-light"})) as light:  # fmt: skip
            time.sleep(2.5)  # the scheduler reads weights every 2 s
            jobs = [heavy.batches.create(_lines("h", 300)).id, light.batches.create(_lines("l", 300)).id]
            _wait(heavy, jobs)
    finally:
        weights.set("fair-heavy", None)
        weights.set("fair-light", None)
    heavy_times, light_times = (_answered_at(redis_client, job) for job in jobs)
    both_until = min(max(heavy_times), max(light_times))  # until the first of them ran dry
    start = max(min(heavy_times), min(light_times))
    in_both = [sum(start <= t <= both_until for t in times) for times in (heavy_times, light_times)]
    ratio = in_both[0] / in_both[1]
    assert 1.8 <= ratio <= 2.2, f"heavy:light = {in_both[0]}:{in_both[1]} = {ratio:.2f} while both had work"
