"""Starting the plain-Celery baseline's worker (bench/plain_celery_app.py), the same way for every bench."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def start_plain_celery_worker(env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``celery -A plain_celery_app worker -P threads -c 4`` (the fastest plain setup we found here)."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "plain_celery_app", "worker", "-P", "threads", "-c", "4",
         "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        cwd=BENCH, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


@contextlib.contextmanager
def echo_beside_plain_celery(prefix: str) -> Iterator[str]:
    """A private Redis with an inferpool echo worker and a plain Celery worker side by side (both started and
    stopped here); yields the Redis URL. ``plain_celery_app`` reads it from ``REDIS_URL`` when first imported."""
    from inferpool.plumbing.local_pool import EmbeddedRedis, start_worker_process, stop_process, wait_for_workers
    from inferpool.plumbing.redis_connection import connect_redis

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        server = EmbeddedRedis(workdir / "redis")
        server.start()
        os.environ["REDIS_URL"] = server.url
        from plain_celery_app import app

        env = {**os.environ, "INFERPOOL_LOG_LEVEL": "WARNING"}
        worker = start_worker_process("echo", server.url, workdir / "worker.log", env=env)
        plain = start_plain_celery_worker(env)
        try:
            wait_for_workers(connect_redis(server.url), [worker], 120)
            yield server.url
        finally:
            stop_process(worker.proc, grace_s=10)
            stop_process(plain, grace_s=10)
            app.close()
            server.stop()
