"""The echo backend itself: deterministic answers, exact word-token usage, limits and stops."""

from __future__ import annotations

import pytest

from inferpool import ContextLengthExceeded, Registry, Settings
from inferpool.wire import ChatRequest
from inferpool.workers.backend import Backend, Generation, create_backend


@pytest.fixture
def backend() -> Backend:
    return create_backend(Registry.load().get("echo"), Settings())


def _req(text: str, **params: object) -> ChatRequest:
    return ChatRequest.model_validate({"model": "echo", "messages": [{"role": "user", "content": text}], **params})


async def test_answers_and_counts_words(backend: Backend) -> None:
    [gen] = await backend.generate([_req("one two three")])
    assert gen == Generation(text="echo: one two three", finish_reason="stop", prompt_tokens=3, completion_tokens=4)


async def test_max_tokens_and_stop(backend: Backend) -> None:
    long, stopped = await backend.generate([_req("a b c d e f", max_tokens=3), _req("red green blue", stop=" blue")])
    assert long == Generation(text="echo: a b", finish_reason="length", prompt_tokens=6, completion_tokens=3)
    assert stopped == Generation(text="echo: red green", finish_reason="stop", prompt_tokens=3, completion_tokens=3)


async def test_context_overflow_is_a_per_request_error(backend: Backend) -> None:
    ok, too_long = await backend.generate([_req("short"), _req("w " * 5000)])
    assert isinstance(ok, Generation)
    assert isinstance(too_long, ContextLengthExceeded)
    assert "context window of 4096" in str(too_long)


def test_backends_register_through_entry_points() -> None:
    from inferpool.workers import available_backends

    assert {"echo", "transformers"} <= set(available_backends())
