"""The Celery application both sides share: clients publish with it, workers consume with it.

Defaults follow DESIGN.md §4; Celery's own defaults (pickle allowed, early ack, prefetch 4) are wrong
for inference work that must never be lost or duplicated.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from inferpool.constants import TASK_PROCESS_CHUNK, Priority, chunk_queue_name
from inferpool.plumbing.redis_connection import kombu_broker
from inferpool.plumbing.settings import Settings
from inferpool.wire import TaskChunk


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration inferpool ships."""
    broker_url, sentinel_options = kombu_broker(settings.require_redis_url())
    # kombu sweeps for unacked messages past their visibility timeout every interval x throttle seconds
    # (10 x 10 = 100 s by default); we scan on every sweep, and sweep more often for short timeouts.
    # A worker killed while holding the sweep's mutex blocks every sweep until the mutex expires
    # (300 s by default), so the mutex lives no longer than the visibility timeout.
    vt = settings.visibility_timeout_s
    transport_options = {
        "visibility_timeout": vt,
        "unacked_restore_interval": max(1, min(10, vt // 4)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(5, min(300, vt)),
        # Poll a model's queues in name order, which is priority order (constants.queue_name).
        "queue_order_strategy": "sorted",
        **sentinel_options,  # master_name (and the sentinels' password) for a sentinel:// URL
    }
    return {
        "broker_url": broker_url,
        # Results travel through inferpool's own keys (inferpool.state.results), not Celery's backend.
        "result_backend": None,
        "task_ignore_result": True,
        "result_expires": 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Task events cost a worker more than processing a small chunk does, so they are off unless asked
        # for (INFERPOOL_TASK_EVENTS=1): Flower turns them on in every worker while it runs (its
        # enable_events broadcast, which `inferpool flower` also sends at start). Progress and usage never
        # depend on them: they live in Redis.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "task_track_started": True,
        "task_default_queue": "inferpool.default",
        "worker_hijack_root_logger": False,
        "broker_pool_limit": 10,
    }


def create_celery_app(settings: Settings, *, main: str = "inferpool") -> Celery:
    """A Celery app configured from ``settings`` (which must name a Redis URL)."""
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def publish_chunk(app: Celery, chunk: TaskChunk, worker: str | None = None) -> None:
    """Send one chunk to its model's queue for its priority (or ``worker``'s own). Flower shows ids and counts,
    never prompt text."""
    publish_chunk_json(app, chunk.model_dump_json(exclude_none=True), model=chunk.model, description=chunk.describe(),
                       priority=chunk.priority, expires_s=chunk.result_ttl_s, worker=worker,
                       headers=chunk.trace_headers())  # fmt: skip


def publish_chunk_json(
    app: Celery,
    payload: str,
    *,
    model: str,
    description: str,
    expires_s: int,
    priority: Priority = Priority.NORMAL,
    worker: str | None = None,
    headers: dict[str, object] | None = None,
) -> None:
    """Send a chunk already serialised as ``TaskChunk`` JSON (the task accepts both forms), to the model's
    shared queue for its priority or, with ``worker``, that worker's own (prefix affinity).

    ``description`` is what Flower and task events show instead of the arguments (``argsrepr``). The task
    expires after ``expires_s`` (the result TTL): a worker discards it unrun rather than answer a request
    whose result, and maybe whose job, is gone. ``headers`` go with the task's own (the chunk's traces).
    """
    queue = chunk_queue_name(model, priority, worker)
    app.send_task(TASK_PROCESS_CHUNK, args=[payload], queue=queue, argsrepr=description, kwargsrepr="{}",
                  expires=expires_s, headers=headers or None)  # fmt: skip
