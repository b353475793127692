"""Priorities: one queue per level, polled high first by every worker (kombu's "sorted" order)."""

from __future__ import annotations

import pytest
import redis

from inferpool import Client, InvalidRequest, Priority
from inferpool.constants import model_queues, queue_name, result_key
from inferpool.plumbing.celery_app import celery_config
from inferpool.plumbing.settings import Settings

pytestmark = pytest.mark.usefixtures("echo_slow_worker")

BACKLOG = 300  # echo-slow answers ~100 requests/s (20 ms each, 2 at a time): a backlog of ~3 s


def test_queues_sort_in_priority_order_and_workers_poll_them_sorted(settings: Settings) -> None:
    queues = model_queues("m")
    assert queues == [queue_name("m", p) for p in (Priority.HIGH, Priority.NORMAL, Priority.LOW)]
    assert sorted(queues) == queues
    assert celery_config(settings)["broker_transport_options"]["queue_order_strategy"] == "sorted"


def test_high_priority_overtakes_a_queued_low_backlog(client: Client, redis_client: redis.Redis) -> None:
    def body(text: str) -> dict[str, object]:
        return {"model": "echo-slow", "messages": [{"role": "user", "content": text}], "max_tokens": 8}

    backlog = [client.submit(body(f"low {i}"), priority="low") for i in range(BACKLOG)]
    urgent = [client.submit(body(f"high {i}"), priority=Priority.HIGH) for i in range(5)]
    for handle in urgent:
        assert handle.result(timeout=60).ok
    low_done = sum(redis_client.exists(result_key(h.request_id)) for h in backlog)
    assert low_done < BACKLOG // 2, f"{low_done} of {BACKLOG} low requests were answered before the high ones"
    assert all(h.result(timeout=120).ok for h in backlog)  # and the backlog still completes


def test_unknown_priority_is_refused_before_queueing(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="not one of high, normal, low"):
        client.submit({"model": "echo", "messages": [{"role": "user", "content": "x"}]}, priority="urgent")
