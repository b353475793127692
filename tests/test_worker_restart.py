"""A worker whose Celery consumer stops on an "unrecoverable" error it was not asked for starts it again and
goes on serving (seen in CI: kombu's transport raised AttributeError mid-failover and the worker exited)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import redis

from inferpool import Settings
from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.local_pool import stop_process
from tests.conftest import wait_until

# A real Celery worker (inferpool's run_celery_worker) whose consumer fails the first time it starts, the way
# kombu did during a Sentinel failover; its one task marks in Redis that it ran.
_WORKER = textwrap.dedent("""
    import sys
    import redis
    from celery import bootsteps
    from inferpool.plumbing.celery_app import create_celery_app
    from inferpool.plumbing.settings import Settings
    from inferpool.workers.serve import run_celery_worker

    settings = Settings(redis_url=sys.argv[1])
    app = create_celery_app(settings)
    starts = []

    class FailsOnce(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, consumer):
            starts.append(1)
            if len(starts) == 1:
                raise AttributeError("'NoneType' object has no attribute 'hostname'")

    app.steps["consumer"].add(FailsOnce)

    @app.task(name="restart_test.mark")
    def mark(value):
        redis.Redis.from_url(sys.argv[1]).set("restart-test:served", value)

    sys.exit(run_celery_worker(app, settings, ["restart-test"], 1, "restart-test@host"))
""")


def test_the_consumer_starts_again_after_an_unrecoverable_error(redis_url: str, redis_client: redis.Redis,
                                                                tmp_path: Path) -> None:  # fmt: skip
    redis_client.delete("restart-test:served")
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, redis_url], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        app = create_celery_app(Settings(redis_url=redis_url))
        app.send_task("restart_test.mark", args=["after the restart"], queue="restart-test")
        wait_until(lambda: redis_client.get("restart-test:served") is not None or proc.poll() is not None, 120,
                   "the task was not served")  # fmt: skip
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert redis_client.get("restart-test:served") == b"after the restart"
    finally:
        stop_process(proc, grace_s=30)
    text = log_path.read_text()
    assert "Unrecoverable error: AttributeError" in text
    assert "starting it again in 2 s (1 of 5)" in text
    assert proc.returncode == 0, text[-3000:]  # a warm shutdown after the restart ends cleanly
