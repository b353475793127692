"""Flower as an operator sees it: a real headless Chromium loads its pages during a job.

Needs Debian's chromium (`.ci/run` installs it); skipped, with the reason, where it is missing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from celery.exceptions import Retry

from inferpool import Client, Registry, Settings
from inferpool.constants import TASK_PROCESS_CHUNK, queue_name
from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.local_pool import free_port, stop_process
from inferpool.wire import ChatRequest
from inferpool.workers import WorkerRuntime, create_backend
from inferpool.workers.tasks import install_tasks

pytestmark = [
    pytest.mark.usefixtures("scheduler", "echo_worker"),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed"),
]

REPO = Path(__file__).resolve().parent.parent
SECRET_PROMPT = "TOPSECRET-PROMPT-7d1f"
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@contextlib.contextmanager
def running_flower(redis_url: str, log_path: Path) -> Iterator[int]:
    """``inferpool flower`` on a free port, with credentials ops:flower-pass; yields the port."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "INFERPOOL_FLOWER_AUTH": "ops:flower-pass"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "inferpool", "flower", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # answering (it wants credentials): up
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        yield port
    finally:
        stop_process(proc, grace_s=10)


@pytest.fixture
def flower_port(redis_url: str, tmp_path: Path) -> Iterator[int]:
    with running_flower(redis_url, tmp_path / "flower.log") as port:
        yield port


def browse(url: str, *extra: str) -> str:
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        out = subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", "--virtual-time-budget=8000", *extra, url],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return out.stdout


def test_flower_shows_workers_and_tasks_but_no_prompts(client: Client, flower_port: int, tmp_path: Path) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/tasks", timeout=10)
    assert refused.value.code == 401
    assert "Basic" in refused.value.headers["WWW-Authenticate"]
    assert browse(f"http://127.0.0.1:{flower_port}/workers", "--dump-dom").count("echo@") == 0  # no credentials

    lines = [json.dumps({"custom_id": f"f{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "echo", "messages": [{"role": "user", "content": f"{SECRET_PROMPT} {i}"}]}})
             for i in range(300)]  # fmt: skip
    job = client.batches.create(lines)
    client.batches.wait(job.id, timeout=120, poll_s=0.2)
    time.sleep(1.0)  # Flower receives task events asynchronously
    base = f"http://ops:flower-pass@127.0.0.1:{flower_port}"
    workers = browse(f"{base}/workers", "--dump-dom")
    tasks = browse(f"{base}/tasks", "--dump-dom")
    assert "echo@" in workers
    assert "inferpool.process_chunk" in tasks
    task_id = tasks.split("/task/")[1].split('"')[0]
    detail = browse(f"{base}/task/{task_id}", "--dump-dom")
    assert "model=echo chunk=chunk_" in detail  # the argsrepr: ids and counts only
    for page in (workers, tasks, detail):
        assert SECRET_PROMPT not in page
        assert "echo: " not in page  # no answers either
    # INFERPOOL_UPDATE_SCREENSHOT=1 refreshes the one the README shows.
    screenshot = (
        REPO / "docs" / "flower-tasks.png" if os.environ.get("INFERPOOL_UPDATE_SCREENSHOT") else tmp_path / "t.png"
    )
    browse(f"{base}/tasks", "--window-size=1400,700", f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000


def test_a_retried_task_shows_no_prompt_either(
    settings: Settings, client: Client, flower_port: int, redis_url: str
) -> None:
    """Review defects 8 and 10: Celery's autoretry re-published a chunk without its argsrepr, so the prompts
    showed in task events and Flower; and `inferpool flower` put the Redis password on its command line."""
    flower = [
        p for p in psutil.process_iter(["cmdline"]) if f"--port={flower_port}" in " ".join(p.info["cmdline"] or [])
    ]
    password = urllib.parse.urlsplit(redis_url).password or ""
    assert password
    assert flower
    assert all(password not in " ".join(p.cmdline()) for p in flower)

    # A chunk whose worker meets a real Redis outage: its runtime's Redis is a port nobody listens on.
    spec = Registry.from_settings(settings).get("echo")
    dead = redis.Redis(port=free_port(), socket_connect_timeout=1)
    runtime = WorkerRuntime(spec, create_backend(spec, settings), dead, settings, worker_id="retry-test")
    app = create_celery_app(settings)
    install_tasks(app, runtime)
    chunk = client.make_chunk(spec, [(ChatRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": f"{SECRET_PROMPT} retried"}]}), None)])  # fmt: skip
    task_id = f"retry-{chunk.chunk_id}"
    task = app.tasks[TASK_PROCESS_CHUNK]
    task.push_request(id=task_id, args=[chunk.model_dump_json()], kwargs={}, retries=0, called_directly=False,
                      delivery_info={"exchange": "", "routing_key": queue_name("echo")})  # fmt: skip
    try:
        with pytest.raises(Retry):
            task.run(chunk.model_dump_json())  # the retry is published to the real broker
    finally:
        task.pop_request()
        runtime.close()
        app.close()
    # The session's echo worker runs the retried task; Flower sees it.
    assert client.wait_result(chunk.items[0].request_id, timeout=60).ok
    time.sleep(1.0)
    base = f"http://ops:flower-pass@127.0.0.1:{flower_port}"
    request = urllib.request.Request(f"http://127.0.0.1:{flower_port}/api/task/info/{task_id}",
                                     headers={"Authorization": "Basic " + base64.b64encode(b"ops:flower-pass").decode()})  # fmt: skip
    info = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert info["args"] == chunk.describe()
    assert info["state"] == "SUCCESS"
    detail = browse(f"{base}/task/{task_id}", "--dump-dom")
    assert task_id in detail
    assert SECRET_PROMPT not in detail
    assert SECRET_PROMPT not in json.dumps(info)
