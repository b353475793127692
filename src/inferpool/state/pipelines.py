"""Pipeline state in Redis (keys in ``inferpool.constants``): what the client that loads the rows, the driver in
the scheduler and the readers share.

- ``pipeline:{id}`` hash: status, the pipeline file (JSON) and its steps' order, rows read, per step its batch
  job (``job:<step>``), how far its driver has read that job's completion stream (``pos:<step>``), whether the
  job was opened (``opened:<step>``: every row upstream of it settled, so it can finish) and counters
  (``decided:``, ``queued:``, ``skipped:``, ``not_run:`` + step).
- ``pipeline:{id}:rows`` hash: row number -> the row's columns (JSON).
- ``pipeline:{id}:marks`` hash: ``<row>:<step>`` -> what was decided for it (its request id, ``skipped`` or
  ``not_run``), set once by ``LUA_DECIDE``, which queues the line in the same step: a driver that dies and
  resumes decides a row's step again and changes nothing.
- ``pipeline:{id}:outcomes`` hash: ``<row>:<step>`` -> the step's outcome for the row (``StepOutcome`` JSON).

Each step is a batch job of the pool (one line per row it runs for), created with the pipeline and kept
validating while rows flow into it: its lines are dispatched, answered and written exactly once as any line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import redis

from inferpool.constants import (
    PIPELINES_ACTIVE_KEY,
    PIPELINES_INDEX_KEY,
    job_costs_key,
    job_items_key,
    job_key,
    job_pending_key,
    pipeline_final_key,
    pipeline_key,
    pipeline_marks_key,
    pipeline_outcomes_key,
    pipeline_rows_key,
)
from inferpool.plumbing.redis_connection import decode_text
from inferpool.state.items import PendingRecord
from inferpool.wire import PipelineStatus

#: How a row's step was decided besides running it (a mark's value; else the mark is the request id).
SKIPPED = "skipped"
NOT_RUN = "not_run"


def mark(row: int, step: str) -> str:
    """The field naming one row's step in the marks and outcomes hashes."""
    return f"{row}:{step}"


class Decision(NamedTuple):
    """One row's step, decided: queued as ``line`` in the step's job, or ended without running (``kind``
    ``skipped`` or ``not_run``, with its ``outcome`` JSON)."""

    row: int
    step: str
    job_id: str
    line: PendingRecord | None = None
    kind: str = "line"
    outcome: bytes = b""


# Decides rows' steps, each once. KEYS[1] the pipeline hash, KEYS[2] its marks, KEYS[3] its outcomes. ARGV[1]
# the keys' lifetime, then 12 values per decision: mark, step, kind, request id, record or outcome, score, cost,
# the step job's hash, items, pending set (of the line's model) and costs keys, and the model. Nothing changes
# unless the pipeline still takes lines (a cancelled one does not: its jobs' totals are read after). A line goes
# to its job's items and pending set (as an upload's), its model into the job's models; an ended step's outcome
# is stored. Returns how many were new.
LUA_DECIDE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'loading' and status ~= 'running' then return -1 end
local ttl = ARGV[1]
local new = 0
for i = 2, #ARGV, 12 do
  local mark, step, kind, rid, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local value = rid
  if kind ~= 'line' then value = kind end
  if redis.call('HSETNX', KEYS[2], mark, value) == 1 then
    new = new + 1
    redis.call('HINCRBY', KEYS[1], 'decided:' .. step, 1)
    if kind == 'line' then
      local job, items, pending, costs, model = ARGV[i + 7], ARGV[i + 8], ARGV[i + 9], ARGV[i + 10], ARGV[i + 11]
      redis.call('HSET', items, rid, body)
      redis.call('EXPIRE', items, ttl)
      redis.call('ZADD', pending, ARGV[i + 5], rid)
      redis.call('EXPIRE', pending, ttl)
      if ARGV[i + 6] ~= '' then
        redis.call('HSET', costs, rid, ARGV[i + 6])
        redis.call('EXPIRE', costs, ttl)
      end
      local models = redis.call('HGET', job, 'models') or ''
      if not string.find(',' .. models .. ',', ',' .. model .. ',', 1, true) then
        if models == '' then models = model else models = models .. ',' .. model end
        redis.call('HSET', job, 'models', models)
      end
      redis.call('HINCRBY', KEYS[1], 'queued:' .. step, 1)
    else
      redis.call('HSET', KEYS[3], mark, body)
      redis.call('HINCRBY', KEYS[1], kind .. ':' .. step, 1)
    end
  end
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return new
"""

# Loading is over (ARGV[1] rows): the pipeline runs on, unless it was cancelled meanwhile.
_LOADED = """
redis.call('HSET', KEYS[1], 'rows', ARGV[1], 'loaded', '1')
if redis.call('HGET', KEYS[1], 'status') == 'loading' then redis.call('HSET', KEYS[1], 'status', 'running') end
"""

# Cancels (or, ARGV[2], expires) a pipeline that still takes lines; returns its status afterwards ('' if gone).
_STOP = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'loading' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1], 'ends_as', ARGV[2])
  return 'cancelling'
end
return status
"""


class PipelineStore:
    """Reads and changes pipeline state; safe from several processes at once."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self._decide = client.register_script(LUA_DECIDE)
        self._loaded = client.register_script(_LOADED)
        self._stop = client.register_script(_STOP)

    def create(self, pipeline_id: str, *, spec: Mapping[str, Any], order: Sequence[str], jobs: Mapping[str, str],
               window_s: int, tenant: str | None, metadata: Mapping[str, str], costed: bool) -> None:  # fmt: skip
        now = time.time()
        record: dict[str, Any] = {
            "status": PipelineStatus.LOADING.value, "created_at": int(now), "expires_at": int(now + window_s),
            "spec": json.dumps(spec), "order": ",".join(order), "rows": 0, "metadata": json.dumps(dict(metadata)),
            "costed": "1" if costed else "",
            **{f"job:{step}": job_id for step, job_id in jobs.items()},
        }  # fmt: skip
        if tenant is not None:
            record["tenant"] = tenant
        pipe = self.redis.pipeline()
        pipe.hset(pipeline_key(pipeline_id), mapping=record)  # type: ignore[arg-type]
        pipe.expire(pipeline_key(pipeline_id), self.result_ttl_s)
        pipe.zadd(PIPELINES_INDEX_KEY, {pipeline_id: now})
        pipe.zremrangebyscore(PIPELINES_INDEX_KEY, "-inf", now - self.result_ttl_s)
        pipe.zadd(PIPELINES_ACTIVE_KEY, {pipeline_id: now})
        pipe.execute()

    def add_rows(self, pipeline_id: str, rows: Mapping[int, str]) -> None:
        """Store rows' columns (each once: a resumed load stores nothing twice)."""
        if not rows:
            return
        pipe = self.redis.pipeline(transaction=False)
        for number, columns in rows.items():
            pipe.hsetnx(pipeline_rows_key(pipeline_id), str(number), columns)
        pipe.expire(pipeline_rows_key(pipeline_id), self.result_ttl_s)
        pipe.execute()

    def decide(self, pipeline_id: str, decisions: Sequence[Decision]) -> int:
        """Queue or end each row's step unless it was decided before; returns how many were new (-1: the pipeline
        no longer takes lines)."""
        if not decisions:
            return 0
        args: list[Any] = [self.result_ttl_s]
        for row, step, job_id, line, kind, outcome in decisions:
            if line is not None:
                args += [mark(row, step), step, "line", line.request_id, line.record, line.score, line.cost,
                         job_key(job_id), job_items_key(job_id), job_pending_key(job_id, line.model),
                         job_costs_key(job_id), line.model]  # fmt: skip
            else:
                args += [mark(row, step), step, kind, "", outcome, 0, "", "", "", "", "", ""]
        keys = [pipeline_key(pipeline_id), pipeline_marks_key(pipeline_id), pipeline_outcomes_key(pipeline_id)]
        return int(self._decide(keys=keys, args=args))

    def store_outcomes(self, pipeline_id: str, outcomes: Mapping[str, bytes]) -> None:
        """Store answered steps' outcomes (the same again when a resumed driver reads a page twice)."""
        if outcomes:
            self.redis.hset(pipeline_outcomes_key(pipeline_id), mapping=dict(outcomes))  # type: ignore[arg-type]

    def set_position(self, pipeline_id: str, step: str, position: str) -> None:
        """How far a step job's completion stream was read: set only after what that page decided is stored."""
        self.redis.hset(pipeline_key(pipeline_id), f"pos:{step}", position)

    def loaded(self, pipeline_id: str, rows: int) -> None:
        self._loaded(keys=[pipeline_key(pipeline_id)], args=[rows])

    def stop(self, pipeline_id: str, ends_as: PipelineStatus = PipelineStatus.CANCELLED) -> str:
        """Stop queueing lines (cancel, or expire); the driver ends the step jobs. Returns the status after."""
        return decode_text(self._stop(keys=[pipeline_key(pipeline_id)], args=[int(time.time()), ends_as.value]))

    def mark_opened(self, pipeline_id: str, step: str) -> None:
        self.redis.hset(pipeline_key(pipeline_id), f"opened:{step}", "1")

    def finalize(self, pipeline_id: str, status: PipelineStatus) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(pipeline_key(pipeline_id), mapping={"status": status.value, "ended_at": int(time.time())})
        pipe.zrem(PIPELINES_ACTIVE_KEY, pipeline_id)
        pipe.rpush(pipeline_final_key(pipeline_id), status.value)
        pipe.expire(pipeline_final_key(pipeline_id), self.result_ttl_s)
        pipe.execute()

    def fail(self, pipeline_id: str, reason: str) -> None:
        self.redis.hset(pipeline_key(pipeline_id), "errors", json.dumps([reason]))
        self.finalize(pipeline_id, PipelineStatus.FAILED)

    # -- reading -------------------------------------------------------------------------------------------

    def raw(self, pipeline_id: str) -> dict[str, str]:
        return {decode_text(k): decode_text(v) for k, v in self.redis.hgetall(pipeline_key(pipeline_id)).items()}

    def active_ids(self) -> list[str]:
        return [decode_text(i) for i in self.redis.zrange(PIPELINES_ACTIVE_KEY, 0, -1)]

    def newest_ids(self, limit: int) -> list[str]:
        return [decode_text(i) for i in self.redis.zrevrange(PIPELINES_INDEX_KEY, 0, limit - 1)]

    def rows_of(self, pipeline_id: str, numbers: Sequence[int]) -> list[bytes | None]:
        if not numbers:
            return []
        values: Any = self.redis.hmget(pipeline_rows_key(pipeline_id), [str(n) for n in numbers])
        return list(values)

    def marks_and_outcomes(self, pipeline_id: str, fields: Sequence[str]) -> tuple[list[bytes | None],
                                                                                   list[bytes | None]]:  # fmt: skip
        if not fields:
            return [], []
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(pipeline_marks_key(pipeline_id), list(fields))
        pipe.hmget(pipeline_outcomes_key(pipeline_id), list(fields))
        marks, outcomes = pipe.execute()
        return list(marks), list(outcomes)

    def outcomes(self, pipeline_id: str, fields: Iterable[str]) -> list[bytes | None]:
        names = list(fields)
        values: Any = self.redis.hmget(pipeline_outcomes_key(pipeline_id), names) if names else []
        return list(values)

    def wait_final(self, pipeline_id: str, timeout_s: float) -> bool:
        """Block until the pipeline has a final status (True) or ``timeout_s`` passes (False)."""
        key = pipeline_final_key(pipeline_id)
        return self.redis.brpoplpush(key, key, timeout=max(0.001, timeout_s)) is not None
