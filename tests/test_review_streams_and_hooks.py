"""Issue 25, items 6, 7, 8 and 13: streams retried mid-answer, provider streams after a hang-up, a lone
surrogate in a batch file, and hooks on the way to a fallback. Real Redis, real workers and the official SDKs
against the provider emulator."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inferpool import Client, JobStatus, RequestError, Settings
from inferpool.constants import queue_name, stream_key
from inferpool.emulators import EmulatorConfig, ProviderEmulator
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.local_pool import WorkerProcess
from inferpool.state.heartbeats import beat, withdraw
from inferpool.state.streams import DeltaSink, StreamAssembler
from inferpool.wire import ChatRequest, RequestResult, TaskChunk, TaskItem, new_id
from inferpool.workers.echo import EchoBackend
from inferpool.workers.hooks import Hook, HookChain
from inferpool.workers.runtime import WorkerRuntime

from .conftest import ANTHROPIC_TEST_KEY, OPENAI_TEST_KEY, _start_workers, _stop_workers, wait_until

# -- 6: a retried stream never shows a spliced text ------------------------------------------------------


def _publish_attempts(client: redis.Redis, request_id: str, attempts: list[str]) -> None:
    """What a backend does on a provider retry: each attempt streams its text, restarting the sink between."""

    async def run() -> None:
        sink = DeltaSink(client, request_id, 60)
        for number, text in enumerate(attempts):
            if number:
                sink.restart()
            for word in text.split(" "):
                sink.emit(word if text.startswith(word) else " " + word)
                await asyncio.sleep(0.002)
            await sink.drain()

    asyncio.run(run())


def _result(request_id: str, text: str) -> RequestResult:
    completion = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    return RequestResult.model_validate({"request_id": request_id, "status": "completed", "response": completion})


def _read(client: redis.Redis, request_id: str, final: str) -> tuple[list[str], RequestError | None]:
    assembler = StreamAssembler(request_id)
    shown: list[str] = []
    try:
        entries = client.xrange(stream_key(request_id))
        for chunk in assembler.feed(entries):  # type: ignore[arg-type]
            shown.append(chunk.text)
        for chunk in assembler.finish(_result(request_id, final)):
            shown.append(chunk.text)
    except RequestError as exc:
        return shown, exc
    return shown, None


def test_a_retried_stream_that_answers_differently_ends_with_an_error_not_a_splice(redis_client: redis.Redis) -> None:
    request_id = new_id("req")
    first, second = "The capital of France is Par", "Paris is the capital of France."
    _publish_attempts(redis_client, request_id, [first, second])
    assert any(b"r" in fields for _, fields in redis_client.xrange(stream_key(request_id)))  # the restart mark
    shown, error = _read(redis_client, request_id, second)
    assert error is not None
    assert error.code == "stream_restarted"
    assert "result" in error.message
    text = "".join(shown)
    assert first.startswith(text) or second.startswith(text)  # only ever a prefix of one attempt
    assert "Parce." not in text


def test_a_retried_stream_that_repeats_itself_reads_as_one_answer(redis_client: redis.Redis) -> None:
    request_id = new_id("req")
    answer = "one two three four five six"
    _publish_attempts(redis_client, request_id, ["one two three", answer])
    shown, error = _read(redis_client, request_id, answer)
    assert error is None
    assert "".join(shown) == answer


# -- 7: an API backend's stream stops when its reader hangs up --------------------------------------------


@pytest.fixture(scope="module")
def slow_stream_emulator() -> Iterator[ProviderEmulator]:
    emulator = ProviderEmulator(EmulatorConfig(token_latency_s=0.15, api_keys=[OPENAI_TEST_KEY, ANTHROPIC_TEST_KEY]))
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def slow_stream_workers(redis_url: str, session_dir: Path, api_worker_env: dict[str, str],
                        slow_stream_emulator: ProviderEmulator) -> Iterator[list[WorkerProcess]]:  # fmt: skip
    env = {**api_worker_env, "OPENAI_BASE_URL": slow_stream_emulator.openai_base_url,
           "ANTHROPIC_BASE_URL": slow_stream_emulator.url}  # fmt: skip
    workers = _start_workers(redis_url, session_dir, "emu-gpt-hangup", "emu-claude-hangup", env=env)
    yield workers
    _stop_workers(workers)


@pytest.mark.parametrize("model", ["emu-gpt-hangup", "emu-claude-hangup"])
def test_a_provider_stream_is_closed_when_its_reader_hangs_up(
    model: str, client: Client, slow_stream_emulator: ProviderEmulator, slow_stream_workers: list[WorkerProcess]
) -> None:
    counts = slow_stream_emulator.counts
    before = (counts["streams_finished"], counts["streams_closed_by_client"])
    words = " ".join(f"w{i}" for i in range(60))  # ~9 s of tokens at 0.15 s each
    handle = client.submit({"model": model, "messages": [{"role": "user", "content": words}], "stream": True,
                            "max_tokens": 200})  # fmt: skip
    stream = handle.stream(timeout=60)
    assert next(c for c in stream if c.text)  # the answer has begun
    handle.stop()
    result = handle.result(timeout=30)
    assert result.error is not None
    assert result.error.code == "request_cancelled"
    wait_until(lambda: counts["streams_closed_by_client"] > before[1], 10, "the provider stream to be closed")
    assert counts["streams_finished"] == before[0]  # the provider never streamed the whole answer


# -- 8: a lone surrogate fails its own line only -----------------------------------------------------------


@pytest.mark.usefixtures("echo_worker", "scheduler")
def test_a_line_with_a_lone_surrogate_is_that_lines_invalid_json(client: Client, tmp_path: Path) -> None:
    good = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "echo", "messages": [{"role": "user", "content": "fine"}]}}  # fmt: skip
    path = tmp_path / "surrogate.jsonl"
    path.write_text(
        json.dumps({"custom_id": "a", **good}) + "\n"
        + '{"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo", '
        '"messages": [{"role": "user", "content": "\\ud800"}]}}\n'
        + json.dumps({"custom_id": "c", **good}) + "\n"
    )  # fmt: skip
    job = client.batches.wait(client.batches.create(path).id, timeout=60)
    assert job.status == JobStatus.COMPLETED
    lines = {line.custom_id: line for line in client.batches.results(job.id)}
    assert set(lines) == {"a", "c", None}
    bad = lines[None]
    assert bad.error is not None
    assert bad.error.code == "invalid_json"
    assert "surrogate" in bad.error.message
    assert lines["a"].error is None
    assert lines["c"].error is None


# -- 13: a fallback gets the request as it arrived, not as the first model's hooks rewrote it ---------------


class _Prefix(Hook):
    def before_request(self, request: ChatRequest) -> ChatRequest:
        messages = [m.model_copy(update={"content": "[seen] " + m.text()}) for m in request.messages]
        return request.model_copy(update={"messages": messages})


def test_a_fallback_receives_the_request_before_the_first_models_hooks(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    registry_file = tmp_path / "hooked.yaml"
    registry_file.write_text(
        "models:\n"
        "  - {name: hooked-first, backend: echo, params: {fail_marker: FAIL}, fallbacks: [hooked-second],\n"
        "     capabilities: {context_window: 4096, max_output_tokens: 64}}\n"
        "  - {name: hooked-second, backend: echo, capabilities: {context_window: 4096, max_output_tokens: 64}}\n"
    )
    local = settings.model_copy(update={"registry": [*settings.registry, registry_file]})
    registry = Registry.from_settings(local)
    spec = registry.get("hooked-first")
    celery = create_celery_app(local)
    runtime = WorkerRuntime(spec, EchoBackend(spec, local), redis_client, local, registry=registry, celery=celery,
                            hooks=HookChain([("prefix", _Prefix())]))  # fmt: skip
    fallback_worker = f"hooked-second@test-{os.getpid()}"
    beat(redis_client, "hooked-second", fallback_worker, 30, "{}")
    try:
        request = ChatRequest.model_validate({"model": "hooked-first", "messages": [{"role": "user",
                                                                                    "content": "FAIL please"}]})  # fmt: skip
        chunk = TaskChunk(model="hooked-first", items=[TaskItem(request_id=new_id("req"), request=request)],
                          result_ttl_s=60)  # fmt: skip
        runtime.process_chunk(chunk)
        raw = redis_client.rpop(queue_name("hooked-second"))
        assert raw is not None, "the request was not forwarded"
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        forwarded = TaskChunk.model_validate_json(body[0][0])
        assert forwarded.items[0].request.messages[0].text() == "FAIL please"  # not "[seen] FAIL please"
        assert forwarded.items[0].tried == ["hooked-first"]
    finally:
        withdraw(redis_client, "hooked-second", fallback_worker)
        runtime.close()
        celery.close()


def test_a_single_request_its_client_gave_up_on_is_not_run(settings: Settings, redis_client: redis.Redis) -> None:
    """Issue 25.1: a request stopped while it waited in a backed-up queue ends without running."""
    registry = Registry.from_settings(settings)
    spec = registry.get("echo")
    runtime = WorkerRuntime(spec, EchoBackend(spec, settings), redis_client, settings, registry=registry)
    try:
        with Client(settings=settings) as client:
            request = ChatRequest.model_validate({"model": "echo", "messages": [{"role": "user", "content": "x"}]})
            given_up, wanted = (TaskItem(request_id=new_id("req"), request=request) for _ in range(2))
            client.handle(given_up.request_id).stop()
            runtime.process_chunk(TaskChunk(model="echo", items=[given_up, wanted], result_ttl_s=60))
            abandoned = client.handle(given_up.request_id).result(timeout=5)
            answered = client.handle(wanted.request_id).result(timeout=5)
    finally:
        runtime.close()
    assert abandoned.error is not None
    assert abandoned.error.code == "request_cancelled"
    assert "not run" in abandoned.error.message
    assert answered.response is not None
