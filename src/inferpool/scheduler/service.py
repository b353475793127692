"""The scheduler service: drives batch jobs from pending to finished.

Each tick it (1) moves jobs through their states (cancel, expire, complete) and (2) dispatches pending
requests as chunk tasks, keeping at most a window of requests in flight per model (window per live
worker x live workers), so Redis queues and Flower stay small whatever the job size. Within a model,
jobs of higher priority go first; jobs of equal priority take turns a chunk at a time, so a 50-line job
is not stuck behind a 100k-line one. It keeps no state of its own: a restarted scheduler re-sends each
active job's in-flight requests (duplicates are harmless: results are written once) and carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import redis
from celery import Celery

from inferpool.celery_app import publish_chunk_json
from inferpool.constants import JOBS_ACTIVE_KEY, MODEL_INFLIGHT_KEY, Priority, job_key
from inferpool.jobstore import CANCELLED_CODE, EXPIRED_CODE, JobStatus, JobStore
from inferpool.model_registry.registry import Registry
from inferpool.settings import Settings
from inferpool.stats import count_live_workers
from inferpool.wire import chunk_json, describe_chunk

log = logging.getLogger(__name__)

_LIVE_WORKERS_REFRESH_S = 2.0
_STALE_CHECK_EVERY_S = 5.0


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


class Scheduler:
    def __init__(self, client: redis.Redis, settings: Settings, registry: Registry, celery: Celery) -> None:
        self.redis = client
        self.settings = settings
        self.registry = registry
        self.celery = celery
        self.store = JobStore(client, settings.result_ttl_s)
        self._live_workers: dict[str, int] = {}
        self._live_checked = 0.0
        self._stale_checked = 0.0

    # -- start-up --------------------------------------------------------------------------------------

    def recover(self) -> int:
        """Re-send the in-flight requests of every active job (after a crash or restart).

        Also recounts requests in flight per model from the jobs' in-flight sets, so counts left by jobs
        whose keys expired do not shrink the dispatch window for ever.
        """
        resent = 0
        counts: dict[str, int] = defaultdict(int)
        for job_id in self.store.active_ids():
            by_model: dict[str, list[str]] = defaultdict(list)
            for item in self.store.inflight_items(job_id):
                by_model[item.served_model].append(item.model_dump_json(exclude_none=True))
            for model, model_items in by_model.items():
                counts[model] += len(model_items)
                resent += self._publish(job_id, model, model_items)
        pipe = self.redis.pipeline()
        pipe.delete(MODEL_INFLIGHT_KEY)
        if counts:
            pipe.hset(MODEL_INFLIGHT_KEY, mapping={model: n for model, n in counts.items()})
        pipe.execute()
        if resent:
            log.info("re-sent %d in-flight requests of active jobs", resent)
        return resent

    # -- one tick --------------------------------------------------------------------------------------

    def tick(self) -> int:
        """Advance every active job; returns how many requests were dispatched."""
        runnable = [job for job in self._active_jobs() if self._advance(job)]
        now = time.monotonic()
        if now - self._stale_checked > _STALE_CHECK_EVERY_S:
            self._stale_checked = now
            self._resend_stale(runnable)
        return self._dispatch(runnable)

    def _resend_stale(self, jobs: list[_JobView]) -> int:
        """Re-send requests in flight for longer than the stale limit (their chunk may be lost)."""
        resent = 0
        for job in jobs:
            by_model: dict[str, list[str]] = defaultdict(list)
            for item in self.store.take_stale_inflight(job.job_id, self.settings.stale_after_s()):
                by_model[item.served_model].append(item.model_dump_json(exclude_none=True))
            for model, item_jsons in by_model.items():
                resent += self._publish(job.job_id, model, item_jsons)
        if resent:
            log.warning("re-sent %d requests in flight for over %.0f s", resent, self.settings.stale_after_s())
        return resent

    def _active_jobs(self) -> list[_JobView]:
        fields = ("status", "priority", "models", "expires_at", "total", "completed", "failed", "validated")
        ids = self.store.active_ids()
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(job_key(job_id), fields)
        views = []
        for job_id, values in zip(ids, pipe.execute(), strict=True):
            if values[0] is None:  # the job's keys expired: forget it
                self.redis.zrem(JOBS_ACTIVE_KEY, job_id)
                continue
            status, priority, models, expires_at, total, completed, failed, validated = (
                v.decode() if v else "" for v in values
            )
            views.append(
                _JobView(
                    job_id=job_id,
                    status=JobStatus(status),
                    priority=int(priority or 0),
                    models=[m for m in models.split(",") if m],
                    expires_at=float(expires_at or "inf"),
                    total=int(total or 0),
                    finished=int(completed or 0) + int(failed or 0),
                    validated=validated == "1",
                )
            )
        return views

    def _advance(self, job: _JobView) -> bool:
        """Apply cancel/expiry/completion to ``job``; True if it may have requests to dispatch.

        A validating job is dispatched too (its lines run while the rest of its input is read). It is
        never finalized before validation ends: until then more lines may arrive, and each must still be
        settled (cancelled, expired or run).
        """
        if job.status.is_final:
            self.redis.zrem(JOBS_ACTIVE_KEY, job.job_id)
            return False
        if job.status == JobStatus.CANCELLING:
            self.store.drop_pending(job.job_id, CANCELLED_CODE, "the batch was cancelled before this request ran")
            if job.validated and self._all_settled(job.job_id):
                self.store.finalize(job.job_id, JobStatus.CANCELLED)
                log.info("job %s cancelled", job.job_id)
            return False
        if time.time() > job.expires_at:
            self._expire_unfinished(job.job_id)
            if job.validated:
                self.store.finalize(job.job_id, JobStatus.EXPIRED)
                log.info("job %s expired", job.job_id)
            return False
        if job.validated and job.finished >= job.total:
            self.store.finalize(job.job_id, JobStatus.COMPLETED)
            log.info("job %s completed (%d requests)", job.job_id, job.total)
            return False
        return True

    def _all_settled(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and job.finished >= job.request_counts.total

    def _expire_unfinished(self, job_id: str) -> None:
        message = "the batch's completion window ended before this request finished"
        self.store.drop_pending(job_id, EXPIRED_CODE, message)
        self.store.settle_inflight(job_id, EXPIRED_CODE, message)

    # -- dispatch --------------------------------------------------------------------------------------

    def _window(self, model: str) -> int:
        now = time.monotonic()
        if now - self._live_checked > _LIVE_WORKERS_REFRESH_S:
            self._live_workers = {}
            self._live_checked = now
        if model not in self._live_workers:
            self._live_workers[model] = count_live_workers(self.redis, model)
        spec = self.registry.get(model)
        return spec.serving.window_per_worker() * max(1, self._live_workers[model])

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
            free = self._window(model) - inflight.get(model, 0)
            levels: dict[int, list[_JobView]] = defaultdict(list)
            for job in model_jobs:
                levels[job.priority].append(job)
            for priority in sorted(levels, reverse=True):
                if free <= 0:
                    break
                sent = self._round_robin(model, levels[priority], free)
                free -= sent
                dispatched += sent
        return dispatched

    def _round_robin(self, model: str, jobs: list[_JobView], free: int) -> int:
        """Jobs of one priority take turns, a chunk each, until the window is full or they run dry."""
        chunk_size = self.registry.get(model).serving.chunk_size
        turn = sorted(jobs, key=lambda j: j.job_id)
        sent = 0
        while turn and free - sent > 0:
            for job in list(turn):
                take = min(chunk_size, free - sent)
                if take <= 0:
                    break
                items = self.store.take_pending(job.job_id, model, take)
                if not items:
                    turn.remove(job)
                    continue
                sent += self._publish(job.job_id, model, items)
        return sent

    def _publish(self, job_id: str, model: str, item_jsons: list[str]) -> int:
        chunk_size = self.registry.get(model).serving.chunk_size
        for start in range(0, len(item_jsons), chunk_size):
            members = item_jsons[start : start + chunk_size]
            chunk_id, payload = chunk_json(job_id, model, members, self.settings.result_ttl_s)
            # Batch work goes on the low-priority queue: single requests overtake it at every worker.
            publish_chunk_json(self.celery, payload, model=model, priority=Priority.LOW,
                               description=describe_chunk(chunk_id, job_id, model, len(members)))  # fmt: skip
        return len(item_jsons)

    # -- the loop --------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_sleep_s: float = 0.1) -> None:
        """Tick until ``stop`` is set; survives Redis restarts by retrying."""
        recovered = False
        while not stop.is_set():
            try:
                if not recovered:
                    self.recover()
                    recovered = True
                busy = self.tick() > 0
            except redis.RedisError as exc:
                log.warning("scheduler: Redis error, retrying: %s", exc)
                recovered = False
                busy = False
                stop.wait(1.0)
            if not busy:
                stop.wait(idle_sleep_s)
