"""The baseline for bench/batch_100k.py: plain Celery, one task per prompt, results in Celery's Redis backend."""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from celery import Celery

app = Celery("plain", broker=os.environ.get("REDIS_URL"), backend=os.environ.get("REDIS_URL"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"], task_acks_late=True,
                worker_prefetch_multiplier=1, result_expires=3600)  # fmt: skip


@app.task(name="plain.echo")
def echo(prompt: str) -> str:
    return f"echo: {prompt}"


@app.task(name="plain.chat")
def chat(body: dict[str, Any]) -> dict[str, Any]:
    """The same chat body in as an inferpool batch line's, a chat.completion of the same answer out."""
    prompt = body["messages"][-1]["content"]
    limit = body.get("max_tokens") or 256
    words = f"echo: {prompt}".split(maxsplit=limit)[:limit]  # the same work as inferpool's echo backend
    return {
        "id": f"chatcmpl-{secrets.token_hex(16)}", "object": "chat.completion", "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                     "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                  "total_tokens": len(prompt.split()) + len(words)},
    }  # fmt: skip
