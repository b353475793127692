"""The Celery application both sides share: clients publish with it, workers consume with it.

Defaults follow DESIGN.md §4; Celery's own defaults (pickle allowed, early ack, prefetch 4) are wrong
for inference work that must never be lost or duplicated.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from inferpool.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration inferpool ships."""
    redis_url = settings.require_redis_url()
    transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    return {
        "broker_url": redis_url,
        # Results travel through inferpool's own keys (inferpool.results), not Celery's backend.
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
        "worker_send_task_events": True,
        "task_send_sent_event": True,
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
