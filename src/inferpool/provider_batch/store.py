"""Provider batches in Redis: which lines went into which provider batch, and how far each has come.

A provider batch (``pbatch_...``) is one batch created at a provider for the lines of one job and one
model. Its hash (``inferpool.constants.provider_batch_key``) holds the job, model, provider, its
``state`` and the provider's ids; its lines are a list of request ids. The states, each recorded *before*
the step that creates something at the provider, so a process killed at any point and restarted neither
creates a second provider batch for the same lines nor loses one::

    prepared --(mark)--> uploading --upload--> uploaded --(mark)--> creating --create--> created
        --poll...--> (ended at the provider) --collect--> collected

``uploading`` and ``creating`` say "this may exist at the provider already": a step that finds either
looks the object up by the name or metadata it was made with before making it again
(``inferpool.provider_batch.api``). Anthropic has no upload: its lines go to ``creating`` directly.

Lines move from the job's pending set into a provider batch in one script (like the scheduler's take of
real-time lines), so none is lost between the two. A line's answer is written through the exactly-once
result path (``inferpool.state.results``): collecting twice writes nothing twice.

A step runs under the batch's lock (``StepLock``), renewed by a thread every third of its hold while the
step lasts, so a slow upload or create is never taken over by a twin while its worker lives. Every record a
step makes is fenced by the lock: a step that lost it (its process stalled past the hold, and another worker
took over) records nothing more (``LockLost``). The scheduler republishes a step only once no lock is held.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import redis

from inferpool.constants import (
    PROVIDER_BATCHES_CLAIMED_KEY,
    PROVIDER_BATCHES_DUE_KEY,
    SCHEDULER_LEASE_KEY,
    job_items_key,
    job_key,
    job_pending_key,
    job_provider_batches_key,
    provider_batch_create_lock_key,
    provider_batch_key,
    provider_batch_lock_key,
    provider_batch_rids_key,
)
from inferpool.plumbing.redis_connection import decode_text
from inferpool.state.leader_fence import fenced_call, lua_fence
from inferpool.wire import PBatchState, ProviderBatch, new_id

#: How long the claimed provider ids are remembered (longer than any provider batch lives).
_CLAIMED_RETENTION_S = 30 * 86400


# Moves up to ARGV[1] ids from a job's pending set (KEYS[1]) into a new provider batch (KEYS[2] hash,
# KEYS[3] ids), due now (KEYS[4]) and listed for its job (KEYS[5]). Fenced by the scheduler lease
# (KEYS[6], ARGV[8]) like the real-time take. ARGV: limit, pbatch id, job, model, provider, now, ttl, fence.
_FORM = (
    lua_fence("KEYS[6]", "ARGV[8]")
    + """
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
if #popped == 0 then return 0 end
local rids = {}
for i = 1, #popped, 2 do rids[#rids + 1] = popped[i] end
redis.call('RPUSH', KEYS[3], unpack(rids))
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'job_id', ARGV[3], 'model', ARGV[4], 'provider', ARGV[5],
           'state', 'prepared', 'count', #rids, 'created_at', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[2])
for k = 2, 5 do
  if k ~= 4 then redis.call('EXPIRE', KEYS[k], ARGV[7]) end
end
return #rids
"""
)

# Splits a prepared provider batch (KEYS[1] hash, KEYS[2] ids) after its first ARGV[1] lines: the rest go
# into a new one (KEYS[3] hash, KEYS[4] ids), due now (KEYS[5]) and listed for the job (KEYS[6]). Only
# while the batch is still 'prepared' (nothing of it exists at the provider). ARGV: keep, new id, now, ttl.
_SPLIT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'prepared' then return 0 end
local rest = redis.call('LRANGE', KEYS[2], ARGV[1], -1)
if #rest == 0 then return 0 end
redis.call('LTRIM', KEYS[2], 0, ARGV[1] - 1)
redis.call('HSET', KEYS[1], 'count', ARGV[1])
local job, model, provider = unpack(redis.call('HMGET', KEYS[1], 'job_id', 'model', 'provider'))
for i = 1, #rest, 1000 do
  redis.call('RPUSH', KEYS[4], unpack(rest, i, math.min(i + 999, #rest)))
end
redis.call('HSET', KEYS[3], 'id', ARGV[2], 'job_id', job, 'model', model, 'provider', provider,
           'state', 'prepared', 'count', #rest, 'created_at', ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[2])
for _, k in ipairs({KEYS[3], KEYS[4], KEYS[6]}) do redis.call('EXPIRE', k, ARGV[4]) end
return #rest
"""

#: The error a fenced record answers when the step's lock is not its own any more.
LOCK_LOST_ERROR = "inferpool: provider batch lock lost"

# The fence of the scripts below: KEYS[n] is the batch's lock, ARGV[m] the step's token ('' = unfenced).
_FENCE = (
    """
local function fence(lock, token)
  if token ~= '' and redis.call('GET', lock) ~= token then
    return redis.error_reply('"""
    + LOCK_LOST_ERROR
    + """')
  end
end
"""
)

# Records fields of a provider batch (KEYS[1]) if the step's lock (KEYS[2]) is still its token (ARGV[1]).
# ARGV[2..]: field, value pairs.
_MARK = (
    _FENCE
    + """
local lost = fence(KEYS[2], ARGV[1])
if lost then return lost end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
)

# Ends a provider batch (KEYS[1]) once: it becomes 'collected' with ARGV[1] as its outcome, is no longer due
# (KEYS[2]), and the ids ARGV[6..] whose items (KEYS[3]) are still there go back to the job's pending set
# (KEYS[4], first in line) to run real-time, the job's path for the model (KEYS[5], field ARGV[3]) saying so (ARGV[4]).
# Fenced by the lock KEYS[6] and token ARGV[5]. Returns how many went back (-1: it was collected already).
_CLOSE = (
    _FENCE
    + """
local lost = fence(KEYS[6], ARGV[5])
if lost then return lost end
if redis.call('HGET', KEYS[1], 'state') == 'collected' then return -1 end
local back = 0
for i = 6, #ARGV do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[4], 0, ARGV[i])
    back = back + 1
  end
end
if back > 0 then redis.call('HSET', KEYS[5], ARGV[3], ARGV[4]) end
redis.call('HSET', KEYS[1], 'state', 'collected', 'outcome', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return back
"""
)

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class LockLost(Exception):
    """A step's lock lapsed and another worker holds the batch now: this step must record nothing more."""


class StepLock:
    """A lock held while a step runs, renewed every third of ``hold_s`` by a daemon thread (so it lapses
    only if this process stops); ``token`` fences the step's records."""

    def __init__(self, client: redis.Redis, key: str, hold_s: float, renew: Any) -> None:
        self.key = key
        self.token = uuid.uuid4().hex
        self._client = client
        self._hold_ms = max(1, int(hold_s * 1000))
        self._renew = renew
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> bool:
        if not self._client.set(self.key, self.token, nx=True, px=self._hold_ms):
            return False
        self._thread = threading.Thread(target=self._keep, name=f"renew {self.key}", daemon=True)
        self._thread.start()
        return True

    def _keep(self) -> None:
        while not self._stop.wait(self._hold_ms / 3000):
            try:
                if not int(self._renew(keys=[self.key], args=[self.token, self._hold_ms])):
                    self.lost = True  # it lapsed (this process stalled) and may be another's now
                    return
            except redis.RedisError:
                continue  # Redis briefly away: try again; the fence still guards every record

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def via_field(model: str) -> str:
    """The job hash field holding the path (``ViaChoice`` JSON) chosen for ``model``."""
    return f"path:{model}"


class ProviderBatchStore:
    """Reads and changes provider batch state; safe from several processes at once."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self._form = client.register_script(_FORM)
        self._split = client.register_script(_SPLIT)
        self._close = client.register_script(_CLOSE)
        self._mark = client.register_script(_MARK)
        self._unlock = client.register_script(_UNLOCK)
        self._renew = client.register_script(_RENEW)

    # -- the scheduler's side ---------------------------------------------------------------------------

    def form(self, job_id: str, model: str, provider: str, limit: int, fence: str = "") -> tuple[str, int]:
        """Move up to ``limit`` pending lines of ``model`` into a new provider batch: (its id, how many; 0:
        none were pending). ``NotLeader`` where the fence no longer holds."""
        pbatch_id = new_id("pbatch")
        keys = [job_pending_key(job_id, model), provider_batch_key(pbatch_id), provider_batch_rids_key(pbatch_id),
                PROVIDER_BATCHES_DUE_KEY, job_provider_batches_key(job_id), SCHEDULER_LEASE_KEY]  # fmt: skip
        moved = fenced_call(self._form, keys, [limit, pbatch_id, job_id, model, provider, time.time(),
                                               self.result_ttl_s, fence])  # fmt: skip
        return pbatch_id, int(moved)

    def due(self, now: float, limit: int = 100) -> list[str]:
        return [decode_text(i) for i in self.redis.zrangebyscore(PROVIDER_BATCHES_DUE_KEY, "-inf", now, 0, limit)]

    def schedule(self, pbatch_id: str, at: float) -> None:
        """The batch's next step is due ``at`` (only while it is unfinished: ``XX``)."""
        self.redis.zadd(PROVIDER_BATCHES_DUE_KEY, {pbatch_id: at}, xx=True)

    def forget(self, pbatch_id: str) -> None:
        """No step is due for it any more (it ended, or its record expired)."""
        self.redis.zrem(PROVIDER_BATCHES_DUE_KEY, pbatch_id)

    def job_batches(self, job_id: str) -> list[ProviderBatch]:
        ids = [decode_text(i) for i in self.redis.zrange(job_provider_batches_key(job_id), 0, -1)]
        return [batch for batch in (self.get(i) for i in ids) if batch is not None]

    def request_cancel(self, pbatch_id: str, *, window_ended: bool = False) -> None:
        """Ask the workers to cancel it at the provider (and settle its lines); due now. ``window_ended``: its
        job's completion window is over (what the provider finished is collected, unrun lines expire)."""
        pipe = self.redis.pipeline()
        pipe.hset(
            provider_batch_key(pbatch_id), mapping={"cancel": "1", **({"window_ended": "1"} if window_ended else {})}
        )
        pipe.zadd(PROVIDER_BATCHES_DUE_KEY, {pbatch_id: time.time()}, xx=True)
        pipe.execute()

    # -- the workers' side ------------------------------------------------------------------------------

    def get(self, pbatch_id: str) -> ProviderBatch | None:
        return ProviderBatch.from_hash(self.redis.hgetall(provider_batch_key(pbatch_id)))

    def request_ids(self, pbatch_id: str, page: int = 1000) -> Iterator[list[str]]:
        """The batch's request ids, a page at a time."""
        key = provider_batch_rids_key(pbatch_id)
        start = 0
        while True:
            ids = [decode_text(i) for i in self.redis.lrange(key, start, start + page - 1)]
            if not ids:
                return
            yield ids
            start += len(ids)

    def mark(self, pbatch_id: str, state: PBatchState | None = None, *, fence: StepLock | None = None,
             **fields: str | int | float) -> None:  # fmt: skip
        """Record a state (and fields such as the provider's ids) before or after a step; ``LockLost`` if the
        step's lock (``fence``) is not its own any more."""
        mapping: dict[str, str | int | float] = dict(fields)
        if state is not None:
            mapping["state"] = state.value
        pairs = [part for item in mapping.items() for part in item]
        _fenced(self._mark, [provider_batch_key(pbatch_id), provider_batch_lock_key(pbatch_id)],
                [fence.token if fence else "", *pairs])  # fmt: skip

    def count_fault(self, pbatch_id: str) -> int:
        """One more failed step (a provider or network error); returns how many so far."""
        return int(self.redis.hincrby(provider_batch_key(pbatch_id), "faults", 1))

    def claim(self, provider_batch_id: str) -> None:
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.zadd(PROVIDER_BATCHES_CLAIMED_KEY, {provider_batch_id: now})
        pipe.zremrangebyscore(PROVIDER_BATCHES_CLAIMED_KEY, "-inf", now - _CLAIMED_RETENTION_S)
        pipe.execute()

    def claimed(self, provider_batch_id: str) -> bool:
        return self.redis.zscore(PROVIDER_BATCHES_CLAIMED_KEY, provider_batch_id) is not None

    def split(self, batch: ProviderBatch, keep: int) -> str | None:
        """Keep the first ``keep`` lines; the rest become a new provider batch (its id)."""
        new = new_id("pbatch")
        keys = [provider_batch_key(batch.id), provider_batch_rids_key(batch.id), provider_batch_key(new),
                provider_batch_rids_key(new), PROVIDER_BATCHES_DUE_KEY,
                job_provider_batches_key(batch.job_id)]  # fmt: skip
        moved: Any = self._split(keys=keys, args=[keep, new, time.time(), self.result_ttl_s])
        return new if int(moved) else None

    def close(self, batch: ProviderBatch, outcome: str, *, back_to_realtime: list[str] | None = None,
              reason: str = "", fence: StepLock | None = None) -> int:  # fmt: skip
        """End the batch once (``collected``); ``back_to_realtime`` lines (unanswered ones) are queued again for
        the real-time path, the job's path for the model saying why. Returns how many went back (-1: it was
        closed already); ``LockLost`` if the step's lock (``fence``) is not its own any more."""
        keys = [provider_batch_key(batch.id), PROVIDER_BATCHES_DUE_KEY, job_items_key(batch.job_id),
                job_pending_key(batch.job_id, batch.model), job_key(batch.job_id),
                provider_batch_lock_key(batch.id)]  # fmt: skip
        path = json.dumps({"via": "realtime", "reason": reason})
        back = _fenced(self._close, keys, [outcome, batch.id, via_field(batch.model), path,
                                           fence.token if fence else "", *(back_to_realtime or [])])  # fmt: skip
        return int(back)

    def step_running(self, pbatch_id: str) -> bool:
        """Whether a worker holds the batch's lock now (a step is under way: it must not be published again)."""
        return bool(self.redis.exists(provider_batch_lock_key(pbatch_id)))

    def lock(self, pbatch_id: str, hold_s: float) -> AbstractContextManager[StepLock | None]:
        """The batch's lock while the block runs (None: another worker holds it), renewed meanwhile."""
        return self._lock(provider_batch_lock_key(pbatch_id), hold_s)

    def create_lock(self, provider: str, hold_s: float) -> AbstractContextManager[StepLock | None]:
        """Whether this process may create a batch at ``provider`` now (see ``provider_batch_create_lock_key``)."""
        return self._lock(provider_batch_create_lock_key(provider), hold_s)

    @contextmanager
    def _lock(self, key: str, hold_s: float) -> Iterator[StepLock | None]:
        lock = StepLock(self.redis, key, hold_s, self._renew)
        held = lock.acquire()
        try:
            yield lock if held else None
        finally:
            if held:
                lock.stop()
                self._unlock(keys=[key], args=[lock.token])


def _fenced(script: Any, keys: list[str], args: list[Any]) -> Any:
    return fenced_call(script, keys, args, refusal=LOCK_LOST_ERROR, raises=LockLost)
