"""Where results live in Redis and how they are written exactly once.

Every result goes through one Lua script. A single request's result is its own key, written ``SET NX``,
and only if that succeeded, a wake-up for its waiter. A batch request's result is written only while its
item is still in the job's items hash, and the item is deleted in the same call (its presence is the "not
yet answered" mark); with it go the job's counts, the request's removal from the in-flight set (freeing the
count of the model its item names) and its usage. A chunk that runs twice after a crash or a redelivery
therefore never yields two results or counts anything twice.

A batch job's results live in its completion stream, one entry per script call (a worker's chunk): field
``z2`` holds the call's results, one JSON per line, compressed together (zlib with a preset dictionary), and
field ``s`` the positions of the lines that were not written (their request already had a result), if any.
Entries of the older format (``z1``: one result per entry) are still read.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from inferpool.constants import (
    COMPLETED_RESULT_V1,
    COMPLETED_RESULTS,
    COMPLETED_SKIPPED,
    DEFAULT_TENANT,
    MODEL_INFLIGHT_KEY,
    MODEL_LATENCY_KEY,
    REPLY_LIST_TTL_S,
    STREAM_DONE,
    STREAM_MAX_ENTRIES,
    USAGE_RETENTION_S,
    USAGE_TOTAL_KEY,
    hold_key,
    job_completed_stream_key,
    job_holds_key,
    job_inflight_since_key,
    job_items_key,
    job_key,
    job_usage_key,
    reply_list_key,
    result_key,
    stream_key,
    usage_day_key,
)
from inferpool.state.budgets import LUA_SETTLE
from inferpool.state.items import LUA_ITEM_HOLDER
from inferpool.state.usage import latency_bucket
from inferpool.wire import RequestResult

_WRITE_ONCE = (
    LUA_ITEM_HOLDER
    + LUA_SETTLE
    + """
-- KEYS: job hash, job completed stream, job items hash, per-model in-flight hash, job usage hash,
--       job in-flight-since sorted set, the day's usage hash, the all-time usage hash (Prometheus counters),
--       the per-model latency histogram, the job's budget holds hash
-- ARGV: ttl, result key prefix, model, mode, tenant, usage ttl, output stream key prefix, stream cap, the
--       job's results (batch modes: every record's JSON, one per line, compressed together; '' otherwise),
--       then one record per
--       result: request_id TAB completed|failed TAB prompt_tokens TAB completion_tokens TAB cost TAB
--       latency bucket TAB latency seconds TAB attempts TAB ttft bucket TAB ttft seconds TAB
--       cached (1 or 0) TAB cost saved by the cache TAB prompt tokens found in the engine's prefix cache TAB
--       the submitting client's reply list id ('' for none) TAB
--       json (an empty bucket: not measured; the json is
--       empty in the batch modes, where it is in the compressed results)
-- mode: '' a single request's result: its own key (SET NX) and a wake-up for its waiter: the result pushed onto
--       its client's reply list, or, if the request is streamed (its output stream exists), the stream's last
--       entry ('d'), else a mark on its own notify list. 'job' a batch
--       request's result: written only if the request's item is still in the job's items hash (it goes
--       with the answer: that is what makes the write happen once); the call's results that were written
--       make one entry of the job's completion stream: the compressed results ('z2') and, if some were
--       not written, their positions ('s', comma-separated). 'new' a batch line settled before it had an
--       item (refused while uploading): written to the stream unconditionally.
-- A result written settles its request's budget hold, if it has one (inferpool.state.budgets): a single request's
-- own hold key, a batch line's entry in its job's holds hash; the real cost joins the spend, the hold leaves.
-- Every record is checked before anything is written: a malformed number fails the whole call with an
-- error and writes nothing. A batch result whose job is gone (its retention ended) is not written: its
-- request was answered, counted and forgotten long ago. Returns the 0-based positions of the records not
-- written (their request already had a result, or their job is gone).
local ttl, prefix, model, mode, tenant, usage_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local stream_prefix, stream_cap, job_results = ARGV[7], ARGV[8], ARGV[9]
local hold_prefix = '"""
    + hold_key("")
    + """'
local reply_prefix, reply_ttl = '"""
    + reply_list_key("")
    + "', "
    + str(REPLY_LIST_TTL_S)
    + """
local is_job = mode ~= ''
local first = 10
local function number(text, rid)
  local value = tonumber(text)
  if value == nil or value ~= value or value == math.huge or value == -math.huge then
    return error('inferpool: result ' .. rid .. ' has a malformed usage number: ' .. tostring(text))
  end
  return value
end
local records = {}
for i = first, #ARGV do
  local record = ARGV[i]
  local fields, pos = {}, 1
  for f = 1, 14 do
    local tab = string.find(record, '\t', pos, true)
    if tab == nil then return error('inferpool: malformed result record at position ' .. (i - first)) end
    fields[f] = string.sub(record, pos, tab - 1)
    pos = tab + 1
  end
  local r = {rid = fields[1], ok = fields[2] == 'completed', payload = string.sub(record, pos)}
  r.prompt = number(fields[3], r.rid)
  r.completion = number(fields[4], r.rid)
  r.cost = number(fields[5], r.rid)
  if fields[6] ~= '' then r.bucket, r.latency = fields[6], number(fields[7], r.rid) end
  r.attempts = number(fields[8], r.rid)
  if fields[9] ~= '' then r.ttft_bucket, r.ttft = fields[9], number(fields[10], r.rid) end
  r.cached, r.saved = fields[11] == '1', number(fields[12], r.rid)
  r.prefix_cached = number(fields[13], r.rid)
  r.reply = fields[14]
  records[#records + 1] = r
end
local skipped = {}
if is_job and redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 1, #records do skipped[i] = i - 1 end
  return skipped
end
local completed, failed, prompt, completion, cost = 0, 0, 0, 0, 0
local latency_sum, retried, ttft_sum, hits, saved, prefix_cached = 0, 0, 0, 0, 0, 0
local buckets, ttft_buckets, settled = {}, {}, {}
local job_holds = is_job and mode ~= 'new' and redis.call('EXISTS', KEYS[10]) == 1
local function settle(r)
  local hold
  if is_job then
    if not job_holds then return end
    hold = redis.call('HGET', KEYS[10], r.rid)
    if hold then redis.call('HDEL', KEYS[10], r.rid) end
  else
    hold = redis.call('GET', hold_prefix .. r.rid)
    if hold then redis.call('DEL', hold_prefix .. r.rid) end
  end
  if hold then settle_hold(hold, math.floor(r.cost * 1000000000 + 0.5)) end
end
local function fresh(r)
  if mode == 'new' then return true end
  if not is_job then return redis.call('SET', prefix .. r.rid, r.payload, 'NX', 'EX', ttl) end
  local held = redis.call('HGET', KEYS[3], r.rid)
  if not held then return false end
  -- A dispatched request frees the in-flight count of the model its item names (a fallback may hold it
  -- now, not this one); its item, the job's copy of the prompt, goes with the answer.
  if redis.call('ZREM', KEYS[6], r.rid) == 1 then
    local holder = inflight_model(held)
    settled[holder] = (settled[holder] or 0) + 1
  end
  redis.call('HDEL', KEYS[3], r.rid)
  return true
end
for i, r in ipairs(records) do
  if fresh(r) then
    settle(r)
    if r.ok then completed = completed + 1 else failed = failed + 1 end
    prompt = prompt + r.prompt
    completion = completion + r.completion
    cost = cost + r.cost
    prefix_cached = prefix_cached + r.prefix_cached
    if r.bucket then
      buckets[r.bucket] = (buckets[r.bucket] or 0) + 1
      latency_sum = latency_sum + r.latency
    end
    if r.attempts > 1 then retried = retried + 1 end
    if r.cached then hits, saved = hits + 1, saved + r.saved end
    if r.ttft_bucket then
      ttft_buckets[r.ttft_bucket] = (ttft_buckets[r.ttft_bucket] or 0) + 1
      ttft_sum = ttft_sum + r.ttft
    end
    if not is_job then
      if r.reply ~= '' then
        redis.call('RPUSH', reply_prefix .. r.reply, r.payload)
        redis.call('EXPIRE', reply_prefix .. r.reply, reply_ttl)
      end
      if redis.call('EXISTS', stream_prefix .. r.rid) == 1 then
        -- a streamed request's readers wake on its stream's last entry: no notify list left behind for it
        redis.call('XADD', stream_prefix .. r.rid, 'MAXLEN', '~', stream_cap, '*', '"""
    + STREAM_DONE
    + """', '1')
      elseif r.reply == '' then
        redis.call('RPUSH', prefix .. r.rid .. ':notify', '1')
        redis.call('EXPIRE', prefix .. r.rid .. ':notify', ttl)
      end
    end
  else
    skipped[#skipped + 1] = i - 1
  end
end
local function count_usage(hash, m)
  redis.call('HINCRBY', hash, m .. 'requests', completed + failed)
  redis.call('HINCRBY', hash, m .. 'errors', failed)
  redis.call('HINCRBY', hash, m .. 'prompt_tokens', prompt)
  redis.call('HINCRBY', hash, m .. 'completion_tokens', completion)
  redis.call('HINCRBYFLOAT', hash, m .. 'cost_usd', string.format('%.17g', cost))
  redis.call('HINCRBYFLOAT', hash, m .. 'latency_sum', string.format('%.17g', latency_sum))
  redis.call('HINCRBY', hash, m .. 'retried', retried)
  for bucket, n in pairs(buckets) do
    redis.call('HINCRBY', hash, m .. 'latency|' .. bucket, n)
  end
  if prefix_cached > 0 then
    redis.call('HINCRBY', hash, m .. 'prefix_cached_tokens', prefix_cached)
  end
  if hits > 0 then
    redis.call('HINCRBY', hash, m .. 'cache_hits', hits)
    redis.call('HINCRBYFLOAT', hash, m .. 'saved_usd', string.format('%.17g', saved))
  end
  if next(ttft_buckets) ~= nil then
    redis.call('HINCRBYFLOAT', hash, m .. 'ttft_sum', string.format('%.17g', ttft_sum))
    for bucket, n in pairs(ttft_buckets) do
      redis.call('HINCRBY', hash, m .. 'ttft|' .. bucket, n)
    end
  end
end
if completed + failed > 0 then
  if is_job then
    if #skipped == 0 then
      redis.call('XADD', KEYS[2], '*', '"""
    + COMPLETED_RESULTS
    + """', job_results)
    else
      redis.call('XADD', KEYS[2], '*', '"""
    + COMPLETED_RESULTS
    + """', job_results, '"""
    + COMPLETED_SKIPPED
    + """', table.concat(skipped, ','))
    end
  end
  count_usage(KEYS[7], tenant .. '|' .. model .. '|')
  redis.call('EXPIRE', KEYS[7], usage_ttl)
  count_usage(KEYS[8], tenant .. '|' .. model .. '|')
  for bucket, n in pairs(buckets) do
    redis.call('HINCRBY', KEYS[9], model .. '|' .. bucket, n)
  end
  if is_job then
    redis.call('HINCRBY', KEYS[1], 'completed', completed)
    redis.call('HINCRBY', KEYS[1], 'failed', failed)
    for holder, n in pairs(settled) do redis.call('HINCRBY', KEYS[4], holder, -n) end
    count_usage(KEYS[5], model .. '|')
    for k = 1, 6 do
      if k ~= 4 then redis.call('EXPIRE', KEYS[k], ttl) end
    end
  end
end
return skipped
"""
)

# Returns the 0-based positions of the request ids (ARGV[2..]) that already have a result.
_EXISTING = """
local found = {}
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 1 then found[#found + 1] = i - 2 end
end
return found
"""

#: Usage rows for results that no model served (lines rejected before queueing, cancelled, expired).
NO_MODEL = "-"

_RESULT_PREFIX = result_key("")
_STREAM_PREFIX = stream_key("")


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """One result ready to store: ``payload`` is the ``RequestResult`` JSON (UTF-8 bytes, as pydantic makes
    them), the rest feeds the counters."""

    request_id: str
    ok: bool
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float | None
    payload: bytes
    tenant: str = DEFAULT_TENANT
    attempts: int = 1
    ttft_s: float | None = None
    cached: bool = False
    saved_usd: float = 0.0
    prefix_cached_tokens: int = 0
    reply_to: str = ""  # the submitting client's reply list id (a single request): its result is pushed there

    @classmethod
    def of(cls, result: RequestResult) -> ResultRecord:
        stats, usage = result.stats, result.usage
        return cls(
            request_id=result.request_id,
            ok=result.ok,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cost_usd=stats.cost_usd if stats else 0.0,
            latency_s=stats.latency_s if stats else None,
            payload=result.model_dump_json(exclude_none=True).encode(),
            tenant=result.tenant or DEFAULT_TENANT,
            attempts=stats.attempts if stats else 1,
            ttft_s=stats.ttft_s if stats else None,
            prefix_cached_tokens=usage.prompt_tokens_details.cached_tokens
            if usage and usage.prompt_tokens_details
            else 0,
        )

    def encode(self, *, with_payload: bool = True) -> bytes:
        """The script's record format (see ``_WRITE_ONCE``); a batch result's payload travels apart from it
        (compressed with its chunk-mates'), so its record ends at the last tab."""
        bucket = latency_bucket(self.latency_s) if self.latency_s is not None else ""
        ttft_bucket = latency_bucket(self.ttft_s) if self.ttft_s is not None else ""
        head = (
            f"{self.request_id}\t{'completed' if self.ok else 'failed'}\t{self.prompt_tokens}\t"
            f"{self.completion_tokens}\t{self.cost_usd!r}\t{bucket}\t{self.latency_s or 0.0!r}\t{self.attempts}\t"
            f"{ttft_bucket}\t{self.ttft_s or 0.0!r}\t{1 if self.cached else 0}\t{self.saved_usd!r}\t"
            f"{self.prefix_cached_tokens}\t{self.reply_to}\t"
        ).encode()
        return head + self.payload if with_payload else head


class ResultWriter:
    """Writes results idempotently: workers, and the scheduler or client when they settle a request.

    Results are written in groups (one Lua call per job and model), which is what lets a worker settle
    a 500-request chunk in one round trip.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._write = client.register_script(_WRITE_ONCE)
        self._exists = client.register_script(_EXISTING)

    def write(self, result: RequestResult, ttl_s: int, *, model: str | None = None) -> bool:
        """Store ``result`` unless its request already has one; True if this call stored it.

        ``model`` is the model the request was dispatched to (default: the one in its stats).
        """
        return self.write_many([(result, model)], ttl_s)[0]

    def write_many(
        self,
        results: Sequence[tuple[RequestResult, str | None]],
        ttl_s: int,
        *,
        new_lines: bool = False,
        reply_to: Mapping[str, str] | None = None,
    ) -> list[bool]:
        """``write`` for many (result, model) pairs, in one round trip.

        ``new_lines``: batch lines settled before they were ever queued (refused while uploading): they
        have no item, and are written as they are. ``reply_to``: request id -> its client's reply list id.
        """
        replies = reply_to or {}
        records = [dataclasses.replace(record, reply_to=replies.get(record.request_id, ""))
                   if record.request_id in replies else record
                   for record in (ResultRecord.of(result) for result, _ in results)]  # fmt: skip
        keys = [
            (result.job_id or "", model or (result.stats.model if result.stats else NO_MODEL))
            for result, model in results
        ]
        return self._write_grouped(records, keys, ttl_s, "new" if new_lines else "job")

    def write_records(self, job_id: str | None, model: str, records: Sequence[ResultRecord], ttl_s: int) -> list[bool]:
        """Store records of one job (or none) and one model; True for each one this call stored.

        The workers' hot path: no ``RequestResult`` object is built or validated on the way.
        """
        return self._write_grouped(records, [(job_id or "", model)] * len(records), ttl_s, "job")

    def _write_grouped(
        self, records: Sequence[ResultRecord], targets: Sequence[tuple[str, str]], ttl_s: int, job_mode: str
    ) -> list[bool]:
        """One script call per (job, model, tenant) group, all in one pipeline; True where a record was stored."""
        groups: dict[tuple[str, str, str], list[int]] = {}
        for index, ((job_id, model), record) in enumerate(zip(targets, records, strict=True)):
            groups.setdefault((job_id, model, record.tenant), []).append(index)
        if not groups:
            return []
        day = time.strftime("%Y-%m-%d", time.gmtime())
        pipe = self._client.pipeline(transaction=False)
        for (job_id, model, tenant), indexes in groups.items():
            keys = [job_key(job_id), job_completed_stream_key(job_id), job_items_key(job_id), MODEL_INFLIGHT_KEY,
                    job_usage_key(job_id), job_inflight_since_key(job_id), usage_day_key(day),
                    USAGE_TOTAL_KEY, MODEL_LATENCY_KEY, job_holds_key(job_id)]  # fmt: skip
            group = [records[i] for i in indexes]
            stored = compress_results([record.payload for record in group]) if job_id else b""
            args: list[bytes | str | int] = [ttl_s, _RESULT_PREFIX, model, job_mode if job_id else "", tenant,
                                             USAGE_RETENTION_S, _STREAM_PREFIX, STREAM_MAX_ENTRIES, stored]  # fmt: skip
            args += [record.encode(with_payload=not job_id) for record in group]
            self._write(keys=keys, args=args, client=pipe)
        written = [True] * len(records)
        for indexes, duplicates in zip(groups.values(), pipe.execute(), strict=True):
            for position in duplicates:
                written[indexes[position]] = False
        return written

    def existing(self, request_ids: Sequence[str]) -> set[str]:
        """Which of ``request_ids`` already have a result (so a redelivered chunk skips them)."""
        if not request_ids:
            return set()
        found: Any = self._exists(keys=[], args=[_RESULT_PREFIX, *request_ids])
        return {request_ids[position] for position in found}


def parse_result(raw: bytes | str) -> RequestResult:
    return RequestResult.model_validate_json(raw)


# -- how a batch result is stored ------------------------------------------------------------------------

#: zlib's preset dictionary for batch results: a result as workers write it, so the compressor finds every key
#: and the common values already there. Never change it: stored results name it by their field (``z1``,
#: ``z2``). A new dictionary gets a new field.
_ZDICT_V1 = (
    b'{"request_id":"req_","custom_id":"","job_id":"batch_","tenant":"default","stats":{"model":"","backend":'
    b'"echo","worker":"@","queued_s":0.0,"latency_s":0.0,"attempts":1,"cost_usd":0.0,"ttft_s":0.0},"warnings":'
    b'["model  is deprecated"],"error":{"code":"provider_error","message":"the batch was cancelled before this '
    b'request ran"},"batch_expired","batch_failed","invalid_request","context_length_exceeded","model_not_found",'
    b'"response":{"id":"chatcmpl-","object":"chat.completion","created":17,"model":"","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"The "},"finish_reason":"stop","logprobs":null}],"usage":'
    b'{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}}'
)
#: A completion-stream entry's results: one JSON per line (JSON text never holds a raw newline), compressed
#: together with ``_ZDICT_V1``. Field ``s``: the positions of the lines not written, comma-separated.
STORED_RESULTS_FIELD = COMPLETED_RESULTS.encode()
SKIPPED_FIELD = COMPLETED_SKIPPED.encode()
#: One result per entry, compressed alone with ``_ZDICT_V1`` (written by earlier versions; still read).
STORED_RESULT_FIELD_V1 = COMPLETED_RESULT_V1.encode()
#: zlib level 1: on a 500-result echo chunk, 1.7 us and ~62 bytes a result; level 6, 3.1 us and ~53 bytes.
_LEVEL = 1


def compress_results(payloads: Sequence[bytes]) -> bytes:
    compressor = zlib.compressobj(level=_LEVEL, zdict=_ZDICT_V1)
    return compressor.compress(b"\n".join(payloads)) + compressor.flush()


def stored_results(fields: Mapping[bytes, bytes]) -> list[bytes]:
    """The results (JSON) that a completion-stream entry holds: none for an entry this version cannot read."""
    stored = fields.get(STORED_RESULTS_FIELD)
    if stored is not None:
        lines = _decompress(stored).split(b"\n")
        skipped = fields.get(SKIPPED_FIELD)
        if skipped:
            gone = {int(position) for position in skipped.split(b",")}
            lines = [line for position, line in enumerate(lines) if position not in gone]
        return lines
    single = fields.get(STORED_RESULT_FIELD_V1)
    return [] if single is None else [_decompress(single)]


def _decompress(stored: bytes) -> bytes:
    return zlib.decompressobj(zdict=_ZDICT_V1).decompress(stored)
