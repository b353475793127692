"""The OpenAI-compatible gateway, driven by the official ``openai`` SDK against a real gateway process,
real workers (echo, SmolLM2) and the real scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from inferpool import Client
from inferpool.constants import stream_key
from inferpool.plumbing.local_pool import WorkerProcess
from inferpool.state.api_keys import ApiKeys

from .conftest import start_gateway, stop_gateway

pytestmark = pytest.mark.usefixtures("echo_worker", "echo_trickle_worker", "scheduler")

WORDS = " ".join(f"w{i}" for i in range(30))


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def gateway_url(redis_url: str, session_dir: Path) -> Iterator[str]:
    log_path = session_dir / "gateway.log"
    proc, url = start_gateway(redis_url, log_path, {"INFERPOOL_FILES_DIR": str(session_dir / "gateway-files")})
    yield f"{url}/v1"
    stop_gateway(proc, log_path)


@pytest.fixture(scope="module")
def keys(redis_url: str) -> dict[str, str]:
    store = ApiKeys(redis.Redis.from_url(redis_url))
    return {tenant: store.create(tenant)[0] for tenant in ("acme", "globex")}


@pytest.fixture
def acme(gateway_url: str, keys: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url, api_key=keys["acme"], max_retries=0)


@pytest.fixture
def globex(gateway_url: str, keys: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url, api_key=keys["globex"], max_retries=0)


def test_chat_completion(acme: openai.OpenAI) -> None:
    completion = acme.chat.completions.create(model="echo", messages=ask("hello gateway"), max_tokens=10)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "echo: hello gateway"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 5


def test_streamed_chat_completion_with_usage(acme: openai.OpenAI) -> None:
    stream = acme.chat.completions.create(model="echo", messages=ask(WORDS), stream=True,  # type: ignore[arg-type]
                                          stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: " + WORDS
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 31


def test_stream_without_include_usage_has_no_usage_chunk(acme: openai.OpenAI) -> None:
    chunks = list(acme.chat.completions.create(model="echo", messages=ask("hi"), stream=True))  # type: ignore[arg-type]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_streamed_local_model(acme: openai.OpenAI, smollm2_worker: WorkerProcess) -> None:
    stream = acme.chat.completions.create(model="smollm2-135m", messages=ask("What is the capital of France?"),  # type: ignore[arg-type]
                                          stream=True, max_tokens=16, temperature=0)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text


def test_models_list_shows_live_workers(acme: openai.OpenAI) -> None:
    models = {m.id: m for m in acme.models.list()}
    assert "echo" in models
    assert models["echo"].model_extra is not None
    assert models["echo"].model_extra["inferpool"]["live_workers"] >= 1
    assert models["echo-unserved"].model_extra["inferpool"]["live_workers"] == 0  # type: ignore[index]


def test_no_live_worker_is_a_503(acme: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError, match="No live worker serves model 'echo-unserved'"):
        acme.chat.completions.create(model="echo-unserved", messages=ask("hi"))  # type: ignore[arg-type]


def test_wrong_key_is_an_authentication_error(gateway_url: str) -> None:
    bad = openai.OpenAI(base_url=gateway_url, api_key="ipk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    reply = httpx.get(f"{gateway_url}/models")  # no Authorization header at all
    assert reply.status_code == 401
    assert "inferpool keys create" in reply.json()["error"]["message"]


def test_malformed_bodies_are_bad_requests_with_useful_messages(acme: openai.OpenAI, gateway_url: str,
                                                                keys: dict[str, str]) -> None:  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        acme.chat.completions.create(model="echo", messages=ask("hi"), max_tokens=-3)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        acme.chat.completions.create(model="no-such-model", messages=ask("hi"))  # type: ignore[arg-type]
    headers = {"Authorization": f"Bearer {keys['acme']}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        reply = httpx.post(f"{gateway_url}/chat/completions", content=body, headers=headers, timeout=30)
        assert reply.status_code == 400, body[:20]
        assert reply.json()["error"]["type"] == "invalid_request_error"
    reply = httpx.post(f"{gateway_url}/chat/completions", content=b"x" * 2_000_000, headers=headers, timeout=30)
    assert reply.status_code == 413


def test_batch_flow_through_files_and_batches(acme: openai.OpenAI, globex: openai.OpenAI, tmp_path: Path,
                                              client: Client) -> None:  # fmt: skip
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "echo", "messages": ask(f"line {i}")}} for i in range(20)]  # fmt: skip
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "nope"}})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = acme.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.bytes == path.stat().st_size
    assert acme.files.content(uploaded.id).read() == path.read_bytes()
    assert uploaded.id in [f.id for f in acme.files.list()]
    with pytest.raises(openai.BadRequestError, match="inferpool_via must be one of auto, realtime, provider-batch"):
        acme.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                            metadata={"inferpool_via": "sometimes"})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="inferpool_routing must be load or prefix"):
        acme.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                            metadata={"inferpool_routing": "random"})  # fmt: skip
    metadata = {"run": "t1", "inferpool_via": "realtime", "inferpool_routing": "prefix"}
    batch = acme.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h", metadata=metadata)  # fmt: skip
    assert client.batches.retrieve(batch.id).via == "realtime"
    assert client.batches.retrieve(batch.id).routing == "prefix"
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
        batch = acme.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (21, 20, 1)
    assert batch.metadata == metadata
    assert batch.input_file_id == uploaded.id
    assert batch.output_file_id is not None
    assert batch.error_file_id is not None
    out = [json.loads(line) for line in acme.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in out) == sorted(f"c{i}" for i in range(20))
    assert all(line["response"]["body"]["choices"][0]["message"]["content"].startswith("echo: line") for line in out)
    errors = [json.loads(line) for line in acme.files.content(batch.error_file_id).text.splitlines()]
    assert [line["custom_id"] for line in errors] == ["bad"]
    assert batch.id in [b.id for b in acme.batches.list(limit=5)]

    # Another tenant sees none of it.
    for call in (lambda: globex.batches.retrieve(batch.id), lambda: globex.files.retrieve(uploaded.id),
                 lambda: globex.files.content(uploaded.id), lambda: globex.files.content(batch.output_file_id or ""),
                 lambda: globex.batches.cancel(batch.id), lambda: globex.files.delete(uploaded.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in globex.batches.list()]
    assert uploaded.id not in [f.id for f in globex.files.list()]

    assert acme.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(uploaded.id)


def test_cancel_a_batch(acme: openai.OpenAI, tmp_path: Path) -> None:
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "echo-trickle", "messages": ask(f"slow {i}")}} for i in range(40)]  # fmt: skip
    path = tmp_path / "slow.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = acme.files.create(file=path.open("rb"), purpose="batch")
    batch = acme.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelled = acme.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    deadline = time.monotonic() + 60
    while cancelled.status != "cancelled":
        assert time.monotonic() < deadline, cancelled
        time.sleep(0.3)
        cancelled = acme.batches.retrieve(batch.id)
    assert cancelled.request_counts is not None
    assert cancelled.request_counts.failed > 0


def test_garbage_uploads_are_refused_and_the_gateway_stays_up(acme: openai.OpenAI, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(10 * 1024 * 1024))
    with pytest.raises(openai.BadRequestError, match="JSONL"):
        acme.files.create(file=garbage.open("rb"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        acme.files.create(file=garbage.open("rb"), purpose="assistants")
    assert acme.chat.completions.create(model="echo", messages=ask("still up")).choices[0].message.content == \
        "echo: still up"  # type: ignore[arg-type]  # fmt: skip


def test_hanging_up_stops_the_worker(acme: openai.OpenAI, redis_client: redis.Redis) -> None:
    stream = acme.chat.completions.create(model="echo-trickle", messages=ask(WORDS), stream=True)  # type: ignore[arg-type]
    request_id = stream.response.headers["x-request-id"]
    first = next(c for c in stream if c.choices and c.choices[0].delta.content)
    assert first.choices[0].delta.content == "echo:"
    stream.close()
    deadline = time.monotonic() + 30
    result = None
    while result is None:
        assert time.monotonic() < deadline
        result = redis_client.get(f"inferpool:result:{request_id}")
        time.sleep(0.1)
    assert json.loads(result)["error"]["code"] == "request_cancelled"
    published = "".join(f[b"t"].decode() for _, f in redis_client.xrange(stream_key(request_id)) if b"t" in f)
    assert len(published) < len("echo: " + WORDS)


def test_health_and_readiness(gateway_url: str) -> None:
    root = gateway_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json() == {"status": "ok"}
    assert httpx.get(f"{root}/ready").json() == {"status": "ready"}


def test_keys_cli_create_list_revoke(redis_url: str, gateway_url: str) -> None:
    import subprocess
    import sys

    env = {**os.environ, "REDIS_URL": redis_url}
    run = [sys.executable, "-m", "inferpool", "keys"]
    made = subprocess.run([*run, "create", "--tenant", "initech"], env=env, capture_output=True, text=True, check=True)
    key = made.stdout.strip()
    assert key.startswith("ipk-")
    key_id = made.stderr.split()[2]
    listed = subprocess.run([*run, "list"], env=env, capture_output=True, text=True, check=True).stdout
    assert key_id in listed
    assert key not in listed
    assert key not in redis.Redis.from_url(redis_url).hgetall("inferpool:apikeys").__repr__()
    client = openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0)
    assert client.models.list().data
    subprocess.run([*run, "revoke", key_id], env=env, capture_output=True, text=True, check=True)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_no_auth_refuses_a_public_address(redis_url: str) -> None:
    import subprocess
    import sys

    env = {**os.environ, "REDIS_URL": redis_url}
    run = subprocess.run([sys.executable, "-m", "inferpool", "gateway", "--no-auth", "--host", "0.0.0.0"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1
    assert "loopback" in run.stderr


@pytest.mark.usefixtures("api_workers")
def test_tool_calls_through_the_sdk(acme: openai.OpenAI) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
    completion = acme.chat.completions.create(model="emu-claude", messages=ask("Oslo"), tools=[weather])  # type: ignore[arg-type, list-item]
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    streamed = acme.chat.completions.create(model="emu-gpt-stream", messages=ask("Oslo"), tools=[weather],  # type: ignore[arg-type, list-item]
                                            stream=True)  # fmt: skip
    pieces = [c.choices[0].delta.tool_calls for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert [call.function.name for piece in pieces for call in piece] == ["get_weather"]  # type: ignore[union-attr]


NODE_TEST_DIR = Path(__file__).parent / "node"


@pytest.mark.skipif(not (NODE_TEST_DIR / "node_modules" / "openai").is_dir(),
                    reason="the Node openai SDK is not installed (scripts/test.sh installs it where npm exists)")  # fmt: skip
def test_official_node_sdk(gateway_url: str, keys: dict[str, str]) -> None:
    done = subprocess.run(["node", "chat.mjs", gateway_url, keys["acme"]], cwd=NODE_TEST_DIR, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["whole"] == "echo: one two three four"
    assert "".join(seen["deltas"]) == "echo: one two three four"
    assert len(seen["deltas"]) > 1
    assert seen["usage"]["completion_tokens"] == 5
    assert seen["authError"] == {"name": "AuthenticationError", "status": 401}
    assert "echo" in seen["models"]
