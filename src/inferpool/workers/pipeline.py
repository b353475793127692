"""What a worker does to one chunk, as a pipeline of steps (the way dramatiq's middleware works): each
concern is one ``Step`` whose hooks do nothing unless it overrides them, so adding a concern is adding a
class, touching no other.

``WorkerRuntime._process`` reads a chunk's unanswered requests into a ``ChunkWork``, then runs every
step's hooks in the order of ``default_steps``:

1. ``before_generate``: requests its client gave up on, requests ended before running (their job was
   cancelled or expired, their stored item unreadable), the model's request hooks, the model's limits, the
   streams readers wait on, the response cache (hits, and identical requests computed once);
2. the backend, for the requests no step has decided or held back (``ChunkWork.to_generate``);
3. ``after_generate``: the cache stores and shares what was computed, the result hooks rewrite answers,
   failed requests move on to their fallback;
4. the result write (exactly once, ``ResultWriter``), then ``after_write``: dead letters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inferpool._exceptions import RequestError
from inferpool.constants import STREAM_CANCELLED_CODE, stream_cancel_key
from inferpool.model_registry.capability import check_request_fits
from inferpool.state.streams import open_streams
from inferpool.wire import TaskChunk, TaskItem
from inferpool.workers.backend import Generation, Outcome
from inferpool.workers.cache import CachePlan, cache_key, cache_scope, cache_ttl_s

if TYPE_CHECKING:
    from inferpool.workers.runtime import WorkerRuntime

#: Runs the backend for some requests and returns their outcomes (for a step that holds requests back).
Generate = Callable[[Sequence[TaskItem]], dict[str, Outcome]]


@dataclass
class ChunkWork:
    """One chunk's unanswered requests on their way through the steps."""

    chunk: TaskChunk
    items: list[TaskItem]  # as this model sends them (its request hooks applied)
    stopped: RequestError | None = None  # every request ends with this: its job was cancelled or expired
    ended: dict[str, RequestError] = field(default_factory=dict)  # these end so, without running
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # answered by a step later (the cache), not the backend now
    ran: set[str] = field(default_factory=set)  # reached the backend or the cache (set once, before it runs)
    hooks_s: dict[str, float] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)
    forwarded: set[str] = field(default_factory=set)  # moved to a fallback: their result is not written here
    notes: dict[type, object] = field(default_factory=dict)  # a step's own state for this chunk, by its class
    arrived: dict[str, TaskItem] = field(init=False)  # as they came, before this model's hooks

    def __post_init__(self) -> None:
        self.arrived = {item.request_id: item for item in self.items}

    def undecided(self) -> list[TaskItem]:
        return [item for item in self.items if item.request_id not in self.outcomes]

    def to_generate(self) -> list[TaskItem]:
        return [item for item in self.undecided() if item.request_id not in self.held]

    def answered(self) -> list[TaskItem]:
        """The requests that reached the backend or the cache."""
        return [item for item in self.items if item.request_id in self.ran]

    def to_write(self) -> list[TaskItem]:
        return [item for item in self.items if item.request_id not in self.forwarded]


class Step:
    """One concern of serving a chunk. Every hook does nothing by default."""

    def before_generate(self, runtime: WorkerRuntime, work: ChunkWork) -> None:
        """Decide requests (``work.outcomes``), rewrite them (``work.items``), or hold them back."""

    def after_generate(self, runtime: WorkerRuntime, work: ChunkWork, generate: Generate) -> None:
        """Change outcomes once the backend answered (``generate`` runs it for requests held back)."""

    def span_name(self, runtime: WorkerRuntime, work: ChunkWork, phase: str) -> str | None:
        """The span a hook that just ran (``phase``: its name) shows as in a trace, if it acted on this chunk
        (``inferpool.workers.tracing``); None: it did nothing worth a span."""
        return None

    def after_write(self, runtime: WorkerRuntime, work: ChunkWork, written: Sequence[bool]) -> None:
        """React to what was written (``written``, one flag per ``work.to_write()``)."""


class AbandonedRequests(Step):
    """Single requests whose client gave up before they ran (the gateway's hang-up or timeout, a handle's
    ``stop``) end as ``request_cancelled`` without running: a backed-up queue never does work nobody reads."""

    def before_generate(self, runtime: WorkerRuntime, work: ChunkWork) -> None:
        if work.chunk.job_id is not None or not work.items:
            return
        pipe = runtime.redis.pipeline(transaction=False)
        for item in work.items:
            pipe.exists(stream_cancel_key(item.request_id))
        error = RequestError("the client stopped waiting before this request ran; it was not run",
                             code=STREAM_CANCELLED_CODE)  # fmt: skip
        for item, gone in zip(work.items, pipe.execute(), strict=True):
            if gone:
                work.ended[item.request_id] = error


class EndedBeforeRunning(Step):
    """Requests that end without running: their job was cancelled or expired, their stored item cannot be
    read, their client gave up."""

    def before_generate(self, runtime: WorkerRuntime, work: ChunkWork) -> None:
        for item in work.items:
            ended = work.stopped or work.ended.get(item.request_id)
            if ended is not None:
                work.outcomes[item.request_id] = ended


class RequestHooks(Step):
    """The model's hooks' ``before_request``: a request rewritten, or refused with ``hook_error``."""

    def span_name(self, runtime: WorkerRuntime, work: ChunkWork, phase: str) -> str | None:
        return "inferpool.hooks.request" if runtime.hooks.hooks and phase == "before_generate" else None

    def before_generate(self, runtime: WorkerRuntime, work: ChunkWork) -> None:
        hooks = runtime.hooks
        if not hooks.hooks:
            return
        for index, item in enumerate(work.items):
            if item.request_id in work.outcomes:
                continue
            request, work.hooks_s[item.request_id] = hooks.before(item.request)
            if isinstance(request, RequestError):
                work.outcomes[item.request_id] = request
            else:
                work.items[index] = item.model_copy(update={"request": request})


class ModelLimits(Step):
    """A request the model cannot take (window, output limit, capabilities) ends with that error."""

    def before_generate(self, runtime: WorkerRuntime, work: ChunkWork) -> None:
        for item in work.undecided():
            try:
                check_request_fits(runtime.spec, item.request)
            except RequestError as exc:
                work.outcomes[item.request_id] = exc


class Streams(Step):
    """Streamed requests get their stream's first entry before they run, so readers see who took them."""

    def before_generate(self, runtime: WorkerRuntime, work: ChunkWork) -> None:
        streamed = [item.request_id for item in work.items if item.request.stream and item.request_id not in work.ended]
        open_streams(runtime.redis, streamed, runtime.spec.name, work.chunk.result_ttl_s)


class ResponseCache(Step):
    """Answers from the response cache where a request may use it (``inferpool.workers.cache``): stored
    answers, and identical requests computed once, here or by another worker."""

    def span_name(self, runtime: WorkerRuntime, work: ChunkWork, phase: str) -> str | None:
        if ResponseCache not in work.notes:  # no request of the chunk may use the cache
            return None
        return "inferpool.cache.lookup" if phase == "before_generate" else "inferpool.cache.store"

    def before_generate(self, runtime: WorkerRuntime, work: ChunkWork) -> None:
        if runtime.cache is None:
            return
        keys = {}
        for item in work.undecided():
            ttl = cache_ttl_s(runtime.spec, item.request, runtime.settings.result_ttl_s)
            if ttl is not None:
                keys[item.request_id] = (cache_key(item.request, cache_scope(runtime.spec, item.tenant)), ttl)
        if keys:
            plan = CachePlan(runtime.cache, keys, runtime.worker_id)
            work.held |= set(keys) - plan.first_run()
            work.notes[ResponseCache] = plan

    def after_generate(self, runtime: WorkerRuntime, work: ChunkWork, generate: Generate) -> None:
        plan = work.notes.get(ResponseCache)
        if not isinstance(plan, CachePlan):
            return
        plan.store(work.outcomes, plan.mine)
        abandoned = plan.wait()
        if abandoned:
            late = {plan.leader[digest] for digest in abandoned}
            work.outcomes.update(generate([item for item in work.items if item.request_id in late]))
            plan.store(work.outcomes, abandoned)
        work.cached = plan.fill(work.outcomes)


class ResultHooks(Step):
    """The model's hooks' ``after_result``: an answer rewritten, or rejected with ``hook_error``."""

    def span_name(self, runtime: WorkerRuntime, work: ChunkWork, phase: str) -> str | None:
        return "inferpool.hooks.result" if runtime.hooks.hooks and phase == "after_generate" else None

    def after_generate(self, runtime: WorkerRuntime, work: ChunkWork, generate: Generate) -> None:
        hooks = runtime.hooks
        if not hooks.hooks:
            return
        for item in work.answered():
            outcome = work.outcomes[item.request_id]
            if isinstance(outcome, Generation):
                work.outcomes[item.request_id], seconds = hooks.after(item.request, outcome)
                work.hooks_s[item.request_id] = work.hooks_s.get(item.request_id, 0.0) + seconds


class Fallbacks(Step):
    """A request that failed moves on to the next model of its chain, as it arrived (the next model runs
    its own hooks), and gets no result here."""

    def after_generate(self, runtime: WorkerRuntime, work: ChunkWork, generate: Generate) -> None:
        policy = runtime.failures
        moving = [(original, outcome, target) for item in work.answered()
                  if isinstance(outcome := work.outcomes[item.request_id], RequestError)
                  and (target := policy.fallback_for(original := work.arrived[item.request_id], outcome))
                  is not None]  # fmt: skip
        policy.forward(work.chunk, moving)
        work.forwarded = {item.request_id for item, _, _ in moving}


class DeadLetters(Step):
    """Provider failures whose result this call wrote are kept in the dead-letter stream."""

    def after_write(self, runtime: WorkerRuntime, work: ChunkWork, written: Sequence[bool]) -> None:
        runtime.failures.dead_letter(work.chunk, work.to_write(), work.outcomes, written)


def default_steps() -> list[Step]:
    """The built-in steps, in the order each hook runs."""
    return [AbandonedRequests(), EndedBeforeRunning(), RequestHooks(), ModelLimits(), Streams(), ResponseCache(),
            ResultHooks(), Fallbacks(), DeadLetters()]  # fmt: skip
