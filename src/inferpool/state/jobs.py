"""Batch job state in Redis: what a job is, and the operations the client, scheduler and workers share.

A job's keys (all in ``inferpool.constants``):

- ``job:{id}`` hash: status, timestamps, counters (``total``, ``completed``, ``failed``), priority, models.
- ``job:{id}:items`` hash: request id -> ``<model>|<task item JSON>`` (``inferpool.state.items``) for every
  unanswered request: the one copy of each prompt in Redis. Deleted with the writing of its result.
- ``job:{id}:pending:{model}`` sorted sets: ids of the requests not yet dispatched, scored by their line's
  place in the upload (load routing: first in, first out) or by their prefix group key (prefix routing:
  ``inferpool.affinity.prefix``, so the scheduler takes a document's questions together, whatever the
  file's order).
- ``job:{id}:inflight-since`` sorted set: ids of the dispatched, unanswered requests, by dispatch time. The
  scheduler moves ids here atomically as it dispatches them, and re-sends what is here when it starts, so
  a scheduler crash between taking ids and publishing them loses nothing (a re-send may run a request
  twice; its result is still written once). Chunks carry ids only: workers read the items.
- ``job:{id}:completed`` stream and ``job:{id}:usage`` hash: written by ``inferpool.state.results``.

State lives entirely in Redis: a client can exit and come back, and a restarted scheduler resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import ValidationError

from inferpool.constants import (
    DEFAULT_TENANT,
    FAILED_CODE,
    JOBS_ACTIVE_KEY,
    JOBS_INDEX_KEY,
    MODEL_INFLIGHT_KEY,
    SCHEDULER_LEASE_KEY,
    job_completed_stream_key,
    job_costs_key,
    job_final_key,
    job_inflight_since_key,
    job_items_key,
    job_key,
    job_pending_key,
    job_provider_batches_key,
    job_usage_key,
    provider_batch_key,
    tenant_jobs_key,
)
from inferpool.plumbing.redis_connection import decode_text
from inferpool.state.items import LUA_ITEM_HOLDER, PendingRecord, item_from_record, item_record, split_record
from inferpool.state.leader_fence import fenced_call, lua_fence
from inferpool.state.results import ResultWriter, parse_result, stored_results
from inferpool.state.usage import usage_from_counters
from inferpool.wire import (
    CHAT_COMPLETIONS_URL,
    BatchJob,
    ErrorInfo,
    JobStatus,
    ProviderBatch,
    RequestCounts,
    RequestResult,
    TaskItem,
    ViaChoice,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewJob:
    """What a new job is created with."""

    priority: int = 0
    window_s: int = 24 * 3600
    window_label: str = "24h"
    metadata: dict[str, str] = field(default_factory=dict)
    tenant: str | None = None
    input_file_id: str | None = None
    cache: bool | None = None  # lines that set no ``cache`` of their own get this one (not stored)
    via: str = "auto"  # realtime, provider-batch or auto (inferpool.provider_batch.via)
    routing: str | None = None  # load or prefix; None: each model's own (ModelSpec.routing)
    endpoint: str | None = None  # the OpenAI batch object's endpoint (lines may use any served one)
    allowed_models: frozenset[str] | None = None  # a gateway key's models: other lines are model_not_found
    budget_scopes: tuple[str, ...] = ()  # scopes with a spend budget: lines reserve against them when dispatched
    traceparent: str | None = None  # the job's trace (OpenTelemetry): its chunks' spans join it


_ENTRIES_PER_READ = 8
_TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "cancelling_at", "cancelled_at", "expired_at",
               "failed_at", "expires_at")  # fmt: skip

#: The error a fenced script answers when the caller's lease (fencing value) is no longer the current one
#: (written out in the scripts below).

# Moves up to ARGV[1] request ids, lowest score first, from a pending set (KEYS[1]) into flight: stamped in the job's
# in-flight set (KEYS[2]) and counted for the model (ARGV[2]) in KEYS[3] and the job (KEYS[4]). The items
# stay where they are (the job's items hash): only ids move, whatever the prompts' size. Fenced: with a
# lease value (ARGV[5]), nothing moves unless the scheduler lease (KEYS[5]) still holds it.
_TAKE_PENDING = (
    lua_fence("KEYS[5]", "ARGV[5]")
    + """
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
if #popped == 0 then
  return {}
end
for i = 1, #popped, 2 do
  redis.call('ZADD', KEYS[2], ARGV[3], popped[i])
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[2], #popped / 2)
redis.call('HINCRBY', KEYS[4], 'dispatched', #popped / 2)
return popped
"""
)


# In-flight requests dispatched before ARGV[1] (at most ARGV[3]), re-stamped ARGV[2], to be re-sent:
# returns request id, holding model pairs (KEYS[1] the in-flight set, KEYS[2] the items hash). An id whose
# item is gone (answered meanwhile) is dropped from the set. Fenced like _TAKE_PENDING (KEYS[3], ARGV[4]).
_TAKE_STALE = (
    LUA_ITEM_HOLDER
    + lua_fence("KEYS[3]", "ARGV[4]")
    + """
local rids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, rid in ipairs(rids) do
  local record = redis.call('HGET', KEYS[2], rid)
  if record then
    redis.call('ZADD', KEYS[1], ARGV[2], rid)
    out[#out + 1] = rid
    out[#out + 1] = inflight_model(record)
  else
    redis.call('ZREM', KEYS[1], rid)
  end
end
return out
"""
)


# Recounts the per-model in-flight counts (KEYS[1]) from the in-flight sets of the active jobs (KEYS[2])
# and the models their items name; ARGV: the key prefix and the two suffixes around a job id. One
# script: no result written between reading and writing the counts can leave a count nothing frees.
_RECOUNT = (
    LUA_ITEM_HOLDER
    + """
local counts = {}
for _, job_id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local items = ARGV[1] .. job_id .. ARGV[2]
  for _, rid in ipairs(redis.call('ZRANGE', ARGV[1] .. job_id .. ARGV[3], 0, -1)) do
    local record = redis.call('HGET', items, rid)
    if record then
      local model = inflight_model(record)
      counts[model] = (counts[model] or 0) + 1
    end
  end
end
redis.call('DEL', KEYS[1])
for model, n in pairs(counts) do redis.call('HSET', KEYS[1], model, n) end
return redis.call('HGETALL', KEYS[1])
"""
)

# Asks for cancellation (KEYS[1] the job hash, KEYS[2] the active set; ARGV: now) unless the job is
# gone, final or already cancelling: read and write in one step, so a job that completes meanwhile stays
# completed. Returns the status the job has afterwards ('' if it is gone).
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'validating' or status == 'in_progress' or status == 'finalizing' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
  redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[2])
  return 'cancelling'
end
return status
"""

# Sets the total and, unless the job was cancelled while validating, moves it to in_progress.
_OPEN = """
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'models', ARGV[3], 'validated', '1')
if redis.call('HGET', KEYS[1], 'status') == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[2])
end
"""


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    """A script's flat reply ``[a1, b1, a2, b2, ...]`` as pairs."""
    return list(zip(flat[::2], flat[1::2], strict=True))


def _decode(mapping: Any) -> dict[str, str]:
    return {decode_text(k): decode_text(v) for k, v in mapping.items()}


def error_result_of_record(
    job_id: str, request_id: str, record: bytes | None, code: str, message: str
) -> RequestResult:
    """``error_result`` for an item record; one that is missing or unreadable is settled by request id."""
    if record is not None:
        try:
            return error_result(job_id, item_from_record(request_id, record), code, message)
        except ValueError:  # pydantic's ValidationError, or no model prefix
            pass
    return RequestResult(request_id=request_id, job_id=job_id, error=ErrorInfo(code=code, message=message))


class JobStore:
    """Reads and changes job state. Every method is safe to call from several processes at once."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.writer = ResultWriter(client)
        self._take = client.register_script(_TAKE_PENDING)
        self._open = client.register_script(_OPEN)
        self._stale = client.register_script(_TAKE_STALE)
        self._recount = client.register_script(_RECOUNT)
        self._cancel = client.register_script(_CANCEL)

    # -- creating ----------------------------------------------------------------------------------------

    def create(self, job_id: str, options: NewJob) -> None:
        now = time.time()
        record: dict[Any, Any] = {
            "status": JobStatus.VALIDATING.value, "created_at": int(now), "priority": options.priority,
            "expires_at": int(now + options.window_s), "completion_window": options.window_label,
            "metadata": json.dumps(options.metadata), "total": 0, "completed": 0, "failed": 0, "dispatched": 0,
            "via": options.via,
        }  # fmt: skip
        if options.tenant is not None:
            record["tenant"] = options.tenant
        if options.input_file_id is not None:
            record["input_file_id"] = options.input_file_id
        if options.routing is not None:
            record["routing"] = options.routing
        if options.endpoint is not None:
            record["endpoint"] = options.endpoint
        if options.budget_scopes:
            record["budget_scopes"] = ",".join(options.budget_scopes)
        if options.traceparent is not None:
            record["traceparent"] = options.traceparent
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=record)
        pipe.expire(job_key(job_id), self.result_ttl_s)
        pipe.zadd(JOBS_INDEX_KEY, {job_id: now})
        if options.tenant is not None:
            index = tenant_jobs_key(options.tenant)
            pipe.zadd(index, {job_id: now})
            pipe.zremrangebyscore(index, "-inf", now - self.result_ttl_s)  # jobs whose retention ended
            pipe.expire(index, self.result_ttl_s)
        # Active from the start: the scheduler dispatches lines while the rest of the file is validated.
        pipe.zadd(JOBS_ACTIVE_KEY, {job_id: now})
        pipe.execute()

    def add_pending(self, job_id: str, items: Sequence[TaskItem], models: Iterable[str], first_line: int = 0) -> None:
        """Queue ``items`` (whose ``request.model`` is canonical: a registry name, maybe with ``:adapter``), in
        order from ``first_line`` (load routing).

        ``models`` is every model the job has queued so far (the scheduler reads it to know where to look).
        """
        self.add_pending_records(job_id, [PendingRecord(item.request_id, item.served_model,
                                                        item_record(item.served_model, item), first_line + index)
                                          for index, item in enumerate(items)], models)  # fmt: skip

    def add_pending_records(self, job_id: str, pending: Sequence[PendingRecord], models: Iterable[str]) -> None:
        """``add_pending`` for requests already made into records (the client's upload)."""
        by_model: dict[str, dict[str, float]] = {}
        records: dict[str, bytes] = {}
        costs: dict[str, str] = {}
        for request_id, model, record, score, cost in pending:
            by_model.setdefault(model, {})[request_id] = score
            records[request_id] = record
            if cost:
                costs[request_id] = cost
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(job_key(job_id), "models", ",".join(sorted(models)))
        if records:
            pipe.hset(job_items_key(job_id), mapping=records)  # type: ignore[arg-type]
            pipe.expire(job_items_key(job_id), self.result_ttl_s)
        if costs:  # the most each line can cost, reserved against the job's budgets when it is dispatched
            pipe.hset(job_costs_key(job_id), mapping=costs)  # type: ignore[arg-type]
            pipe.expire(job_costs_key(job_id), self.result_ttl_s)
        for model, scores in by_model.items():
            pipe.zadd(job_pending_key(job_id, model), scores)
            pipe.expire(job_pending_key(job_id, model), self.result_ttl_s)
        pipe.execute()

    def end_lines(self, results: Sequence[RequestResult], *, new_lines: bool = False) -> None:
        """Write results the job decides itself: lines refused while uploading (``new_lines``: they have no
        item), or requests cancelled, expired or failed before they ran."""
        self.writer.write_many([(r, None) for r in results], self.result_ttl_s, new_lines=new_lines)

    def end_dispatched(self, job_id: str, code: str, message: str, *, model: str | None = None) -> int:
        """End every dispatched, unanswered request of the job (or only those with ``model``) with this
        error, in one round trip; returns how many. Each frees the window of the model it is counted under.
        """
        inflight = [entry for entry in self._inflight_records(job_id) if model is None or entry[1] == model]
        results = [
            (error_result_of_record(job_id, rid, record, code, message), holder) for rid, holder, record in inflight
        ]
        return sum(self.writer.write_many(results, self.result_ttl_s))

    def end_requests(self, job_id: str, errors: Mapping[str, tuple[str, str]]) -> int:
        """End the job's requests ``errors`` names (request id -> (code, message)) with those errors."""
        if not errors:
            return 0
        rids = list(errors)
        records: Any = self.redis.hmget(job_items_key(job_id), rids)
        results = [(error_result_of_record(job_id, rid, record, *errors[rid]), split_record(record)[0] if record
                    else None) for rid, record in zip(rids, records, strict=True)]  # fmt: skip
        return sum(self.writer.write_many(results, self.result_ttl_s))

    def inflight_by_tenant(self) -> dict[tuple[str, str], int]:
        """Batch lines dispatched and not yet answered, per (tenant, model), over the active jobs (bounded by the
        models' windows, so cheap)."""
        counts: dict[tuple[str, str], int] = {}
        for raw_id in self.redis.zrange(JOBS_ACTIVE_KEY, 0, -1):
            job_id = decode_text(raw_id)
            tenant = decode_text(self.redis.hget(job_key(job_id), "tenant") or DEFAULT_TENANT)
            for _rid, model, _record in self._inflight_records(job_id):
                if model:
                    counts[(tenant, model)] = counts.get((tenant, model), 0) + 1
        return counts

    def _inflight_records(self, job_id: str) -> list[tuple[str, str, bytes | None]]:
        """(request id, holding model, record) of each request in flight (model '' if its item is gone)."""
        rids = [decode_text(rid) for rid in self.redis.zrange(job_inflight_since_key(job_id), 0, -1)]
        if not rids:
            return []
        records: Any = self.redis.hmget(job_items_key(job_id), rids)
        return [
            (rid, split_record(record)[0] if record else "", record) for rid, record in zip(rids, records, strict=True)
        ]

    def open(self, job_id: str, total: int, models: Iterable[str]) -> None:
        """Validation is over: the total is known, so the job can finish (unless it was cancelled meanwhile)."""
        self._open(keys=[job_key(job_id)], args=[total, int(time.time()), ",".join(sorted(models))])

    def fail(self, job_id: str, reason: str) -> None:
        """The job cannot go on (its upload was refused or broke off, or the scheduler cannot run it).

        Lines not yet dispatched end with a ``batch_failed`` error naming the reason; lines already
        dispatched still finish (their results are written as usual).
        """
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping={
            "status": JobStatus.FAILED.value, "failed_at": int(time.time()), "errors": json.dumps([reason]),
        })  # fmt: skip
        pipe.zrem(JOBS_ACTIVE_KEY, job_id)
        self._announce_final(pipe, job_id, JobStatus.FAILED)
        pipe.execute()
        self.drop_pending(job_id, FAILED_CODE, f"the batch failed before this request ran: {reason}")

    # -- reading -----------------------------------------------------------------------------------------

    def get(self, job_id: str) -> BatchJob | None:
        """The job, or None if it is gone (or its record is incomplete: only a job's creation writes one)."""
        raw = _decode(self.redis.hgetall(job_key(job_id)))
        if "status" not in raw or "created_at" not in raw:
            return None
        try:
            return self._job_from(job_id, raw)
        except (ValueError, ValidationError) as exc:
            log.warning("job %s has a malformed record, treated as gone: %s", job_id, exc)
            return None

    def _job_from(self, job_id: str, raw: dict[str, str]) -> BatchJob:
        usage = usage_from_counters(_decode(self.redis.hgetall(job_usage_key(job_id))))
        fields: dict[str, Any] = {
            "id": job_id, "status": raw["status"], "created_at": int(float(raw["created_at"])),
            "priority": int(raw.get("priority", 0)), "completion_window": raw.get("completion_window", "24h"),
            "models": [m for m in raw.get("models", "").split(",") if m],
            "metadata": json.loads(raw.get("metadata", "{}")), "errors": json.loads(raw.get("errors", "[]")),
            "request_counts": RequestCounts(total=int(raw.get("total", 0)), completed=int(raw.get("completed", 0)),
                                            failed=int(raw.get("failed", 0))),
            "usage": usage, "tenant": raw.get("tenant"), "input_file_id": raw.get("input_file_id"),
            "via": raw.get("via", "realtime"), "routing": raw.get("routing"),
            "endpoint": raw.get("endpoint", CHAT_COMPLETIONS_URL),
            "provider_batches": self._provider_batches(job_id),
            "paths": {name.removeprefix("path:"): ViaChoice.model_validate_json(value)
                      for name, value in raw.items() if name.startswith("path:")},
        }  # fmt: skip
        for name in _TIMESTAMPS:
            if name in raw:
                fields[name] = int(float(raw[name]))
        return BatchJob.model_validate(fields)

    def _provider_batches(self, job_id: str) -> list[ProviderBatch]:
        pipe = self.redis.pipeline(transaction=False)
        for member in self.redis.zrange(job_provider_batches_key(job_id), 0, -1):
            pipe.hgetall(provider_batch_key(decode_text(member)))
        return [batch for batch in map(ProviderBatch.from_hash, pipe.execute()) if batch is not None]

    def tenant_job_ids(self, tenant: str, limit: int, after: str | None = None) -> list[str]:
        """Up to ``limit`` of ``tenant``'s job ids, newest first, older than job ``after`` if given."""
        index = tenant_jobs_key(tenant)
        top: float | str = "+inf"
        if after is not None:
            score = self.redis.zscore(index, after)
            if score is None:
                return []
            top = f"({score}"
        ids = self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit)
        return [decode_text(i) for i in ids]

    def list_jobs(self, limit: int = 20) -> list[BatchJob]:
        """The newest jobs first (jobs whose keys expired are left out)."""
        ids = [decode_text(i) for i in self.redis.zrevrange(JOBS_INDEX_KEY, 0, limit - 1)]
        return [job for job in (self.get(i) for i in ids) if job is not None]

    def active_ids(self) -> list[str]:
        return [decode_text(i) for i in self.redis.zrange(JOBS_ACTIVE_KEY, 0, -1)]

    def read_raw_results(self, job_id: str, after: str = "0-0", count: int = 1000) -> tuple[list[bytes], str]:
        """About ``count`` stored results (JSON) written after stream position ``after`` (whole entries: one
        holds a chunk's results), and the next position.

        A page can be empty while later ones are not (its entries unreadable): readers stop only when the
        position stops moving.
        """
        key, position = job_completed_stream_key(job_id), after
        results: list[bytes] = []
        while len(results) < count:
            entries: Any = self.redis.xrange(key, min=f"({position}", count=_ENTRIES_PER_READ)
            for entry_id, fields in entries:
                results += stored_results(fields)
                position = decode_text(entry_id)
            if len(entries) < _ENTRIES_PER_READ:
                break
        return results, position

    def read_results(self, job_id: str, after: str = "0-0", count: int = 1000) -> tuple[list[RequestResult], str]:
        """``read_raw_results``, parsed."""
        raws, position = self.read_raw_results(job_id, after, count)
        return [parse_result(raw) for raw in raws], position

    def iter_results(self, job_id: str, page: int = 1000) -> Iterator[RequestResult]:
        """Every result written so far, in completion order (safe while the job runs)."""
        position = "0-0"
        while True:
            results, after = self.read_results(job_id, position, page)
            if after == position:
                return
            position = after
            yield from results

    # -- scheduling ----------------------------------------------------------------------------------

    def take_pending(self, job_id: str, model: str, limit: int, fence: str = "") -> list[tuple[str, int]]:
        """Atomically move up to ``limit`` pending requests of ``model`` into flight, lowest score first;
        returns (id, score) pairs (the score is the prefix group key under prefix routing). With ``fence``
        (the scheduler lease's value), ``NotLeader`` if the lease is not that any more."""
        keys = [job_pending_key(job_id, model), job_inflight_since_key(job_id), MODEL_INFLIGHT_KEY, job_key(job_id),
                SCHEDULER_LEASE_KEY]  # fmt: skip
        flat: Any = fenced_call(self._take, keys, [limit, model, time.time(), self.result_ttl_s, fence])
        return [(decode_text(rid), int(float(score))) for rid, score in _pairs(flat)]

    def take_stale_inflight(self, job_id: str, older_than_s: float, limit: int = 1000,
                            fence: str = "") -> list[tuple[str, str]]:  # fmt: skip
        """(request id, holding model) of requests dispatched more than ``older_than_s`` ago, stamped as
        dispatched now.

        A chunk can vanish without a trace (a task that failed outside the per-request error handling,
        a message lost with a Redis that kept no AOF); these are re-sent so the job still finishes.
        """
        now = time.time()
        keys = [job_inflight_since_key(job_id), job_items_key(job_id), SCHEDULER_LEASE_KEY]
        flat: Any = fenced_call(self._stale, keys, [now - older_than_s, now, limit, fence])
        return [(decode_text(rid), decode_text(model)) for rid, model in _pairs(flat)]

    def inflight_refs(self, job_id: str) -> list[tuple[str, str]]:
        """(request id, holding model) of each request in flight whose item is still there."""
        return [(rid, holder) for rid, holder, record in self._inflight_records(job_id) if record]

    def recount_inflight(self) -> dict[str, int]:
        """Recount requests in flight per model from the active jobs' in-flight sets, atomically."""
        prefix, _, items_suffix = job_items_key("\0").partition("\0")
        since_suffix = job_inflight_since_key("\0").partition("\0")[2]
        flat: Any = self._recount(keys=[MODEL_INFLIGHT_KEY, JOBS_ACTIVE_KEY], args=[prefix, items_suffix, since_suffix])
        return {decode_text(model): int(count) for model, count in _pairs(flat)}

    def model_inflight(self) -> dict[str, int]:
        return {k: int(v) for k, v in _decode(self.redis.hgetall(MODEL_INFLIGHT_KEY)).items()}

    def cancel(self, job_id: str) -> BatchJob | None:
        """Ask for cancellation: queued lines end as cancelled, in-flight ones finish."""
        self._cancel(keys=[job_key(job_id), JOBS_ACTIVE_KEY], args=[int(time.time()), job_id])
        return self.get(job_id)

    def job_models(self, job_id: str) -> list[str]:
        """The models the job has queued requests for (from its record: no keyspace scan)."""
        return [m for m in decode_text(self.redis.hget(job_key(job_id), "models") or b"").split(",") if m]

    def drop_pending(
        self, job_id: str, code: str | None = None, message: str = "", *, models: Iterable[str] | None = None
    ) -> int:
        """Empty the pending lists (of every model of the job, or of ``models``); with ``code``, each
        dropped request gets that error as its result."""
        dropped = 0
        for model in self.job_models(job_id) if models is None else models:
            key = job_pending_key(job_id, model)
            while True:
                popped: Any = self.redis.zpopmin(key, 500)
                if not popped:
                    break
                rids = [decode_text(rid) for rid, _ in popped]
                dropped += len(rids)
                records: Any = self.redis.hmget(job_items_key(job_id), rids)
                if code is not None:
                    self.end_lines([error_result_of_record(job_id, rid, record, code, message)
                                 for rid, record in zip(rids, records, strict=True)])  # fmt: skip
                else:
                    self.redis.hdel(job_items_key(job_id), *rids)
        return dropped

    def finalize(self, job_id: str, status: JobStatus) -> None:
        """Record a final status and stop driving the job."""
        stamp = {JobStatus.COMPLETED: "completed_at", JobStatus.CANCELLED: "cancelled_at",
                 JobStatus.EXPIRED: "expired_at", JobStatus.FAILED: "failed_at"}[status]  # fmt: skip
        now = int(time.time())
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping={"status": status.value, "finalizing_at": now, stamp: now})
        pipe.zrem(JOBS_ACTIVE_KEY, job_id)
        self._announce_final(pipe, job_id, status)
        pipe.execute()

    def _announce_final(self, pipe: Any, job_id: str, status: JobStatus) -> None:
        """Wake whoever waits for the job (``wait_final``); the signal lives as long as the job's record."""
        pipe.rpush(job_final_key(job_id), status.value)
        pipe.expire(job_final_key(job_id), self.result_ttl_s)

    def wait_final(self, job_id: str, timeout_s: float) -> bool:
        """Block until the job has a final status (True) or ``timeout_s`` passes (False). Cheaper and quicker
        than polling: the scheduler's ``finalize`` (or ``fail``) wakes every waiter at once."""
        key = job_final_key(job_id)
        # Rotating the list onto itself reads its entry without taking it from the other waiters. Redis 6+
        # takes a fractional timeout (0 would block forever: the least is a millisecond).
        return self.redis.brpoplpush(key, key, timeout=max(0.001, timeout_s)) is not None


def error_result(job_id: str, item: TaskItem, code: str, message: str) -> RequestResult:
    """The error result of a request the job ends without running it (counted for the item's tenant)."""
    return RequestResult(request_id=item.request_id, custom_id=item.custom_id, job_id=job_id, tenant=item.tenant,
                         error=ErrorInfo(code=code, message=message))  # fmt: skip
