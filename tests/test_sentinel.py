"""Redis Sentinel: a pool on a primary, a replica and three sentinels (real redis-server processes on
loopback ports); the primary is killed mid-job, the sentinels promote the replica, and the job finishes
with every line answered once."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from inferpool import Client, Settings
from inferpool.plumbing.local_pool import (
    WorkerProcess,
    find_redis_server,
    free_port,
    start_scheduler_process,
    start_worker_process,
    stop_process,
)
from inferpool.plumbing.redis_connection import kombu_broker, parse_sentinel_url, redis_from_url

from .conftest import assert_answered_once, echo_slow_lines, wait_until

SERVICE = "inferpool-primary"


@dataclass
class SentinelSetup:
    password: str
    primary: subprocess.Popen[bytes]
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    processes: list[subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"sentinel://:{self.password}@{hosts}/{SERVICE}/0"

    def ready_for_failover(self) -> bool:
        views = [_sentinel_view(port) for port in self.sentinel_ports]
        return all(view.get("num-other-sentinels") == 2 and view.get("num-slaves") == 1 for view in views)

    def master_port(self) -> int | None:
        for port in self.sentinel_ports:
            try:
                found = redis.Redis(port=port, socket_connect_timeout=1).sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if found:
                return int(found[1])
        return None


def _sentinel_view(port: int) -> dict[str, object]:
    try:
        view: dict[str, object] = redis.Redis(port=port, socket_connect_timeout=1).sentinel_master(SERVICE)
    except redis.RedisError:
        return {}
    return view


def _start(executable: str, config: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([executable, str(config), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSetup]:
    executable = find_redis_server()
    password = secrets.token_urlsafe(16)
    primary_port, replica_port = free_port(), free_port()
    processes: list[subprocess.Popen[bytes]] = []
    for name, port, extra in (("primary", primary_port, []), ("replica", replica_port,
                                                              [f"replicaof 127.0.0.1 {primary_port}"])):  # fmt: skip
        config = tmp_path / f"{name}.conf"
        config.write_text("\n".join([f"port {port}", "bind 127.0.0.1", f'dir "{tmp_path}"', 'save ""',
                                     f"dbfilename {name}.rdb", "appendonly no", f"requirepass {password}",
                                     f"masterauth {password}", *extra]) + "\n")  # fmt: skip
        processes.append(_start(executable, config))
    sentinel_ports = [free_port() for _ in range(3)]
    for index, port in enumerate(sentinel_ports):
        config = tmp_path / f"sentinel-{index}.conf"
        config.write_text("\n".join([f"port {port}", "bind 127.0.0.1", f'dir "{tmp_path}"',
                                     f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
                                     f"sentinel auth-pass {SERVICE} {password}",
                                     f"sentinel down-after-milliseconds {SERVICE} 1000",
                                     f"sentinel failover-timeout {SERVICE} 5000"]) + "\n")  # fmt: skip
        processes.append(_start(executable, config, "--sentinel"))
    setup = SentinelSetup(password, processes[0], primary_port, replica_port, sentinel_ports, processes)
    replica = redis.Redis(port=replica_port, password=password)
    wait_until(lambda: _linked(replica), 30, "the replica did not sync with the primary")
    wait_until(lambda: setup.master_port() == primary_port, 30, "the sentinels do not see the primary")
    # A failover needs a quorum of sentinels that know each other and the replica: they learn both from the
    # primary (hello messages every 2 s, INFO every 10 s), so wait for it before anything kills the primary.
    wait_until(lambda: setup.ready_for_failover(), 60, "the sentinels do not know each other and the replica")
    yield setup
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _linked(replica: redis.Redis) -> bool:
    try:
        return bool(replica.info("replication").get("master_link_status") == "up")
    except redis.RedisError:
        return False


def test_sentinel_urls_are_read_and_refused_clearly() -> None:
    target = parse_sentinel_url("sentinel://:p%40ss@a:26379,b:26380/mymaster/2?sentinel_password=s")
    assert target is not None
    assert (target.sentinels, target.service, target.db, target.password, target.sentinel_password) == (
        (("a", 26379), ("b", 26380)), "mymaster", 2, "p@ss", "s")  # fmt: skip
    assert parse_sentinel_url("redis://localhost:6379/0") is None
    broker, options = kombu_broker("sentinel://:pw@a:26379,b:26380/mymaster/2")
    assert broker == "sentinel://:pw@a:26379/2;sentinel://:pw@b:26380/2"
    assert options == {"master_name": "mymaster"}
    for bad in ("sentinel://a/mymaster", "sentinel://a:26379", "sentinel://a:26379/m/x"):
        with pytest.raises(Exception, match="sentinel"):
            parse_sentinel_url(bad)


def test_a_job_survives_a_failover(sentinels: SentinelSetup, tmp_path: Path) -> None:
    env = {"INFERPOOL_VISIBILITY_TIMEOUT_S": "4", "INFERPOOL_RESEND_STALE_AFTER_S": "6",
           "INFERPOOL_SCHEDULER_LEASE_S": "2"}  # fmt: skip
    processes: list[WorkerProcess] = [
        start_worker_process("echo-slow", sentinels.url, tmp_path / "worker.log", env=env),
        start_scheduler_process(sentinels.url, tmp_path / "scheduler.log", env),
    ]
    try:
        direct = redis_from_url(sentinels.url)
        wait_until(lambda: direct.exists("inferpool:scheduler:lease"), 60, "the scheduler did not start")
        with Client(settings=Settings(redis_url=sentinels.url)) as client:
            job = client.batches.create(echo_slow_lines(300))
            wait_until(lambda: client.batches.retrieve(job.id).finished >= 40, 120, "the job made no progress")
            os.killpg(sentinels.primary.pid, signal.SIGKILL)
            sentinels.primary.wait(timeout=10)
            wait_until(lambda: sentinels.master_port() == sentinels.replica_port, 60, "no failover happened")
            done = client.batches.wait(job.id, timeout=240)
            outputs = list(client.batches.results(job.id))
        assert_answered_once(done, [line.custom_id for line in outputs], 300)
        assert all(process.proc.poll() is None for process in processes)  # both followed the new primary
    finally:
        for process in processes:
            stop_process(process.proc, grace_s=10)
