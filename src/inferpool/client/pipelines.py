"""Pipelines from the client: ``client.pipelines.create/retrieve/list/cancel/wait/results``.

``create`` checks the pipeline file against the rows' columns, creates one batch job per step (kept open while
rows flow in), stores each row and queues its first steps, and returns; the scheduler's pipeline driver
(``inferpool.pipelines.driver``) queues each row's later steps as their inputs are answered. Giving ``resume``
the id of a pipeline whose loading broke off loads the same rows into it again: rows and steps already there
are left as they are.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import redis

from inferpool._exceptions import BatchRefused, JobNotFound, ResultTimeout
from inferpool.client.batch_lines import BodyLines
from inferpool.client.batches import Batches
from inferpool.client.routing import Router
from inferpool.pipelines.plan import RowPlanner, parse_outcome, stored_pipeline
from inferpool.pipelines.spec import Pipeline, load_pipeline
from inferpool.state.jobs import JobStore
from inferpool.state.pipelines import Decision, PipelineStore, mark
from inferpool.templates.rows import read_rows
from inferpool.wire import BatchJob, PipelineRow, PipelineRun, PipelineStatus, StepProgress, new_id

#: Called with the pipeline's latest state while ``wait`` polls.
PipelineProgressCallback = Callable[[PipelineRun], None]
PipelineSource = str | os.PathLike[str] | Pipeline | Mapping[str, Any]
RowSource = str | os.PathLike[str] | Iterable[Mapping[str, Any]]

_FLUSH_ROWS = 500
#: Metadata of a step's job: which pipeline and step its lines are.
PIPELINE_METADATA = "inferpool_pipeline"
STEP_METADATA = "inferpool_step"


def _rows(rows: RowSource) -> Iterator[Mapping[str, Any] | Exception]:
    if isinstance(rows, str | os.PathLike):
        yield from read_rows(Path(rows))
    else:
        yield from (dict(row) for row in rows)


def _row_json(columns: Mapping[str, Any]) -> str:
    """A row's columns as JSON (values JSON cannot hold, such as dates, as text); escaped where its text is not
    valid Unicode (a lone surrogate), so Redis can store it."""
    text = json.dumps(columns, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(columns, default=str)
    return text


class Pipelines:
    """Pipelines through one client's Redis. Reached as ``client.pipelines``."""

    def __init__(self, redis_client: redis.Redis, batches: Batches, router: Router, result_ttl_s: int) -> None:
        self._batches = batches
        self._router = router
        self._store = PipelineStore(redis_client, result_ttl_s)
        self._jobs = JobStore(redis_client, result_ttl_s)

    def create(self, pipeline: PipelineSource, rows: RowSource, *, priority: int = 0, completion_window: str = "24h",
               metadata: Mapping[str, str] | None = None, tenant: str | None = None,
               resume: str | None = None) -> PipelineRun:  # fmt: skip
        """Check ``pipeline`` (a YAML file, a mapping or a ``Pipeline``) against the columns of ``rows`` (a CSV,
        JSONL or Parquet file, or mappings), queue every row's first steps and return the running pipeline.
        ``TemplateError`` if the file cannot run over these rows; ``resume``: an existing pipeline's id, to load
        the rest of its rows after an interrupted ``create`` (the same file and rows)."""
        source = rows
        iterator = _rows(source)
        first = next(iterator, None)
        if first is None:
            raise BatchRefused("the rows are empty: a pipeline needs at least one row")
        columns = list(first) if not isinstance(first, Exception) else None
        given = pipeline.model_dump() if isinstance(pipeline, Pipeline) else pipeline
        spec, order = load_pipeline(Path(given) if isinstance(given, os.PathLike) else given, columns)
        pipeline_id, jobs, costed, job_tenant = self._start(spec, order, resume, priority=priority,
                                                            completion_window=completion_window,
                                                            metadata=metadata, tenant=tenant)  # fmt: skip
        planner = RowPlanner(spec, order, jobs, BodyLines(self._router, tenant=job_tenant, costed=costed))
        count = self._load(pipeline_id, planner, [first], 0)
        count = self._load(pipeline_id, planner, iterator, count)
        self._store.loaded(pipeline_id, count)
        return self.retrieve(pipeline_id)

    def _start(self, spec: Pipeline, order: list[str], resume: str | None, **options: Any) -> tuple[
            str, dict[str, str], bool, str | None]:  # fmt: skip
        if resume is not None:
            raw = self._store.raw(resume)
            if "status" not in raw:
                raise JobNotFound(f"no pipeline {resume!r} to resume (wrong id, another Redis, or its retention ended)")
            stored, _, jobs = stored_pipeline(raw)
            if stored != spec:
                raise BatchRefused(f"pipeline {resume} was started with another pipeline file; resume it with the same")
            return resume, jobs, raw.get("costed") == "1", raw.get("tenant")
        pipeline_id = new_id("pipe")
        job_options = self._batches.job_options(**options)
        jobs = {}
        for name in order:
            job_id = new_id("batch")
            metadata = {**job_options.metadata, PIPELINE_METADATA: pipeline_id, STEP_METADATA: name}
            via = spec.step(name).via or "realtime"  # rows flow unless a step asks for a provider's Batch API
            self._jobs.create(job_id, dataclasses.replace(job_options, metadata=metadata, via=via))
            jobs[name] = job_id
        costed = bool(job_options.budget_scopes)
        self._store.create(pipeline_id, spec=spec.model_dump(mode="json"), order=order, jobs=jobs,
                           window_s=job_options.window_s, tenant=job_options.tenant,
                           metadata=options.get("metadata") or {}, costed=costed)  # fmt: skip
        return pipeline_id, jobs, costed, job_options.tenant

    def _load(self, pipeline_id: str, planner: RowPlanner, rows: Iterable[Mapping[str, Any] | Exception],
              count: int) -> int:  # fmt: skip
        """Store rows and decide their first steps, a page at a time; returns the rows counted so far."""
        page: dict[int, str] = {}
        decisions: list[Decision] = []
        for row in rows:
            count += 1
            columns = row if isinstance(row, Exception) else dict(row)
            page[count] = _row_json({} if isinstance(columns, Exception) else columns)
            decisions += planner.plan(count, columns, {}, set())
            if len(page) >= _FLUSH_ROWS:
                self._flush(pipeline_id, page, decisions)
        self._flush(pipeline_id, page, decisions)
        return count

    def _flush(self, pipeline_id: str, page: dict[int, str], decisions: list[Decision]) -> None:
        self._store.add_rows(pipeline_id, page)  # rows first: the driver renders later steps from them
        if self._store.decide(pipeline_id, decisions) < 0:
            raise BatchRefused(f"pipeline {pipeline_id} was cancelled while its rows were being loaded")
        page.clear()
        decisions.clear()

    def retrieve(self, pipeline_id: str) -> PipelineRun:
        raw = self._store.raw(pipeline_id)
        if "status" not in raw:
            raise JobNotFound(f"no pipeline {pipeline_id!r} (wrong id, another Redis, or its retention ended)")
        pipeline, order, jobs = stored_pipeline(raw)
        steps = []
        for name in order:
            job = self._jobs.get(jobs[name])
            steps.append(StepProgress(
                name=name, model=pipeline.step(name).model, job_id=jobs[name], queued=int(raw.get(f"queued:{name}", 0)),
                completed=job.request_counts.completed if job else 0, failed=job.request_counts.failed if job else 0,
                skipped=int(raw.get(f"skipped:{name}", 0)), not_run=int(raw.get(f"not_run:{name}", 0)),
                usage=job.usage if job else []))  # fmt: skip
        return PipelineRun(id=pipeline_id, status=PipelineStatus(raw["status"]), created_at=int(raw["created_at"]),
                           expires_at=int(raw["expires_at"]), rows=int(raw.get("rows", 0)), steps=steps,
                           tenant=raw.get("tenant"), metadata=json.loads(raw.get("metadata", "{}")),
                           errors=json.loads(raw.get("errors", "[]")))  # fmt: skip

    def list(self, limit: int = 20) -> builtins.list[PipelineRun]:
        """The newest pipelines first."""
        runs = []
        for pipeline_id in self._store.newest_ids(limit):
            try:
                runs.append(self.retrieve(pipeline_id))
            except JobNotFound:
                continue
        return runs

    def cancel(self, pipeline_id: str) -> PipelineRun:
        """Queue no more steps; the steps' jobs are cancelled (lines running finish). Final once they end."""
        self.retrieve(pipeline_id)
        self._store.stop(pipeline_id)
        return self.retrieve(pipeline_id)

    def jobs(self, pipeline_id: str) -> dict[str, BatchJob]:
        """Each step's batch job."""
        run = self.retrieve(pipeline_id)
        return {step.name: self._batches.retrieve(step.job_id) for step in run.steps}

    def wait(self, pipeline_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
             on_progress: PipelineProgressCallback | None = None) -> PipelineRun:  # fmt: skip
        """Until the pipeline is final (blocking on its final signal between polls); ``ResultTimeout`` after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.retrieve(pipeline_id)
            if on_progress is not None:
                on_progress(run)
            if run.status.is_final:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"pipeline {pipeline_id} is still {run.status.value} after {timeout} s; wait "
                                    f"again with `inferpool pipeline wait {pipeline_id}`")  # fmt: skip
            pause = poll_s if deadline is None else min(poll_s, max(0.0, deadline - time.monotonic()))
            if pause > 0:
                self._store.wait_final(pipeline_id, pause)

    def results(self, pipeline_id: str, *, page: int = 500) -> Iterator[PipelineRow]:
        """Every row with each step's outcome (None where a step has none yet), in row order."""
        run = self.retrieve(pipeline_id)
        names = [step.name for step in run.steps]
        for start in range(1, run.rows + 1, page):
            numbers = list(range(start, min(run.rows, start + page - 1) + 1))
            columns = self._store.rows_of(pipeline_id, numbers)
            outcomes = self._store.outcomes(pipeline_id, [mark(n, name) for n in numbers for name in names])
            for index, number in enumerate(numbers):
                raw = columns[index]
                found = outcomes[index * len(names) : (index + 1) * len(names)]
                steps = {name: parse_outcome(o) if o else None for name, o in zip(names, found, strict=True)}
                yield PipelineRow(row_number=number, row=json.loads(raw) if raw else {}, steps=steps)


class AsyncPipelines:
    """The asyncio twin of ``Pipelines`` (``async_client.pipelines``): the same calls, run in a thread."""

    def __init__(self, sync: Pipelines) -> None:
        self._sync = sync

    async def create(self, pipeline: PipelineSource, rows: RowSource, **options: Any) -> PipelineRun:
        return await asyncio.to_thread(self._sync.create, pipeline, rows, **options)

    async def retrieve(self, pipeline_id: str) -> PipelineRun:
        return await asyncio.to_thread(self._sync.retrieve, pipeline_id)

    async def list(self, limit: int = 20) -> builtins.list[PipelineRun]:
        return await asyncio.to_thread(self._sync.list, limit)

    async def cancel(self, pipeline_id: str) -> PipelineRun:
        return await asyncio.to_thread(self._sync.cancel, pipeline_id)

    async def wait(self, pipeline_id: str, **options: Any) -> PipelineRun:
        return await asyncio.to_thread(self._sync.wait, pipeline_id, **options)

    async def results(self, pipeline_id: str) -> builtins.list[PipelineRow]:
        return await asyncio.to_thread(lambda: builtins.list(self._sync.results(pipeline_id)))
