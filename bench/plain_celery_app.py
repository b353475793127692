"""The baseline for bench/batch_100k.py: plain Celery, one task per prompt, results in Celery's Redis backend."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("plain", broker=os.environ.get("REDIS_URL"), backend=os.environ.get("REDIS_URL"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"], task_acks_late=True,
                worker_prefetch_multiplier=1, result_expires=3600)  # fmt: skip


@app.task(name="plain.echo")
def echo(prompt: str) -> str:
    return f"echo: {prompt}"
