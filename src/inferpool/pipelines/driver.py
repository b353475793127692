"""The pipeline driver: runs in the scheduler (the leader, each tick) and moves every active pipeline on.

For each step it reads the step job's completion stream from where it last stopped (the position is kept in
Redis), turns each result into the row's outcome for that step, and decides the row's next steps
(``RowPlanner``): their lines go into their steps' jobs at once, so a row's second step runs while other rows
are still on their first (no stage barrier). Every change it makes is idempotent (a row's step is decided once,
``LUA_DECIDE``; an outcome is the same each time it is read), and the position moves only after what a page
decided is stored: a scheduler killed at any point, or a new leader, reads a page again and changes nothing.

A step's job is opened (its total set, so it can finish) once every row has been decided for that step; the
pipeline completes when every step's job has and its results are read. A cancelled or expired pipeline queues
no more lines, cancels its jobs, and ends when they have.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from inferpool.constants import job_key
from inferpool.pipelines.plan import LineMaker, RowPlanner, outcome_json, outcome_of, parse_outcome, stored_pipeline
from inferpool.state.jobs import JobStore
from inferpool.state.pipelines import Decision, PipelineStore, mark
from inferpool.state.results import parse_result
from inferpool.wire import JobStatus, PipelineStatus, StepOutcome

log = logging.getLogger(__name__)

#: Results read per step and tick: a tick stays short however far behind a pipeline is.
_PAGE = 1000
_PAGES_PER_TICK = 4
#: A pipeline whose driving raised this many times in a row (Redis errors aside) is failed with the reason.
MAX_FAULTS = 3

#: Makes the line maker for a pipeline's tenant, its lines costed (a budget holds) or not.
LineMakerFactory = Callable[[str | None, bool], LineMaker]


@dataclass
class _Driven:
    planner: RowPlanner
    faults: int = 0
    drained: dict[str, bool] = field(default_factory=dict)


class PipelineDriver:
    def __init__(self, client: redis.Redis, result_ttl_s: int, line_maker: LineMakerFactory) -> None:
        self.store = PipelineStore(client, result_ttl_s)
        self.jobs = JobStore(client, result_ttl_s)
        self._line_maker = line_maker
        self._driven: dict[str, _Driven] = {}

    def drive(self) -> int:
        """Move every active pipeline on; returns how many rows' steps were decided."""
        decided = 0
        active = self.store.active_ids()
        for pipeline_id in set(self._driven) - set(active):
            del self._driven[pipeline_id]
        for pipeline_id in active:
            try:
                decided += self._drive(pipeline_id)
            except redis.RedisError:
                raise
            except Exception as exc:  # one pipeline's fault is its own, never the scheduler's
                self._fault(pipeline_id, exc)
        return decided

    def _fault(self, pipeline_id: str, exc: Exception) -> None:
        log.exception("pipeline %s: driving it failed", pipeline_id)
        driven = self._driven.get(pipeline_id)
        faults = (driven.faults + 1) if driven else MAX_FAULTS
        if driven is not None:
            driven.faults = faults
        if faults >= MAX_FAULTS:
            self.store.fail(pipeline_id, f"the scheduler could not drive it: {type(exc).__name__}: {exc}")
            for job_id in self._jobs_of(pipeline_id):
                self.jobs.cancel(job_id)

    def _jobs_of(self, pipeline_id: str) -> list[str]:
        raw = self.store.raw(pipeline_id)
        return [value for name, value in raw.items() if name.startswith("job:")]

    def _drive(self, pipeline_id: str) -> int:
        raw = self.store.raw(pipeline_id)
        if "status" not in raw:  # its keys expired
            self.store.finalize(pipeline_id, PipelineStatus.EXPIRED)
            return 0
        status = PipelineStatus(raw["status"])
        if status.is_final:
            self.store.finalize(pipeline_id, status)
            return 0
        driven = self._driven.get(pipeline_id)
        if driven is None:
            pipeline, order, jobs = stored_pipeline(raw)
            maker = self._line_maker(raw.get("tenant"), raw.get("costed") == "1")
            driven = self._driven[pipeline_id] = _Driven(RowPlanner(pipeline, order, jobs, maker))
        if status.accepts_lines and time.time() > float(raw["expires_at"]):
            status = PipelineStatus(self.store.stop(pipeline_id, PipelineStatus.EXPIRED) or status.value)
        planner = driven.planner
        final_before = {name: self._job_final(job_id) for name, job_id in planner.jobs.items()}
        decided = sum(self._read_step(pipeline_id, driven, name, raw.get(f"pos:{name}", "0-0"))
                      for name in planner.order)  # fmt: skip
        raw = self.store.raw(pipeline_id)
        stopping = PipelineStatus(raw["status"]) == PipelineStatus.CANCELLING
        for name in planner.order:
            job_id = planner.jobs[name]
            if raw.get(f"opened:{name}") != "1" and (stopping or (
                    raw.get("loaded") == "1" and int(raw.get(f"decided:{name}", 0)) >= int(raw["rows"]))):  # fmt: skip
                self.jobs.open(job_id, int(raw.get(f"queued:{name}", 0)), self.jobs.job_models(job_id))
                self.store.mark_opened(pipeline_id, name)
                raw[f"opened:{name}"] = "1"
            if stopping and not final_before[name]:
                self.jobs.cancel(job_id)  # no more lines come: its jobs end as cancelled once what runs has
        done = all(raw.get(f"opened:{name}") == "1" and final_before[name] and driven.drained.get(name)
                   for name in planner.order)  # fmt: skip
        if done:
            ends_as = PipelineStatus(raw.get("ends_as") or "cancelled") if stopping else PipelineStatus.COMPLETED
            self.store.finalize(pipeline_id, ends_as)
            log.info("pipeline %s %s (%s rows)", pipeline_id, ends_as.value, raw.get("rows"))
        driven.faults = 0
        return decided

    def _job_final(self, job_id: str) -> bool:
        status: bytes | None = self.jobs.redis.hget(job_key(job_id), "status")  # type: ignore[assignment]
        return status is not None and JobStatus(status.decode()).is_final

    def _read_step(self, pipeline_id: str, driven: _Driven, name: str, position: str) -> int:
        """Read the step job's new results (a few pages) and decide what they make possible."""
        planner = driven.planner
        decided = 0
        for _ in range(_PAGES_PER_TICK):
            raws, after = self.jobs.read_raw_results(planner.jobs[name], position, _PAGE)
            if after == position:
                driven.drained[name] = True
                return decided
            outcomes: dict[int, StepOutcome] = {}
            for raw in raws:
                result = parse_result(raw)
                if result.custom_id is not None and result.custom_id.isdigit():
                    outcomes[int(result.custom_id)] = outcome_of(result, planner.asks_json[name])
            self.store.store_outcomes(pipeline_id, {mark(row, name): outcome_json(o) for row, o in outcomes.items()})
            if planner.uses(name):
                decided += self._decide_rows(pipeline_id, planner, sorted(outcomes))
            self.store.set_position(pipeline_id, name, after)
            position = after
        driven.drained[name] = False
        return decided

    def _decide_rows(self, pipeline_id: str, planner: RowPlanner, rows: list[int]) -> int:
        """Decide what can be of these rows' steps, from their columns and outcomes in Redis."""
        if not rows:
            return 0
        fields = [mark(row, name) for row in rows for name in planner.order]
        marks, stored = self.store.marks_and_outcomes(pipeline_id, fields)
        columns = self.store.rows_of(pipeline_id, rows)
        decisions: list[Decision] = []
        width = len(planner.order)
        for index, row in enumerate(rows):
            raw_columns = columns[index]
            if raw_columns is None:
                continue  # not loaded (its key expired): nothing can be rendered for it
            outcomes: dict[str, StepOutcome] = {}
            decided: set[str] = set()
            for offset, name in enumerate(planner.order):
                if marks[index * width + offset] is not None:
                    decided.add(name)
                outcome = stored[index * width + offset]
                if outcome is not None:
                    outcomes[name] = parse_outcome(outcome)
            decisions += planner.plan(row, _columns(raw_columns), outcomes, decided)
        return max(0, self.store.decide(pipeline_id, decisions))


def _columns(raw: bytes) -> dict[str, object]:
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}
