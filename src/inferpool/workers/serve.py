"""Starting a worker process: load the model, then consume its queue until told to stop."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import Celery, signals

from inferpool._exceptions import ModelLoadError, RedisUnavailable
from inferpool.constants import model_queues, worker_queues
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.process_tuning import tune_gc_for_throughput
from inferpool.plumbing.redis_connection import connect_redis
from inferpool.plumbing.settings import Settings
from inferpool.provider_batch.runner import ProviderBatchRunner
from inferpool.provider_batch.store import ProviderBatchStore
from inferpool.tracing.setup import install_tracing
from inferpool.workers.backend import create_backend
from inferpool.workers.cache import ResponseCache
from inferpool.workers.hooks import load_hooks
from inferpool.workers.runtime import WorkerRuntime
from inferpool.workers.tasks import install_tasks

log = logging.getLogger(__name__)


def serve_model(model: str, settings: Settings, *, concurrency: int | None = None, worker_id: str | None = None) -> int:
    """Serve ``model`` from this process; returns the Celery worker's exit code.

    The model loads before the worker starts consuming, so a model that cannot load never takes a task:
    the error propagates (``ModelLoadError``) and the process exits non-zero.
    """
    install_tracing(settings.tracing, "worker")
    registry = Registry.from_settings(settings)
    spec = registry.get(model)
    redis_client = connect_redis(settings.require_redis_url())
    hooks = load_hooks(spec.hooks)  # before the model: a hook that is not installed fails fast
    log.info("loading model %s (backend %s)", spec.name, spec.backend)
    try:
        backend = create_backend(spec, settings)
    except ModelLoadError:
        raise
    except ImportError as exc:
        raise ModelLoadError(
            f"backend {spec.backend!r} for model {spec.name!r} needs a package that is not installed: {exc}"
        ) from exc
    app = create_celery_app(settings)
    cache_redis = connect_redis(settings.cache_redis_url) if settings.cache_redis_url else redis_client
    runtime = WorkerRuntime(spec, backend, redis_client, settings, worker_id, registry=registry, celery=app,
                            hooks=hooks, cache=ResponseCache(cache_redis, settings))  # fmt: skip
    batch_api = getattr(backend, "batch_api", None)
    runner = None
    if callable(batch_api):
        store = ProviderBatchStore(redis_client, settings.result_ttl_s)
        runner = ProviderBatchRunner(runtime, batch_api(), store, settings)
    install_tasks(app, runtime, runner)

    # The model's shared queues and this worker's own (prefix affinity sends work there by name), in the
    # order BRPOP looks at them: priority first, own before shared within a priority (constants).
    queues = sorted([*model_queues(spec.name), *worker_queues(spec.name, runtime.worker_id)])

    def on_ready(**_: Any) -> None:
        tune_gc_for_throughput(collect_first=True)  # the model and Celery are loaded: what is held now stays
        runtime.start_heartbeat()
        log.info("worker %s serving %s on queues %s", runtime.worker_id, spec.name, ", ".join(queues))

    def on_shutting_down(**_: Any) -> None:
        runtime.drain()  # routers stop sending here at once, while the chunks in hand finish

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    try:
        return run_celery_worker(app, settings, queues, concurrency or spec.serving.concurrency, runtime.worker_id)
    finally:
        runtime.close()


#: Times in a row an unrecoverable error may stop the consumer before the worker gives up (exit code 1).
MAX_CONSUMER_RESTARTS = 5
#: A consumer that ran this long before stopping starts a fresh count of restarts.
_STABLE_RUN_S = 300.0


def run_celery_worker(app: Celery, settings: Settings, queues: list[str], concurrency: int, worker_id: str) -> int:
    """Consume ``queues`` on Celery's thread pool until stopped; returns the worker's exit code.

    Celery ends its consumer on any error it does not know as a connection error ("Unrecoverable error"),
    and some are transient: during a Sentinel failover kombu's transport was seen raising ``AttributeError``
    from a connection whose client was already gone. A worker that was not asked to stop therefore starts its
    consumer again, after a growing pause, up to ``MAX_CONSUMER_RESTARTS`` times in a row; the model stays
    loaded, its heartbeat goes on, and the tasks the failed consumer held are redelivered as after any crash.
    """
    stopping = threading.Event()

    def on_shutting_down(**_: Any) -> None:
        stopping.set()

    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    restarts = 0
    while True:
        worker = app.Worker(queues=queues, pool="threads", concurrency=concurrency, hostname=worker_id,
                            loglevel=settings.log_level, without_gossip=True, without_mingle=True,
                            optimization="fair")  # fmt: skip
        started = time.monotonic()
        try:
            worker.start()
        except redis.ConnectionError as exc:
            raise RedisUnavailable(f"lost Redis while serving: {exc}") from exc
        code = int(worker.exitcode or 0)
        if code == 0 or stopping.is_set():
            return code
        restarts = 1 if time.monotonic() - started > _STABLE_RUN_S else restarts + 1
        if restarts > MAX_CONSUMER_RESTARTS:
            log.critical("worker %s: the consumer stopped on an unrecoverable error %d times in a row; giving up",
                         worker_id, restarts - 1)  # fmt: skip
            return code
        pause = min(30.0, 2.0**restarts)
        log.error("worker %s: the consumer stopped on an unrecoverable error (exit code %d); starting it again in "
                  "%.0f s (%d of %d)", worker_id, code, pause, restarts, MAX_CONSUMER_RESTARTS)  # fmt: skip
        if stopping.wait(pause):
            return code
