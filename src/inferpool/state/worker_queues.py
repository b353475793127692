"""Workers' own queues: how much waits in them, and handing what waits to the model's shared queues.

Prefix affinity sends work to one worker by name (``constants.worker_queue_name``). Work must never be
stranded there: a worker that drains (SIGTERM) hands its own queues over as it stops, and every live
worker of the model hands over the queues of peers whose heartbeat has gone (SIGKILL, a lost host), on
each heartbeat for the grace period, since kombu restores a dead worker's unacknowledged messages to the queue they came
from once the visibility timeout passes. A handed-over message is re-addressed to the shared queue
(its delivery info's routing key), so a later restore of it goes there too. Requests stay exactly-once:
whichever worker runs a message writes each result once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from inferpool.constants import Priority, queue_name, worker_queue_name
from inferpool.state.heartbeats import gone_worker_ids

log = logging.getLogger(__name__)

# KEYS: n own queues, then their n shared queues. ARGV: n, then the 2n quoted queue names (own, shared).
# Messages keep their order: the oldest own message ends up next in line on the shared queue (kombu
# LPUSHes and BRPOPs). The routing key is replaced as a quoted string: queue names never need escaping
# in JSON, and a message's body is base64.
_HAND_OVER = """
local n = tonumber(ARGV[1])
local moved = 0
for i = 1, n do
  local own, shared = KEYS[i], KEYS[n + i]
  local from, to = ARGV[1 + i], ARGV[1 + n + i]
  local messages = redis.call('LRANGE', own, 0, -1)
  for _, message in ipairs(messages) do
    local out, start = {}, 1
    while true do
      local a, b = string.find(message, from, start, true)
      if not a then break end
      out[#out + 1] = string.sub(message, start, a - 1)
      out[#out + 1] = to
      start = b + 1
    end
    out[#out + 1] = string.sub(message, start)
    redis.call('RPUSH', shared, table.concat(out))
    moved = moved + 1
  end
  redis.call('DEL', own)
end
return moved
"""


def _quoted(name: str) -> str:
    return f'"{name}"'


class WorkerQueues:
    """Own-queue backlogs and hand-overs for one Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._hand_over = client.register_script(_HAND_OVER)

    def hand_over(self, model: str, worker_ids: Sequence[str]) -> int:
        """Move everything waiting in the own queues of ``worker_ids`` to ``model``'s shared queues of the
        same priority, in one script call; returns how many messages moved."""
        own = [worker_queue_name(model, worker_id, priority) for worker_id in worker_ids for priority in Priority]
        shared = [queue_name(model, priority) for _ in worker_ids for priority in Priority]
        if not own:
            return 0
        moved: Any = self._hand_over(keys=[*own, *shared],
                                     args=[len(own), *map(_quoted, own), *map(_quoted, shared)])  # fmt: skip
        return int(moved)

    def hand_over_gone(self, model: str) -> int:
        """``hand_over`` the own queues of ``model``'s gone workers (a live worker does this on each beat)."""
        gone = gone_worker_ids(self.redis, model)
        moved = self.hand_over(model, gone) if gone else 0
        if moved:
            log.warning("handed %d chunk(s) waiting for gone workers %s to the shared queues", moved, ", ".join(gone))
        return moved

    def backlogs(self, model: str, worker_ids: Sequence[str], priority: Priority = Priority.LOW) -> dict[str, int]:
        """Messages (chunks) waiting in each worker's own queue of ``priority``, in one round trip."""
        if not worker_ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in worker_ids:
            pipe.llen(worker_queue_name(model, worker_id, priority))
        return {worker_id: int(n) for worker_id, n in zip(worker_ids, pipe.execute(), strict=True)}
