"""Hostile input, generated (hypothesis): whatever the bytes, every input surface ends in a clear error.

Surfaces: batch lines (the parser, and a running pool: one output line per input line), request bodies
(``client.submit``), registry YAML, and stored results read back. The invariant is that nothing but the
surface's own error escapes, and each bad item gets its own error with a code and a message.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferpool import Client, InvalidRequest, JobStatus, RegistryError, RequestError
from inferpool.client._base import build_request
from inferpool.client.batch_lines import AcceptedLine, BatchLineParser, RejectedLine
from inferpool.client.routing import Router
from inferpool.model_registry.registry import Registry, parse_registry_text
from inferpool.wire import BatchOutputLine, ChatRequest
from inferpool.workers.anthropic_translate import tool_arguments

FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
          "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice", "logprobs",
          "top_logprobs", "user", "metadata", "stream", "routing", "parallel_tool_calls", "cache"]  # fmt: skip
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", 7])},
        optional={"content": json_values, "tool_call_id": scalars, "tool_calls": json_values, "name": scalars},
    ),
    max_size=4,
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["echo", "echo-slow", "no-such-model", "", "auto", 3])},
    optional={"messages": messages | json_values, **{field: json_values for field in FIELDS[2:]}},
)


functions = st.fixed_dictionaries({}, optional={"name": scalars, "parameters": json_values, "description": scalars})
tool_lists = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "retrieval", 1])}, optional={"function": functions | json_values}
    ),
    max_size=3,
)
tool_choices = st.sampled_from(["none", "auto", "required", "any"]) | st.fixed_dictionaries(
    {"type": st.just("function")}, optional={"function": functions | json_values}
)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _batch_line(custom_id: Any, body: Any, url: Any = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


lines = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda raw: raw.decode("utf-8", errors="replace")),
    json_values.map(json.dumps),
    st.builds(_batch_line, st.text(max_size=10) | scalars, bodies),
    st.builds(_batch_line, st.text(min_size=1, max_size=10), bodies, st.text(max_size=30)),
    st.integers(min_value=1, max_value=200_000).map(_nested),
    st.integers(min_value=4_301, max_value=20_000).map(lambda n: '{"custom_id": "big", "body": ' + "7" * n + "}"),
).map(lambda text: text.replace("\n", " ").replace("\r", " "))


@SLOW
@given(tools=tool_lists | json_values, choice=tool_choices | json_values, parallel=json_values)
def test_any_tools_become_a_request_or_invalid_request(tools: Any, choice: Any, parallel: Any) -> None:
    """The tool fields, nearer to valid than random bodies get: a request, or InvalidRequest saying why."""
    body = {"model": "emu-claude", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
            "tool_choice": choice, "parallel_tool_calls": parallel}  # fmt: skip
    try:
        request = build_request(body)
    except InvalidRequest as exc:
        message = exc.message
    else:
        message = ""
    if message:
        return
    for tool in request.tools or []:
        assert isinstance(tool["function"]["name"], str)
    arguments = tool_arguments(request)  # the Anthropic translation takes whatever validation let through
    assert ("tools" in arguments) == bool(request.tools)


@pytest.fixture(scope="module")
def parser_router() -> Router:
    return Router(Registry.load())


@SLOW
@given(line=lines)
def test_any_line_becomes_a_request_or_its_own_error(parser_router: Router, line: str) -> None:
    parsed = BatchLineParser(parser_router).parse_line(1, line)
    assert isinstance(parsed, AcceptedLine | RejectedLine)
    if isinstance(parsed, RejectedLine):
        assert parsed.error.code
        assert parsed.error.message.startswith("line 1: ")


@SLOW
@given(body=bodies)
def test_any_body_is_a_request_or_an_invalid_request(client: Client, body: dict[str, Any]) -> None:
    refused: RequestError | None = None
    try:
        handle = client.submit(body)
    except RequestError as exc:  # InvalidRequest, ModelNotFound, CapabilityMismatch, ...
        refused = exc
    if refused is None:
        assert handle.request_id
    else:
        assert refused.code
        assert str(refused)


def test_bodies_nested_beyond_reason_are_invalid_requests(client: Client) -> None:
    deep: Any = "x"
    for _ in range(50_000):
        deep = {"a": deep}
    with pytest.raises(InvalidRequest):
        client.submit({"model": "echo", "messages": [{"role": "user", "content": "x"}], "metadata": deep})
    with pytest.raises(InvalidRequest):
        client.submit({"model": "echo", "messages": [{"role": "user", "content": "x"}], "response_format": deep})


@SLOW
@given(text=st.text(max_size=400) | st.integers(min_value=1, max_value=50_000).map(_nested))
def test_any_registry_text_is_a_registry_or_a_registry_error(text: str) -> None:
    refused: RegistryError | None = None
    try:
        document = parse_registry_text(text, "hostile.yaml")
    except RegistryError as exc:
        refused = exc
    if refused is None:
        assert document.models is not None
    else:
        assert str(refused).startswith("hostile.yaml: ")


@SLOW
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_stored_result_reads_back_as_an_output_line(raw: bytes) -> None:
    text, ok = BatchOutputLine.json_from_stored_result(raw)
    line = json.loads(text)
    assert {"id", "custom_id", "response", "error"} <= set(line)
    assert ok == (line["response"] is not None)
    if not ok:
        assert isinstance(line["error"]["code"], str)
        assert isinstance(line["error"]["message"], str)


@pytest.mark.usefixtures("echo_worker", "scheduler")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(batch=st.lists(lines, min_size=1, max_size=25))
def test_a_pool_answers_every_hostile_line_once(client: Client, batch: list[str]) -> None:
    expected = [line for line in batch if line.strip()]
    if not expected:
        return
    job = client.batches.create(batch)
    done = client.batches.wait(job.id, timeout=60, poll_s=0.1)
    assert done.status == JobStatus.COMPLETED
    output = list(client.batches.results(job.id))
    assert len(output) == len(expected) == done.request_counts.total
    assert all((line.response is None) != (line.error is None) for line in output)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "user"}], "a user message needs content"),
        ([{"role": "system", "content": None}, {"role": "user", "content": "x"}], "a system message needs content"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}], "needs tool_call_id"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "42", "tool_call_id": "call_1"}],
         "no earlier assistant message called"),
        ([{"role": "user", "content": "x"}, {"role": "assistant"}], "needs content or tool_calls"),
    ],
)  # fmt: skip
def test_messages_follow_openai_rules(messages: list[dict[str, Any]], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ChatRequest.model_validate({"model": "echo", "messages": messages})


def test_a_tool_answer_to_an_earlier_call_is_valid() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    request = ChatRequest.model_validate({"model": "echo", "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"}]})  # fmt: skip
    assert len(request.messages) == 3
