"""Batch job state in Redis: what a job is, and the operations the client, scheduler and workers share.

A job's keys (all in ``inferpool.constants``):

- ``job:{id}`` hash: status, timestamps, counters (``total``, ``completed``, ``failed``), priority, models.
- ``job:{id}:pending:{model}`` lists: requests not yet dispatched, as ``<request id>|<task item JSON>``.
- ``job:{id}:inflight`` hash: request id -> task item JSON for dispatched, unanswered requests. The
  scheduler moves items here atomically as it dispatches them, and re-sends what is here when it starts,
  so a scheduler crash between taking items and publishing them loses nothing (a re-send may run a
  request twice; its result is still written once).
- ``job:{id}:completed`` stream and ``job:{id}:usage`` hash: written by ``inferpool.results``.

State lives entirely in Redis: a client can exit and come back, and a restarted scheduler resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field

from inferpool.constants import (
    JOBS_ACTIVE_KEY,
    JOBS_INDEX_KEY,
    MODEL_INFLIGHT_KEY,
    job_completed_stream_key,
    job_inflight_key,
    job_inflight_since_key,
    job_key,
    job_pending_key,
    job_usage_key,
    result_key,
)
from inferpool.redis_connection import decode_text
from inferpool.results import ResultWriter, parse_result
from inferpool.usage import ModelUsage, usage_from_counters
from inferpool.wire import ErrorInfo, RequestResult, TaskItem


class JobStatus(StrEnum):
    """The OpenAI batch object's statuses."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.FAILED, JobStatus.COMPLETED, JobStatus.EXPIRED, JobStatus.CANCELLED)


#: Error codes for requests a job settles without running them.
CANCELLED_CODE = "batch_cancelled"
EXPIRED_CODE = "batch_expired"


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchJob(BaseModel):
    """A batch job as the OpenAI batch object shows it, plus priority and usage per model."""

    id: str
    object: str = "batch"
    endpoint: str = "/v1/chat/completions"
    status: JobStatus
    created_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    expires_at: int | None = None
    expired_at: int | None = None
    failed_at: int | None = None
    completion_window: str = "24h"
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    priority: int = 0
    models: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)
    usage: list[ModelUsage] = Field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.request_counts.completed + self.request_counts.failed


_TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "cancelling_at", "cancelled_at", "expired_at",
               "failed_at", "expires_at")  # fmt: skip

# Moves up to ARGV[1] items from a pending list into the job's in-flight hash and counts them per model.
_TAKE_PENDING = """
local items = redis.call('LPOP', KEYS[1], ARGV[1])
if not items then
  return {}
end
for _, entry in ipairs(items) do
  local bar = string.find(entry, '|', 1, true)
  local rid = string.sub(entry, 1, bar - 1)
  redis.call('HSET', KEYS[2], rid, string.sub(entry, bar + 1))
  redis.call('ZADD', KEYS[5], ARGV[3], rid)
end
redis.call('EXPIRE', KEYS[5], ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[2], #items)
redis.call('HINCRBY', KEYS[4], 'dispatched', #items)
return items
"""


# In-flight items dispatched before ARGV[1] (at most ARGV[3]), re-stamped ARGV[2]: to be re-sent.
_TAKE_STALE = """
local rids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
if #rids == 0 then
  return {}
end
for _, rid in ipairs(rids) do
  redis.call('ZADD', KEYS[1], ARGV[2], rid)
end
return redis.call('HMGET', KEYS[2], unpack(rids))
"""


# Sets the total and, unless the job was cancelled while validating, moves it to in_progress.
_OPEN = """
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'models', ARGV[3], 'validated', '1')
if redis.call('HGET', KEYS[1], 'status') == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[2])
end
"""


def _decode(mapping: Any) -> dict[str, str]:
    return {decode_text(k): decode_text(v) for k, v in mapping.items()}


def pending_entry(item: TaskItem) -> str:
    return f"{item.request_id}|{item.model_dump_json(exclude_none=True)}"


def item_from_entry(entry: bytes | str) -> TaskItem:
    text = entry.decode() if isinstance(entry, bytes) else entry
    return TaskItem.model_validate_json(text.partition("|")[2])


class JobStore:
    """Reads and changes job state. Every method is safe to call from several processes at once."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.writer = ResultWriter(client)
        self._take = client.register_script(_TAKE_PENDING)
        self._open = client.register_script(_OPEN)
        self._stale = client.register_script(_TAKE_STALE)

    # -- creating ----------------------------------------------------------------------------------------

    def create(
        self, job_id: str, *, priority: int, completion_window_s: int, window_label: str, metadata: dict[str, str]
    ) -> None:
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping={
            "status": JobStatus.VALIDATING.value, "created_at": int(now), "priority": priority,
            "expires_at": int(now + completion_window_s), "completion_window": window_label,
            "metadata": json.dumps(metadata), "total": 0, "completed": 0, "failed": 0, "dispatched": 0,
        })  # fmt: skip
        pipe.expire(job_key(job_id), self.result_ttl_s)
        pipe.zadd(JOBS_INDEX_KEY, {job_id: now})
        # Active from the start: the scheduler dispatches lines while the rest of the file is validated.
        pipe.zadd(JOBS_ACTIVE_KEY, {job_id: now})
        pipe.execute()

    def add_pending(self, job_id: str, items: Sequence[TaskItem], models: Iterable[str]) -> None:
        """Queue ``items`` (whose ``request.model`` is canonical: a registry name, maybe with ``:adapter``).

        ``models`` is every model the job has queued so far (the scheduler reads it to know where to look).
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(job_key(job_id), "models", ",".join(sorted(models)))
        for item in items:
            pipe.rpush(job_pending_key(job_id, item.served_model), pending_entry(item))
        for model in {item.served_model for item in items}:
            pipe.expire(job_pending_key(job_id, model), self.result_ttl_s)
        pipe.execute()

    def settle(self, results: Sequence[RequestResult]) -> None:
        """Write results the job decides itself (lines rejected, or cancelled before dispatch)."""
        self.writer.write_many([(r, None) for r in results], self.result_ttl_s)

    def settle_inflight(self, job_id: str, code: str, message: str) -> None:
        """End every dispatched, unanswered request of the job with this error, in one round trip.

        Each is counted against the model it was dispatched to, which frees that model's window.
        """
        items = self.inflight_items(job_id)
        results = [(settled_result(job_id, item, code, message), item.served_model) for item in items]
        self.writer.write_many(results, self.result_ttl_s)

    def open(self, job_id: str, total: int, models: Iterable[str]) -> None:
        """Validation is over: the total is known, so the job can finish (unless it was cancelled meanwhile)."""
        self._open(keys=[job_key(job_id)], args=[total, int(time.time()), ",".join(sorted(models))])

    def fail(self, job_id: str, reason: str) -> None:
        """The job cannot run at all (e.g. its file was refused while uploading)."""
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping={
            "status": JobStatus.FAILED.value, "failed_at": int(time.time()), "errors": json.dumps([reason]),
        })  # fmt: skip
        pipe.zrem(JOBS_ACTIVE_KEY, job_id)
        pipe.execute()
        self.drop_pending(job_id)

    # -- reading -----------------------------------------------------------------------------------------

    def get(self, job_id: str) -> BatchJob | None:
        raw = _decode(self.redis.hgetall(job_key(job_id)))
        if not raw:
            return None
        usage = usage_from_counters(_decode(self.redis.hgetall(job_usage_key(job_id))))
        fields: dict[str, Any] = {
            "id": job_id, "status": raw["status"], "created_at": int(raw["created_at"]),
            "priority": int(raw.get("priority", 0)), "completion_window": raw.get("completion_window", "24h"),
            "models": [m for m in raw.get("models", "").split(",") if m],
            "metadata": json.loads(raw.get("metadata", "{}")), "errors": json.loads(raw.get("errors", "[]")),
            "request_counts": RequestCounts(total=int(raw.get("total", 0)), completed=int(raw.get("completed", 0)),
                                            failed=int(raw.get("failed", 0))),
            "usage": usage,
        }  # fmt: skip
        for name in _TIMESTAMPS:
            if name in raw:
                fields[name] = int(float(raw[name]))
        return BatchJob.model_validate(fields)

    def list_jobs(self, limit: int = 20) -> list[BatchJob]:
        """The newest jobs first (jobs whose keys expired are left out)."""
        ids = [decode_text(i) for i in self.redis.zrevrange(JOBS_INDEX_KEY, 0, limit - 1)]
        return [job for job in (self.get(i) for i in ids) if job is not None]

    def active_ids(self) -> list[str]:
        return [decode_text(i) for i in self.redis.zrange(JOBS_ACTIVE_KEY, 0, -1)]

    def read_raw_results(self, job_id: str, after: str = "0-0", count: int = 1000) -> tuple[list[bytes], str]:
        """Up to ``count`` stored results (JSON) written after stream position ``after``, and the next position."""
        entries: Any = self.redis.xrange(job_completed_stream_key(job_id), min=f"({after}", count=count)
        if not entries:
            return [], after
        ids = [decode_text(fields[b"rid"]) for _, fields in entries]
        raws: Any = self.redis.mget([result_key(rid) for rid in ids])
        return [raw for raw in raws if raw is not None], decode_text(entries[-1][0])

    def read_results(self, job_id: str, after: str = "0-0", count: int = 1000) -> tuple[list[RequestResult], str]:
        """``read_raw_results``, parsed."""
        raws, position = self.read_raw_results(job_id, after, count)
        return [parse_result(raw) for raw in raws], position

    def iter_results(self, job_id: str, page: int = 1000) -> Iterator[RequestResult]:
        """Every result written so far, in completion order (safe while the job runs)."""
        position = "0-0"
        while True:
            results, position = self.read_results(job_id, position, page)
            if not results:
                return
            yield from results

    # -- scheduling ----------------------------------------------------------------------------------

    def take_pending(self, job_id: str, model: str, limit: int) -> list[str]:
        """Atomically move up to ``limit`` pending items of ``model`` into the job's in-flight set.

        Returns the items as ``TaskItem`` JSON, unparsed (the scheduler only forwards them).
        """
        keys = [job_pending_key(job_id, model), job_inflight_key(job_id), MODEL_INFLIGHT_KEY, job_key(job_id),
                job_inflight_since_key(job_id)]  # fmt: skip
        entries: Any = self._take(keys=keys, args=[limit, model, time.time(), self.result_ttl_s])
        return [decode_text(entry).partition("|")[2] for entry in entries]

    def take_stale_inflight(self, job_id: str, older_than_s: float, limit: int = 1000) -> list[TaskItem]:
        """In-flight items dispatched more than ``older_than_s`` ago, stamped as dispatched now.

        A chunk can vanish without a trace (a task that failed outside the per-request error handling,
        a message lost with a Redis that kept no AOF); these are re-sent so the job still finishes.
        """
        now = time.time()
        keys = [job_inflight_since_key(job_id), job_inflight_key(job_id)]
        values: Any = self._stale(keys=keys, args=[now - older_than_s, now, limit])
        return [TaskItem.model_validate_json(v) for v in values if v]

    def inflight_items(self, job_id: str) -> list[TaskItem]:
        return [TaskItem.model_validate_json(v) for v in self.redis.hvals(job_inflight_key(job_id))]

    def model_inflight(self) -> dict[str, int]:
        return {k: int(v) for k, v in _decode(self.redis.hgetall(MODEL_INFLIGHT_KEY)).items()}

    def cancel(self, job_id: str) -> BatchJob | None:
        """Ask for cancellation: queued lines end as cancelled, in-flight ones finish."""
        job = self.get(job_id)
        if job is None or job.status.is_final or job.status == JobStatus.CANCELLING:
            return job
        self.redis.hset(job_key(job_id), mapping={
            "status": JobStatus.CANCELLING.value, "cancelling_at": int(time.time()),
        })  # fmt: skip
        self.redis.zadd(JOBS_ACTIVE_KEY, {job_id: time.time()}, nx=True)
        return self.get(job_id)

    def drop_pending(self, job_id: str, code: str | None = None, message: str = "") -> int:
        """Empty the pending lists; with ``code``, each dropped request gets that error as its result."""
        dropped = 0
        for key in self.redis.scan_iter(job_pending_key(job_id, "*"), count=100):
            while True:
                entries: Any = self.redis.lpop(key, 500)
                if not entries:
                    break
                dropped += len(entries)
                if code is not None:
                    items = [item_from_entry(e) for e in entries]
                    self.settle([settled_result(job_id, item, code, message) for item in items])
        return dropped

    def finalize(self, job_id: str, status: JobStatus) -> None:
        """Record a final status and stop driving the job."""
        stamp = {JobStatus.COMPLETED: "completed_at", JobStatus.CANCELLED: "cancelled_at",
                 JobStatus.EXPIRED: "expired_at", JobStatus.FAILED: "failed_at"}[status]  # fmt: skip
        now = int(time.time())
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping={"status": status.value, "finalizing_at": now, stamp: now})
        pipe.zrem(JOBS_ACTIVE_KEY, job_id)
        pipe.execute()


def settled_result(job_id: str, item: TaskItem, code: str, message: str) -> RequestResult:
    return RequestResult(
        request_id=item.request_id, custom_id=item.custom_id, job_id=job_id, error=ErrorInfo(code=code, message=message)
    )
