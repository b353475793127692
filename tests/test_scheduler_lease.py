"""Several schedulers: one leads through a Redis lease, another takes over when it dies, and a deposed
leader's dispatch is fenced off. Real scheduler and worker processes on a Redis of their own (the
session's scheduler must not take part)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inferpool import Client, Settings
from inferpool.constants import SCHEDULER_LEASE_KEY
from inferpool.plumbing.local_pool import EmbeddedRedis, start_scheduler_process, start_worker_process, stop_process
from inferpool.scheduler.lease import SchedulerLease, lease_holder
from inferpool.state.jobs import JobStore
from inferpool.state.leader_fence import NotLeader

from .conftest import assert_answered_once, echo_slow_lines, wait_until

LEASE_S = 2.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_a_deposed_leader_cannot_dispatch(own_redis: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(own_redis.url)
    store = JobStore(client, 3600)
    first, second = SchedulerLease(client, "first", 5), SchedulerLease(client, "second", 5)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert store.take_pending("batch_x", "echo", 5, fence=first.value or "") == []
    client.delete(SCHEDULER_LEASE_KEY)  # as if its lease lapsed while it was paused or cut off
    assert second.try_acquire()
    assert int((second.value or "0").partition("|")[0]) > int((first.value or "0").partition("|")[0])
    with pytest.raises(NotLeader):
        store.take_pending("batch_x", "echo", 5, fence=first.value or "")
    with pytest.raises(NotLeader):
        store.take_stale_inflight("batch_x", 0.0, fence=first.value or "")
    assert store.take_pending("batch_x", "echo", 5, fence=second.value or "") == []
    assert not first.renew()
    assert not first.held
    second.release()
    assert lease_holder(client) is None


def test_another_scheduler_takes_over_when_the_leader_dies(own_redis: EmbeddedRedis, tmp_path: Path) -> None:
    env = {"INFERPOOL_SCHEDULER_LEASE_S": str(LEASE_S)}
    client = redis.Redis.from_url(own_redis.url)
    worker = start_worker_process("echo-slow", own_redis.url, tmp_path / "worker.log")
    leader = start_scheduler_process(own_redis.url, tmp_path / "scheduler-a.log", env)
    standby = None
    try:
        wait_until(lambda: lease_holder(client) is not None, 60, "no scheduler took the lease")
        assert lease_holder(client) == f"{socket.gethostname()}-{leader.proc.pid}"
        standby = start_scheduler_process(own_redis.url, tmp_path / "scheduler-b.log", env)
        with Client(settings=Settings(redis_url=own_redis.url)) as pool:
            job = pool.batches.create(echo_slow_lines(300))
            wait_until(lambda: pool.batches.retrieve(job.id).finished >= 40, 120, "the job made no progress")
            os.killpg(leader.proc.pid, signal.SIGKILL)
            leader.proc.wait(timeout=10)
            assert pool.batches.retrieve(job.id).finished < 300  # the rest needs a scheduler to dispatch it
            wait_until(lambda: lease_holder(client) == f"{socket.gethostname()}-{standby.proc.pid}",  # type: ignore[union-attr]
                       60, "the standby did not take the lease")  # fmt: skip
            done = pool.batches.wait(job.id, timeout=180)
            outputs = list(pool.batches.results(job.id))
        assert_answered_once(done, [line.custom_id for line in outputs], 300)
        stop_process(standby.proc, grace_s=15)
        assert standby.proc.returncode == 0, standby.log_path.read_text()[-2000:]
        assert lease_holder(client) is None  # a scheduler stopping gracefully hands the lease on at once
    finally:
        for process in (leader, standby, worker):
            if process is not None:
                stop_process(process.proc, grace_s=10)
