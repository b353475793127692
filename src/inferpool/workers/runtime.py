"""One worker process's state: its model's backend, an event loop that feeds it, and its heartbeat.

Celery task threads hand chunks to ``WorkerRuntime.process_chunk``; the backend's coroutines run on
one event loop in a background thread, so many chunks can be in flight in one backend at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from inferpool._exceptions import ProviderError, RequestError
from inferpool.constants import worker_heartbeat_key
from inferpool.model_registry.capability import check_request_fits
from inferpool.model_registry.spec import ModelSpec
from inferpool.results import ResultWriter
from inferpool.settings import Settings
from inferpool.wire import (
    AssistantMessage,
    ChatCompletion,
    Choice,
    ErrorInfo,
    RequestResult,
    ServingStats,
    TaskChunk,
    TaskItem,
    Usage,
)
from inferpool.workers.backend import Backend, Generation, GenerationOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkReport:
    """What one ``process_chunk`` call did; returned to Celery (JSON) for Flower and logs."""

    written: int
    skipped_existing: int
    duplicates_ignored: int
    errors: int

    def as_dict(self) -> dict[str, int]:
        return {
            "written": self.written,
            "skipped_existing": self.skipped_existing,
            "duplicates_ignored": self.duplicates_ignored,
            "errors": self.errors,
        }


def default_worker_id(model_name: str) -> str:
    return f"{model_name}@{socket.gethostname()}-{os.getpid()}"


class WorkerRuntime:
    """Serves one model in this process."""

    def __init__(
        self,
        spec: ModelSpec,
        backend: Backend,
        redis_client: redis.Redis,
        settings: Settings,
        worker_id: str | None = None,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.settings = settings
        self.worker_id = worker_id or default_worker_id(spec.name)
        self._redis = redis_client
        self._writer = ResultWriter(redis_client)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="backend-loop", daemon=True)
        self._loop_thread.start()
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # -- processing ------------------------------------------------------------------------------------

    def process_chunk(self, chunk: TaskChunk) -> ChunkReport:
        """Answer every request of ``chunk`` that has no result yet, and write each result once."""
        started = time.time()
        already = self._writer.existing([item.request_id for item in chunk.items])
        todo = [item for item in chunk.items if item.request_id not in already]
        outcomes: dict[str, GenerationOutcome] = {}
        runnable: list[TaskItem] = []
        for item in todo:
            try:
                check_request_fits(self.spec, item.request)
            except RequestError as exc:
                outcomes[item.request_id] = exc
            else:
                runnable.append(item)
        outcomes.update(self._generate(runnable))
        written = duplicates = errors = 0
        for item in todo:
            result = self._result(chunk, item, outcomes[item.request_id], started)
            errors += result.error is not None
            if self._writer.write(result, chunk.result_ttl_s):
                written += 1
            else:
                duplicates += 1
        report = ChunkReport(written, len(already), duplicates, errors)
        log.info("chunk %s done: %s", chunk.describe(), report.as_dict())
        return report

    def _generate(self, items: Sequence[TaskItem]) -> dict[str, GenerationOutcome]:
        if not items:
            return {}
        future = asyncio.run_coroutine_threadsafe(self.backend.generate([i.request for i in items]), self._loop)
        try:
            generated = future.result()
        except Exception as exc:  # a backend bug must not lose the chunk's requests: each gets an error
            log.exception("backend %s failed on a chunk", self.backend.name)
            failure = ProviderError(f"backend {self.backend.name!r} failed: {type(exc).__name__}: {exc}")
            return {item.request_id: failure for item in items}
        if len(generated) != len(items):
            failure = ProviderError(f"backend {self.backend.name!r} returned {len(generated)} answers for {len(items)}")
            return {item.request_id: failure for item in items}
        return {item.request_id: outcome for item, outcome in zip(items, generated, strict=True)}

    def _result(self, chunk: TaskChunk, item: TaskItem, outcome: GenerationOutcome, started: float) -> RequestResult:
        now = time.time()
        stats = ServingStats(
            model=self.spec.name,
            backend=self.backend.name,
            worker=self.worker_id,
            queued_s=max(0.0, started - chunk.enqueued_at),
            latency_s=max(0.0, now - started),
        )
        common = {"request_id": item.request_id, "custom_id": item.custom_id, "job_id": chunk.job_id, "stats": stats}
        if isinstance(outcome, RequestError):
            return RequestResult(**common, error=ErrorInfo.from_exception(outcome))
        return RequestResult(**common, response=self._completion(outcome, int(now)))

    def _completion(self, generation: Generation, created: int) -> ChatCompletion:
        usage = Usage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            total_tokens=generation.prompt_tokens + generation.completion_tokens,
        )
        choice = Choice(
            index=0, message=AssistantMessage(content=generation.text), finish_reason=generation.finish_reason
        )
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=created, model=self.spec.name, choices=[choice], usage=usage
        )

    # -- heartbeat and shutdown ------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Announce this worker in Redis until ``close``; the key expires by itself if the process dies."""
        if self._heartbeat_thread is not None:
            return
        self._beat()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()

    def _beat(self) -> None:
        payload = json.dumps(
            {
                "worker_id": self.worker_id,
                "model": self.spec.name,
                "backend": self.backend.name,
                "pid": os.getpid(),
                "concurrency": self.spec.serving.concurrency,
                "at": time.time(),
            }
        )
        self._redis.set(worker_heartbeat_key(self.spec.name, self.worker_id), payload, ex=self.settings.heartbeat_ttl_s)

    def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_ttl_s / 3
        while not self._stop.wait(interval):
            try:
                self._beat()
            except redis.RedisError as exc:  # Redis restarting: keep trying, the key just lapses meanwhile
                log.warning("heartbeat failed: %s", exc)

    def close(self) -> None:
        """Stop the heartbeat, remove it, and release the backend."""
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self._redis.delete(worker_heartbeat_key(self.spec.name, self.worker_id))
        asyncio.run_coroutine_threadsafe(self.backend.aclose(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)
