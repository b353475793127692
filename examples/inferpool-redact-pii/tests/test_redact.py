"""The hook on its own (the pool test in inferpool's tests runs it inside a real worker)."""

from __future__ import annotations

import pytest
from inferpool_redact_pii import RedactPII

from inferpool.hooks import Generation, Reject
from inferpool.wire import ChatRequest


def request(text: str) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": text}]})


@pytest.mark.parametrize(("text", "expected"), [
    ("mail ada@example.org now", "mail [email] now"),
    ("call +44 20 7946 0958 or (555) 123-4567", "call [phone] or [phone]"),
    ("on 2024-01-31 at 10:30, room 12", "on 2024-01-31 at 10:30, room 12"),
    ("order 123 456", "order 123 456"),
])  # fmt: skip
def test_redacts_emails_and_phone_numbers_only(text: str, expected: str) -> None:
    redacted = RedactPII({}).before_request(request(text))
    assert redacted.messages[0].content == expected


def test_text_parts_blocked_phrases_and_answers() -> None:
    hook = RedactPII({"block": ["Launch Code"], "redact_answers": True, "email_placeholder": "<e>"})
    parts = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "to bob@corp.io"}]}]})  # fmt: skip
    assert hook.before_request(parts).messages[0].text() == "to <e>"
    with pytest.raises(Reject, match="blocked phrase 'launch code'"):
        hook.before_request(request("the LAUNCH CODE is"))
    answer = Generation(text="write to eve@x.org", finish_reason="stop", prompt_tokens=1, completion_tokens=4)
    assert hook.after_result(request("hi"), answer).text == "write to <e>"
    assert RedactPII({}).after_result(request("hi"), answer).text == "write to eve@x.org"
