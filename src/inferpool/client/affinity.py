"""Prefix affinity for single requests: a client (or gateway) process sends each request of a
prefix-routed model to the worker that holds its prefix, by that worker's own queue.

The choice is made here, in the process, with no Redis round trip on the request's path: the live
workers come from the heartbeats (re-read every couple of seconds) and the owners from this process's
own table (``inferpool.affinity.owners``), which remembers every prefix step of each request sent, so a
conversation's next turn (whose shorter prefixes are the last turn's) follows it. A request with no known
owner takes the same rendezvous choice a batch line of its group would, so single requests about a
document meet the batch lines about it. Other processes keep their own tables: two gateway replicas
agree on new prefixes (rendezvous order) but not on overflow choices.
"""

from __future__ import annotations

import threading
import time

import redis

from inferpool.affinity.owners import OwnerTable
from inferpool.affinity.prefix import request_keys
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.heartbeats import live_worker_ids
from inferpool.wire import AnyRequest

_LIVE_REFRESH_S = 2.0


class SingleRequestAffinity:
    """Owner tables per model for one client process (thread-safe: the async client publishes from threads)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._tables: dict[str, OwnerTable] = {}
        self._refreshed: dict[str, float] = {}
        self._lock = threading.Lock()

    def worker_for(self, spec: ModelSpec, request: AnyRequest) -> str | None:
        """The worker whose own queue ``request`` (of a prefix-routed model) goes to, or None for the model's
        shared queue."""
        levels, group = request_keys(request)
        now = time.monotonic()
        with self._lock:
            table = self._tables.setdefault(spec.name, OwnerTable())
            stale = now - self._refreshed.get(spec.name, 0.0) > _LIVE_REFRESH_S
        if stale:
            live = live_worker_ids(self.redis, spec.name)  # outside the lock: a Redis round trip
            with self._lock:
                self._refreshed[spec.name] = now
                table.set_workers(live)
        with self._lock:
            if len(table.workers) < 2:
                return None
            worker = table.choose(group, known=levels)
            if worker is not None:
                table.remember_all(levels, worker)
            return worker
