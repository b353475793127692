"""The Celery tasks a worker runs, bound to what serves them: one model's runtime, or a worker holding several
models (``inferpool.residency``), both a ``ChunkServer``."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import redis
from celery import Celery, Task
from celery.utils.time import get_exponential_backoff_interval

from inferpool._exceptions import ModelNotResident
from inferpool.constants import TASK_PROCESS_CHUNK, TASK_PROVIDER_BATCH_STEP
from inferpool.provider_batch.runner import ProviderBatchRunner
from inferpool.wire import TaskChunk
from inferpool.wire.tasks import ITEM_TRACES_HEADER, TRACEPARENT_HEADER
from inferpool.workers.runtime import ChunkReport, WorkerRuntime

log = logging.getLogger(__name__)

#: Longest wait before a chunk that met a Redis outage is tried again.
RETRY_BACKOFF_MAX_S = 30


class ChunkServer(Protocol):
    """What the tasks hand their work to."""

    def process_chunk(self, chunk: TaskChunk, *, maybe_answered: bool = True) -> ChunkReport: ...

    def provider_batch_step(self, pbatch_id: str) -> str: ...


class OneModel:
    """A worker serving one model: its runtime, and its provider-batch runner if the model has a Batch API."""

    def __init__(self, runtime: WorkerRuntime, provider_batches: ProviderBatchRunner | None = None) -> None:
        self.runtime = runtime
        self.provider_batches = provider_batches

    def process_chunk(self, chunk: TaskChunk, *, maybe_answered: bool = True) -> ChunkReport:
        return self.runtime.process_chunk(chunk, maybe_answered=maybe_answered)

    def provider_batch_step(self, pbatch_id: str) -> str:
        if self.provider_batches is None:
            log.error("provider batch %s: model %s has no provider Batch API in this worker", pbatch_id,
                      self.runtime.spec.name)  # fmt: skip
            return "no provider Batch API here"
        return self.provider_batches.step(pbatch_id)


def install_tasks(app: Celery, runtime: WorkerRuntime, provider_batches: ProviderBatchRunner | None = None) -> None:
    """Register the tasks on ``app`` for one model: ``inferpool.process_chunk`` served by ``runtime``,
    ``inferpool.provider_batch_step`` by ``provider_batches`` (models with a provider Batch API)."""
    install_chunk_server(app, OneModel(runtime, provider_batches))


def install_chunk_server(app: Celery, server: ChunkServer) -> None:
    """Register ``inferpool.process_chunk`` and ``inferpool.provider_batch_step`` on ``app``, served by ``server``."""

    # A step that fails on Redis is published again by the scheduler when its step timeout has passed.
    @app.task(name=TASK_PROVIDER_BATCH_STEP, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def provider_batch_step(pbatch_id: str) -> str:
        return server.provider_batch_step(pbatch_id)

    # Redis going away mid-chunk (a restart) retries the chunk with backoff rather than failing it;
    # requests it already answered are skipped on the retry. The retry is published by hand, not by
    # Celery's ``autoretry_for``: that re-publishes without ``argsrepr``, and the chunk's prompts would
    # then show in task events and Flower.
    @app.task(bind=True, name=TASK_PROCESS_CHUNK, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
              max_retries=None)  # fmt: skip
    def process_chunk(task: Task[Any, Any], payload: str | dict[str, Any]) -> dict[str, int]:
        chunk = (
            TaskChunk.model_validate_json(payload) if isinstance(payload, str) else TaskChunk.model_validate(payload)
        )
        request = task.request
        chunk.restore_traces(getattr(request, TRACEPARENT_HEADER, None), getattr(request, ITEM_TRACES_HEADER, None))
        # Delivered before (restored after a crash, or a retry): some results may exist already.
        again = bool(request.retries) or bool((request.delivery_info or {}).get("redelivered"))
        try:
            return server.process_chunk(chunk, maybe_answered=again).as_dict()
        except (redis.ConnectionError, redis.TimeoutError, ModelNotResident) as exc:
            # (ModelNotResident: a budgeted worker had no room for the chunk's model yet; it waits its turn.)
            countdown = get_exponential_backoff_interval(factor=1, retries=task.request.retries,
                                                         maximum=RETRY_BACKOFF_MAX_S, full_jitter=True)  # fmt: skip
            # celery-types' stub omits retry's **options, which Celery passes on to apply_async.
            raise task.retry(exc=exc, countdown=countdown, argsrepr=chunk.describe(),  # type: ignore[call-arg]
                             kwargsrepr="{}", headers=chunk.trace_headers()) from exc  # type: ignore[arg-type]  # fmt: skip
