"""Fair share of a model's window between tenants: weighted deficit round robin, kept across ticks.

Within one priority band (high still goes first), the tenants with lines pending for the model take turns. A
turn adds ``chunk_size x weight`` to the tenant's deficit and it dispatches that many lines, a chunk at a time,
round robin over its own jobs; then the next tenant's turn begins. A tenant whose jobs run dry leaves the round
and its deficit is cleared, so a tenant alone gets the whole window (work-conserving), and a tenant with fifty
jobs gets what a tenant with one gets. The deficits, whose turn it is and each tenant's next job survive from
one tick to the next: when the window frees a chunk at a time, the turns still rotate instead of the same
tenant winning every tick. Weights come from ``inferpool tenants set NAME --weight W`` (default 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from inferpool.constants import DEFAULT_TENANT


class _Job(Protocol):
    @property
    def job_id(self) -> str: ...

    @property
    def tenant(self) -> str: ...


J = TypeVar("J", bound=_Job)


@dataclass
class _Band:
    """One model's priority band: whose turn it is, and what each tenant has left of its turn."""

    current: str = ""
    deficit: dict[str, float] = field(default_factory=dict)
    in_turn: set[str] = field(default_factory=set)


class FairShare:
    """Decides which job's lines fill a model's free window (one scheduler's memory: a new leader starts fresh)."""

    def __init__(self, weights: Callable[[], Mapping[str, float]]) -> None:
        self._weights = weights
        self._bands: dict[tuple[str, int], _Band] = {}
        self._next_job: dict[tuple[str, str], str] = {}  # (model, tenant) -> the job id whose chunk is next

    def dispatch(self, model: str, priority: int, jobs: Sequence[J], free: int, chunk_size: int,
                 take: Callable[[J, int], int]) -> int:  # fmt: skip
        """Fill up to ``free`` slots from ``jobs`` (one band of one model) by turns; ``take(job, n)`` dispatches up
        to ``n`` of a job's lines and says how many it did (0: it has none pending). Returns how many were sent."""
        by_tenant: dict[str, list[J]] = {}
        for job in sorted(jobs, key=lambda j: j.job_id):
            by_tenant.setdefault(job.tenant or DEFAULT_TENANT, []).append(job)
        tenants = sorted(by_tenant)
        if not tenants or free <= 0:
            return 0
        band = self._bands.setdefault((model, priority), _Band())
        for gone in set(band.deficit) - set(tenants):  # no longer waiting: their share is not kept for later
            band.deficit.pop(gone, None)
            band.in_turn.discard(gone)
        weights = self._weights()
        index = next((i for i, tenant in enumerate(tenants) if tenant >= band.current), 0)
        sent = 0
        while sent < free and tenants:
            tenant = tenants[index % len(tenants)]
            if tenant not in band.in_turn:
                quantum = max(1.0, chunk_size * max(0.0, weights.get(tenant, 1.0)))
                band.deficit[tenant] = band.deficit.get(tenant, 0.0) + quantum
                band.in_turn.add(tenant)
            queue = self._rotation(model, tenant, by_tenant[tenant])
            while band.deficit[tenant] >= 1 and sent < free and queue:
                job = queue[0]
                moved = take(job, min(chunk_size, int(band.deficit[tenant]), free - sent))
                if moved <= 0:
                    queue.pop(0)
                    continue
                band.deficit[tenant] -= moved
                sent += moved
                queue.append(queue.pop(0))
                self._next_job[(model, tenant)] = queue[0].job_id
            if not queue:  # nothing pending: out of this round, with no credit kept
                band.deficit.pop(tenant, None)
                band.in_turn.discard(tenant)
                tenants.remove(tenant)
                by_tenant.pop(tenant)
                continue
            if sent >= free and band.deficit[tenant] >= 1:
                band.current = tenant  # its turn goes on at the next tick, without a new quantum
                return sent
            band.in_turn.discard(tenant)
            index += 1
            band.current = tenants[index % len(tenants)]
        return sent

    def _rotation(self, model: str, tenant: str, jobs: list[J]) -> list[J]:
        """The tenant's jobs starting from the one whose chunk is next (kept in place: dispatch rotates it)."""
        first = self._next_job.get((model, tenant), "")
        start = next((i for i, job in enumerate(jobs) if job.job_id >= first), 0)
        jobs[:] = jobs[start:] + jobs[:start]
        return jobs
