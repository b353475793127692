"""One input through a chain of prompt steps, as single requests: ``client.chain(steps, inputs)``.

The steps are a pipeline's (``inferpool.pipelines.spec``: each a prompt template that may use the input's fields
and earlier steps' ``steps.<name>.answer``, ``.json``, ``.usage``, ``.finish_reason``; ``when`` skips a step), and
the same rules decide what runs (``RowPlanner``): steps whose inputs are answered run at once, in parallel, as
ordinary single requests (priority, budgets and key limits apply as to any). ``stream=True`` streams the last
step's tokens once the steps before it are answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from inferpool._exceptions import request_error_from_code
from inferpool.client.batch_lines import BatchLineParser, RejectedLine
from inferpool.pipelines.plan import RowPlanner, outcome_of
from inferpool.pipelines.spec import Pipeline, load_pipeline
from inferpool.state.items import PendingRecord
from inferpool.wire import AnyRequest, ChatCompletionChunk, ErrorInfo, StepOutcome, new_id

if TYPE_CHECKING:
    from inferpool.client.client import AsyncClient, Client
    from inferpool.client.routing import Router

ChainSteps = Sequence[Mapping[str, Any]] | Mapping[str, Any] | Pipeline


class ChainResult(BaseModel):
    """Each step's outcome (None for a step that never came to be decided), and the last step's answer."""

    steps: dict[str, StepOutcome | None]
    answer: str | None = None


class _Requests:
    """The ``LineMaker`` of a chain: each rendered body validated and routed as a batch line would be, the request
    kept to be submitted as a single request."""

    def __init__(self, router: Router) -> None:
        self._parser = BatchLineParser(router)
        self.requests: dict[str, AnyRequest] = {}

    def __call__(self, row: int, body: Mapping[str, Any]) -> PendingRecord | ErrorInfo:
        parsed = self._parser.parse_body(row, "chain", body)
        if isinstance(parsed, RejectedLine):
            return parsed.error
        record = PendingRecord(new_id("req"), parsed.spec.name, b"")
        self.requests[record.request_id] = parsed.request
        return record


class _Chain:
    """A chain's state between rounds: what each round can run, and the outcomes so far."""

    def __init__(self, router: Router, steps: ChainSteps, inputs: Mapping[str, Any]) -> None:
        given = steps.model_dump() if isinstance(steps, Pipeline) else steps
        spec, order = load_pipeline({"steps": list(given)} if isinstance(given, Sequence) else given, list(inputs))
        self.requests = _Requests(router)
        self.planner = RowPlanner(spec, order, dict.fromkeys(order, ""), self.requests)
        self.inputs = dict(inputs)
        self.outcomes: dict[str, StepOutcome] = {}
        self._decided: set[str] = set()

    @property
    def last(self) -> str:
        return self.planner.order[-1]

    def ready(self) -> dict[str, AnyRequest]:
        """The steps that can run now (their requests); those that end without running are settled here."""
        decisions = self.planner.plan(1, self.inputs, self.outcomes, self._decided)
        return {d.step: self.requests.requests.pop(d.line.request_id) for d in decisions if d.line is not None}

    def settle(self, step: str, outcome: StepOutcome) -> None:
        self.outcomes[step] = outcome

    def outcome_of(self, step: str, result: Any) -> StepOutcome:
        return outcome_of(result, self.planner.asks_json[step])

    def result(self) -> ChainResult:
        last = self.outcomes.get(self.last)
        return ChainResult(steps={name: self.outcomes.get(name) for name in self.planner.order},
                           answer=last.answer if last else None)  # fmt: skip

    def last_error(self) -> Exception:
        outcome = self.outcomes.get(self.last)
        if outcome is not None and outcome.error is not None:
            return request_error_from_code(outcome.error.code, outcome.error.message)
        return request_error_from_code("invalid_request", f"step {self.last!r} was skipped: its when was false, or "
                                       "a step it uses was skipped")  # fmt: skip


def run_chain(client: Client, steps: ChainSteps, inputs: Mapping[str, Any], *,
              timeout: float | None = None) -> ChainResult:  # fmt: skip
    chain = _Chain(client.router, steps, inputs)
    while ready := chain.ready():
        handles = {step: client.submit(request) for step, request in ready.items()}
        for step, handle in handles.items():
            chain.settle(step, chain.outcome_of(step, handle.result(timeout)))
    return chain.result()


def stream_chain(client: Client, steps: ChainSteps, inputs: Mapping[str, Any], *,
                 timeout: float | None = None) -> Iterator[ChatCompletionChunk]:  # fmt: skip
    chain = _Chain(client.router, steps, inputs)
    while ready := chain.ready():
        if chain.last in ready:
            request = ready.pop(chain.last).model_copy(update={"stream": True})
            yield from client.submit(request).stream(timeout)
            return
        handles = {step: client.submit(request) for step, request in ready.items()}
        for step, handle in handles.items():
            chain.settle(step, chain.outcome_of(step, handle.result(timeout)))
    raise chain.last_error()


async def run_chain_async(client: AsyncClient, steps: ChainSteps, inputs: Mapping[str, Any], *,
                          timeout: float | None = None) -> ChainResult:  # fmt: skip
    chain = _Chain(client.router, steps, inputs)
    while ready := chain.ready():
        handles = {step: await client.submit(request) for step, request in ready.items()}
        for step, handle in handles.items():
            chain.settle(step, chain.outcome_of(step, await handle.result(timeout)))
    return chain.result()


async def stream_chain_async(client: AsyncClient, steps: ChainSteps, inputs: Mapping[str, Any], *,
                             timeout: float | None = None) -> AsyncIterator[ChatCompletionChunk]:  # fmt: skip
    chain = _Chain(client.router, steps, inputs)
    while ready := chain.ready():
        if chain.last in ready:
            request = ready.pop(chain.last).model_copy(update={"stream": True})
            async for chunk in (await client.submit(request)).stream(timeout):
                yield chunk
            return
        handles = {step: await client.submit(request) for step, request in ready.items()}
        for step, handle in handles.items():
            chain.settle(step, chain.outcome_of(step, await handle.result(timeout)))
    raise chain.last_error()
