"""Review defects of the security and hostile-input paths (issue 17, items 9-12, 14 and 17), on real parts.

9. The local pool's Redis had no password.
10. (with test_flower.py) passwords in URLs shown in messages.
11. Settled requests were counted under 'default'; the metrics' tenant labels grew without bound.
12. Answers printed as Rich markup failed `batch run` at the end.
14. A seed of 2^64 failed whole chunks; `Retry-After: inf` hung; one request's exception failed its mates.
17. A GGUF header with a huge length field raised MemoryError in every process; dead letters never expired.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from inferpool import Client, InvalidRequest, JobStatus, ProviderError, Registry, RegistryError, Settings
from inferpool.plumbing.local_pool import EmbeddedRedis, free_port
from inferpool.plumbing.metrics import OTHER_TENANTS, PoolCollector
from inferpool.plumbing.redis_connection import redact_url
from inferpool.state.dead_letters import DeadLetters
from inferpool.wire import ChatRequest, TaskItem, new_id
from inferpool.workers.api_backend import MAX_RETRY_AFTER_S, retry_after_seconds
from inferpool.workers.backend import Generation, GenerationOutcome, gather_outcomes

from .test_cli import run_cli

# -- 9, 10 ----------------------------------------------------------------------------------------------


def test_the_embedded_redis_wants_a_password_kept_off_command_lines(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        assert redis.Redis.from_url(server.url).ping()
        assert server.proc is not None
        assert server.password not in " ".join(psutil.Process(server.proc.pid).cmdline())
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o077 == 0
        assert (tmp_path / "redis").stat().st_mode & 0o077 == 0
    finally:
        server.stop()


def test_redact_url_hides_every_password() -> None:
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redact_url("redis://host/0?password=s3cret&db=2") == "redis://host/0?password=***&db=2"
    assert redact_url("unix:///run/redis.sock?PASSWORD=s3cret") == "unix:///run/redis.sock?PASSWORD=***"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    # Issue 25.12: a Sentinel URL's own password, and any other secret-looking parameter.
    sentinel = "sentinel://:pw@h:1/m/0?sentinel_password=S3CRET&socket_timeout=5"
    assert redact_url(sentinel) == "sentinel://:***@h:1/m/0?sentinel_password=***&socket_timeout=5"
    assert "S3CRET" not in redact_url("redis://h/0?db=1&auth_token=S3CRET")
    assert redact_url("redis://h/0?db=1&keepalive=1") == "redis://h/0?db=1&keepalive=1"


def test_stats_never_prints_a_sentinel_password(tmp_path: Path) -> None:
    url = f"sentinel://:pw@127.0.0.1:{free_port()}/m/0?sentinel_password=S3CRET"
    done = subprocess.run([sys.executable, "-m", "inferpool", "stats"], env={**os.environ, "REDIS_URL": url},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "sentinel_password=***" in done.stderr + done.stdout, done.stderr
    assert "S3CRET" not in done.stderr + done.stdout


# -- 11 -------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("scheduler")
def test_requests_the_scheduler_settles_count_for_their_tenant(settings: Settings) -> None:
    tenant = f"settled-{new_id('t')[-8:]}"
    line = {"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "echo-vision-cheap", "messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip
    with Client(settings=settings, tenant=tenant) as client:
        # No worker serves echo-vision-cheap: the lines expire, settled by the scheduler.
        job = client.batches.create([json.dumps({**line, "custom_id": f"s{i}"}) for i in range(3)],
                                    completion_window="2s")  # fmt: skip
        assert client.batches.wait(job.id, timeout=30, poll_s=0.2).status == JobStatus.EXPIRED
        [row] = client.usage(tenant=tenant)
    assert (row.requests, row.errors) == (3, 3)


@pytest.mark.usefixtures("echo_worker")
def test_metrics_export_a_bounded_set_of_tenants(settings: Settings, redis_client: redis.Redis) -> None:
    for n in range(4):
        with Client(settings=settings, tenant=f"cap-{n}") as client:
            client.chat("echo", [{"role": "user", "content": "x"}], timeout=30)
    collector = PoolCollector(redis_client, Registry.from_settings(settings), max_tenants=3)
    [requests] = [family for family in collector.collect() if family.name == "inferpool_requests"]
    tenants = {sample.labels["tenant"] for sample in requests.samples}
    assert len(tenants) <= 4  # three tenants and 'other'
    assert OTHER_TENANTS in tenants
    total = sum(sample.value for sample in requests.samples)
    unbounded = PoolCollector(redis_client, Registry.from_settings(settings), max_tenants=10_000)
    [everything] = [family for family in unbounded.collect() if family.name == "inferpool_requests"]
    assert total == sum(sample.value for sample in everything.samples)  # folded, not dropped


# -- 12 -------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("echo_worker", "scheduler")
def test_answers_that_look_like_markup_print_as_text(redis_url: str, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    texts = ["[/INST] done", "[bold]not bold[/bold]", "[red"]
    source.write_text("".join(json.dumps({"custom_id": f"[m{i}]", "method": "POST", "url": "/v1/chat/completions",
                                          "body": {"model": "echo", "messages": [{"role": "user", "content": t}]}})
                              + "\n" for i, t in enumerate(texts)))  # fmt: skip
    proc = run_cli("batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--no-local",
                   env={"REDIS_URL": redis_url}, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for i, text in enumerate(texts):
        assert f"[m{i}]" in proc.stdout
        assert f"echo: {text}" in proc.stdout


# -- 14 -------------------------------------------------------------------------------------------------


def test_seeds_are_64_bit(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="seed"):
        client.submit({"model": "echo", "messages": [{"role": "user", "content": "x"}], "seed": 2**64})
    assert ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                       "seed": -(2**63)}).seed == -(2**63)  # fmt: skip


def test_retry_after_is_finite_and_bounded() -> None:
    assert retry_after_seconds({"retry-after": "inf"}) is None
    assert retry_after_seconds({"retry-after": "nan"}) is None
    assert retry_after_seconds({"retry-after": "1e300"}) == MAX_RETRY_AFTER_S
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25


def test_one_request_that_raises_fails_alone() -> None:
    async def answer(text: str) -> GenerationOutcome:
        if text == "boom":
            raise OverflowError("seed out of range")
        return Generation(text=text, finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    outcomes = asyncio.run(gather_outcomes("test", (answer(t) for t in ("a", "boom", "b"))))
    assert [o.text for o in outcomes if isinstance(o, Generation)] == ["a", "b"]
    assert isinstance(outcomes[1], ProviderError)  # that request's error result
    assert "seed out of range" in str(outcomes[1])


# -- 17 -------------------------------------------------------------------------------------------------


def _gguf(path: Path, body: bytes) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 0, 1) + body)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (struct.pack("<Q", 2**62), "longer than GGUF metadata can be"),  # a key of 2^62 bytes
        (struct.pack("<Q", 10_000), "runs past the end of the file"),
        (struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9) + struct.pack("<IQ", 4, 2**61), "runs past the end"),
        (struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6, "nested more than"),
    ],
)
def test_a_hostile_gguf_header_is_a_clear_registry_error(tmp_path: Path, body: bytes, message: str) -> None:
    _gguf(tmp_path / "hostile.gguf", body + b"\0" * 64)
    with pytest.raises(RegistryError, match=f"hostile.gguf: not a readable GGUF file: .*{message}"):
        Registry.load(models_dirs=[tmp_path])


def test_dead_letters_expire_with_the_results(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")  # its own: trimming must not touch the session's letters
    server.start()
    letters = DeadLetters(redis.Redis.from_url(server.url), ttl_s=1)
    item = TaskItem(request_id=new_id("req"), request=ChatRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": "secret prompt"}]}))  # fmt: skip
    letters.add_many([(item, None, "echo", "provider_error", "down")])
    assert any(letter.request_id == item.request_id for letter in letters.list())
    time.sleep(1.2)
    assert all(letter.request_id != item.request_id for letter in letters.list())
    server.stop()
