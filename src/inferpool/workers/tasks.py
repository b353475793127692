"""The Celery task a worker runs, bound to that worker's runtime."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

from inferpool.constants import TASK_PROCESS_CHUNK
from inferpool.wire import TaskChunk
from inferpool.workers.runtime import WorkerRuntime


def install_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Register ``inferpool.process_chunk`` on ``app``, served by ``runtime``."""

    # Redis going away mid-chunk (a restart) retries the chunk with backoff rather than failing it;
    # requests it already answered are skipped on the retry.
    @app.task(
        name=TASK_PROCESS_CHUNK,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        autoretry_for=(redis.ConnectionError, redis.TimeoutError),
        retry_backoff=True,
        retry_backoff_max=30,
        retry_jitter=True,
        max_retries=None,
    )
    def process_chunk(payload: str | dict[str, Any]) -> dict[str, int]:
        chunk = (
            TaskChunk.model_validate_json(payload) if isinstance(payload, str) else TaskChunk.model_validate(payload)
        )
        return runtime.process_chunk(chunk).as_dict()
