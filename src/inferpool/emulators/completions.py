"""The emulator's answers beyond chat: OpenAI's ``/v1/embeddings`` and ``/v1/completions`` bodies.

Deterministic, like the chat answers: an embedding is a unit vector drawn from a generator seeded by the
input's text (or token ids), so equal inputs give equal vectors in any process; a completion echoes its
prompt (``emulated: <prompt>``) cut to ``max_tokens`` words and at the first stop sequence. A body the real
API refuses gets the 400's message instead.
"""

from __future__ import annotations

import time
from typing import Any

from inferpool.emulators.answers import cut_answer
from inferpool.wire import pack_vector
from inferpool.workers.echo import echo_vector as embedding_vector

#: The vector size when a request names no ``dimensions`` (OpenAI's text-embedding-3-small).
DEFAULT_DIMENSIONS = 1536
#: Most inputs one embeddings request may carry (OpenAI's limit).
MAX_INPUTS = 2048


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(x) is int for x in value)


def _inputs(raw: Any) -> list[str | list[int]] | str:
    """The request's inputs as a list, or the 400's message."""
    if isinstance(raw, str) or _token_ids(raw):
        return [raw]  # one text, or one input as token ids
    if not isinstance(raw, list) or not raw:
        return "'input' must be a non-empty string, array of strings, or array of token arrays"
    items: list[str | list[int]] = []
    for item in raw:
        if not ((isinstance(item, str) and item) or _token_ids(item)):
            return "each input must be a non-empty string or a non-empty array of token ids"
        items.append(item)
    if len(items) > MAX_INPUTS:
        return f"at most {MAX_INPUTS} inputs per request, got {len(items)}"
    return items


def embeddings_answer(body: dict[str, Any]) -> dict[str, Any] | str:
    """OpenAI's embeddings ``list`` object for ``body``, or the 400's message."""
    items = _inputs(body.get("input"))
    if isinstance(items, str):
        return items
    dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= DEFAULT_DIMENSIONS:
        return f"'dimensions' must be an integer from 1 to {DEFAULT_DIMENSIONS}"
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return "'encoding_format' must be 'float' or 'base64'"
    data = []
    for index, item in enumerate(items):
        vector = embedding_vector(item, dimensions)
        embedding: list[float] | str = pack_vector(vector) if encoding == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(len(item.split()) if isinstance(item, str) else len(item) for item in items)
    return {"object": "list", "data": data, "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


def _prompts(raw: Any) -> list[str] | str:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        return list(raw)
    return "'prompt' must be a string or a non-empty array of strings"


def completion_texts(prompt: str, max_tokens: Any, stop: Any) -> tuple[str, str]:
    """``emulated: <prompt>`` cut to ``max_tokens`` words (16 when unset, as OpenAI's default) and at the first
    stop sequence: (text, finish reason)."""
    limit = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 16
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return cut_answer(f"emulated: {prompt}", limit, [s for s in stops if isinstance(s, str) and s])


def completions_answer(body: dict[str, Any], sequence: int) -> dict[str, Any] | str:
    """OpenAI's ``text_completion`` object for ``body`` (one choice per prompt, times ``n``), or the 400's
    message."""
    prompts = _prompts(body.get("prompt"))
    if isinstance(prompts, str):
        return prompts
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        return "'n' must be an integer from 1 to 128"
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    for prompt in prompts:
        text, finish = completion_texts(prompt, body.get("max_tokens"), body.get("stop"))
        if body.get("echo"):
            text = prompt + text
        prompt_tokens += len(prompt.split())
        for _ in range(n):
            choices.append({"text": text, "index": len(choices), "logprobs": None, "finish_reason": finish})
            completion_tokens += len(text.split())
    return {"id": f"cmpl-emu{sequence}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}  # fmt: skip


def completion_stream_events(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``text_completion`` chunks OpenAI streams for ``answer``: its text word by word, per choice, the
    finish reason on each choice's last chunk."""
    head = {k: answer[k] for k in ("id", "object", "created", "model")}
    events = []
    for choice in answer["choices"]:
        pieces = choice["text"].split(" ")
        for position, piece in enumerate(pieces):
            last = position == len(pieces) - 1
            text = piece if position == 0 else " " + piece
            finish = choice["finish_reason"] if last else None
            events.append({**head, "choices": [{"text": text, "index": choice["index"], "logprobs": None,
                                                "finish_reason": finish}]})  # fmt: skip
    return events
