"""Batch jobs from the client: ``client.batches.create/retrieve/list/cancel/wait/results``.

A job's state lives in Redis (``inferpool.state.jobs``); the scheduler service runs it. ``create`` streams
the input (a 100k-line file never sits in memory whole), validates every line, queues the good ones and
settles the bad ones with their error at once, and returns the job. Any process can then follow it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, get_args

import redis

from inferpool._exceptions import BatchRefused, JobNotFound, ResultTimeout
from inferpool.client.batch_lines import AcceptedLine, BatchLineParser, pending_record
from inferpool.client.keys import KeyGate
from inferpool.client.routing import Router
from inferpool.client.tracing import submit_span, traceparent
from inferpool.constants import DEFAULT_TENANT
from inferpool.model_registry.spec import Routing
from inferpool.plumbing.settings import Settings
from inferpool.state.budgets import Budgets, scopes_of
from inferpool.state.items import PendingRecord
from inferpool.state.jobs import JobStore, NewJob
from inferpool.templates.prompt import CUSTOM_ID_METADATA, PromptTemplate, UnrenderedRow, load_template
from inferpool.templates.rows import read_rows
from inferpool.wire import VIA_CHOICES, AnyRequest, BatchJob, BatchOutputLine, RequestResult, Via, load_json, new_id

#: Called with the job's latest state while ``wait`` polls.
JobProgressCallback = Callable[[BatchJob], None]
BatchSource = str | os.PathLike[str] | Iterable[str | Mapping[str, Any]]

log = logging.getLogger(__name__)

_FLUSH_EVERY = 1000
_SNIFF_LINES = 10
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_WINDOW_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """``"24h"``, ``"30m"``, ``"2d"`` or seconds -> seconds."""
    match = _WINDOW.match(text)
    if not match or int(match.group(1)) <= 0:
        raise BatchRefused(f"completion window {text!r} is not a duration like '24h', '30m' or '3600'")
    return int(match.group(1)) * _WINDOW_UNITS[match.group(2)]


def _check_file(path: Path, max_bytes: int, max_lines: int) -> None:
    """Refuse a file up front: missing, too big, too many lines, or not JSONL at all."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BatchRefused(f"cannot read {path}: {exc.strerror}") from exc
    if size > max_bytes:
        raise BatchRefused(f"{path} is {size} bytes, over the batch limit of {max_bytes}; split it into several jobs")
    sniffed: list[bytes] = []
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                sniffed.append(raw)
            if len(sniffed) >= _SNIFF_LINES:
                break
        handle.seek(0)
        lines = _count_lines(handle)
    if lines > max_lines:
        raise BatchRefused(f"{path} has {lines} lines, over the batch limit of {max_lines}; split it into several jobs")
    if not sniffed:
        raise BatchRefused(f"{path} has no requests (it is empty or holds only blank lines)")
    if not any(_is_json_object(raw) for raw in sniffed):
        raise BatchRefused(
            f"{path} does not look like JSONL: none of its first {len(sniffed)} lines is a JSON object. "
            "Each line must be one OpenAI batch request: "
            '{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}'
        )


def _count_lines(handle: BinaryIO) -> int:
    """Lines in the file (a last one without a newline counts), read in 1 MiB blocks: no line objects."""
    lines = 0
    last = b"\n"
    while block := handle.read(1 << 20):
        lines += block.count(b"\n")
        last = block[-1:]
    return lines + (last != b"\n")


def _is_json_object(raw: bytes) -> bool:
    data, problem = load_json(raw)
    return problem is None and isinstance(data, dict)


def _source_lines(source: Iterable[str | Mapping[str, Any]]) -> Iterator[str]:
    for entry in source:
        yield entry if isinstance(entry, str) else json.dumps(dict(entry))


def _still_running(job: BatchJob, timeout: float | None) -> ResultTimeout:
    return ResultTimeout(
        f"batch {job.id} is still {job.status.value} after {timeout} s "
        f"({job.finished} of {job.request_counts.total} done); wait again with `inferpool batch wait {job.id}`"
    )


class Batches:
    """Batch jobs through one client's Redis. Reached as ``client.batches``."""

    def __init__(
        self,
        redis_client: redis.Redis,
        settings: Settings,
        router: Router,
        tenant_for: Callable[[AnyRequest], str | None] = lambda _: None,
        key_gate: KeyGate | None = None,
    ) -> None:
        self._settings = settings
        self._key_gate = key_gate  # the client's API key: its models and budget hold for its jobs
        self._router = router
        self._tenant_for = tenant_for
        self._store = JobStore(redis_client, settings.result_ttl_s)
        self._budgets = Budgets(redis_client)

    def create(
        self,
        source: BatchSource,
        *,
        priority: int = 0,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        tenant: str | None = None,
        input_file_id: str | None = None,
        cache: bool | None = None,
        via: Via = "auto",
        routing: Routing | None = None,
        endpoint: str | None = None,
        allowed_models: Collection[str] | None = None,
        key_id: str | None = None,
    ) -> BatchJob:
        """Validate and queue every line of ``source`` (a JSONL path, or lines / line dicts); return the job.

        Bad lines are settled at once with an error result; the file as a whole is refused
        (``BatchRefused``) only if it is not JSONL at all or exceeds the job limits. ``tenant`` owns the
        job and is counted its usage (a gateway serving many tenants); ``input_file_id`` is recorded for
        the OpenAI batch object. ``cache`` (true or false) is the response-cache choice of every line that
        makes none of its own. ``via`` is the path of the lines of models with a provider Batch API
        (``auto``, ``realtime``, ``provider-batch``: see ``inferpool.provider_batch.via``). ``routing``
        (``load`` or ``prefix``) overrides each model's own policy for this job (``inferpool.affinity``).
        ``endpoint`` is what the OpenAI batch object says (lines may use any served endpoint whatever it is).
        ``allowed_models``: the only models its lines may use (a gateway key's); other lines are ``model_not_found``.
        ``key_id``: the gateway key whose spend budget holds beside its tenant's.
        """
        settings = self._settings
        options = self._options(priority, completion_window, metadata, tenant, input_file_id, cache, via, routing)
        options = self._with_key(options, endpoint, allowed_models, key_id)
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            _check_file(path, settings.batch_max_bytes, settings.batch_max_lines)
            with path.open("rb") as handle:
                return self._create(handle, options)
        return self._create(_source_lines(source), options)

    def job_options(self, *, priority: int = 0, completion_window: str = "24h", metadata: Mapping[str, str] | None
                    = None, tenant: str | None = None, via: Via = "auto") -> NewJob:  # fmt: skip
        """What a new job of this client is created with (its key's models and the budgets its lines reserve
        against included): ``BatchRefused`` for a bad window or path. Pipelines create their steps' jobs so."""
        options = self._options(priority, completion_window, metadata, tenant, None, None, via)
        return self._with_key(options, None, None, None)

    def _with_key(self, options: NewJob, endpoint: str | None, allowed_models: Collection[str] | None,
                  key_id: str | None) -> NewJob:  # fmt: skip
        if self._key_gate is not None:
            allowed_models = allowed_models if allowed_models is not None else self._key_gate.allowed()
            key_id = key_id or self._key_gate.info.key_id
        allowed = frozenset(allowed_models) if allowed_models is not None else None
        budgeted = self._budgets.all()  # the scopes with a budget now: the job's lines reserve against these
        scopes = tuple(scope for scope in scopes_of(options.tenant or self._settings.tenant or DEFAULT_TENANT, key_id)
                       if scope in budgeted)  # fmt: skip
        return dataclasses.replace(options, endpoint=endpoint, allowed_models=allowed, budget_scopes=scopes)

    def _options(self, priority: int, completion_window: str, metadata: Mapping[str, str] | None,
                 tenant: str | None, input_file_id: str | None, cache: bool | None, via: Via,
                 routing: Routing | None = None) -> NewJob:  # fmt: skip
        if via not in VIA_CHOICES:
            raise BatchRefused(f"via {via!r} is not one of {', '.join(VIA_CHOICES)}")
        tenant = tenant or self._settings.tenant  # the job is its client's tenant's (fair share, budgets, listing)
        if routing is not None and routing not in get_args(Routing):
            raise BatchRefused(f"routing {routing!r} is not one of {', '.join(get_args(Routing))}")
        window_s = parse_window(completion_window)
        if window_s > self._settings.result_ttl_s:
            raise BatchRefused(
                f"completion window {completion_window!r} is longer than the result retention "
                f"({self._settings.result_ttl_s} s, INFERPOOL_RESULT_TTL_S): results would expire before the job "
                "ends; use a shorter window or a longer retention"
            )
        return NewJob(priority=priority, window_s=window_s, window_label=completion_window,
                      metadata=dict(metadata or {}), tenant=tenant, input_file_id=input_file_id,
                      cache=cache, via=via, routing=routing)  # fmt: skip

    def create_from_template(
        self,
        template: str | os.PathLike[str] | PromptTemplate | Mapping[str, Any],
        rows: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
        *,
        priority: int = 0,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        tenant: str | None = None,
        cache: bool | None = None,
        via: Via = "auto",
        routing: Routing | None = None,
    ) -> BatchJob:
        """One request per row: ``template`` (a YAML file or a ``PromptTemplate``) rendered with each row of
        ``rows`` (a CSV, JSONL or Parquet file, or mappings). A row that cannot be rendered is its line's
        ``template_error`` (row number and column named); the rest run. ``TemplateError`` if the template
        or the rows file cannot be used at all. The custom_id template is kept in the job's metadata
        (``inferpool_custom_id``), for ``join_results``."""
        prompt = load_template(template if isinstance(template, PromptTemplate | Mapping) else Path(template))
        lines = prompt.compiled().lines(
            read_rows(Path(rows)) if isinstance(rows, str | os.PathLike) else (dict(row) for row in rows)
        )
        job_metadata = {**(metadata or {}), CUSTOM_ID_METADATA: prompt.custom_id}
        options = self._options(priority, completion_window, job_metadata, tenant, None, cache, via, routing)
        return self._create(lines, options)

    def _create(self, lines: Iterable[str | bytes | UnrenderedRow], options: NewJob) -> BatchJob:
        job_id = new_id("batch")
        with submit_span("inferpool.batch.create") as span:
            if span is not None:
                span.set_attribute("inferpool.job.id", job_id)
                options = dataclasses.replace(options, traceparent=traceparent(span))
            return self._create_job(job_id, lines, options)

    def _create_job(self, job_id: str, lines: Iterable[str | bytes | UnrenderedRow], options: NewJob) -> BatchJob:
        self._store.create(job_id, options)
        try:
            total, models = self._upload(job_id, lines, options)
        except BaseException as exc:
            # The lines read so far may be running already; the job must not stay 'validating' for ever.
            if isinstance(exc, BatchRefused):
                reason = str(exc)
            elif isinstance(exc, KeyboardInterrupt):
                reason = "its upload was interrupted"
            else:
                reason = f"its input could not be read to the end ({type(exc).__name__}: {exc})"
            with contextlib.suppress(Exception):
                self._store.fail(job_id, reason)
            raise
        self._store.open(job_id, total, models)
        return self.retrieve(job_id)

    def _upload(self, job_id: str, lines: Iterable[str | bytes | UnrenderedRow],
                options: NewJob) -> tuple[int, set[str]]:  # fmt: skip
        """Validate and queue every line; returns how many there were and the models they need."""
        settings, tenant = self._settings, options.tenant
        parser = BatchLineParser(self._router, max_line_bytes=settings.batch_max_line_bytes,
                                 allowed=options.allowed_models)  # fmt: skip
        pending: list[PendingRecord] = []
        rejected: list[RequestResult] = []
        models: set[str] = set()
        total = 0
        for parsed in parser.parse(lines):
            total += 1
            if total > settings.batch_max_lines:
                raise BatchRefused(f"batch {job_id} refused: more than {settings.batch_max_lines} lines; split the "
                                   "input into several jobs")  # fmt: skip
            if isinstance(parsed, AcceptedLine):
                pending.append(pending_record(parsed, number=total, tenant=tenant or self._tenant_for(parsed.request),
                                              routing=options.routing, cache=options.cache,
                                              costed=bool(options.budget_scopes)))  # fmt: skip
                models.add(parsed.spec.name)
            else:
                rejected.append(RequestResult(request_id=new_id("req"), custom_id=parsed.custom_id, job_id=job_id,
                                              tenant=tenant or settings.tenant, error=parsed.error))  # fmt: skip
            if len(pending) + len(rejected) >= _FLUSH_EVERY:
                self._flush(job_id, pending, rejected, models)
        self._flush(job_id, pending, rejected, models)
        if total == 0:
            raise BatchRefused("the batch input has no requests (it is empty or holds only blank lines)")
        return total, models

    def _flush(self, job_id: str, pending: list[PendingRecord], rejected: list[RequestResult],
               models: set[str]) -> None:  # fmt: skip
        if pending:
            self._store.add_pending_records(job_id, pending, models)
        if rejected:
            self._store.end_lines(rejected, new_lines=True)
        pending.clear()
        rejected.clear()

    def retrieve(self, job_id: str) -> BatchJob:
        job = self._store.get(job_id)
        if job is None:
            raise JobNotFound(f"no batch job {job_id!r} (wrong id, another Redis, or its retention ended)")
        return job

    def list(self, limit: int = 20) -> list[BatchJob]:
        """The newest jobs first."""
        return self._store.list_jobs(limit)

    def cancel(self, job_id: str) -> BatchJob:
        """Cancel: queued lines end as ``batch_cancelled`` errors; lines already running finish."""
        job = self._store.cancel(job_id)
        if job is None:
            raise JobNotFound(f"no batch job {job_id!r}")
        return job

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: JobProgressCallback | None = None,
    ) -> BatchJob:
        """Poll every ``poll_s`` until the job reaches a final status; ``ResultTimeout`` after ``timeout``
        seconds. Between polls it blocks on the job's final-status signal, so it returns as soon as the job ends.

        Redis being briefly unreachable (a restart, a Sentinel failover) is waited out: the job lives on in
        Redis, so polling resumes where it was; past ``timeout`` the Redis error is raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                job = self.retrieve(job_id)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                log.warning("waiting for batch %s: Redis is unreachable (%s); retrying", job_id, exc)
                time.sleep(max(poll_s, 1.0))
                continue
            if on_progress is not None:
                on_progress(job)
            if job.status.is_final:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise _still_running(job, timeout)
            pause = poll_s if deadline is None else min(poll_s, max(0.0, deadline - time.monotonic()))
            if pause > 0:
                try:  # blocks on the job's final-status signal: wakes at once when the job ends (no polling lag)
                    self._store.wait_final(job_id, pause)
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(pause)  # the next poll waits the outage out (or raises past the timeout)

    def results(self, job_id: str) -> Iterator[BatchOutputLine]:
        """Output lines written so far, in completion order; call again later for the rest."""
        self.retrieve(job_id)
        for result in self._store.iter_results(job_id):
            yield BatchOutputLine.from_result(result)

    def request_results(self, job_id: str) -> Iterator[RequestResult]:
        """Like ``results`` but as ``RequestResult``: with serving stats (model, worker, attempts, cost, latency)."""
        self.retrieve(job_id)
        yield from self._store.iter_results(job_id)

    def results_after(self, job_id: str, position: str = "0-0") -> tuple[builtins.list[BatchOutputLine], str]:
        """Output lines written after ``position`` (start with ``"0-0"``) and the position to go on from.

        For following a running job: call again with the returned position to get only new lines.
        """
        results, position = self._store.read_results(job_id, position)
        return [BatchOutputLine.from_result(r) for r in results], position

    def output_json_after(self, job_id: str, position: str = "0-0") -> tuple[builtins.list[tuple[bytes, bool]], str]:
        """Like ``results_after``, but each line as (UTF-8 JSON bytes, succeeded): the fast path for writing files."""
        raws, position = self._store.read_raw_results(job_id, position)
        return [BatchOutputLine.json_from_stored_result(raw) for raw in raws], position


def check_batch_file(path: Path, settings: Settings) -> None:
    """Refuse a batch input file up front (``BatchRefused``): missing, over the job limits, or not JSONL."""
    _check_file(path, settings.batch_max_bytes, settings.batch_max_lines)


class AsyncBatches:
    """The asyncio twin of ``Batches`` (``async_client.batches``), same methods, awaited.

    Job calls run the sync implementation in a worker thread: creating a job is mostly CPU (parsing and
    validating lines), and one code path for both clients keeps their behaviour identical.
    """

    def __init__(self, sync: Batches) -> None:
        self._sync = sync

    async def create(
        self,
        source: BatchSource,
        *,
        priority: int = 0,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        tenant: str | None = None,
        input_file_id: str | None = None,
        cache: bool | None = None,
        via: Via = "auto",
        routing: Routing | None = None,
        endpoint: str | None = None,
        allowed_models: Collection[str] | None = None,
        key_id: str | None = None,
    ) -> BatchJob:
        return await asyncio.to_thread(self._sync.create, source, priority=priority,
                                       completion_window=completion_window, metadata=metadata, tenant=tenant,
                                       input_file_id=input_file_id, cache=cache, via=via, routing=routing,
                                       endpoint=endpoint, allowed_models=allowed_models, key_id=key_id)  # fmt: skip

    async def create_from_template(
        self,
        template: str | os.PathLike[str] | PromptTemplate | Mapping[str, Any],
        rows: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
        **options: Any,
    ) -> BatchJob:
        """``Batches.create_from_template``."""
        return await asyncio.to_thread(self._sync.create_from_template, template, rows, **options)

    async def retrieve(self, job_id: str) -> BatchJob:
        return await asyncio.to_thread(self._sync.retrieve, job_id)

    async def list(self, limit: int = 20) -> builtins.list[BatchJob]:
        return await asyncio.to_thread(self._sync.list, limit)

    async def cancel(self, job_id: str) -> BatchJob:
        return await asyncio.to_thread(self._sync.cancel, job_id)

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: JobProgressCallback | None = None,
    ) -> BatchJob:
        """Poll until the job is final, sleeping with ``asyncio.sleep`` between polls."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.retrieve(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.status.is_final:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise _still_running(job, timeout)
            await asyncio.sleep(poll_s)

    async def output_json_after(
        self, job_id: str, position: str = "0-0"
    ) -> tuple[builtins.list[tuple[bytes, bool]], str]:
        return await asyncio.to_thread(self._sync.output_json_after, job_id, position)

    async def results(self, job_id: str) -> AsyncIterator[BatchOutputLine]:
        """Output lines written so far, in completion order."""
        await self.retrieve(job_id)
        position = "0-0"
        while True:
            lines, after = await asyncio.to_thread(self._sync.results_after, job_id, position)
            if after == position:  # a page can be empty (its results expired) with more after it
                return
            position = after
            for line in lines:
                yield line
