"""Tool calls through the API-proxy workers: the official SDKs in real worker processes against the
emulators, which answer with calls in each provider's own format and refuse tool results that answer
no call. A round trip (request with tools -> tool_calls -> tool results -> answer) runs for OpenAI
and Anthropic, whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inferpool import CapabilityMismatch, Client, InvalidRequest
from inferpool.wire import ChatCompletion

pytestmark = pytest.mark.usefixtures("api_workers", "scheduler")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}  # fmt: skip
ASK = [{"role": "user", "content": "Paris"}]


def follow_up(completion: ChatCompletion, answers: dict[str, str]) -> list[dict[str, Any]]:
    """The conversation with the assistant's calls and a tool message answering each."""
    message = completion.choices[0].message
    assert message.tool_calls is not None
    calls = [call.model_dump() for call in message.tool_calls]
    results = [{"role": "tool", "tool_call_id": call.id, "content": answers[call.function.name]}
               for call in message.tool_calls]  # fmt: skip
    return [*ASK, {"role": "assistant", "content": message.content, "tool_calls": calls}, *results]


@pytest.mark.parametrize("model", ["emu-gpt", "emu-claude"])
def test_tool_call_round_trip(client: Client, model: str) -> None:
    completion = client.chat(model, ASK, tools=[WEATHER], timeout=30)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id
    assert completion.usage.completion_tokens > 0

    answer = client.chat(model, follow_up(completion, {"get_weather": "sunny 21C"}), tools=[WEATHER], timeout=30)
    assert answer.choices[0].message.content == "emulated: sunny 21C"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None


@pytest.mark.parametrize("model", ["emu-gpt", "emu-claude"])
def test_parallel_calls_and_tool_choice(client: Client, model: str) -> None:
    both = client.chat(model, ASK, tools=[WEATHER, TIME], timeout=30)
    assert both.choices[0].message.tool_calls is not None
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    answers = {"get_weather": "rain", "get_time": "noon"}
    answer = client.chat(model, follow_up(both, answers), tools=[WEATHER, TIME], timeout=30)
    assert answer.choices[0].message.content == "emulated: rain noon"

    one = client.chat(model, ASK, tools=[WEATHER, TIME], parallel_tool_calls=False, timeout=30)
    assert [c.function.name for c in one.choices[0].message.tool_calls or []] == ["get_weather"]
    named = client.chat(model, ASK, tools=[WEATHER, TIME], timeout=30,
                        tool_choice={"type": "function", "function": {"name": "get_time"}})  # fmt: skip
    assert [c.function.name for c in named.choices[0].message.tool_calls or []] == ["get_time"]
    none = client.chat(model, ASK, tools=[WEATHER], tool_choice="none", timeout=30)
    assert none.choices[0].message.content == "emulated: Paris"
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("model", ["emu-gpt-stream", "emu-claude-stream"])
def test_streamed_tool_calls(client: Client, model: str) -> None:
    """Providers called with streaming put the calls together from their deltas; a reader of the
    request's own stream gets them whole in the last delta, with their index."""
    chunks = list(client.stream(model, ASK, tools=[WEATHER, TIME], timeout=30))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1
    calls = deltas[0].tool_calls or []
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    whole = client.chat(model, ASK, tools=[WEATHER], timeout=30)  # the worker streams from the provider
    assert [c.function.name for c in whole.choices[0].message.tool_calls or []] == ["get_weather"]


def test_a_result_answering_no_call_is_the_providers_400(client: Client) -> None:
    """The emulators refuse what the real APIs refuse; the provider's message reaches the caller."""
    bad = [*ASK, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                       "function": {"name": "get_weather", "arguments": "{}"}}]},
           {"role": "user", "content": "and?"}]  # fmt: skip
    for model in ("emu-gpt", "emu-claude"):
        result = client.submit({"model": model, "messages": bad, "tools": [WEATHER]}).result(30)
        assert result.error is not None
        assert "HTTP 400" in result.error.message
        assert "call_1" in result.error.message


def test_tool_requests_are_checked_before_queueing(client: Client) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tool_choice": "auto"}, "tool_choice is only allowed when tools are given"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools\\[0\\] must be"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
    ]
    for extra, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            client.submit({"model": "emu-gpt", "messages": ASK, **extra})
    anthropic_bad_arguments = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "[1, 2]"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]  # fmt: skip
    result = client.submit({"model": "emu-claude", "messages": anthropic_bad_arguments, "tools": [WEATHER]}).result(30)
    assert result.error is not None
    assert result.error.code == "invalid_request"
    assert "must be a JSON object" in result.error.message


def test_models_without_tools_are_a_capability_mismatch(client: Client) -> None:
    with pytest.raises(CapabilityMismatch, match="does not support tools"):
        client.submit({"model": "smollm2-135m", "messages": ASK, "tools": [WEATHER]})
