"""A worker's side of provider batches: prepare, upload, create, poll and collect, one step at a time.

The scheduler publishes ``inferpool.provider_batch_step`` (the batch id) to the model's queue whenever a
provider batch's next step is due; whichever worker of the model takes it runs ``ProviderBatchRunner.step``:
under a per-batch lock it advances the batch as far as it can now (see ``inferpool.provider_batch.store``
for the states), then says when it wants to be called again. Everything that talks to the provider runs
here, in the process that holds the provider key.

Lines go to the provider as the real-time backend would send them: through the model's hooks
(``before_request``; a refused line gets its error at once), checked against the model's limits, and
translated by the backend. Answers come back through the hooks' ``after_result`` and the exactly-once
result path, priced at the model's batch price, with ``stats.via = "provider-batch"``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferpool._exceptions import InvalidRequest, ProviderError, RequestError
from inferpool.constants import CANCELLED_CODE, EXPIRED_CODE, job_items_key, job_key
from inferpool.model_registry.capability import check_request_fits
from inferpool.plumbing.redis_connection import decode_text
from inferpool.plumbing.settings import Settings
from inferpool.provider_batch.api import LineOutcome, ProviderBatchApi
from inferpool.provider_batch.store import LockLost, ProviderBatchStore, StepLock
from inferpool.provider_batch.via import batch_limits
from inferpool.state.items import item_from_record
from inferpool.state.results import ResultRecord
from inferpool.wire import JobStatus, PBatchState, ProviderBatch, TaskItem
from inferpool.workers.backend import Generation, Outcome

if TYPE_CHECKING:
    from inferpool.workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

#: Test-only fault injection (``Settings.fault_provider_batch``): ``after-upload`` or ``after-create`` ends the
#: process right after that provider call, before its result is recorded (the crash-safety tests).
FAULT_ENV = "INFERPOOL_FAULT_PROVIDER_BATCH"
_PAGE = 1000
#: HTTP statuses of a refused upload or create that no retry will change.
_FINAL_STATUSES = frozenset(range(400, 500)) - {408, 409, 429}


class ProviderBatchRunner:
    """Advances the provider batches of one model, in its worker processes."""

    def __init__(self, runtime: WorkerRuntime, api: ProviderBatchApi, store: ProviderBatchStore,
                 settings: Settings, work_dir: Path | None = None) -> None:  # fmt: skip
        self.runtime = runtime
        self.api = api
        self.store = store
        self.settings = settings
        self.redis = store.redis
        self.spec = runtime.spec
        self._dir = work_dir or Path(tempfile.gettempdir()) / "inferpool-provider-batches"
        self._fault = settings.fault_provider_batch
        self._step = _StepState()  # per thread: Celery runs steps of different batches at once

    # -- one step -----------------------------------------------------------------------------------------

    def step(self, pbatch_id: str) -> str:
        """Advance the batch as far as it goes now; returns what happened (for the task's result and logs)."""
        with self.store.lock(pbatch_id, self.settings.provider_batch_step_timeout_s) as held:
            if held is None:
                return "busy: another worker is advancing it"
            batch = self.store.get(pbatch_id)
            if batch is None or batch.finished:
                return "nothing to do"
            self._step.fence = held
            try:
                try:
                    return self._advance(batch)
                except LockLost:
                    raise
                except Exception as exc:
                    return self._failed_step(batch, exc)
            except LockLost:
                log.warning("provider batch %s: this step lost its lock (its process stalled past %s s) and another "
                            "worker holds the batch now; it recorded nothing more", pbatch_id,
                            self.settings.provider_batch_step_timeout_s)  # fmt: skip
                return "lost its lock: another worker advances it now"
            finally:
                self._step.fence = None

    def _mark(self, pbatch_id: str, state: PBatchState | None = None, **fields: str | int | float) -> None:
        self.store.mark(pbatch_id, state, fence=self._step.fence, **fields)

    def _close(self, batch: ProviderBatch, outcome: str, *, back_to_realtime: list[str] | None = None,
               reason: str = "") -> int:  # fmt: skip
        return self.store.close(batch, outcome, back_to_realtime=back_to_realtime, reason=reason,
                                fence=self._step.fence)  # fmt: skip

    def _failed_step(self, batch: ProviderBatch, exc: Exception) -> str:
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and status in _FINAL_STATUSES and batch.state in (
                PBatchState.UPLOADING, PBatchState.CREATING):  # fmt: skip
            message = f"{self.api.provider} refused the batch: HTTP {status}: {getattr(exc, 'message', exc)}"
            self._settle_all(batch, ProviderError(message))
            self._close(batch, f"refused: {message}")
            return message
        faults = self.store.count_fault(batch.id)
        wait = self._backoff(faults)
        log.warning("provider batch %s (%s): %s: %s; trying again in %.0f s", batch.id, batch.state.value,
                    type(exc).__name__, exc, wait, exc_info=not isinstance(status, int))  # fmt: skip
        self.store.schedule(batch.id, time.time() + wait)
        return f"failed ({type(exc).__name__}), retrying"

    def _backoff(self, times: int) -> float:
        settings = self.settings
        return float(min(settings.provider_batch_poll_max_s, settings.provider_batch_poll_s * 2 ** min(times, 16)))

    def _advance(self, batch: ProviderBatch) -> str:
        job_status = self.redis.hget(job_key(batch.job_id), "status")
        if job_status is None:
            self._close(batch, "its job is gone")
            return "job gone"
        # Found in 'uploading' or 'creating': an earlier step may have made the object at the provider.
        resumed = batch.state
        while True:
            state = batch.state
            # Nothing of it runs at the provider before the create (an uploaded file is only input).
            if batch.cancel and state in (PBatchState.PREPARED, PBatchState.UPLOADING, PBatchState.UPLOADED):
                self._settle_all(batch, _not_run(_why_not_run(batch), decode_text(job_status)))
                self._close(batch, "cancelled before it was sent")
                return "cancelled before it was sent"
            if state == PBatchState.PREPARED:
                sent = self._build(batch)
                if sent == 0:
                    self._close(batch, "no lines left to send")
                    return "no lines left to send"
                next_state = PBatchState.UPLOADING if self.api.uploads else PBatchState.CREATING
                self._mark(batch.id, next_state, marked_at=time.time(), sent=sent)
            elif state == PBatchState.UPLOADING:
                self._upload(batch, look_first=resumed == PBatchState.UPLOADING)
            elif state == PBatchState.UPLOADED:
                self._mark(batch.id, PBatchState.CREATING, marked_at=time.time())
            elif state == PBatchState.CREATING:
                return self._create(batch, look_first=resumed == PBatchState.CREATING)
            else:
                return self._poll(batch, decode_text(job_status))
            refreshed = self.store.get(batch.id)
            if refreshed is None:
                return "gone"
            batch = refreshed

    # -- prepare, upload, create --------------------------------------------------------------------------

    def _lines_path(self, batch: ProviderBatch) -> Path:
        return self._dir / f"{batch.id}.jsonl"

    def _file_name(self, batch: ProviderBatch) -> str:
        return f"inferpool-{batch.id}.jsonl"

    def _build(self, batch: ProviderBatch) -> int:
        """Write the batch's lines in the provider's format (the hooks and limits applied; a line that fails
        them gets its error now). Splits the batch where it would pass the provider's size limit. Returns how
        many lines are in the file."""
        _, max_bytes = batch_limits(self.spec)
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._lines_path(batch)
        size = sent = 0
        kind: str | None = None  # a provider batch has one endpoint: the first line's
        with path.open("wb") as out:
            for rids in self.store.request_ids(batch.id, _PAGE):
                errors: list[tuple[TaskItem, RequestError]] = []
                for item in self._items(batch.job_id, rids):
                    kind = kind or item.request.kind
                    line = self._line(item) if item.request.kind == kind else _other_endpoint(kind, item)
                    if isinstance(line, RequestError):
                        errors.append((item, line))
                        continue
                    if sent and size + len(line) + 1 > max_bytes:
                        self._write_errors(batch, errors)
                        self.store.split(batch, self._position_of(batch, item.request_id))
                        return sent
                    out.write(line + b"\n")
                    size += len(line) + 1
                    sent += 1
                self._write_errors(batch, errors)
        path.chmod(0o600)
        return sent

    def _position_of(self, batch: ProviderBatch, request_id: str) -> int:
        for start, rids in enumerate(self.store.request_ids(batch.id, _PAGE)):
            if request_id in rids:
                return start * _PAGE + rids.index(request_id)
        raise LookupError(request_id)

    def _line(self, item: TaskItem) -> bytes | RequestError:
        request = item.request
        if self.runtime.hooks.hooks:
            rewritten, _ = self.runtime.hooks.before(request)
            if isinstance(rewritten, RequestError):
                return rewritten
            request = rewritten
        try:
            check_request_fits(self.spec, request)
            return self.api.line(item.request_id, request)
        except RequestError as exc:
            return exc

    def _items(self, job_id: str, rids: list[str]) -> list[TaskItem]:
        """The items of ``rids`` still unanswered (an answered or settled one has no item any more)."""
        records: Any = self.redis.hmget(job_items_key(job_id), rids)
        return [item_from_record(rid, record) for rid, record in zip(rids, records, strict=True) if record is not None]

    def _upload(self, batch: ProviderBatch, *, look_first: bool) -> None:
        name, since = self._file_name(batch), batch.marked_at or batch.created_at
        file_id = self.runtime.run_on_backend_loop(self.api.find_upload(name, since)) if look_first else None
        if file_id is None:
            path = self._lines_path(batch)
            if not path.exists():  # another worker prepared it, or this one restarted: the same lines again
                self._build(batch)
            file_id = self.runtime.run_on_backend_loop(self.api.upload(name, path))
            self._crash_point("after-upload")
        self._mark(batch.id, PBatchState.UPLOADED, file_id=file_id)

    def _create(self, batch: ProviderBatch, *, look_first: bool) -> str:
        """Create the batch at the provider (or adopt the one an interrupted step created) and record it."""
        if not self.api.serial_creates:
            self._create_now(batch, batch.marked_at or batch.created_at, look_first=look_first)
            return "created"
        with self.store.create_lock(self.api.provider, self.settings.provider_batch_step_timeout_s) as held:
            if not held:
                self.store.schedule(batch.id, time.time() + min(1.0, self.settings.provider_batch_poll_s))
                return "waiting: another batch is being created at the provider"
            since = batch.marked_at or batch.created_at
            if not look_first:  # the create's own time slot starts now (see AnthropicBatchApi)
                since = time.time()
                self._mark(batch.id, marked_at=since)
            self._create_now(batch, since, look_first=look_first)
        return "created"

    def _create_now(self, batch: ProviderBatch, since: float, *, look_first: bool) -> None:
        sent = batch.sent or batch.count
        found = None
        if look_first:
            found = self.runtime.run_on_backend_loop(self.api.find_created(batch.id, sent, since, self.store.claimed))
        if found is None:
            path = self._lines_path(batch)
            if not self.api.uploads and not path.exists():
                self._build(batch)
            found = self.runtime.run_on_backend_loop(self.api.create(batch.id, batch.job_id, batch.file_id, path))
            self._crash_point("after-create")
        else:
            log.warning("provider batch %s: adopted %s batch %s, created before a crash", batch.id,
                        self.api.provider, found)  # fmt: skip
        self.store.claim(found)
        self._mark(batch.id, PBatchState.CREATED, batch_id=found)
        self.store.schedule(batch.id, time.time() + self.settings.provider_batch_poll_s)
        self._lines_path(batch).unlink(missing_ok=True)
        log.info("provider batch %s: %s batch %s created (%d lines)", batch.id, self.api.provider, found, sent)

    def _crash_point(self, name: str) -> None:
        if self._fault == name:
            log.error("fault injection (%s=%s): exiting now", FAULT_ENV, name)
            os._exit(70)

    # -- poll and collect ---------------------------------------------------------------------------------

    def _poll(self, batch: ProviderBatch, job_status: str) -> str:
        assert batch.batch_id is not None
        progress = self.runtime.run_on_backend_loop(self.api.retrieve(batch.batch_id))
        if progress.ended:
            return self._collect(batch, progress.status, progress.failed, job_status)
        if batch.cancel and not batch.cancel_sent:
            self.runtime.run_on_backend_loop(self.api.cancel(batch.batch_id))
            self._mark(batch.id, cancel_sent=1)
        self._mark(batch.id, provider_status=f"{progress.status}: {progress.counts}", polls=batch.polls + 1)
        # A cancelled batch ends soon: poll it at the first pace, not the backoff's, to collect it in time.
        wait = self.settings.provider_batch_poll_s if batch.cancel else self._backoff(batch.polls)
        self.store.schedule(batch.id, time.time() + wait)
        return f"{progress.status}: {progress.counts}"

    def _collect(self, batch: ProviderBatch, status: str, refused: str | None, job_status: str) -> str:
        assert batch.batch_id is not None
        if refused is not None:
            self._settle_all(batch, ProviderError(f"{self.api.provider} failed the batch: {refused}"))
            self._close(batch, f"failed: {refused}")
            return f"failed: {refused}"
        outcomes = self.runtime.run_on_backend_loop(_gather(self.api.results(batch.batch_id)))
        resend = (self.spec.batch_api is not None and self.spec.batch_api.on_expiry == "realtime"
                  and job_status in (JobStatus.VALIDATING, JobStatus.IN_PROGRESS)
                  and not batch.window_ended)  # fmt: skip
        back: list[str] = []
        written = 0
        for rids in self.store.request_ids(batch.id, _PAGE):
            records = []
            for item in self._items(batch.job_id, rids):
                outcome = outcomes.get(item.request_id)
                if outcome == "expired" and resend:
                    back.append(item.request_id)
                    continue
                if batch.window_ended and outcome == "cancelled":
                    outcome = "expired"  # cancelled by us because the job's window ended: it expired unrun
                records.append(self._record(batch, item, _settled_outcome(outcome, job_status)))
            written += sum(self.runtime.write_records(batch.job_id, records, self.settings.result_ttl_s))
        reason = (f"re-sent through the real-time API: provider batch {batch.batch_id} expired with {len(back)} "
                  "lines not run (batch_api.on_expiry: realtime)")  # fmt: skip
        self._close(batch, f"{status}: {written} results written", back_to_realtime=back, reason=reason)
        log.info("provider batch %s (%s %s) %s: %d results written, %d lines back to real time", batch.id,
                 self.api.provider, batch.batch_id, status, written, len(back))  # fmt: skip
        return f"{status}: {written} results written"

    def _record(self, batch: ProviderBatch, item: TaskItem, outcome: LineOutcome) -> ResultRecord:
        hooks_s = None
        if isinstance(outcome, Generation) and self.runtime.hooks.hooks:
            outcome, hooks_s = self.runtime.hooks.after(item.request, outcome)
        assert not isinstance(outcome, str)
        return self.runtime.result_record(batch.job_id, batch.created_at, item, outcome, batch.created_at, hooks_s,
                                          provider_batch=True)  # fmt: skip

    def _settle_all(self, batch: ProviderBatch, error: RequestError) -> None:
        """End every unanswered line of the batch with ``error``."""
        for rids in self.store.request_ids(batch.id, _PAGE):
            records = [self._record(batch, item, error) for item in self._items(batch.job_id, rids)]
            self.runtime.write_records(batch.job_id, records, self.settings.result_ttl_s)

    def _write_errors(self, batch: ProviderBatch, errors: list[tuple[TaskItem, RequestError]]) -> None:
        if errors:
            records = [self._record(batch, item, error) for item, error in errors]
            self.runtime.write_records(batch.job_id, records, self.settings.result_ttl_s)


class _StepState(threading.local):
    fence: StepLock | None = None


async def _gather(results: AsyncIterator[tuple[str, LineOutcome]]) -> dict[str, LineOutcome]:
    return {custom_id: outcome async for custom_id, outcome in results}


def _other_endpoint(kind: str, item: TaskItem) -> RequestError:
    return InvalidRequest(f"this line is {item.request.kind}, and the provider batch its model's lines went to carries "
                          f"{kind} (one endpoint per provider batch): send {item.request.kind} lines for this model "
                          "in a job of their own, or with --via realtime")  # fmt: skip


def _why_not_run(batch: ProviderBatch) -> str:
    return "expired" if batch.window_ended else "cancelled"


def _not_run(how: str, job_status: str) -> RequestError:
    if how == "expired" and job_status not in (JobStatus.CANCELLING, JobStatus.CANCELLED):
        return RequestError("the provider's batch expired before this request ran", code=EXPIRED_CODE)
    return RequestError("the batch was cancelled before this request ran", code=CANCELLED_CODE)


def _settled_outcome(outcome: LineOutcome | None, job_status: str) -> Outcome:
    if outcome is None:
        return ProviderError("the provider's batch ended without a result for this request")
    if isinstance(outcome, str):
        return _not_run(outcome, job_status)
    return outcome
