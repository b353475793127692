"""Which live worker owns a prefix key: rendezvous hashing with bounded load, and a table that remembers.

Each router (the scheduler for batch lines, each client or gateway process for single requests) keeps an
``OwnerTable`` per model. A key seen before goes to the worker that took it, while that worker is alive,
not full and within the load bound; then it overflows to the model's shared queue (any worker). A new
key goes to the first worker in its rendezvous order (highest random weight: the same order in every
process, and a worker joining or leaving moves only the keys it wins or held) that is within the bound.

The bound is on lines routed by affinity since the live workers last changed: a new key goes to a worker
only if its lines keep that worker within ``load_factor`` times the mean share (else to the least loaded),
and an owner keeps its key while it is below that bound (give or take ``keep_slack`` lines); so no worker
ends far above 1.25x the mean.
The table is bounded (least recently used keys are forgotten: they are re-chosen, by the same rendezvous
order, to the same worker when it is still within the bound).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

#: A worker may take new work while below this multiple of the mean share.
LOAD_FACTOR = 1.25
#: Lines an owner may run ahead of the bound and keep its keys (SGLang's cache-aware router has the same
#: absolute threshold, 32): with few lines routed yet, a relative bound alone would move a conversation's
#: third turn.
KEEP_SLACK_LINES = 32
#: Keys remembered per model.
TABLE_CAPACITY = 100_000
_MASK64 = (1 << 64) - 1
_DECAY_AT = 1 << 24  # lines: counts are halved past this, so old history does not pin the balance


def _salt(worker: str) -> int:
    return int.from_bytes(hashlib.blake2b(worker.encode(), digest_size=8).digest(), "big")


def _weight(key: int, salt: int) -> int:
    """splitmix64 of key ^ salt: a well-mixed 64-bit weight, the same in every process."""
    z = (key ^ salt) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class OwnerTable:
    """Owners of prefix keys among one model's live workers (not thread-safe: one per router thread)."""

    def __init__(self, load_factor: float = LOAD_FACTOR, capacity: int = TABLE_CAPACITY,
                 keep_slack: int = KEEP_SLACK_LINES) -> None:  # fmt: skip
        self.load_factor = load_factor
        self.keep_slack = keep_slack
        self.capacity = capacity
        self._owners: OrderedDict[int, str] = OrderedDict()
        self._salts: dict[str, int] = {}
        self._assigned: dict[str, int] = {}
        self._total = 0

    @property
    def workers(self) -> list[str]:
        return list(self._salts)

    def set_workers(self, workers: Iterable[str]) -> None:
        """The live workers now; the balance starts afresh when they changed."""
        live = sorted(set(workers))
        if live == sorted(self._salts):
            return
        self._salts = {worker: _salt(worker) for worker in live}
        self._assigned = dict.fromkeys(live, 0)
        self._total = 0

    def order(self, key: int) -> list[str]:
        """The live workers in ``key``'s rendezvous order."""
        return sorted(self._salts, key=lambda worker: _weight(key, self._salts[worker]), reverse=True)

    def owner_of(self, keys: Sequence[int]) -> str | None:
        """The live owner of the longest of ``keys`` (shortest first) that has one."""
        for key in reversed(keys):
            owner = self._owners.get(key)
            if owner is not None and owner in self._salts:
                return owner
        return None

    def _fair(self, lines: int) -> float:
        return self.load_factor * (self._total + lines) / len(self._salts)

    def _takes_new(self, worker: str, lines: int) -> bool:
        """A new key's lines fit on ``worker`` without taking it above the bound."""
        return self._assigned[worker] + lines <= self._fair(lines)

    def _keeps(self, worker: str, lines: int) -> bool:
        """An owner keeps its key's next lines while it is below the bound, give or take the slack (a key's
        lines come in several takes, a conversation's turns one by one: a stricter rule would scatter them)."""
        return self._assigned[worker] < self._fair(lines) + self.keep_slack

    def choose(self, key: int, lines: int = 1, *, known: Sequence[int] = (),
               full: Callable[[str], bool] | None = None) -> str | None:  # fmt: skip
        """The worker ``lines`` requests of ``key`` go to, or None for the model's shared queue.

        ``known``: more keys of the same requests (the shorter prefixes of a conversation) whose owner the
        requests follow when ``key`` has none. ``full(worker)``: a worker with a backlog it should not grow.
        """
        if not self._salts:
            return None
        owner = self._owners.get(key)
        if owner is None or owner not in self._salts:
            owner = self.owner_of(known) if known else None
        fits = [w for w in self._salts if full is None or not full(w)]
        chosen: str | None
        if owner is not None:
            chosen = owner if owner in fits and self._keeps(owner, lines) else None  # None: overflow, any worker
        else:
            order = [w for w in self.order(key) if w in fits]
            # The first in rendezvous order that stays within the bound, else the least loaded of them.
            chosen = next((w for w in order if self._takes_new(w, lines)), None)
            if chosen is None and order:
                chosen = min(order, key=lambda w: self._assigned[w])
        if chosen is not None:
            self._remember(key, chosen)
            self._assigned[chosen] += lines
        self._total += lines
        if self._total > _DECAY_AT:
            self._total //= 2
            self._assigned = {worker: count // 2 for worker, count in self._assigned.items()}
        return chosen

    def _remember(self, key: int, worker: str) -> None:
        self._owners[key] = worker
        self._owners.move_to_end(key)
        if len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    def remember_all(self, keys: Iterable[int], worker: str) -> None:
        """Record ``worker`` as the owner of each of ``keys`` (every prefix of a request it was sent)."""
        for key in keys:
            self._remember(key, worker)

    def shares(self) -> dict[str, int]:
        """Lines routed to each live worker since the workers last changed."""
        return dict(self._assigned)
