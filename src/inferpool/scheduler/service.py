"""The scheduler service: drives batch jobs from pending to finished.

Each tick it (1) moves jobs through their states (cancel, expire, complete), (2) re-sends requests in
flight for too long (their chunk may be lost; cancelling jobs too, so they can finish) and (3) dispatches
pending requests as chunk tasks, keeping at most a window of requests in flight per model (window per
live worker x live workers), so Redis queues and Flower stay small whatever the job size. Within a model,
jobs of higher priority go first; jobs of equal priority take turns a chunk at a time, so a 50-line job
is not stuck behind a 100k-line one.

Nothing a client submits can stop it. Each job's work is contained: a model this scheduler's registry
does not know fails that job's lines for it (``model_not_found``); any other error in one job is logged,
and a job that keeps failing is marked failed with the reason. Only Redis or broker errors stop a tick;
the loop waits and tries again. It keeps no state of its own: on each new leadership it recounts the per-model
in-flight counts and re-sends each active job's in-flight requests (duplicates are harmless: results are
written once); after that, never again, so a Redis hiccup does not pay for every in-flight request twice.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from inferpool._exceptions import ModelNotFound
from inferpool.client.batch_lines import BodyLines
from inferpool.client.routing import Router
from inferpool.constants import BUDGET_EXCEEDED_CODE, CANCELLED_CODE, EXPIRED_CODE, JOBS_ACTIVE_KEY, Priority, job_key
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.pipelines.driver import PipelineDriver
from inferpool.plumbing.celery_app import publish_chunk_json
from inferpool.plumbing.settings import Settings
from inferpool.provider_batch.planner import ProviderBatchPlanner
from inferpool.scheduler.fair_share import FairShare
from inferpool.scheduler.lease import SchedulerLease
from inferpool.scheduler.placement import Placement
from inferpool.scheduler.tracing import dispatch_span
from inferpool.state.budgets import Budgets, TenantWeights
from inferpool.state.heartbeats import count_live_workers
from inferpool.state.jobs import JobStore
from inferpool.state.leader_fence import NotLeader
from inferpool.wire import JobStatus, chunk_json, describe_chunk

log = logging.getLogger(__name__)

_LIVE_WORKERS_REFRESH_S = 2.0
_STALE_CHECK_EVERY_S = 5.0
#: A job whose handling raised this many times (not counting Redis errors) is failed with the reason.
MAX_JOB_FAULTS = 3
#: Errors of Redis or the broker: they stop the tick (the loop retries), never a job.
INFRASTRUCTURE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OperationalError)

#: What ends a tick instead of being a job's fault: infrastructure errors and a lost lease.
_STOP_TICK_ERRORS: tuple[type[Exception], ...] = (*INFRASTRUCTURE_ERRORS, NotLeader)

_T = TypeVar("_T")


class _Phase(Enum):
    DONE = "done"  # final (or just finalized): nothing to do
    CANCELLING = "cancelling"  # nothing to dispatch, but in-flight requests must still end
    RUNNING = "running"


@dataclass(frozen=True)
class _JobView:
    job_id: str
    status: JobStatus
    priority: int
    models: list[str]
    expires_at: float
    total: int
    finished: int
    validated: bool
    via: str = "realtime"
    window_s: float = 0.0
    routing: str = ""  # load or prefix; '': each model's own
    budget_scopes: tuple[str, ...] = ()  # its lines reserve against these budgets when dispatched
    tenant: str = ""  # whose job: tenants share each model's window fairly (inferpool.scheduler.fair_share)
    traceparent: str = ""  # its trace: each chunk's dispatch joins it (inferpool.tracing)


_VIEW_FIELDS = ("status", "priority", "models", "expires_at", "total", "completed", "failed", "validated", "via",
                "created_at", "routing", "budget_scopes", "tenant", "traceparent")  # fmt: skip


def _job_view(job_id: str, values: list[bytes | None]) -> _JobView:
    (status, priority, models, expires_at, total, completed, failed, validated, via, created_at, routing, budget,
     tenant, parent) = (v.decode() if v else "" for v in values)  # fmt: skip
    expires = float(expires_at or "inf")
    return _JobView(
        job_id=job_id,
        status=JobStatus(status),
        priority=int(priority or 0),
        models=[m for m in models.split(",") if m],
        expires_at=float(expires_at or "inf"),
        total=int(total or 0),
        finished=int(completed or 0) + int(failed or 0),
        validated=validated == "1",
        via=via or "realtime",  # jobs from before provider batches
        window_s=expires - float(created_at or 0),
        routing=routing,
        budget_scopes=tuple(scope for scope in budget.split(",") if scope),
        tenant=tenant,
        traceparent=parent,
    )


class Scheduler:
    def __init__(self, client: redis.Redis, settings: Settings, registry: Registry, celery: Celery,
                 lease: SchedulerLease | None = None) -> None:  # fmt: skip
        self.redis = client
        self.lease = lease
        self.settings = settings
        self.registry = registry
        self.celery = celery
        self.store = JobStore(client, settings.result_ttl_s)
        self._live_workers: dict[str, int] = {}
        self._live_checked = 0.0
        self._stale_checked = 0.0
        self._faults: dict[str, int] = defaultdict(int)
        self.planner = ProviderBatchPlanner(self.store, settings, celery, self._fence)
        self.placement = Placement(client)
        self.budgets = Budgets(client)
        self.weights = TenantWeights(client)
        self.fair_share = FairShare(self.weights.read)
        router = Router(registry)  # pipelines' later steps are routed here, as an upload's lines are in the client
        self.pipelines = PipelineDriver(
            client, settings.result_ttl_s, lambda tenant, costed: BodyLines(router, tenant=tenant, costed=costed)
        )
        # Items taken into flight whose publishing failed (broker down): published first on the next tick.
        self._unsent: list[tuple[str, ModelSpec, list[str], bool, str | None]] = []

    # -- on becoming the leader ----------------------------------------------------------------------

    def recover(self) -> int:
        """Recount requests in flight per model (one atomic script), then re-send the in-flight requests
        of every active job (after a crash or restart). Runs each time this scheduler becomes the leader."""
        counts = self.store.recount_inflight()
        resent = sum(self._guard(job_id, self._resend_inflight, job_id) or 0 for job_id in self.store.active_ids())
        log.info("recovered: %d in-flight requests re-sent; in flight per model: %s", resent, counts or "none")
        return resent

    def _resend_inflight(self, job_id: str) -> int:
        by_model: dict[str, list[str]] = defaultdict(list)
        for request_id, model in self.store.inflight_refs(job_id):
            by_model[model].append(request_id)
        return sum(self._publish_or_refuse(job_id, model, items, resent=True) for model, items in by_model.items())

    # -- containment -----------------------------------------------------------------------------------

    def _guard(self, job_id: str, step: Callable[..., _T], *args: object) -> _T | None:
        """Run one job's ``step``; an error other than Redis's (or a lost lease) is that job's alone (None is
        returned)."""
        try:
            return step(*args)
        except _STOP_TICK_ERRORS:
            raise
        except Exception as exc:
            self._job_fault(job_id, exc)
            return None

    def _job_fault(self, job_id: str, exc: Exception) -> None:
        self._faults[job_id] += 1
        faults = self._faults[job_id]
        log.error("job %s: %s: %s (fault %d of %d)", job_id, type(exc).__name__, exc, faults, MAX_JOB_FAULTS,
                  exc_info=exc)  # fmt: skip
        if faults < MAX_JOB_FAULTS:
            return
        reason = f"the scheduler could not run this job ({type(exc).__name__}: {exc})"
        try:
            self.store.fail(job_id, reason)
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception:  # the job's own records are unreadable: stop driving it all the same
            log.exception("job %s: could not settle its lines; dropping it from the active set", job_id)
            self.redis.zrem(JOBS_ACTIVE_KEY, job_id)
        del self._faults[job_id]

    def _spec(self, model: str) -> ModelSpec | None:
        try:
            return self.registry.get(model)
        except ModelNotFound:
            return None

    def _refuse_model(self, job_id: str, model: str) -> int:
        """End the job's requests for a model this scheduler does not know, with ``model_not_found``."""
        message = (
            f"model {model!r} is not in the registry the scheduler uses ({self.registry.describe_sources()}); "
            "add it to the scheduler's registry (INFERPOOL_REGISTRY) and restart the scheduler, or send the "
            "request to a model it knows"
        )
        code = ModelNotFound.code
        refused = self.store.drop_pending(job_id, code, message, models=[model])
        refused += self.store.end_dispatched(job_id, code, message, model=model)
        log.warning("job %s: %d request(s) for model %r refused: not in the scheduler's registry (%s)", job_id,
                    refused, model, self.registry.describe_sources())  # fmt: skip
        return refused

    def _fence(self) -> str:
        """The lease value the dispatch scripts must find ('' without a lease: a scheduler run alone)."""
        if self.lease is None:
            return ""
        value = self.lease.value
        if value is None:
            raise NotLeader("this scheduler does not hold the lease")
        return value

    # -- one tick --------------------------------------------------------------------------------------

    def tick(self) -> int:
        """Advance every active job; returns how many requests were dispatched."""
        self._publish_unsent()
        running: list[_JobView] = []
        live: list[_JobView] = []
        for job in self._active_jobs():
            phase = self._guard(job.job_id, self._advance, job)
            if phase is None or phase is _Phase.DONE:
                continue
            live.append(job)
            if phase is _Phase.RUNNING:
                running.append(job)
        now = time.monotonic()
        if now - self._stale_checked > _STALE_CHECK_EVERY_S:
            self._stale_checked = now
            for job in live:
                self._guard(job.job_id, self._resend_stale, job)
        dispatched = self._dispatch(running)
        try:
            dispatched += self.planner.drive()
        except _STOP_TICK_ERRORS:
            raise
        except Exception:
            log.exception("scheduler: publishing provider batch steps failed; trying again next tick")
        # Pipelines' answers decide their rows' next lines, dispatched from the next tick (which comes at once).
        dispatched += self.pipelines.drive()
        return dispatched

    def _resend_stale(self, job: _JobView) -> int:
        """Re-send requests in flight for longer than the stale limit (their chunk may be lost)."""
        by_model: dict[str, list[str]] = defaultdict(list)
        for request_id, model in self.store.take_stale_inflight(job.job_id, self.settings.stale_after_s(),
                                                                 fence=self._fence()):  # fmt: skip
            by_model[model].append(request_id)
        resent = sum(
            self._publish_or_refuse(job.job_id, model, items, resent=True) for model, items in by_model.items()
        )
        if resent:
            log.warning("job %s: re-sent %d requests in flight for over %.0f s", job.job_id, resent,
                        self.settings.stale_after_s())  # fmt: skip
        return resent

    def _active_jobs(self) -> list[_JobView]:
        ids = self.store.active_ids()
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(job_key(job_id), _VIEW_FIELDS)
        views = []
        for job_id, values in zip(ids, pipe.execute(), strict=True):
            if values[0] is None:  # the job's keys expired: forget it
                self.redis.zrem(JOBS_ACTIVE_KEY, job_id)
                continue
            view = self._guard(job_id, _job_view, job_id, values)
            if view is not None:
                views.append(view)
        return views

    def _advance(self, job: _JobView) -> _Phase:
        """Apply cancel/expiry/completion to ``job``.

        A validating job is dispatched too (its lines run while the rest of its input is read). It is
        never finalized before validation ends: until then more lines may arrive, and each must still be
        settled (cancelled, expired or run), unless its completion window ended with the upload still
        unfinished (its client died): then it fails.
        """
        if job.status.is_final:
            self.redis.zrem(JOBS_ACTIVE_KEY, job.job_id)
            return _Phase.DONE
        if time.time() > job.expires_at:
            return self._expire(job)
        if job.status == JobStatus.CANCELLING:
            message = "the batch was cancelled before this request ran"
            self.store.drop_pending(job.job_id, CANCELLED_CODE, message, models=job.models)
            self.planner.cancel_job(job.job_id)
            if job.validated and self._all_settled(job.job_id):
                self.store.finalize(job.job_id, JobStatus.CANCELLED)
                log.info("job %s cancelled", job.job_id)
                return _Phase.DONE
            return _Phase.CANCELLING
        if job.validated and job.finished >= job.total:
            self.store.finalize(job.job_id, JobStatus.COMPLETED)
            log.info("job %s completed (%d requests)", job.job_id, job.total)
            return _Phase.DONE
        return _Phase.RUNNING

    def _expire(self, job: _JobView) -> _Phase:
        """The completion window is over: unfinished requests end (as cancelled if the job was cancelling)."""
        if job.status == JobStatus.CANCELLING:
            code, status = CANCELLED_CODE, JobStatus.CANCELLED
            message = "the batch was cancelled before this request finished"
        else:
            code, status = EXPIRED_CODE, JobStatus.EXPIRED
            message = "the batch's completion window ended before this request finished"
        self.store.drop_pending(job.job_id, code, message, models=job.models)
        self.store.end_dispatched(job.job_id, code, message)
        # Answers the provider finished are paid for: collect them before anything is settled (the provider
        # batch's own window started later than the job's), for at most the grace period.
        unfinished = self.planner.collect_at_window_end(job.job_id)
        if unfinished and time.time() < job.expires_at + self.settings.provider_batch_expiry_grace_s:
            return _Phase.CANCELLING
        self.planner.settle_job(job.job_id, code, message)
        if not job.validated:
            self.store.fail(job.job_id, "its input was never fully uploaded within the completion window")
        else:
            self.store.finalize(job.job_id, status)
        log.info("job %s %s at the end of its completion window", job.job_id, status.value)
        return _Phase.DONE

    def _all_settled(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and job.finished >= job.request_counts.total

    # -- dispatch --------------------------------------------------------------------------------------

    def _window(self, spec: ModelSpec) -> int:
        now = time.monotonic()
        if now - self._live_checked > _LIVE_WORKERS_REFRESH_S:
            self._live_workers = {}
            self._live_checked = now
        if spec.name not in self._live_workers:
            self._live_workers[spec.name] = count_live_workers(self.redis, spec.name)
        return spec.serving.window_per_worker() * max(1, self._live_workers[spec.name])

    def _dispatch(self, jobs: list[_JobView]) -> int:
        if not jobs:
            return 0
        inflight = self.store.model_inflight()
        by_model: dict[str, list[_JobView]] = defaultdict(list)
        for job in jobs:
            for model in job.models:
                by_model[model].append(job)
        dispatched = 0
        for model, model_jobs in by_model.items():
            spec = self._spec(model)
            if spec is None:
                for job in model_jobs:
                    self._guard(job.job_id, self._refuse_model, job.job_id, model)
                continue
            free = self._window(spec) - inflight.get(model, 0)
            levels: dict[int, list[_JobView]] = defaultdict(list)
            for job in model_jobs:
                held = self._guard(job.job_id, self.planner.holds, job.job_id, job.via, job.window_s, job.validated,
                                   spec)  # fmt: skip
                if held is False:
                    levels[job.priority].append(job)
            for priority in sorted(levels, reverse=True):
                if free <= 0:
                    break
                sent = self.fair_share.dispatch(spec.name, priority, levels[priority], free, spec.serving.chunk_size,
                                                functools.partial(self._take_guarded, spec))  # fmt: skip
                free -= sent
                dispatched += sent
        return dispatched

    def _take_guarded(self, spec: ModelSpec, job: _JobView, take: int) -> int:
        return self._guard(job.job_id, self._take_and_publish, job, spec, take) or 0

    def _take_and_publish(self, job: _JobView, spec: ModelSpec, take: int) -> int:
        taken = self.store.take_pending(job.job_id, spec.name, take, fence=self._fence())
        if not taken:
            return 0
        if job.budget_scopes:  # each line reserves the most it can cost; those that do not fit end here
            refused = self.budgets.reserve_lines(job.job_id, job.budget_scopes, [rid for rid, _ in taken],
                                                 self.settings.result_ttl_s)  # fmt: skip
            if refused:
                self.store.end_requests(job.job_id, {rid: (BUDGET_EXCEEDED_CODE, why.message())
                                                     for rid, why in refused.items()})  # fmt: skip
                log.warning("job %s: %d line(s) refused by a spend budget (%s)", job.job_id, len(refused),
                            next(iter(refused.values())).scope)  # fmt: skip
                taken = [(rid, score) for rid, score in taken if rid not in refused]
                if not taken:
                    return len(refused)
        # To the workers where the model is warm, each prefix group to its owner (inferpool.scheduler.placement).
        prefix = (job.routing or spec.routing) == "prefix"
        return sum(self._publish(job.job_id, spec, rids, worker=worker, parent=job.traceparent)
                   for worker, rids in self.placement.split(spec, taken, prefix=prefix))  # fmt: skip

    def _publish_or_refuse(self, job_id: str, model: str, request_ids: list[str], *, resent: bool) -> int:
        spec = self._spec(model)
        if spec is None:
            self._refuse_model(job_id, model)
            return 0
        return self._publish(job_id, spec, request_ids, resent=resent)

    def _publish(self, job_id: str, spec: ModelSpec, request_ids: list[str], *, resent: bool = False,
                 worker: str | None = None, parent: str = "") -> int:  # fmt: skip
        """Send requests (already in flight) as chunks of ids, to ``worker``'s own queue or the model's shared
        one. If the broker fails, what was not sent is kept and sent first on the next tick: nothing waits
        for the stale limit."""
        chunk_size = spec.serving.chunk_size
        for start in range(0, len(request_ids), chunk_size):
            members = request_ids[start : start + chunk_size]
            chunk_id, payload = chunk_json(job_id, spec.name, members, self.settings.result_ttl_s, resent=resent)
            try:
                with dispatch_span(parent, spec.name, chunk_id, len(members)) as headers:
                    # Batch work goes on the low-priority queue: single requests overtake it at every worker.
                    publish_chunk_json(self.celery, payload, model=spec.name, priority=Priority.LOW,
                                       description=describe_chunk(chunk_id, job_id, spec.name, len(members)),
                                       expires_s=self.settings.result_ttl_s, worker=worker,
                                       headers=headers)  # fmt: skip
            except INFRASTRUCTURE_ERRORS:
                self._unsent.append((job_id, spec, request_ids[start:], resent, worker))
                raise
        return len(request_ids)

    def _publish_unsent(self) -> None:
        while self._unsent:
            job_id, spec, request_ids, resent, worker = self._unsent.pop(0)
            self._publish(job_id, spec, request_ids, resent=resent, worker=worker)

    # -- the loop --------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_sleep_s: float = 0.1) -> None:
        """Tick until ``stop`` is set; Redis and broker errors are waited out. With a lease, only while it
        is held: each leadership starts with a recovery (recount, re-send in-flight requests)."""
        recovered = False
        while not stop.is_set():
            try:
                if self.lease is not None and not self.lease.held:
                    recovered = False
                    if not self.lease.try_acquire():
                        stop.wait(self.lease.try_interval_s)
                        continue
                if not recovered:
                    self.recover()
                    recovered = True
                busy = self.tick() > 0
            except NotLeader:
                if self.lease is not None:
                    self.lease.lose()
                busy = False
            except INFRASTRUCTURE_ERRORS as exc:
                log.warning("scheduler: Redis or the broker failed, retrying: %s", exc)
                busy = False
                stop.wait(1.0)
            if not busy:
                stop.wait(idle_sleep_s)
