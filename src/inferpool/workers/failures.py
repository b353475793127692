"""What a worker does with requests its model failed: pass them to a fallback model, or bury them.

A request that ends in a ``ProviderError`` (after the backend's own retries) moves to the next model
in the ``fallbacks`` chain of the model it was first sent to that has not tried it yet, can serve it and
has a live worker; one that did not fit its
model's context window moves only to a fallback with a larger window. It travels as a new chunk on the
fallback's queue, with the same request id (so its result is still written once), a warning naming the
failed model, and, for batch jobs, the job's in-flight record moved to the new model (so a restarted
scheduler re-sends it there and the per-model windows stay right; a redelivered chunk that had already
forwarded a request finds its record moved and forwards nothing). A ``ProviderError`` with nowhere left
to go gets its error result and a copy in the dead-letter stream.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence

import redis
from celery import Celery

from inferpool._exceptions import ContextLengthExceeded, ProviderError, RequestError
from inferpool.constants import MODEL_INFLIGHT_KEY, job_items_key
from inferpool.model_registry.capability import check_request_fits
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.celery_app import publish_chunk
from inferpool.plumbing.redis_connection import decode_text
from inferpool.state.dead_letters import DeadLetters
from inferpool.state.heartbeats import count_live_workers
from inferpool.state.items import LUA_ITEM_HOLDER, record_json
from inferpool.wire import TaskChunk, TaskItem
from inferpool.workers.backend import Outcome

log = logging.getLogger(__name__)


# Moves batch requests' item records from one model to another, only where the record still says the
# request is with the failing model (a redelivered chunk that already forwarded a request, or one whose
# request was answered meanwhile, moves nothing). KEYS: the job's items hash, the per-model in-flight
# counts. ARGV: from model, to model, then request id / new item JSON pairs. Returns the request ids moved.
_MOVE_INFLIGHT = (
    LUA_ITEM_HOLDER
    + """
local moved = {}
for i = 3, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current then
    if inflight_model(current) == ARGV[1] then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[2] .. '|' .. ARGV[i + 1])
      moved[#moved + 1] = ARGV[i]
    end
  end
end
if #moved > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[1], -#moved)
  redis.call('HINCRBY', KEYS[2], ARGV[2], #moved)
end
return moved
"""
)


class FailurePolicy:
    def __init__(
        self, spec: ModelSpec, registry: Registry | None, client: redis.Redis, celery: Celery | None, *,
        dead_letter_ttl_s: int,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.registry = registry
        self.redis = client
        self.celery = celery
        self.dead_letters = DeadLetters(client, dead_letter_ttl_s)
        self._move = client.register_script(_MOVE_INFLIGHT)

    def fallback_for(self, item: TaskItem, outcome: Outcome) -> ModelSpec | None:
        """The model ``item`` should move to after ``outcome``, or None.

        The chain is the one of the model the request was first sent to; a candidate must not have tried
        it yet, must accept it, must have a live worker, and after a context overflow must have a larger
        context window than the model that overflowed.
        """
        if (
            self.registry is None
            or self.celery is None
            or not isinstance(outcome, ProviderError | ContextLengthExceeded)
        ):
            return None
        origin = self.registry.get((item.tried or [self.spec.name])[0])
        tried = {*(item.tried or []), self.spec.name}
        for name in origin.fallbacks:
            candidate = self.registry.get(name)
            if candidate.name in tried:
                continue
            too_small = candidate.capabilities.context_window <= self.spec.capabilities.context_window
            if isinstance(outcome, ContextLengthExceeded) and too_small:
                continue
            try:
                check_request_fits(candidate, item.request)
            except RequestError:
                continue
            if count_live_workers(self.redis, candidate.name) == 0:
                continue
            return candidate
        return None

    def forward(self, chunk: TaskChunk, failed: Sequence[tuple[TaskItem, RequestError, ModelSpec]]) -> None:
        """Send each failed item on to its fallback model (one chunk per fallback)."""
        if not failed or self.celery is None:
            return
        by_model: dict[str, list[TaskItem]] = defaultdict(list)
        for item, error, target in failed:
            note = (
                f"model {self.spec.name!r} failed ({error.code}: {error.message}); passed to fallback {target.name!r}"
            )
            by_model[target.name].append(item.model_copy(update={
                "request": item.request.model_copy(update={"model": target.name}),
                "tried": [*(item.tried or []), self.spec.name],
                "warnings": [*(item.warnings or []), note],
            }))  # fmt: skip
        for model, items in by_model.items():
            common = {"job_id": chunk.job_id, "model": model, "resent": True, "result_ttl_s": chunk.result_ttl_s,
                      "priority": chunk.priority}  # fmt: skip
            if chunk.job_id is None:
                moving = TaskChunk(items=items, **common)
            else:  # the job's items are rewritten for the fallback; the chunk carries their ids
                pairs = [part for moved in items for part in (moved.request_id, record_json(moved))]
                taken = self._move(keys=[job_items_key(chunk.job_id), MODEL_INFLIGHT_KEY],
                                   args=[self.spec.name, model, *pairs])  # fmt: skip
                if not taken:
                    continue
                moving = TaskChunk(refs=[decode_text(rid) for rid in taken], **common)
            log.info("passing %d request(s) of %s to fallback %s", moving.size, chunk.describe(), model)
            publish_chunk(self.celery, moving)

    def dead_letter(self, chunk: TaskChunk, items: Sequence[TaskItem], outcomes: Mapping[str, Outcome],
             written: Sequence[bool]) -> int:  # fmt: skip
        """Copy to the dead-letter stream each provider failure this call wrote the result of."""
        dead = [
            (item, chunk.job_id, self.spec.name, outcome.code, outcome.message)
            for item, stored in zip(items, written, strict=True)
            if stored and isinstance(outcome := outcomes[item.request_id], ProviderError)
        ]
        if dead:
            self.dead_letters.add_many(dead)
        return len(dead)
