"""Where results live in Redis and how they are written exactly once.

A worker writes each request's result with one Lua script: ``SET NX`` on the result key, and only if
that succeeded, a wake-up for waiters and (for batch jobs) one entry on the job's completion stream and
one count. A chunk that runs twice after a crash or a redelivery therefore never yields two results or
counts anything twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from inferpool.constants import job_completed_stream_key, job_key, result_key, result_notify_key
from inferpool.wire import RequestResult

_WRITE_ONCE = """
local written = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if not written then
  return 0
end
redis.call('RPUSH', KEYS[2], '1')
redis.call('EXPIRE', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[4], '*', 'rid', ARGV[3])
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
return 1
"""


class ResultWriter:
    """Writes results idempotently; used by workers (and by anything that settles a request itself)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._script = client.register_script(_WRITE_ONCE)

    def write(self, result: RequestResult, ttl_s: int) -> bool:
        """Store ``result`` unless one already exists for its request id; True if this call stored it."""
        job_id = result.job_id or ""
        keys = [
            result_key(result.request_id),
            result_notify_key(result.request_id),
            job_key(job_id) if job_id else "",
            job_completed_stream_key(job_id) if job_id else "",
        ]
        counter = "completed" if result.ok else "failed"
        payload = result.model_dump_json(exclude_none=True)
        args: list[str | int] = [payload, ttl_s, result.request_id if job_id else "", counter]
        return bool(self._script(keys=keys, args=args))

    def existing(self, request_ids: Sequence[str]) -> set[str]:
        """Which of ``request_ids`` already have a result (so a redelivered chunk skips them)."""
        if not request_ids:
            return set()
        pipe = self._client.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.exists(result_key(request_id))
        return {rid for rid, found in zip(request_ids, pipe.execute(), strict=True) if found}


def parse_result(raw: bytes | str) -> RequestResult:
    return RequestResult.model_validate_json(raw)
