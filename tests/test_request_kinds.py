"""Embeddings and text completions through every layer: batch jobs mixing the three kinds, the client, the
gateway with the official openai SDK, and the OpenAI backend against the emulator (real Redis, real workers)."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferpool import AsyncClient, CapabilityMismatch, Client, InvalidRequest
from inferpool.client.batch_lines import AcceptedLine, BatchLineParser, RejectedLine
from inferpool.client.routing import Router
from inferpool.constants import result_key
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.local_pool import WorkerProcess
from inferpool.plumbing.settings import Settings
from inferpool.state.api_keys import ApiKeys
from inferpool.wire import Completion, EmbeddingList, JobStatus, unpack_vector
from inferpool.workers.echo import echo_vector

from .conftest import _start_workers, _stop_workers, start_gateway, stop_gateway

pytestmark = pytest.mark.usefixtures("echo_worker", "scheduler")


@pytest.fixture(scope="module")
def embed_workers(redis_url: str, session_dir: Path, api_worker_env: dict[str, str]) -> Iterator[list[WorkerProcess]]:
    """The echo embedding model and the emulated OpenAI models (embeddings, and chat that also completes)."""
    workers = _start_workers(redis_url, session_dir, "echo-embed", "emu-embed", "emu-gpt", "emu-claude",
                             env=api_worker_env)  # fmt: skip
    yield workers
    _stop_workers(workers)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_a_job_mixing_chat_completions_and_embeddings(client: Client, redis_client: redis.Redis,
                                                      embed_workers: list[WorkerProcess]) -> None:  # fmt: skip
    """One job, three kinds: each line answered once in OpenAI's batch format, vectors stored packed, usage per
    line, model and job."""
    lines = []
    for i in range(30):
        lines.append(_line(f"chat{i}", "/v1/chat/completions",
                           {"model": "echo", "messages": [{"role": "user", "content": f"hello {i}"}]}))  # fmt: skip
        lines.append(
            _line(f"cmpl{i}", "/v1/completions", {"model": "echo", "prompt": f"once upon {i}", "max_tokens": 3})
        )
        lines.append(
            _line(f"emb{i}", "/v1/embeddings", {"model": "echo-embed", "input": [f"text {i}", "shared words"]})
        )
    lines.append(
        _line("b64", "/v1/embeddings", {"model": "echo-embed", "input": "packed", "encoding_format": "base64"})
    )
    lines.append(_line("multi", "/v1/completions", {"model": "echo", "prompt": ["a b", "c d e"], "n": 1, "echo": True}))
    lines.append(_line("wrong-kind", "/v1/embeddings", {"model": "echo", "input": "x"}))
    lines.append(_line("empty", "/v1/embeddings", {"model": "echo-embed", "input": []}))
    lines.append(_line("too-many", "/v1/embeddings", {"model": "echo-embed", "input": ["w"] * 10_000}))
    lines.append(_line("dims", "/v1/embeddings", {"model": "echo-embed", "input": "x", "dimensions": 64}))
    lines.append(_line("chat-at-embeddings", "/v1/embeddings", {"model": "echo-embed", "messages": []}))
    job = client.batches.wait(client.batches.create(lines).id, timeout=120, poll_s=0.2)
    assert job.status is JobStatus.COMPLETED
    assert job.request_counts.total == len(lines)
    output = {line.custom_id: line for line in client.batches.results(job.id)}
    assert len(output) == len(lines)
    for i in range(30):
        chat = output[f"chat{i}"].response
        assert chat is not None
        assert chat.body.object == "chat.completion"
        cmpl = output[f"cmpl{i}"].response
        assert cmpl is not None
        assert isinstance(cmpl.body, Completion)
        assert cmpl.body.choices[0].text == "echo: once upon"  # three words: max_tokens=3
        assert cmpl.body.choices[0].finish_reason == "length"
        emb = output[f"emb{i}"].response
        assert emb is not None
        assert isinstance(emb.body, EmbeddingList)
        vectors = [item.embedding for item in emb.body.data]
        assert all(isinstance(v, list) and len(v) == 384 for v in vectors)  # floats, as asked by default
        assert _cosine(vectors[0], echo_vector(f"text {i}", 384)) > 0.999999  # type: ignore[arg-type]
        assert emb.body.usage.prompt_tokens == 4
        assert emb.body.requested_format is None  # inferpool's storage field never reaches the output
    packed = output["b64"].response
    assert packed is not None
    assert isinstance(packed.body, EmbeddingList)
    assert isinstance(packed.body.data[0].embedding, str)
    assert unpack_vector(packed.body.data[0].embedding) == pytest.approx(echo_vector("packed", 384), abs=1e-6)
    multi = output["multi"].response
    assert multi is not None
    assert isinstance(multi.body, Completion)
    assert [c.text for c in multi.body.choices] == ["a becho: a b", "c d eecho: c d e"]
    assert multi.body.usage.prompt_tokens == 5
    errors = {cid: output[cid].error for cid in ("wrong-kind", "empty", "too-many", "dims", "chat-at-embeddings")}
    assert errors["wrong-kind"] is not None
    assert errors["wrong-kind"].code == "capability_mismatch"
    assert "echo-embed" in errors["wrong-kind"].message  # names the models that can
    assert errors["empty"] is not None
    assert "empty list" in errors["empty"].message
    assert errors["too-many"] is not None
    assert "at most 2048 inputs" in errors["too-many"].message
    assert errors["dims"] is not None
    assert "cannot change" in errors["dims"].message
    assert errors["chat-at-embeddings"] is not None
    assert "body.input" in errors["chat-at-embeddings"].message
    by_model = {row.model: row for row in job.usage}
    assert by_model["echo-embed"].requests == 31
    assert by_model["echo-embed"].completion_tokens == 0
    assert by_model["echo-embed"].prompt_tokens == 30 * 4 + 1
    assert by_model["echo"].requests == 61


def test_vectors_are_stored_packed(client: Client, redis_client: redis.Redis,
                                   embed_workers: list[WorkerProcess]) -> None:  # fmt: skip
    """A stored embeddings result holds each vector as base64 of float32: 2,048 characters for 384 dimensions."""
    handle = client.submit({"model": "echo-embed", "input": "one text to store"})
    result = handle.result(timeout=30)
    assert isinstance(result.response, EmbeddingList)
    raw = redis_client.get(result_key(handle.request_id))
    assert raw is not None
    stored = json.loads(raw)["response"]["data"][0]["embedding"]
    assert isinstance(stored, str)
    assert len(stored) == 2048
    assert len(base64.b64decode(stored)) == 384 * 4
    assert len(raw) < 2048 + 700  # the rest of the result (ids, usage, stats) is small beside the vector


def test_client_embed_and_complete(client: Client, embed_workers: list[WorkerProcess]) -> None:
    embeddings = client.embed("echo-embed", ["first", "second"], timeout=30)
    assert [len(v) for v in embeddings.vectors()] == [384, 384]
    assert embeddings.vectors()[1] == pytest.approx(echo_vector("second", 384), abs=1e-6)
    packed = client.embed("echo-embed", "first", encoding_format="base64", timeout=30)
    assert isinstance(packed.data[0].embedding, str)
    completion = client.complete("echo", "the raw prompt", max_tokens=10, timeout=30)
    assert completion.object == "text_completion"
    assert completion.text == "echo: the raw prompt"
    assert completion.usage.model_dump() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    chunks = list(client.complete("echo", "streamed words here", stream=True, max_tokens=10, timeout=30))
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(chunk.text for chunk in chunks) == "echo: streamed words here"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    with pytest.raises(CapabilityMismatch, match=r"models that do: .*echo-embed"):
        client.embed("emu-claude", "x")
    with pytest.raises(CapabilityMismatch, match="text completions"):
        client.complete("emu-claude", "x")
    with pytest.raises(InvalidRequest, match="non-negative"):
        client.embed("echo-embed", [[1, -2]])
    # model "auto" picks among the live models that serve the kind (chat-only models never).
    picked = client.embed("auto", "routed by capability", timeout=30)
    assert picked.model in ("echo-embed", "emu-embed")
    chosen = client.complete("auto", "x", routing={"prefer": "cheapest"}, timeout=30).model
    assert client.registry.get(chosen).capabilities.completions


async def test_async_client_embed_and_complete(async_client: AsyncClient,
                                               embed_workers: list[WorkerProcess]) -> None:  # fmt: skip
    embeddings = await async_client.embed("echo-embed", "async text", timeout=30)
    assert embeddings.vectors()[0] == pytest.approx(echo_vector("async text", 384), abs=1e-6)
    completion = await async_client.complete("echo", "async prompt", timeout=30)
    assert completion.text == "echo: async prompt"
    stream = await async_client.complete("echo", "async stream", stream=True, timeout=30)
    assert "".join([chunk.text async for chunk in stream]) == "echo: async stream"
    handle = await async_client.submit({"model": "echo-embed", "input": ["a", "b", "c"]})
    answer = await handle.completion(timeout=30)
    assert isinstance(answer, EmbeddingList)
    assert len(answer.data) == 3


def test_openai_backend_embeds_and_completes(client: Client, embed_workers: list[WorkerProcess]) -> None:
    """The OpenAI backend through the SDK: embeddings (asked as base64, stored as they come) and completions."""
    embeddings = client.embed("emu-embed", ["alpha", "beta gamma"], timeout=30)
    assert [len(v) for v in embeddings.vectors()] == [1536, 1536]
    assert embeddings.vectors()[0] == pytest.approx(echo_vector("alpha", 1536), abs=1e-6)
    assert embeddings.usage.prompt_tokens == 1 + 2
    short = client.embed("emu-embed", "alpha", dimensions=256, timeout=30)
    assert len(short.vectors()[0]) == 256
    by_ids = client.embed("emu-embed", [[1, 2, 3], [4]], timeout=30)
    assert by_ids.vectors()[1] == pytest.approx(echo_vector([4], 1536), abs=1e-6)
    assert by_ids.usage.prompt_tokens == 4
    completion = client.complete("emu-gpt", ["one two", "three"], max_tokens=5, timeout=30)
    assert [choice.text for choice in completion.choices] == ["emulated: one two", "emulated: three"]
    assert [choice.index for choice in completion.choices] == [0, 1]
    streamed = list(client.complete("emu-gpt", "streamed prompt", stream=True, timeout=30))
    assert "".join(chunk.text for chunk in streamed) == "emulated: streamed prompt"


@pytest.fixture(scope="module")
def sdk(redis_url: str, session_dir: Path, embed_workers: list[WorkerProcess]) -> Iterator[openai.OpenAI]:
    log_path = session_dir / "gateway-kinds.log"
    proc, url = start_gateway(redis_url, log_path, {"INFERPOOL_FILES_DIR": str(session_dir / "gateway-kinds-files")})
    key = ApiKeys(redis.Redis.from_url(redis_url)).create("kinds")[0]
    yield openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    stop_gateway(proc, log_path)


def test_the_openai_sdk_unchanged_against_the_gateway(sdk: openai.OpenAI, tmp_path: Path) -> None:
    # The SDK asks for base64 by default and decodes it: the vectors must come out as the model made them.
    created = sdk.embeddings.create(model="echo-embed", input=["gateway one", "gateway two"])
    assert [item.index for item in created.data] == [0, 1]
    assert created.data[1].embedding == pytest.approx(echo_vector("gateway two", 384), abs=1e-6)
    assert created.usage.prompt_tokens == 4
    floats = sdk.embeddings.create(model="echo-embed", input="as floats", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(echo_vector("as floats", 384), abs=1e-6)
    completion = sdk.completions.create(model="echo", prompt="gateway prompt", max_tokens=8)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "echo: gateway prompt"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2
    stream = sdk.completions.create(model="echo", prompt="a streamed gateway prompt", max_tokens=8, stream=True,
                                    stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: a streamed gateway prompt"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model="echo", input="x")
    assert refused.value.code == "capability_mismatch"
    with pytest.raises(openai.BadRequestError, match="suffix"):
        sdk.completions.create(model="echo", prompt="x", suffix="y")
    # /v1/batches takes embeddings and completions lines.
    path = tmp_path / "kinds.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [
        _line("e", "/v1/embeddings", {"model": "echo-embed", "input": "batch text"}),
        _line("c", "/v1/completions", {"model": "echo", "prompt": "batch prompt"}),
    ]))  # fmt: skip
    uploaded = sdk.files.create(file=path.open("rb"), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    for _ in range(300):
        batch = sdk.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        import time

        time.sleep(0.2)
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    lines = {
        row["custom_id"]: row for row in map(json.loads, sdk.files.content(batch.output_file_id).text.splitlines())
    }
    assert lines["e"]["response"]["body"]["data"][0]["embedding"] == pytest.approx(echo_vector("batch text", 384),
                                                                                   abs=1e-6)  # fmt: skip
    assert lines["c"]["response"]["body"]["choices"][0]["text"] == "echo: batch prompt"


_TEXT = st.text(min_size=0, max_size=30)
_BODY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
_BODIES = st.fixed_dictionaries(
    {"model": st.sampled_from(["echo", "echo-embed", "emu-gpt", "nope", ""])},
    optional={"input": _BODY_VALUES, "prompt": _BODY_VALUES, "dimensions": _BODY_VALUES, "n": _BODY_VALUES,
              "encoding_format": _BODY_VALUES, "max_tokens": _BODY_VALUES, "echo": _BODY_VALUES,
              "stop": _BODY_VALUES, "suffix": _BODY_VALUES, "extra": _BODY_VALUES},
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=st.sampled_from(["/v1/embeddings", "/v1/completions"]), body=_BODIES)
def test_any_body_is_a_routed_request_or_its_own_error(url: str, body: dict[str, Any]) -> None:
    """Hypothesis over embeddings and completions bodies: each line is accepted (for a model serving its kind)
    or refused with a clear per-line error; never an exception."""
    parser = BatchLineParser(Router(Registry.from_settings(Settings())))
    raw = json.dumps({"custom_id": "x", "method": "POST", "url": url, "body": body})
    parsed = parser.parse_line(1, raw)
    if isinstance(parsed, AcceptedLine):
        assert parsed.request.url == url
        assert parsed.request.kind in parsed.spec.capabilities.kinds()
    else:
        assert isinstance(parsed, RejectedLine)
        assert parsed.error.code
        assert parsed.error.message.startswith("line 1: ")


def test_packed_vectors_round_trip() -> None:
    values = [0.0, -1.5, 3.25, 1e-8]
    packed = base64.b64encode(struct.pack("<4f", *values)).decode()
    assert unpack_vector(packed) == pytest.approx(values)
