"""OpenTelemetry traces end to end: real workers, scheduler and gateway exporting over OTLP/HTTP to a real receiver
(``inferpool.emulators.otlp``), and this process's client spans in the SDK's in-memory exporter.

The pool here has its own Redis: a scheduler leads per Redis, and the session's untraced one must not dispatch
these jobs.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from inferpool import AsyncClient, Client, Settings
from inferpool.emulators.otlp import OtlpReceiver, ReceivedSpan
from inferpool.plumbing.local_pool import EmbeddedRedis, start_scheduler_process, stop_process
from inferpool.state.api_keys import ApiKeys

from .conftest import _start_workers, _stop_workers, start_gateway, stop_gateway, wait_until

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # OTLP's span kinds


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    found = OtlpReceiver().start()
    yield found
    found.stop()


@pytest.fixture(scope="module")
def otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    # Exported every 100 ms, so the test waits little for spans.
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture(scope="module")
def traced_pool(tmp_path_factory: pytest.TempPathFactory, otel_env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(Redis URL, gateway base URL) of a pool whose every process exports spans."""
    workdir = tmp_path_factory.mktemp("traced-pool")
    server = EmbeddedRedis(workdir / "redis", executable=shutil.which("redis-server"))
    server.start()
    workers = _start_workers(server.url, workdir, "echo-traced", env=otel_env)
    content = _start_workers(server.url, workdir, "echo-traced-content",
                             env={**otel_env, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"})  # fmt: skip
    scheduler = start_scheduler_process(server.url, workdir / "scheduler.log", otel_env)
    gateway, url = start_gateway(server.url, workdir / "gateway.log", otel_env)
    try:
        yield server.url, url
    finally:
        log = stop_gateway(gateway, workdir / "gateway.log")
        stop_process(scheduler.proc, grace_s=15)
        _stop_workers(workers + content)
        server.stop()
        assert "could not record the spans" not in log
        for path in workdir.glob("*.log"):
            assert "could not record the spans" not in path.read_text(), path


@pytest.fixture(scope="module")
def memory() -> Iterator[InMemorySpanExporter]:
    """This process's spans (the client library's), kept in memory; the global provider is restored after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    # The API sets its provider once per process; the other tests must run untraced as before.
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]


def spans_of(receiver: OtlpReceiver, trace_id: str, *, at_least: int, what: str) -> list[ReceivedSpan]:
    found: list[ReceivedSpan] = []

    def arrived() -> bool:
        found[:] = [span for span in receiver.received() if span.trace_id == trace_id]
        return len(found) >= at_least

    wait_until(arrived, 30, what)
    time.sleep(0.3)  # a straggler of the same trace would show now
    return [span for span in receiver.received() if span.trace_id == trace_id]


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    named = [span for span in spans if span.name == name]
    assert len(named) == 1, (name, [span.name for span in spans])
    return named[0]


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def test_gateway_chat_is_one_trace_with_no_text(traced_pool: tuple[str, str], receiver: OtlpReceiver) -> None:
    """A caller's trace continues through the gateway, the submit and the worker; attributes follow the GenAI
    conventions, and neither the prompt nor the answer is in any span."""
    redis_url, url = traced_pool
    key = ApiKeys(redis.Redis.from_url(redis_url)).create("acme")[0]
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    marker = f"zebra-{secrets.token_hex(6)}"
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                        default_headers={"traceparent": f"00-{trace_id}-{parent}-01"})  # fmt: skip
    completion = sdk.chat.completions.create(model="echo-traced", messages=[{"role": "user", "content": marker}],
                                             max_tokens=20, temperature=0.5)  # fmt: skip
    assert marker in (completion.choices[0].message.content or "")

    spans = spans_of(receiver, trace_id, at_least=7, what="the chat's spans")
    server = one(spans, "POST /v1/chat/completions")
    assert (server.service, server.kind, server.parent_id) == ("inferpool-gateway", SERVER, parent)
    assert server.attributes["http.response.status_code"] == 200
    submit = one(spans, "inferpool.submit")
    assert (submit.service, submit.kind, submit.parent_id) == ("inferpool-gateway", PRODUCER, server.span_id)
    queued, process = one(spans, "inferpool.queue_wait"), one(spans, "inferpool.process echo-traced")
    assert queued.parent_id == process.parent_id == submit.span_id
    assert (process.service, process.kind) == ("inferpool-worker", CONSUMER)
    assert queued.end_ns == process.start_ns
    hook = one(spans, "inferpool.hooks.request")
    call = one(spans, "chat echo-traced")
    write = one(spans, "inferpool.result_write")
    assert hook.parent_id == call.parent_id == write.parent_id == process.span_id
    assert process.start_ns <= hook.start_ns <= call.start_ns <= call.end_ns <= write.start_ns <= process.end_ns
    assert call.kind == CLIENT
    usage = completion.usage
    assert usage is not None
    assert call.attributes == {
        "gen_ai.provider.name": "echo",
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "echo-traced", "gen_ai.request.max_tokens": 20,
        "gen_ai.request.temperature": 0.5, "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens, "gen_ai.response.finish_reasons": ["stop"],
    }  # fmt: skip
    assert not any(marker.encode() in body for body in receiver.raw)


def test_a_bad_traceparent_starts_a_new_trace(traced_pool: tuple[str, str], receiver: OtlpReceiver) -> None:
    """A caller's header is input like any other: malformed, all-zero or huge, the chat is served and its trace
    starts at the gateway."""
    redis_url, url = traced_pool
    key = ApiKeys(redis.Redis.from_url(redis_url)).create("acme")[0]
    marker = f"bad-parent-{secrets.token_hex(4)}"
    for parent in ("garbage", f"00-{'0' * 32}-{'0' * 16}-01", "00-" + "f" * 5000, "ff-" + "ab" * 16 + "-" + "cd" * 8):
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                           headers={"Authorization": f"Bearer {key}", "traceparent": parent},
                           json={"model": "echo-traced", "max_tokens": 4, "user": marker,
                                 "messages": [{"role": "user", "content": "hello"}]})  # fmt: skip
        assert reply.status_code == 200, reply.text
    roots: list[ReceivedSpan] = []

    def four_roots() -> bool:
        roots[:] = [span for span in receiver.received() if span.name == "POST /v1/chat/completions"
                    and span.parent_id == ""]  # fmt: skip
        return len(roots) >= 4

    wait_until(four_roots, 30, "the four chats' server spans, each the root of its trace")


def test_streamed_chat_marks_its_first_token(traced_pool: tuple[str, str], receiver: OtlpReceiver) -> None:
    redis_url, url = traced_pool
    key = ApiKeys(redis.Redis.from_url(redis_url)).create("acme")[0]
    trace_id = secrets.token_hex(16)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key}", "traceparent": f"00-{trace_id}-{'ab' * 8}-01"},
                      json={"model": "echo-traced", "stream": True, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "one two three four five"}]}) as response:  # fmt: skip
        assert response.status_code == 200
        body = b"".join(response.iter_bytes())
    assert body.rstrip().endswith(b"data: [DONE]")
    spans = spans_of(receiver, trace_id, at_least=7, what="the stream's spans")
    call = one(spans, "chat echo-traced")
    assert call.events == ("gen_ai.first_token",)
    assert call.attributes["gen_ai.request.stream"] is True


async def test_client_chats_each_get_their_trace(traced_pool: tuple[str, str], receiver: OtlpReceiver,
                                                 memory: InMemorySpanExporter) -> None:  # fmt: skip
    """40 chats at once travel in shared chunks, yet each is its own trace: the library's ``chat`` and
    ``inferpool.submit`` (in-memory exporter) and the worker's tree (the receiver), linked parent to child."""
    redis_url, _ = traced_pool
    memory.clear()
    async with AsyncClient(redis_url) as client:
        answers = await asyncio.gather(*(client.chat("echo-traced", [{"role": "user", "content": f"question {n}"}],
                                                     max_tokens=5)
                                         for n in range(40)))  # fmt: skip
    local = memory.get_finished_spans()
    calls = [span for span in local if span.name == "chat echo-traced"]
    submits = [span for span in local if span.name == "inferpool.submit"]
    assert len(calls) == len(submits) == 40
    by_trace = {hex_ids(span)[0]: span for span in calls}
    assert len(by_trace) == 40  # one trace per chat
    for call in calls:
        assert call.kind == trace.SpanKind.CLIENT
        assert call.attributes is not None
        assert call.attributes["gen_ai.usage.output_tokens"] > 0
    answered = {answer.id for answer in answers}
    assert {span.attributes["gen_ai.response.id"] for span in calls if span.attributes} == answered
    chunk_ids: set[object] = set()
    for submit in submits:
        assert submit.parent is not None
        trace_id, span_id = hex_ids(submit)
        assert hex_ids(by_trace[trace_id])[1] == f"{submit.parent.span_id:016x}"
        spans = spans_of(receiver, trace_id, at_least=4, what="a chat's worker spans")
        process = one(spans, "inferpool.process echo-traced")
        assert process.parent_id == span_id
        chunk_ids.add(process.attributes["inferpool.chunk.id"])
    assert len(chunk_ids) < 40  # they shared chunks, and still each has its own tree


def test_batch_job_is_one_trace_with_a_span_per_chunk(traced_pool: tuple[str, str], receiver: OtlpReceiver,
                                                      memory: InMemorySpanExporter) -> None:  # fmt: skip
    redis_url, _ = traced_pool
    memory.clear()
    lines = [{"custom_id": f"l{n}", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo-traced", "messages": [{"role": "user", "content":
              f"line {n}"}], "max_tokens": 4}} for n in range(10)]  # fmt: skip
    with Client(redis_url) as client:
        job = client.batches.wait(client.batches.create(lines).id, timeout=60)
    assert job.request_counts.completed == 10
    (create,) = [span for span in memory.get_finished_spans() if span.name == "inferpool.batch.create"]
    trace_id, create_id = hex_ids(create)
    # chunk_size 4: 10 lines are 3 chunks (4, 4, 2), each dispatched once and processed once.
    spans = spans_of(receiver, trace_id, at_least=3 * 2, what="the job's chunk spans")
    dispatches = [span for span in spans if span.name == "inferpool.dispatch echo-traced"]
    processes = [span for span in spans if span.name == "inferpool.process echo-traced"]
    assert len(dispatches) == len(processes) == 3
    assert {span.parent_id for span in dispatches} == {create_id}
    assert all(span.service == "inferpool-scheduler" and span.kind == PRODUCER for span in dispatches)
    assert {span.parent_id for span in processes} == {span.span_id for span in dispatches}
    assert sorted(span.attributes["inferpool.chunk.size"] for span in processes) == [2, 4, 4]
    calls = [span for span in spans if span.name == "chat echo-traced"]
    assert sorted(span.attributes["inferpool.requests"] for span in calls) == [2, 4, 4]
    assert sum(span.attributes["gen_ai.usage.input_tokens"] for span in calls) == job.usage[0].prompt_tokens
    assert all(span.attributes["inferpool.job.id"] == job.id for span in processes)
    assert sum(span.attributes["inferpool.results.written"] for span in processes) == 10
    # Not a span per line: each chunk is dispatched, then waits, is processed (the model's hooks before and after the
    # call), and written.
    assert Counter(span.name for span in spans) == {
        name: 3
        for name in (
            "inferpool.dispatch echo-traced",
            "inferpool.queue_wait",
            "inferpool.process echo-traced",
            "inferpool.hooks.request",
            "chat echo-traced",
            "inferpool.hooks.result",
            "inferpool.result_write",
        )
    }


def test_content_only_when_asked(traced_pool: tuple[str, str], receiver: OtlpReceiver,
                                 memory: InMemorySpanExporter) -> None:  # fmt: skip
    redis_url, _ = traced_pool
    marker = f"okapi-{secrets.token_hex(6)}"
    memory.clear()
    settings = Settings(redis_url=redis_url)
    with Client(settings=settings) as client:
        client.chat("echo-traced-content", [{"role": "user", "content": marker}], max_tokens=10)
    (submit,) = [span for span in memory.get_finished_spans() if span.name == "inferpool.submit"]
    spans = spans_of(receiver, hex_ids(submit)[0], at_least=4, what="the chat's worker spans")
    call = one(spans, "chat echo-traced-content")
    assert marker in str(call.attributes["gen_ai.input.messages"])
    assert marker in str(call.attributes["gen_ai.output.messages"])
    assert not any(marker in str(span.attributes) for span in memory.get_finished_spans())
