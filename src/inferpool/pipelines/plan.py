"""Deciding a row's next steps: which of them can run now, and each one's line or why it ends without running.

The same code decides a row's first steps (the client loading rows) and its later ones (the driver in the
scheduler, as answers come back), so both agree on every rule:

- a step waits until every step it uses has an outcome for the row;
- a step any of whose steps failed (or was not run) is not run for the row (``upstream_failed``), and one any of
  whose steps was skipped is skipped too;
- a step whose ``when`` is false is skipped; one whose ``when`` or template cannot be evaluated for the row, or
  whose rendered request is not valid (unknown model, parameters out of range), is not run, with that error
  (``template_error``, or the request's own code) naming the row and step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from inferpool.constants import TEMPLATE_ERROR_CODE, UPSTREAM_FAILED_CODE
from inferpool.pipelines.spec import Pipeline, step_needs
from inferpool.state.items import PendingRecord
from inferpool.state.pipelines import NOT_RUN, SKIPPED, Decision
from inferpool.templates.prompt import UnrenderedRow
from inferpool.wire import ChatCompletion, ErrorInfo, RequestResult, StepOutcome

_WHEN = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


class LineMaker(Protocol):
    """Makes a rendered request body a line ready to queue (validated, routed, costed), or says why it cannot
    run: ``inferpool.client.batch_lines.BodyLines``."""

    def __call__(self, row: int, body: Mapping[str, Any]) -> PendingRecord | ErrorInfo: ...


def outcome_of(result: RequestResult, asks_json: bool) -> StepOutcome:
    """A step's outcome for a row from its line's result."""
    if result.error is not None:
        return StepOutcome(error=result.error, cost_usd=result.stats.cost_usd if result.stats else 0.0)
    response = result.response
    answer = finish = None
    usage = None
    if isinstance(response, ChatCompletion):
        usage = response.usage
        if response.choices:
            answer = response.choices[0].message.content
            finish = response.choices[0].finish_reason
    parsed: Any = None
    if asks_json and answer is not None:
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = None
    return StepOutcome(answer=answer, json=parsed, usage=usage, finish_reason=finish,
                       cost_usd=result.stats.cost_usd if result.stats else 0.0)  # fmt: skip


def outcome_json(outcome: StepOutcome) -> bytes:
    return outcome.model_dump_json(by_alias=True, exclude_defaults=True).encode()


def parse_outcome(raw: bytes | str) -> StepOutcome:
    return StepOutcome.model_validate_json(raw)


class RowPlanner:
    """Decides rows' steps for one pipeline (its steps' jobs named in ``jobs``)."""

    def __init__(self, pipeline: Pipeline, order: Sequence[str], jobs: Mapping[str, str], make_line: LineMaker) -> None:
        self.pipeline = pipeline
        self.order = list(order)
        self.jobs = dict(jobs)
        self.needs = step_needs(pipeline)
        self.asks_json = {step.name: step.asks_json() for step in pipeline.steps}
        self._templates = {step.name: step.compiled() for step in pipeline.steps}
        self._when = {step.name: _WHEN.compile_expression(step.when) for step in pipeline.steps
                      if step.when is not None}  # fmt: skip
        self._make_line = make_line

    def uses(self, step: str) -> bool:
        """Whether any step waits for ``step`` (else its answers decide nothing)."""
        return any(step in needs for needs in self.needs.values())

    def plan(self, row: int, columns: Mapping[str, Any] | Exception, outcomes: dict[str, StepOutcome],
             decided: set[str]) -> list[Decision]:  # fmt: skip
        """Decisions for the row's steps that can be decided now and were not (``decided``); ``outcomes`` (the
        row's steps' outcomes so far) gains those that end without running, so what depends on them follows."""
        decisions = []
        for name in self.order:
            if name in decided or not self.needs[name] <= outcomes.keys():
                continue
            if isinstance(columns, Exception):
                ended: StepOutcome | None = StepOutcome(error=ErrorInfo(
                    code=TEMPLATE_ERROR_CODE, message=f"row {row}: it could not be read: {columns}"))  # fmt: skip
            else:
                ended = self._upstream(name, outcomes)
            if ended is None:
                assert not isinstance(columns, Exception)
                made = self._line(name, row, columns, outcomes)
                if isinstance(made, PendingRecord):
                    decisions.append(Decision(row, name, self.jobs[name], line=made))
                    decided.add(name)
                    continue
                ended = made
            outcomes[name] = ended
            decided.add(name)
            kind = SKIPPED if ended.skipped else NOT_RUN
            decisions.append(Decision(row, name, self.jobs[name], kind=kind, outcome=outcome_json(ended)))
        return decisions

    def _upstream(self, name: str, outcomes: Mapping[str, StepOutcome]) -> StepOutcome | None:
        for need in sorted(self.needs[name]):
            error = outcomes[need].error
            if error is not None:
                return StepOutcome(error=ErrorInfo(code=UPSTREAM_FAILED_CODE, message=f"not run: step {need!r} "
                                                   f"failed for this row ({error.code}: {error.message})"))  # fmt: skip
        if any(outcomes[need].skipped for need in self.needs[name]):
            return StepOutcome(skipped=True)
        return None

    def _line(self, name: str, row: int, columns: Mapping[str, Any],
              outcomes: Mapping[str, StepOutcome]) -> PendingRecord | StepOutcome:  # fmt: skip
        context = {**columns, "row_number": row,
                   "steps": {need: outcomes[need].context() for need in self.needs[name]}}  # fmt: skip
        when = self._when.get(name)
        if when is not None:
            try:
                if not when(**context):
                    return StepOutcome(skipped=True)
            except Exception as exc:  # a row's data meeting the expression: that row's step error, never the driver's
                return _not_run(TEMPLATE_ERROR_CODE, f"row {row}, step {name!r}: its when cannot be evaluated: "
                                f"{type(exc).__name__}: {exc}")  # fmt: skip
        line = self._templates[name].line(row, context)
        if isinstance(line, UnrenderedRow):
            return _not_run(TEMPLATE_ERROR_CODE, f"step {name!r}: {line.message}")
        made = self._make_line(row, line["body"])
        if isinstance(made, ErrorInfo):
            return _not_run(made.code, f"row {row}, step {name!r}: {made.message}")
        return made


def _not_run(code: str, message: str) -> StepOutcome:
    return StepOutcome(error=ErrorInfo(code=code, message=message))


def stored_pipeline(raw: Mapping[str, str]) -> tuple[Pipeline, list[str], dict[str, str]]:
    """A pipeline's file, its steps' order and their jobs, from its hash (``PipelineStore.raw``)."""
    pipeline = Pipeline.model_validate_json(raw["spec"])
    order = raw["order"].split(",")
    return pipeline, order, {name: raw[f"job:{name}"] for name in order}
