"""Placement: which worker each chunk of a take goes to, knowing what the engines hold.

- *Residency.* A worker holding several models within a budget (``inferpool.residency``) says in its heartbeat
  whether each is warm, loading or cold. When some live workers hold the model warm and others do not, its
  chunks go only to the warm ones (their own queues): a cold worker is not made to swap while a warm one
  serves. When none holds it warm, chunks take the shared queue, and any worker that can load it does (the
  scale-to-zero case: the lines waited in Redis). Single-model workers are always warm.
- *Prefix affinity.* Under prefix routing a job's pending lines wait scored by their prefix group key
  (``inferpool.affinity.prefix``), so a take brings a document's questions together. Each group goes to the
  worker that owns its key among the warm workers (``inferpool.affinity.owners``), in a chunk published to
  that worker's own queue; a group whose owner is full or above the load bound goes to the shared queue.

Work is never stranded on a worker: the model's live workers hand the own queues of peers whose heartbeat
has gone to the shared queues (``inferpool.state.worker_queues``; a dead owner's in-flight lines also come
back through the stale re-send, like any lost chunk), and a gone worker stops owning keys as soon as it
is no longer live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from inferpool.affinity.owners import OwnerTable
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.heartbeats import live_worker_ids, model_state, read_heartbeats
from inferpool.state.worker_queues import WorkerQueues

log = logging.getLogger(__name__)

_LIVE_REFRESH_S = 2.0
#: A worker with this many times its share of the model's window waiting in its own batch queue takes no
#: more groups until it catches up (they overflow to the shared queue): a worker that stalls (a slow
#: host, a long generation) does not hold its groups' lines back.
_FULL_BACKLOG_SHARES = 2
#: Heartbeat states of a model that count as held (a loading model is about to be warm).
_HELD = ("warm", "loading")

Buckets = list[tuple[str | None, list[str]]]


@dataclass(frozen=True)
class _Workers:
    """A model's live workers, and those of them that hold it."""

    live: list[str]
    held: list[str]


class Placement:
    """Per model: its live workers and where it is warm (refreshed from the heartbeats every couple of
    seconds), and its prefix owner table."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.queues = WorkerQueues(client)
        self._tables: dict[str, OwnerTable] = {}
        self._workers: dict[str, tuple[float, _Workers]] = {}

    def workers(self, model: str) -> _Workers:
        now = time.monotonic()
        cached = self._workers.get(model)
        if cached is not None and now - cached[0] <= _LIVE_REFRESH_S:
            return cached[1]
        live = live_worker_ids(self.redis, model)
        beats = read_heartbeats(self.redis, model, live)
        held = [w for w in live if model_state(beats.get(w, {})) in _HELD]
        workers = _Workers(live, held)
        self._workers[model] = (now, workers)
        return workers

    def table(self, spec: ModelSpec, workers: Sequence[str]) -> OwnerTable:
        """The model's owner table over ``workers``. An owner keeps its groups up to a take (a chunk) past the
        bound: the scheduler sees a group's lines a take at a time."""
        table = self._tables.get(spec.name)
        if table is None:
            table = self._tables[spec.name] = OwnerTable(keep_slack=spec.serving.chunk_size)
        table.set_workers(workers)
        return table

    def split(self, spec: ModelSpec, taken: Sequence[tuple[str, int]], *, prefix: bool) -> Buckets:
        """(worker, request ids) buckets for ``taken`` (id, group key) pairs, in the order taken; worker None is
        the model's shared queue."""
        rids = [rid for rid, _ in taken]
        workers = self.workers(spec.name)
        if not workers.held:  # nobody holds it: whoever can load it takes it from the shared queue
            return [(None, rids)]
        everywhere = len(workers.held) == len(workers.live)
        if prefix and len(workers.held) >= 2:
            return self._by_prefix(spec, taken, workers.held)
        if everywhere:
            return [(None, rids)]
        backlog = self.queues.backlogs(spec.name, workers.held)
        return [(min(workers.held, key=lambda w: backlog[w]), rids)]  # the warm worker with least waiting

    def _by_prefix(self, spec: ModelSpec, taken: Sequence[tuple[str, int]], held: Sequence[str]) -> Buckets:
        table = self.table(spec, held)
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
