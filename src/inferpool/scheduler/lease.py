"""Which scheduler leads: a Redis lease, renewed by its holder, with a fencing token.

Any number of ``inferpool scheduler`` processes may run; one holds the lease (``SET NX PX``) and
drives jobs, the others try to take it every third of its lifetime. The holder renews it every third
of its lifetime from its own thread; if it dies or is cut off, the lease lapses and another scheduler
takes it within ``lease_s`` plus one try interval. Each new leadership takes a fencing token from a
counter that only grows, and the lease holds ``"<token>|<owner>"``: the scripts that move a job's
requests into flight only act while the lease still holds that exact value, so a deposed leader
(paused, cut off, its lease taken) cannot dispatch anything, even before it notices.
"""

from __future__ import annotations

import logging
import threading

import redis

from inferpool.constants import SCHEDULER_FENCE_KEY, SCHEDULER_LEASE_KEY
from inferpool.plumbing.redis_connection import decode_text

log = logging.getLogger(__name__)

# KEYS: lease, fence counter; ARGV: owner, lease ms. Returns the new lease value, or nil if it is held.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = redis.call('INCR', KEYS[2]) .. '|' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""

# KEYS: lease; ARGV: the value held, lease ms. 1 if still held (and extended), 0 if lost.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease; ARGV: the value held. Gives the lease up (only if still ours).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class SchedulerLease:
    """This process's claim to lead. ``value`` is the fencing value while held (else None)."""

    def __init__(self, client: redis.Redis, owner: str, lease_s: float) -> None:
        self._redis = client
        self.owner = owner
        self.lease_s = lease_s
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self.value: str | None = None
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self.value is not None

    @property
    def try_interval_s(self) -> float:
        return self.lease_s / 3

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True if this process leads now."""
        value = self._acquire(keys=[SCHEDULER_LEASE_KEY, SCHEDULER_FENCE_KEY],
                              args=[self.owner, int(self.lease_s * 1000)])  # fmt: skip
        with self._lock:
            self.value = decode_text(value) if value else None
        if self.value is not None:
            log.info("scheduler %s leads (fencing token %s)", self.owner, self.value.partition("|")[0])
        return self.value is not None

    def renew(self) -> bool:
        """Extend the lease; False (and no longer held) if another scheduler has it now."""
        value = self.value
        if value is None:
            return False
        if self._renew(keys=[SCHEDULER_LEASE_KEY], args=[value, int(self.lease_s * 1000)]):
            return True
        self.lose()
        return False

    def lose(self) -> None:
        with self._lock:
            if self.value is not None:
                log.warning("scheduler %s lost the lease; it stops dispatching and waits", self.owner)
            self.value = None

    def release(self) -> None:
        """Give the lease up at shutdown, so another scheduler takes over at once."""
        value, self.value = self.value, None
        if value is not None:
            self._release(keys=[SCHEDULER_LEASE_KEY], args=[value])

    def keep_renewed(self, stop: threading.Event) -> threading.Thread:
        """Renew from a thread of its own every third of the lease (a long tick must not let it lapse)."""

        def renew_loop() -> None:
            while not stop.wait(self.try_interval_s):
                try:
                    if self.held:
                        self.renew()
                except redis.RedisError as exc:  # cannot reach Redis: the lease may lapse; fencing protects
                    log.warning("scheduler %s could not renew its lease: %s", self.owner, exc)

        thread = threading.Thread(target=renew_loop, name="lease-renewal", daemon=True)
        thread.start()
        return thread


def lease_holder(client: redis.Redis) -> str | None:
    """The owner of the current lease, if any (for status displays and tests)."""
    value = client.get(SCHEDULER_LEASE_KEY)
    return decode_text(value).partition("|")[2] if value else None
