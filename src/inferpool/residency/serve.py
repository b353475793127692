"""A worker process holding several models within a memory budget (``inferpool worker --models a,b,c``).

It consumes every model's shared and own queues and announces itself for each model (state warm, loading,
asleep or cold), so a model nobody holds warm still has a worker: its lines wait in Redis until this one loads
it (scale to zero per model). Models load when their first chunk arrives (``inferpool.residency.manager``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery, bootsteps, signals

from inferpool._exceptions import ConfigurationError, ModelLoadError, ModelNotResident
from inferpool.constants import MODEL_LOAD_ERROR_CODE, job_items_key, model_queues, worker_queues
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.process_tuning import refreeze_after_unload, tune_gc_for_throughput
from inferpool.plumbing.redis_connection import connect_redis
from inferpool.plumbing.settings import Settings
from inferpool.provider_batch.runner import ProviderBatchRunner
from inferpool.provider_batch.store import ProviderBatchStore
from inferpool.residency.budget import (
    can_park,
    describe_bytes,
    known_footprint,
    record_footprint,
    record_swap_seconds,
)
from inferpool.residency.manager import Loaded, ResidentModels
from inferpool.state.availability import mark_unavailable, publish_availability
from inferpool.state.heartbeats import beat, withdraw
from inferpool.state.items import held_by
from inferpool.state.jobs import error_result_of_record
from inferpool.state.results import ResultWriter
from inferpool.state.worker_queues import WorkerQueues
from inferpool.tracing.setup import install_tracing
from inferpool.wire import ErrorInfo, RequestResult, TaskChunk
from inferpool.workers.backend import create_backend, memory_footprint, preload_backend
from inferpool.workers.cache import ResponseCache
from inferpool.workers.detection import OwnDetection
from inferpool.workers.hooks import HookChain, load_hooks
from inferpool.workers.runtime import ChunkReport, WorkerRuntime
from inferpool.workers.serve import run_celery_worker
from inferpool.workers.tasks import install_chunk_server

log = logging.getLogger(__name__)


class ResidentServer:
    """The tasks' ``ChunkServer``: each chunk served while its model is held."""

    def __init__(self, resident: ResidentModels, store: ProviderBatchStore) -> None:
        self.resident = resident
        self.store = store
        self.writer = ResultWriter(store.redis)

    def process_chunk(self, chunk: TaskChunk, *, maybe_answered: bool = True) -> ChunkReport:
        try:
            with self.resident.hold(chunk.model) as loaded:
                return loaded.runtime.process_chunk(chunk, maybe_answered=maybe_answered)
        except ModelNotResident:
            raise  # no room yet: the chunk waits its turn (the task retries it)
        except ModelLoadError as exc:
            log.error("model %s could not load: %s; its chunk %s ends with that error", chunk.model, exc,
                      chunk.describe())  # fmt: skip
            return self._end_unloadable(chunk, str(exc))

    def _end_unloadable(self, chunk: TaskChunk, reason: str) -> ChunkReport:
        """End the chunk's unanswered requests with ``model_load_error``: a model that cannot load here must
        not leave its requests waiting (a single request's client would wait for nothing)."""
        message = f"model {chunk.model!r} could not be loaded by the worker: {reason}"
        if chunk.refs and chunk.job_id is not None:
            records: Any = self.store.redis.hmget(job_items_key(chunk.job_id), chunk.refs)
            results = [error_result_of_record(chunk.job_id, rid, record, MODEL_LOAD_ERROR_CODE, message)
                       for rid, record in zip(chunk.refs, records, strict=True)
                       if record is not None and held_by(record, chunk.model)]  # fmt: skip
        else:
            results = [RequestResult(request_id=item.request_id, custom_id=item.custom_id, job_id=chunk.job_id,
                                     tenant=item.tenant, error=ErrorInfo(code=MODEL_LOAD_ERROR_CODE, message=message))
                       for item in chunk.items]  # fmt: skip
        replies = {item.request_id: item.reply_to for item in chunk.items if item.reply_to}
        flags = self.writer.write_many([(result, chunk.model) for result in results], chunk.result_ttl_s,
                                       reply_to=replies)  # fmt: skip
        written = sum(flags)
        return ChunkReport(written, chunk.size - len(results), len(flags) - written, written)

    def provider_batch_step(self, pbatch_id: str) -> str:
        batch = self.store.get(pbatch_id)
        if batch is None or batch.model not in self.resident.specs:
            return "not a provider batch of this worker's models"
        with self.resident.hold(batch.model) as loaded:
            if loaded.runner is None:
                return "no provider Batch API here"
            return loaded.runner.step(pbatch_id)


def plan(specs: Sequence[ModelSpec], budget: int, client: redis.Redis) -> list[tuple[str, int | None]]:
    """Each model with its footprint (None: measured at its first load); ``ConfigurationError`` for one that
    can never fit the budget."""
    footprints = [(spec.name, known_footprint(spec, client)) for spec in specs]
    for name, footprint in footprints:
        if footprint is not None and footprint > budget:
            raise ConfigurationError(f"model {name!r} takes {describe_bytes(footprint)}, more than the worker's "
                                     f"memory budget of {describe_bytes(budget)}: raise --memory-budget or leave "
                                     "it out")  # fmt: skip
    return footprints


def plan_for(models: Sequence[str], settings: Settings, budget: int) -> list[tuple[str, int | None]]:
    """``plan`` for model names (aliases resolved) on the Redis of ``settings``: what the worker will hold."""
    registry = Registry.from_settings(settings)
    specs = list({spec.name: spec for spec in (registry.get(model) for model in models)}.values())
    client = connect_redis(settings.require_redis_url())
    try:
        return plan(specs, budget, client)
    finally:
        client.close()


def _waiting(client: redis.Redis, model: str, worker_id: str) -> int:
    """Chunks waiting for ``model`` in its shared queues and this worker's own."""
    pipe = client.pipeline(transaction=False)
    for queue in [*model_queues(model), *worker_queues(model, worker_id)]:
        pipe.llen(queue)
    return sum(int(n) for n in pipe.execute())


class _Announcer:
    """Heartbeats for every model of the worker (its state per model), the hand-over of gone peers' own
    queues, and the unloading of models idle past their keep-alive."""

    def __init__(self, client: redis.Redis, settings: Settings, worker_id: str, resident: ResidentModels) -> None:
        self.redis, self.settings, self.worker_id, self.resident = client, settings, worker_id, resident
        self.budget = resident.budget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._queues = WorkerQueues(client)
        # Each model's real window and availability, from its detector and, while it is loaded, its engine (a
        # model loaded again is asked again: the heartbeat that announces the load reads it).
        self.detections = {name: OwnDetection(spec, settings, functools.partial(resident.backend_of, name),
                                              on_change=functools.partial(self._availability_changed, name))
                           for name, spec in resident.specs.items()}  # fmt: skip

    def start(self) -> None:
        self.beat()
        self._thread.start()
        for detection in self.detections.values():
            detection.start()

    def _availability_changed(self, name: str, available: bool) -> None:
        if self._stop.is_set():
            return
        try:
            publish_availability(self.redis, name, self.worker_id, available)
            self.beat()
        except redis.RedisError as exc:
            log.warning("could not publish model %s's availability: %s", name, exc)

    def beat(self) -> None:
        states, counts, held = self.resident.states(), self.resident.counts(), self.resident.held_bytes()
        warm = sorted(name for name, state in states.items() if state == "warm")
        grace = self.settings.gone_worker_grace_s()
        for name, spec in self.resident.specs.items():
            detection = self.detections[name]
            if not detection.available:  # out of routing: only the record of why is renewed
                mark_unavailable(self.redis, name, detection.unavailable_record(), self.settings.heartbeat_ttl_s * 3)
                continue
            payload = {"worker_id": self.worker_id, "model": name, "backend": spec.backend, "pid": os.getpid(),
                       "state": states[name], "resident": warm, "budget_bytes": self.budget, "held_bytes": held,
                       "loads": counts.loads, "evictions": counts.evictions, "load_s": counts.load_s,
                       "sleeps": counts.sleeps, "wakes": counts.wakes, "wake_s": counts.wake_s,
                       "at": time.time(), **detection.beat_fields()}  # fmt: skip
            beat(self.redis, name, self.worker_id, self.settings.heartbeat_ttl_s, json.dumps(payload), grace,
                 detection.window())  # fmt: skip

    def _loop(self) -> None:
        interval = self.settings.heartbeat_ttl_s / 3
        while not self._stop.wait(min(interval, max(0.5, self.resident.keep_alive_s / 2))):
            try:
                self.resident.expire_idle()
                self.beat()
                for name in self.resident.specs:
                    if self.detections[name].available:
                        self._queues.hand_over_gone(name)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        """End every heartbeat now (the worker drains) and stop beating."""
        self._stop.set()
        for detection in self.detections.values():
            detection.stop()
        for name in self.resident.specs:
            with contextlib.suppress(redis.RedisError):
                withdraw(self.redis, name, self.worker_id)


def residency_stats(resident: ResidentModels) -> dict[str, Any]:
    """What the worker holds, for Celery's ``inspect stats`` and so Flower's worker page ("Other" tab)."""
    counts = resident.counts()
    return {"inferpool_models": resident.states(), "inferpool_memory_budget": describe_bytes(resident.budget),
            "inferpool_memory_held": describe_bytes(resident.held_bytes()), "inferpool_loads": counts.loads,
            "inferpool_load_seconds": counts.load_s, "inferpool_sleeps": counts.sleeps,
            "inferpool_wakes": counts.wakes, "inferpool_wake_seconds": counts.wake_s,
            "inferpool_evictions": counts.evictions}  # fmt: skip


def _install_stats(app: Celery, resident: ResidentModels) -> None:
    """A worker bootstep whose ``info`` Celery merges into the worker's stats."""

    class ResidencyInfo(bootsteps.StartStopStep):
        def info(self, worker: Any) -> dict[str, Any]:  # type: ignore[override]  # (celery's stubs say None; celery merges it)
            return residency_stats(resident)

    app.steps["worker"].add(ResidencyInfo)


def serve_models(models: Sequence[str], settings: Settings, *, budget: int, keep_alive_s: float = 300.0,
                 concurrency: int | None = None, worker_id: str | None = None) -> int:  # fmt: skip
    """Serve ``models`` from this process within ``budget`` bytes; returns the Celery worker's exit code."""
    install_tracing(settings.tracing, "worker")
    registry = Registry.from_settings(settings)
    specs = list({spec.name: spec for spec in (registry.get(model) for model in models)}.values())
    client = connect_redis(settings.require_redis_url())
    for name, footprint in plan(specs, budget, client):
        log.info("model %s: %s", name, describe_bytes(footprint) if footprint else "footprint measured at first load")
    hooks: dict[str, HookChain] = {spec.name: load_hooks(spec.hooks) for spec in specs}  # fail fast
    for backend_name in sorted({spec.backend for spec in specs}):
        preload_backend(backend_name)  # the engines' imports now, not inside the first load of the job
    worker_id = worker_id or f"multi@{socket.gethostname()}-{os.getpid()}"
    app = create_celery_app(settings)
    cache = ResponseCache(connect_redis(settings.cache_redis_url) if settings.cache_redis_url else client, settings)
    store = ProviderBatchStore(client, settings.result_ttl_s)

    def load(spec: ModelSpec) -> Loaded:
        try:
            backend = create_backend(spec, settings)
        except ModelLoadError:
            raise
        except ImportError as exc:
            raise ModelLoadError(f"backend {spec.backend!r} for model {spec.name!r} needs a package that is not "
                                 f"installed: {exc}") from exc  # fmt: skip
        except Exception as exc:  # a backend that fails to start in any other way: still this model's alone
            raise ModelLoadError(f"model {spec.name!r} ({spec.backend}): {type(exc).__name__}: {exc}") from exc
        runtime = WorkerRuntime(spec, backend, client, settings, worker_id, registry=registry, celery=app,
                                hooks=hooks[spec.name], cache=cache)  # fmt: skip
        batch_api = getattr(backend, "batch_api", None)
        runner = ProviderBatchRunner(runtime, batch_api(), store, settings) if callable(batch_api) else None
        return Loaded(runtime, runner)

    resident = ResidentModels(
        specs, budget, load=load, measure=lambda loaded: memory_footprint(loaded.runtime.backend),
        footprint_of=lambda spec: known_footprint(spec, client),
        record_footprint=lambda model, footprint: record_footprint(client, model, footprint),
        record_swap=lambda model, seconds, woke: record_swap_seconds(client, model, seconds, woke=woke),
        can_park=lambda loaded, nbytes: loaded.can_sleep() and can_park(nbytes),
        waiting=lambda model: _waiting(client, model, worker_id), keep_alive_s=keep_alive_s,
        after_load=gc.freeze, after_unload=refreeze_after_unload,
        max_wait_s=max(10.0, settings.visibility_timeout_s / 10),
    )  # fmt: skip
    announcer = _Announcer(client, settings, worker_id, resident)
    resident.on_change = announcer.beat
    install_chunk_server(app, ResidentServer(resident, store))
    _install_stats(app, resident)
    queues = sorted(q for spec in specs for q in (*model_queues(spec.name), *worker_queues(spec.name, worker_id)))

    def on_ready(**_: Any) -> None:
        # Collect young objects less often, as a single-model worker does. Celery's objects are frozen now, each
        # model's after its load; an unload unfreezes, collects and freezes again, so its objects go.
        tune_gc_for_throughput(collect_first=True)
        announcer.start()
        log.info("worker %s holding up to %s of %s on queues %s", worker_id, describe_bytes(budget),
                 ", ".join(spec.name for spec in specs), ", ".join(queues))  # fmt: skip

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutting_down.connect(lambda **_: announcer.stop(), weak=False)
    try:
        return run_celery_worker(app, settings, queues, concurrency or max(s.serving.concurrency for s in specs),
                                 worker_id)  # fmt: skip
    finally:
        announcer.stop()
        with contextlib.suppress(redis.RedisError):
            own_queues = WorkerQueues(client)
            for spec in specs:
                own_queues.hand_over(spec.name, [worker_id])
        resident.close()
