"""Several hosts, built from Linux network namespaces on this machine: Redis on one, the scheduler on
another, echo workers on two more and the client on a fifth, joined by a bridge and veth pairs this test
creates (addresses only on those links). Mid-job one worker host is cut off (its link down), then its
processes are killed; the job still completes with every line answered once and usage counted once.

Needs root (or CAP_NET_ADMIN) and the ``ip`` command; skipped, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from inferpool.constants import job_key, worker_heartbeats_key
from inferpool.plumbing.local_pool import find_redis_server, stop_process

from .conftest import wait_until

SUBNET = "10.77.{net}.{host}"
CLIENT_SCRIPT = """
import json, sys
from inferpool import Client, Settings
lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "echo-slow", "messages": [{"role": "user", "content": f"line {i}"}]}} for i in range(400)]
with Client(settings=Settings(redis_url=sys.argv[1])) as client:
    job = client.batches.create(lines)
    print(job.id, flush=True)
    done = client.batches.wait(job.id, timeout=300)
    ids = [line.custom_id for line in client.batches.results(job.id)]
    print(json.dumps({"status": done.status.value, "counts": done.request_counts.model_dump(), "ids": ids,
                      "usage": [row.requests for row in done.usage]}), flush=True)
"""


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class Hosts:
    """Namespaces on one bridge; host n has address 10.77.<net>.n."""

    tag: str
    net: int
    names: dict[str, int] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"ipb{self.tag}"

    def address(self, host: str) -> str:
        return SUBNET.format(net=self.net, host=self.names[host])

    def add(self, host: str, number: int) -> None:
        namespace, outside, inside = f"ip{self.tag}{host}", f"ipv{self.tag}{number}", f"ipp{self.tag}{number}"
        _run("ip", "netns", "add", namespace)
        self.names[host] = number
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _run("ip", "link", "set", inside, "netns", namespace)
        _run("ip", "link", "set", outside, "master", self.bridge)
        _run("ip", "link", "set", outside, "up")
        _run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{self.address(host)}/24", "dev", inside)
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", inside, "up")
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        """Take the host's link down: nothing it sends or should receive arrives any more."""
        _run("ip", "link", "set", f"ipv{self.tag}{self.names[host]}", "down")

    def start(self, host: str, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", f"ip{self.tag}{host}", *command], stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **env},
                                    start_new_session=True)  # fmt: skip
        self.processes.append(proc)
        return proc

    def remove(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                stop_process(proc, grace_s=5)  # type: ignore[arg-type]
        for host, number in self.names.items():
            # The outer end first: a namespace can outlive its name (the kernel frees it lazily), and with it
            # the veth pair; deleting one end deletes both.
            subprocess.run(["ip", "link", "del", f"ipv{self.tag}{number}"], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", f"ip{self.tag}{host}"], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)


def _allow_forwarding(bridge: str) -> Callable[[], object]:
    """Let frames cross this test's bridge whatever the host's FORWARD policy: where br_netfilter is loaded
    (Docker loads it and sets the policy to DROP), bridged frames pass iptables' FORWARD chain, and the
    namespaces could not reach each other. The rule names only this bridge; the returned call removes it."""
    iptables = shutil.which("iptables")
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    if iptables is None:  # no iptables: no policy was set through it either (nft-only hosts are not handled)
        return lambda: None
    try:
        _run(iptables, "-I", *rule)
    except (subprocess.CalledProcessError, OSError):
        return lambda: None
    return lambda: subprocess.run([iptables, "-D", *rule], capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed: cannot build hosts from network namespaces")
    made = Hosts(tag=secrets.token_hex(2), net=secrets.randbelow(200) + 20)
    try:
        _run("ip", "link", "add", made.bridge, "type", "bridge")
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create network interfaces here (needs root or CAP_NET_ADMIN): {exc}")
    disallow = _allow_forwarding(made.bridge)
    try:
        _run("ip", "addr", "add", f"{SUBNET.format(net=made.net, host=254)}/24", "dev", made.bridge)  # the test's
        _run("ip", "link", "set", made.bridge, "up")
        for number, host in enumerate(("redis", "scheduler", "worker1", "worker2", "client"), start=1):
            made.add(host, number)
        yield made
    finally:
        made.remove()
        disallow()


def test_a_job_survives_losing_a_worker_host(hosts: Hosts, tmp_path: Path) -> None:
    password = secrets.token_urlsafe(16)
    config = tmp_path / "redis.conf"
    redis_address = hosts.address("redis")
    config.write_text(f'port 6379\nbind {redis_address}\nrequirepass {password}\ndir "{tmp_path}"\nsave ""\n')
    hosts.start("redis", [find_redis_server(), str(config)], tmp_path / "redis.log", {})
    url = f"redis://:{password}@{redis_address}:6379/0"
    observer = redis.Redis.from_url(url, socket_connect_timeout=2)  # the test itself sits on the bridge too
    wait_until(lambda: _answers(observer), 30, "redis did not start on its host")
    env = {"INFERPOOL_VISIBILITY_TIMEOUT_S": "4", "INFERPOOL_RESEND_STALE_AFTER_S": "6", "REDIS_URL": url,
           "INFERPOOL_HEARTBEAT_TTL_S": "3"}  # fmt: skip
    inferpool = [sys.executable, "-m", "inferpool"]
    hosts.start("scheduler", [*inferpool, "scheduler"], tmp_path / "scheduler.log", env)
    doomed = hosts.start("worker1", [*inferpool, "worker", "--model", "echo-slow"], tmp_path / "worker1.log", env)
    hosts.start("worker2", [*inferpool, "worker", "--model", "echo-slow"], tmp_path / "worker2.log", env)
    wait_until(lambda: observer.zcard(worker_heartbeats_key("echo-slow")) >= 2, 120, "the workers did not start")
    client_log = tmp_path / "client.log"
    client = hosts.start("client", [sys.executable, "-c", CLIENT_SCRIPT, url], client_log, {})
    wait_until(lambda: client_log.read_text().strip() != "", 60, "the client did not submit its job")
    job_id = client_log.read_text().split()[0]
    wait_until(lambda: int(observer.hget(job_key(job_id), "completed") or 0) >= 60, 120, "no progress")
    hosts.cut("worker1")
    time.sleep(1.0)  # the cut-off host keeps its chunks in hand; nothing it answers arrives
    os.killpg(doomed.pid, signal.SIGKILL)
    assert client.wait(timeout=300) == 0, client_log.read_text()[-3000:]
    summary = json.loads(client_log.read_text().strip().splitlines()[-1])
    assert summary["status"] == "completed"
    assert summary["counts"] == {"total": 400, "completed": 400, "failed": 0}
    assert sorted(summary["ids"]) == sorted(f"l{i}" for i in range(400))
    assert summary["usage"] == [400]


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
