"""The wire models accept the OpenAI formats and refuse what is wrong, with a message that says what."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from inferpool.wire import BatchOutputLine, ChatRequest, ErrorInfo, RequestResult


def _request(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    body.update(overrides)
    return body


def test_openai_chat_body_is_accepted() -> None:
    request = ChatRequest.model_validate(
        _request(
            max_completion_tokens=10,
            temperature=0.2,
            top_p=0.9,
            stop=["\n"],
            seed=1,
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
            ],
        )
    )
    assert request.output_limit() == 10
    assert request.messages[1].text() == "hello there"
    assert request.stop_sequences() == ["\n"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"temperature": 3}, "temperature"),
        ({"frobnicate": True}, "frobnicate"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ],
)
def test_invalid_bodies_are_refused(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate(_request(**overrides))
    assert fragment in str(info.value)


def test_missing_messages_is_refused() -> None:
    with pytest.raises(ValidationError, match="messages"):
        ChatRequest.model_validate({"model": "echo"})


def test_result_has_exactly_one_outcome() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        RequestResult(request_id="r")


def test_error_output_line_is_openai_batch_shaped() -> None:
    line = BatchOutputLine.from_error("c1", ErrorInfo(code="invalid_json", message="line 3: not JSON"))
    data = json.loads(line.model_dump_json())
    assert set(data) == {"id", "custom_id", "response", "error"}
    assert data["response"] is None
    assert data["error"] == {"code": "invalid_json", "message": "line 3: not JSON"}
