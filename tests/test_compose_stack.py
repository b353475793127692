"""The real docker-compose.yml and Dockerfile, built and brought up on a private Docker engine, used as a user
would: from the host, through the published ports only.

A second compose file (written here) only adds what a test needs: build arguments that take the CPU torch
wheel from this machine's pip mirror, the Redis port published on loopback (for ``inferpool batch run`` from
the host), an emulator of OpenAI's API for the API worker, and the secret files. ``ops/compose-check.sh``
runs this by hand. Marked ``docker``; skipped with the reason where root, dockerd, docker-compose or
debootstrap is missing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import yaml

from inferpool import Client, JobStatus
from inferpool.plumbing.local_pool import free_port

from .docker_engine import DockerEngine, missing_tools, run

REPO = Path(__file__).resolve().parent.parent
PROJECT = "inferpool-compose-test"
SERVICES = ["redis", "scheduler", "flower", "gateway", "api-worker", "local-worker", "openai-emulator"]
HEALTH_TIMEOUT_S = 420
#: The inferpool image plus the emulator's own dependency (aiohttp, a test tool the image has no need of).
EMULATOR_IMAGE = "inferpool-emulator:test"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} (Docker engine tests)"),
]


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


def _find_links() -> Path | None:
    """The directory of wheels pip on this machine is configured to prefer, if it holds a CPU torch wheel."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    candidates = [*os.environ.get("PIP_FIND_LINKS", "").split(), *proc.stdout.split()]
    return next((Path(c) for c in candidates if Path(c).is_dir() and any(Path(c).glob("torch-*+cpu-*.whl"))), None)


class Stack:
    """The compose project: its files, ports, secrets, and the commands a user would type."""

    def __init__(self, engine: DockerEngine, workdir: Path, wheels_url: str | None) -> None:
        self.engine = engine
        self.workdir = workdir
        self.redis_password = secrets.token_hex(16)
        self.flower_auth = f"ops:{secrets.token_hex(8)}"
        self.openai_key = f"sk-compose-{secrets.token_hex(8)}"
        self.ports = {name: free_port() for name in ("GATEWAY_PORT", "FLOWER_PORT", "METRICS_PORT", "REDIS")}
        secret_dir = workdir / "secrets"
        secret_dir.mkdir()
        files = {"REDIS_PASSWORD": self.redis_password, "INFERPOOL_FLOWER_AUTH": self.flower_auth,
                 "OPENAI_API_KEY": self.openai_key}  # fmt: skip
        for name, value in files.items():
            (secret_dir / name).write_text(value + "\n")
        args = {"TORCH_INDEX_URL": "", "TORCH_FIND_LINKS": wheels_url} if wheels_url else {}
        build = {"context": str(REPO), "network": "host", "args": args}
        # A SIGKILLed worker's chunk is redelivered after the visibility timeout (an hour by default): short here.
        fast = {"INFERPOOL_VISIBILITY_TIMEOUT_S": "30"}
        override: dict[str, object] = {
            "services": {
                **{name: {"build": build, "environment": fast}
                   for name in ("scheduler", "flower", "gateway", "local-worker")},
                "api-worker": {"build": build,
                               "environment": {**fast, "OPENAI_BASE_URL": "http://openai-emulator:9100/v1"}},
                "redis": {"ports": [f"127.0.0.1:{self.ports['REDIS']}:6379"]},
                "openai-emulator": {
                    "image": EMULATOR_IMAGE, "init": True, "entrypoint": ["python", "-m", "inferpool.emulators"],
                    "command": ["--host", "0.0.0.0", "--port", "9100", "--api-key", self.openai_key],
                },
            },
            "secrets": {name: {"file": str(secret_dir / name)} for name in files},
        }  # fmt: skip
        self.override = workdir / "docker-compose.test.yml"
        self.override.write_text(yaml.safe_dump(override))
        self.env = {**engine.env, **{k: str(v) for k, v in self.ports.items() if k != "REDIS"}}
        self.redis_url = f"redis://:{self.redis_password}@127.0.0.1:{self.ports['REDIS']}/0"
        self.gateway = f"http://127.0.0.1:{self.ports['GATEWAY_PORT']}"

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
        base = ["docker-compose", "-p", PROJECT, "-f", str(REPO / "docker-compose.yml"), "-f", str(self.override)]
        return run([*base, *args], env=self.env, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, (service, ids)
        return ids[0]

    def state(self, service: str) -> str:
        """healthy / starting / unhealthy for services with a health check, else the container's status."""
        fmt = "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
        return self.engine.docker("inspect", "-f", fmt, self.container(service), check=False).stdout.strip()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            states = {service: self.state(service) for service in SERVICES}
            if states["openai-emulator"] == "running" and all(
                states[s] == "healthy" for s in SERVICES if s != "openai-emulator"
            ):
                return
            if time.monotonic() > deadline or "exited" in states.values():
                logs = self.compose("logs", "--tail", "40", check=False).stdout
                raise AssertionError(f"not healthy after {HEALTH_TIMEOUT_S} s: {states}\n{logs[-6000:]}")
            time.sleep(2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("compose")
    engine = DockerEngine().start()
    server: ThreadingHTTPServer | None = None
    try:
        engine.build_base_images(Path.home() / ".cache" / "inferpool-tests" / "docker-base")
        wheels = _find_links()
        if wheels is not None:  # the CPU torch wheel, served to the build (network: host) over loopback
            server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(wheels)))
            threading.Thread(target=server.serve_forever, daemon=True).start()
        wheels_url = f"http://127.0.0.1:{server.server_address[1]}/" if server is not None else None
        stack = Stack(engine, workdir, wheels_url)
        stack.compose("build", timeout=1800)
        emulator = workdir / "emulator"
        emulator.mkdir()
        (emulator / "Dockerfile").write_text(
            "FROM inferpool:latest\nUSER root\nRUN pip install aiohttp\nUSER inferpool\n"
        )
        engine.docker("build", "--network", "host", "-t", EMULATOR_IMAGE, str(emulator), timeout=600)
        stack.compose("up", "-d", "--no-build")
        stack.wait_healthy()
        yield stack
        stack.compose("down", "-v", "--timeout", "30", check=False)
    finally:
        if server is not None:
            server.shutdown()
        engine.stop()


def _lines(prefix: str, count: int, model: str = "smollm2-135m") -> list[str]:
    return [json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": model, "max_tokens": 8, "temperature": 0,
                                 "messages": [{"role": "user", "content": f"Say the number {i}."}]}})
            for i in range(count)]  # fmt: skip


def _assert_once(client: Client, job_id: str, lines: list[str], timeout: float = 600) -> None:
    done = client.batches.wait(job_id, timeout=timeout, poll_s=0.5)
    assert done.status == JobStatus.COMPLETED, done
    results = list(client.batches.request_results(job_id))
    assert Counter(r.custom_id for r in results) == Counter(json.loads(line)["custom_id"] for line in lines)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]


def test_a_batch_through_the_gateway_with_the_openai_sdk(stack: Stack) -> None:
    made = stack.compose("run", "--rm", "gateway", "keys", "create", "--tenant", "compose")
    key = made.stdout.split()[0]
    assert key.startswith("ipk-"), made.stdout
    sdk = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0, timeout=60)
    lines = _lines("g", 6) + _lines("a", 6, model="gpt-4o-mini")
    path = stack.workdir / "gateway-input.jsonl"
    path.write_text("\n".join(lines) + "\n")
    uploaded = sdk.files.create(file=path.open("rb"), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 600
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(1)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    out = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in out) == sorted(json.loads(line)["custom_id"] for line in lines)
    assert all(line["response"]["status_code"] == 200 for line in out), [line["error"] for line in out][:3]
    models = {line["response"]["body"]["model"] for line in out}
    assert models == {"smollm2-135m", "gpt-4o-mini"}  # the local model and the API worker (the emulator)
    chat = sdk.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])  # fmt: skip
    assert "Paris" in (chat.choices[0].message.content or "")


def test_inferpool_batch_run_from_the_host_against_the_compose_redis(stack: Stack) -> None:
    path = stack.workdir / "run-input.jsonl"
    path.write_text("\n".join(_lines("r", 4)) + "\n")
    output = stack.workdir / "run-output.jsonl"
    env = {**os.environ, "REDIS_URL": stack.redis_url, "INFERPOOL_REGISTRY": str(REPO / "ops" / "registry.yaml"),
           "COLUMNS": "200"}  # fmt: skip
    done = subprocess.run(["inferpool", "batch", "run", str(path), "-o", str(output), "--timeout", "600"], env=env,
                          capture_output=True, text=True, timeout=700)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 lines in" in done.stdout
    assert sorted(json.loads(line)["custom_id"] for line in output.read_text().splitlines()) == [
        f"r{i}" for i in range(4)
    ]


def test_flower_wants_credentials(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.ports['FLOWER_PORT']}/workers"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    token = base64.b64encode(stack.flower_auth.encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=30) as page:
        assert page.status == 200


def test_a_killed_local_worker_is_restarted_and_every_line_answered_once(stack: Stack) -> None:
    lines = _lines("k", 40)
    with Client(stack.redis_url) as client:
        job = client.batches.create(lines)
        deadline = time.monotonic() + 300
        while client.batches.retrieve(job.id).request_counts.completed < 4:  # the worker is mid-job
            assert time.monotonic() < deadline, "the local worker answered nothing"
            time.sleep(0.5)
        container = stack.container("local-worker")
        started = stack.engine.docker("inspect", "-f", "{{.State.StartedAt}}", container).stdout
        # SIGKILL from outside, as the kernel's OOM killer or a crash would: not a `docker stop`, so the
        # restart policy (unless-stopped) applies.
        pid = stack.engine.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
        os.kill(int(pid), 9)
        deadline = time.monotonic() + 120
        while stack.engine.docker("inspect", "-f", "{{.State.StartedAt}}", container).stdout == started:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(1)
        _assert_once(client, job.id, lines)
    assert int(stack.engine.docker("inspect", "-f", "{{.RestartCount}}", container).stdout) >= 1


def test_a_job_survives_down_and_up(stack: Stack) -> None:
    """Submitted, then the whole stack taken down (volumes kept) and up again: Redis' append-only file kept
    the job and its lines, and it completes, each line once."""
    lines = _lines("d", 12)
    with Client(stack.redis_url) as client:
        job_id = client.batches.create(lines).id
    stack.compose("down", "--timeout", "30")
    stack.compose("up", "-d", "--no-build")
    stack.wait_healthy()
    with Client(stack.redis_url) as client:
        _assert_once(client, job_id, lines)


def test_no_secret_in_docker_inspect_or_the_image_layers(stack: Stack) -> None:
    ids = [stack.container(service) for service in SERVICES if service != "openai-emulator"]  # (the test's own)
    shown = stack.engine.docker("inspect", *ids).stdout + stack.engine.docker(
        "history", "--no-trunc", "inferpool:latest").stdout  # fmt: skip
    flower_password = stack.flower_auth.split(":", 1)[1]
    for secret in (stack.redis_password, flower_password, stack.openai_key):
        assert secret not in shown
    assert re.search(r"/run/secrets/REDIS_PASSWORD", shown)  # (mounted as a file: that is how they arrive)


def test_the_image_has_cpu_torch_and_runs_as_an_unprivileged_user(stack: Stack) -> None:
    probe = "import os, torch; print(torch.__version__, torch.version.cuda, os.getuid())"
    shown = stack.engine.docker("run", "--rm", "--entrypoint", "python", "inferpool:latest", "-c", probe).stdout
    version, cuda, uid = shown.split()
    assert version.endswith("+cpu"), shown  # not PyPI's CUDA build (several GB)
    assert cuda == "None"
    assert uid != "0"
    size = int(stack.engine.docker("image", "inspect", "-f", "{{.Size}}", "inferpool:latest").stdout)
    print(f"\ninferpool:latest (CPU) is {size / 1e9:.2f} GB")  # the figure the README gives
