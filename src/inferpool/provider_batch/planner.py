"""The scheduler's side of provider batches: choose each job's path per model, form provider batches
from the job's pending lines, and publish the step of every provider batch that is due.

The scheduler never calls a provider: the workers of the model do (``inferpool.provider_batch.runner``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from inferpool.constants import (
    BUDGET_EXCEEDED_CODE,
    TASK_PROVIDER_BATCH_STEP,
    UNAVAILABLE_CODE,
    Priority,
    job_items_key,
    job_key,
    job_pending_key,
    queue_name,
)
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.redis_connection import decode_text
from inferpool.plumbing.settings import Settings
from inferpool.provider_batch.store import ProviderBatchStore, via_field
from inferpool.provider_batch.via import batch_limits, batch_provider, choose_via, waits_for_upload
from inferpool.state.budgets import Budgets
from inferpool.state.jobs import JobStore, error_result_of_record
from inferpool.wire import ViaChoice

#: Lines reserved per script call when a budgeted job's lines go into provider batches.
_RESERVE_PAGE = 1000

log = logging.getLogger(__name__)


class ProviderBatchPlanner:
    def __init__(self, jobs: JobStore, settings: Settings, celery: Celery, fence: Callable[[], str]) -> None:
        self.jobs = jobs
        self.redis = jobs.redis
        self.settings = settings
        self.celery = celery
        self.store = ProviderBatchStore(jobs.redis, settings.result_ttl_s)
        self.budgets = Budgets(jobs.redis)
        self._fence = fence

    # -- paths ------------------------------------------------------------------------------------------

    def holds(self, job_id: str, via: str, window_s: float, validated: bool, spec: ModelSpec) -> bool:
        """Whether the job's pending lines for ``spec`` are not for real-time dispatch now: they wait for the
        upload to end, went into provider batches (done here), or end with ``provider_batch_unavailable``."""
        if via == "realtime" or (via == "auto" and batch_provider(spec) is None):
            return False  # nothing to choose (and nothing worth showing in batch status)
        choice = self._choice(job_id, spec.name)
        if choice is None:
            if waits_for_upload(spec, via) and not validated:
                return True
            lines = int(self.redis.zcard(job_pending_key(job_id, spec.name)))
            choice = choose_via(spec, via, window_s, lines)
            self.redis.hset(job_key(job_id), via_field(spec.name), choice.model_dump_json())
            log.info("job %s, model %s: %s (%s)", job_id, spec.name, choice.via, choice.reason)
        if choice.via == "realtime":
            return False
        if choice.via == "unavailable":
            self.jobs.drop_pending(job_id, UNAVAILABLE_CODE, choice.reason, models=[spec.name])
        else:
            self._form(job_id, spec)
        return True

    def _choice(self, job_id: str, model: str) -> ViaChoice | None:
        raw = self.redis.hget(job_key(job_id), via_field(model))
        return None if raw is None else ViaChoice.model_validate_json(raw)

    def _form(self, job_id: str, spec: ModelSpec) -> None:
        """Every pending line of the model into provider batches of at most the provider's size."""
        self._reserve(job_id, spec)
        max_requests, _ = batch_limits(spec)
        provider = batch_provider(spec) or "openai"
        while True:
            pbatch_id, moved = self.store.form(job_id, spec.name, provider, max_requests, fence=self._fence())
            if moved:
                log.info("job %s: provider batch %s formed (%s, %d lines)", job_id, pbatch_id, spec.name, moved)
            if moved < max_requests:
                return

    def _reserve(self, job_id: str, spec: ModelSpec) -> None:
        """A job with a spend budget: each pending line reserves the most it can cost at the batch price before it
        goes into a provider batch (idempotent: lines that already hold are skipped); those that do not fit leave
        the pending set and end as ``budget_exceeded``."""
        raw = self.redis.hget(job_key(job_id), "budget_scopes")
        scopes = [scope for scope in decode_text(raw).split(",") if scope] if raw else []
        if not scopes:
            return
        pending = job_pending_key(job_id, spec.name)
        rids = [decode_text(rid) for rid in self.redis.zrange(pending, 0, -1)]
        for start in range(0, len(rids), _RESERVE_PAGE):
            refused = self.budgets.reserve_lines(job_id, scopes, rids[start : start + _RESERVE_PAGE],
                                                 self.settings.result_ttl_s, batch_price=True)  # fmt: skip
            if refused:
                self.redis.zrem(pending, *refused)
                self.jobs.end_requests(job_id, {rid: (BUDGET_EXCEEDED_CODE, why.message())
                                                for rid, why in refused.items()})  # fmt: skip

    # -- driving -----------------------------------------------------------------------------------------

    def drive(self) -> int:
        """Publish the step of every provider batch that is due; returns how many. A step not finished within
        the step timeout is published again then, unless its lock is still held (its worker is alive and
        renews it): only a step whose worker died is run again."""
        now = time.time()
        timeout = self.settings.provider_batch_step_timeout_s
        published = 0
        for pbatch_id in self.store.due(now):
            batch = self.store.get(pbatch_id)
            if batch is None or batch.finished:
                self.store.forget(pbatch_id)
                continue
            self.store.schedule(pbatch_id, now + timeout)
            if self.store.step_running(pbatch_id):  # a live worker renews its lock: look again after the timeout
                continue
            self.celery.send_task(TASK_PROVIDER_BATCH_STEP, args=[pbatch_id],
                                  queue=queue_name(batch.model, Priority.HIGH), argsrepr=pbatch_id, kwargsrepr="{}",
                                  expires=timeout)  # fmt: skip
            published += 1
        return published

    def cancel_job(self, job_id: str) -> None:
        """Ask for the cancellation of the job's unfinished provider batches (their lines end as the
        provider reports them: answered, or ``batch_cancelled``)."""
        for batch in self.store.job_batches(job_id):
            if not batch.finished and not batch.cancel:
                self.store.request_cancel(batch.id)

    def collect_at_window_end(self, job_id: str) -> int:
        """The job's completion window is over: ask for each unfinished provider batch to be collected
        (what the provider finished is kept) and cancelled (its unrun lines expire). Returns how many are
        still unfinished; the scheduler settles what is left of them after the grace period."""
        open_batches = [batch for batch in self.store.job_batches(job_id) if not batch.finished]
        for batch in open_batches:
            if not batch.window_ended:
                self.store.request_cancel(batch.id, window_ended=True)
        return len(open_batches)

    def settle_job(self, job_id: str, code: str, message: str) -> int:
        """End the unanswered lines of the job's provider batches with this error now and cancel the batches at
        the provider; returns how many lines. At a window's end this runs only after
        ``collect_at_window_end`` had its grace period (the provider's finished answers are paid for)."""
        settled = 0
        for batch in self.store.job_batches(job_id):
            if batch.finished:
                continue
            for rids in self.store.request_ids(batch.id):
                records: Any = self.redis.hmget(job_items_key(job_id), rids)
                results = [error_result_of_record(job_id, rid, record, code, message)
                           for rid, record in zip(rids, records, strict=True) if record is not None]  # fmt: skip
                self.jobs.end_lines(results)
                settled += len(results)
            if not batch.cancel:
                self.store.request_cancel(batch.id)
        return settled
