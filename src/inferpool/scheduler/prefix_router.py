"""The scheduler's prefix affinity: which live worker each group of batch lines goes to.

Under prefix routing a job's pending lines wait scored by their prefix group key
(``inferpool.affinity.prefix``), so a take from the pending set brings a document's questions together.
Each group goes to the worker that owns its key (``inferpool.affinity.owners``), in a chunk published
to that worker's own queue; a group whose owner is full or above the load bound goes to the model's
shared queue. With fewer than two live workers there is nothing to choose: everything takes the shared
queue, as under load routing.

Work is never stranded on a worker: the model's live workers hand the own queues of peers whose heartbeat
has gone to the shared queues (``inferpool.state.worker_queues``; a dead owner's in-flight lines also come
back through the stale re-send, like any lost chunk), and a gone worker stops owning keys as soon as it
is no longer live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis

from inferpool.affinity.owners import OwnerTable
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.heartbeats import live_worker_ids
from inferpool.state.worker_queues import WorkerQueues

log = logging.getLogger(__name__)

_LIVE_REFRESH_S = 2.0
#: A worker with this many times its share of the model's window waiting in its own batch queue takes no
#: more groups until it catches up (they overflow to the shared queue): a worker that stalls (a slow
#: host, a long generation) does not hold its groups' lines back.
_FULL_BACKLOG_SHARES = 2


class PrefixRouter:
    """Owner tables per model, their live workers refreshed from the heartbeats."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.queues = WorkerQueues(client)
        self._tables: dict[str, OwnerTable] = {}
        self._refreshed: dict[str, float] = {}

    def table(self, spec: ModelSpec) -> OwnerTable:
        """The model's owner table, its live workers refreshed every couple of seconds. An owner keeps its
        groups up to a take (a chunk) past the bound: the scheduler sees a group's lines a take at a time."""
        model = spec.name
        table = self._tables.get(model)
        if table is None:
            table = self._tables[model] = OwnerTable(keep_slack=spec.serving.chunk_size)
        now = time.monotonic()
        if now - self._refreshed.get(model, 0.0) > _LIVE_REFRESH_S:
            self._refreshed[model] = now
            table.set_workers(live_worker_ids(self.redis, model))
        return table

    def split(self, spec: ModelSpec, taken: Sequence[tuple[str, int]]) -> list[tuple[str | None, list[str]]]:
        """(worker, request ids) buckets for ``taken`` (id, group key) pairs, in the order taken; worker None is
        the model's shared queue."""
        table = self.table(spec)
        if len(table.workers) < 2:
            return [(None, [rid for rid, _ in taken])]
        backlog = self.queues.backlogs(spec.name, table.workers)
        limit = _FULL_BACKLOG_SHARES * max(1, -(-spec.serving.window_per_worker() // spec.serving.chunk_size))
        buckets: dict[str | None, list[str]] = {}
        start = 0
        while start < len(taken):
            key = taken[start][1]
            end = start
            while end < len(taken) and taken[end][1] == key:
                end += 1
            worker = table.choose(key, end - start, full=lambda w: backlog.get(w, 0) >= limit)
            if worker is not None and worker not in buckets:
                backlog[worker] = backlog.get(worker, 0) + 1  # the chunk about to be published there
            buckets.setdefault(worker, []).extend(rid for rid, _ in taken[start:end])
            start = end
        return list(buckets.items())
