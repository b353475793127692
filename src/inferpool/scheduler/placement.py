"""Placement: which worker each chunk of a take goes to, knowing what the engines hold.

- *Residency.* A worker holding several models within a budget (``inferpool.residency``) says in its heartbeat
  whether each is warm, loading, asleep or cold, and how much of its budget is taken. When some live workers
  hold the model warm and others do not, its chunks go to the warm ones (their own queues): a cold worker is
  not made to swap while a warm one serves. Another worker is recruited only when the swap pays: it has room
  for the model without evicting anything, and the lines already waiting at the warm workers would take
  longer to drain at the model's measured service rate than its measured load takes (its wake, where the
  model sleeps there: such a worker is asked first). It then gets the whole take (a long run), so it swaps
  once and serves. When none holds it (scale to zero: the lines waited in Redis), the take goes to one
  budgeted worker with room for it, the most room first, and the model's next takes follow it, so cold
  models spread over the workers; where none has room, to the shared queue, and whichever worker makes room
  by its own rules takes it. Single-model workers are always warm.
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
from dataclasses import dataclass, replace

import redis

from inferpool.affinity.owners import OwnerTable
from inferpool.constants import model_queues
from inferpool.model_registry.spec import ModelSpec
from inferpool.residency.budget import known_footprint, known_swap_seconds
from inferpool.state.heartbeats import live_worker_ids, model_state, read_heartbeats
from inferpool.state.load import read_answered
from inferpool.state.worker_queues import WorkerQueues

log = logging.getLogger(__name__)

_LIVE_REFRESH_S = 2.0
#: A worker with this many times its share of the model's window waiting in its own batch queue takes no
#: more groups until it catches up (they overflow to the shared queue): a worker that stalls (a slow
#: host, a long generation) does not hold its groups' lines back.
_FULL_BACKLOG_SHARES = 2
#: Heartbeat states of a model that count as held (a loading model is about to be warm).
_HELD = ("warm", "loading")
#: The swap cost assumed for a model no budgeted worker has loaded yet (a cautious guess: a real load).
_UNKNOWN_LOAD_S = 30.0
#: How long a model sent to a worker to load counts against that worker's room here (its heartbeat says
#: "loading" as soon as the chunk reaches it; a worker busy with other models may take longer).
_CLAIM_S = 10.0

Buckets = list[tuple[str | None, list[str]]]


@dataclass(frozen=True)
class _Workers:
    """A model's live workers, and those of them that hold it."""

    live: list[str]
    held: list[str]
    room: dict[str, tuple[int, int]]  # budgeted workers not holding the model: (bytes free, budget)
    asleep: frozenset[str]  # workers where the model sleeps (a wake, cheaper than a load)
    footprint: int | None  # the model's, if known


class ServiceRates:
    """Each model's results per second, from its all-time result count sampled a few seconds apart."""

    def __init__(self, client: redis.Redis, every_s: float = _LIVE_REFRESH_S) -> None:
        self.redis, self.every_s = client, every_s
        self._sample: tuple[float, dict[str, int]] | None = None
        self._rates: dict[str, float] = {}

    def of(self, model: str) -> float | None:
        now = time.monotonic()
        if self._sample is None or now - self._sample[0] >= self.every_s:
            counts = read_answered(self.redis)
            if self._sample is not None:
                elapsed = now - self._sample[0]
                for name, count in counts.items():
                    rate = (count - self._sample[1].get(name, count)) / elapsed
                    previous = self._rates.get(name)  # smoothed: one quiet sample does not erase the rate
                    self._rates[name] = rate if previous is None else (rate + previous) / 2
            self._sample = (now, counts)
        return self._rates.get(model)


def _room(beat: dict[str, object]) -> tuple[int, int] | None:
    """(bytes free, budget) of a budgeted worker, from its heartbeat; None for a single-model worker."""
    budget, held = beat.get("budget_bytes"), beat.get("held_bytes")
    if not isinstance(budget, int) or not isinstance(held, int):
        return None  # a single-model worker, or one too old to say
    return budget - held, budget


class Placement:
    """Per model: its live workers and where it is warm (refreshed from the heartbeats every couple of
    seconds), and its prefix owner table."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.queues = WorkerQueues(client)
        self._tables: dict[str, OwnerTable] = {}
        self._workers: dict[str, tuple[float, _Workers]] = {}
        self.rates = ServiceRates(client)
        # Models this scheduler just sent to a worker that must load them: the bytes they will take there,
        # counted until its heartbeat can say so, so the next cold model goes elsewhere.
        self._claims: dict[str, list[tuple[float, int]]] = {}
        # model -> (when, worker) it was last sent to load: its later takes follow (one run, not a scatter)
        # until the worker's heartbeat says it holds the model.
        self._recruits: dict[str, tuple[float, str]] = {}

    def workers(self, spec: ModelSpec) -> _Workers:
        now = time.monotonic()
        cached = self._workers.get(spec.name)
        if cached is not None and now - cached[0] <= _LIVE_REFRESH_S:
            return cached[1]
        live = live_worker_ids(self.redis, spec.name)
        beats = read_heartbeats(self.redis, spec.name, live)
        held = [w for w in live if model_state(beats.get(w, {})) in _HELD]
        asleep = frozenset(w for w in live if model_state(beats.get(w, {})) == "asleep")
        rooms = {w: _room(beats.get(w, {})) for w in live if w not in held}
        room = {w: free for w, free in rooms.items() if free is not None}
        workers = _Workers(live, held, room, asleep, known_footprint(spec, self.redis))
        self._workers[spec.name] = (now, workers)
        return workers

    def loadable(self, workers: _Workers) -> list[str]:
        """Budgeted workers with room for the model without evicting (less what this scheduler has just sent
        them to load): where it sleeps first, then the most room first. An unknown footprint needs an empty
        worker (its first load reserves the whole budget)."""
        now = time.monotonic()
        for worker, claims in list(self._claims.items()):
            kept = [claim for claim in claims if now - claim[0] < _CLAIM_S]
            if kept:
                self._claims[worker] = kept
            else:
                del self._claims[worker]
        free = {w: room - sum(n for _, n in self._claims.get(w, [])) for w, (room, _) in workers.room.items()}
        need = workers.footprint
        fits = [w for w in free if (free[w] >= need if need is not None else free[w] == workers.room[w][1])]
        return sorted(fits, key=lambda w: (w not in workers.asleep, -free[w]))

    def _claim(self, worker: str, workers: _Workers) -> None:
        self._claims.setdefault(worker, []).append((time.monotonic(), workers.footprint or 1 << 62))

    def _swap_pays(self, spec: ModelSpec, backlog: dict[str, int], take: int, *, wake: bool) -> bool:
        """Whether the lines waiting at the model's warm workers (``backlog``: chunks in their own queues; the
        shared queues; this take) would take longer to drain at the model's service rate than one more worker
        takes to load it (``wake``: to wake it from sleep)."""
        rate = self.rates.of(spec.name)
        if not rate or rate <= 0:
            return False  # no measured rate yet: keep to the warm workers
        pipe = self.redis.pipeline(transaction=False)
        for queue in model_queues(spec.name):
            pipe.llen(queue)
        chunks = sum(backlog.values()) + sum(int(n) for n in pipe.execute())
        drain_s = (chunks * spec.serving.chunk_size + take) / rate
        swap_s = known_swap_seconds(self.redis, spec.name, woke=wake)
        if swap_s is None and wake:
            swap_s = known_swap_seconds(self.redis, spec.name, woke=False)  # never woken yet: at most a load
        return drain_s > (_UNKNOWN_LOAD_S if swap_s is None else swap_s)

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
        workers = self.workers(spec)
        recruited = self._recruits.get(spec.name)
        if recruited is not None and time.monotonic() - recruited[0] < _CLAIM_S and recruited[1] in workers.room:
            workers = replace(workers, held=[*workers.held, recruited[1]],
                              room={w: r for w, r in workers.room.items() if w != recruited[1]})  # fmt: skip
        loadable = self.loadable(workers) if workers.room else []
        recruit = loadable[0] if loadable else None
        backlog: dict[str, int] | None = None  # the warm workers' own queues, read once per take if needed
        if not workers.held:
            if recruit is None:  # nobody holds it and none has room: whoever makes room takes it (shared queue)
                return [(None, rids)]
            log.info("model %s: held by no worker; %s has room and loads it", spec.name, recruit)
        elif recruit is not None:
            backlog = self.queues.backlogs(spec.name, workers.held)
            if self._swap_pays(spec, backlog, len(rids), wake=recruit in workers.asleep):
                how = "wakes" if recruit in workers.asleep else "loads"
                log.info("model %s: its warm workers have more waiting than a swap costs; %s %s it, starting "
                         "with %d lines", spec.name, recruit, how, len(rids))  # fmt: skip
            else:
                recruit = None
        if recruit is not None:
            self._claim(recruit, workers)
            self._recruits[spec.name] = (time.monotonic(), recruit)
            self._workers.pop(spec.name, None)  # see it loading (and no longer cold) as soon as it says so
            return [(recruit, rids)]
        everywhere = len(workers.held) == len(workers.live)
        if prefix and len(workers.held) >= 2:
            return self._by_prefix(spec, taken, workers.held)
        if everywhere:
            return [(None, rids)]
        waiting = backlog if backlog is not None else self.queues.backlogs(spec.name, workers.held)
        return [(min(workers.held, key=lambda w: waiting[w]), rids)]  # the warm worker with least waiting

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
