"""A pipeline file: named steps, each a prompt template over a row's columns and the answers of earlier steps.

::

    steps:
      - name: translate
        model: smollm2-135m
        params: {temperature: 0, max_tokens: 64}
        messages: [{role: user, content: "Translate to French: {{ text }}"}]
      - name: summarize
        model: smollm2-135m
        when: "steps.translate.finish_reason == 'stop'"      # optional: a Jinja expression; false skips the row
        messages: [{role: user, content: "Summarise in five words: {{ steps.translate.answer }}"}]

A step's templates (messages, model, ``when``) see the row's columns, ``row_number`` and ``steps.<name>`` of the
steps it uses: ``.answer`` (the text), ``.usage``, ``.finish_reason`` and, for a step that asks for
``response_format: json_object`` or ``json_schema``, ``.json`` (the parsed answer). A step depends on the steps
its templates name (and on any listed in ``after:``): the steps form a graph, not only a line. The file is checked
before anything runs: YAML and template syntax, duplicate or unknown step names, cycles, a ``.json`` of a step
that does not ask for JSON, and, given the rows' columns, every variable no column or step provides; each error
names the step and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inferpool._exceptions import TemplateError
from inferpool.templates.prompt import PromptTemplate
from inferpool.wire import VIA_CHOICES

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: What a step's templates may read of an earlier step.
STEP_FIELDS = ("answer", "usage", "finish_reason", "json", "error")
#: Names every row provides besides its columns.
ROW_NAMES = frozenset({"row_number", "steps"})
_ENV = jinja2.Environment(autoescape=False)  # parsing only: rendering goes through the templates' sandbox


class PipelineStep(PromptTemplate):
    """One step: a prompt template with a name, an optional condition and the steps it must wait for."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="How later steps refer to it: steps.<name>.answer.")
    when: str | None = Field(default=None, description="A Jinja expression; false (or an error) skips the row.")
    after: list[str] = Field(default_factory=list, description="Steps to wait for besides those its templates name.")
    via: str | None = Field(default=None, description="realtime (the default: rows flow) or provider-batch (the "
                            "provider's Batch API at its price: the step's lines go once every row reached it), or "
                            "auto, as for batch jobs.")  # fmt: skip

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} is not a step name (letters, digits and '_', not starting with a digit)")
        return value

    @field_validator("via")
    @classmethod
    def _valid_via(cls, value: str | None) -> str | None:
        if value is not None and value not in VIA_CHOICES:
            raise ValueError(f"via {value!r} is not one of {', '.join(VIA_CHOICES)}")
        return value

    def asks_json(self) -> bool:
        response_format = self.params.get("response_format")
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        return kind in ("json_object", "json_schema")

    def sources(self) -> dict[str, str]:
        """Each template of the step (field name -> Jinja source), ``when`` as an expression."""
        out = {"model": self.model, "custom_id": self.custom_id}
        out.update({f"messages[{i}].content": message.content for i, message in enumerate(self.messages)})
        if self.when is not None:
            out["when"] = "{{ " + self.when + " }}"
        return out


class Pipeline(BaseModel):
    """A pipeline file's contents, checked (``load_pipeline``); ``order`` is a topological order of its steps."""

    model_config = ConfigDict(extra="forbid")
    steps: list[PipelineStep] = Field(min_length=1)

    def step(self, name: str) -> PipelineStep:
        return next(step for step in self.steps if step.name == name)


class StepUse(BaseModel):
    """What one step's templates read: row variables, and which fields of which steps."""

    variables: set[str] = Field(default_factory=set)
    steps: dict[str, set[str]] = Field(default_factory=dict)


def _uses(step: PipelineStep) -> StepUse:
    use = StepUse()
    for field, source in step.sources().items():
        try:
            tree = _ENV.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"step {step.name!r}, {field}: template syntax error: {exc.message}") from None
        use.variables |= _free_names(tree)
        for node in tree.find_all(jinja2.nodes.Getattr):
            if isinstance(node.node, jinja2.nodes.Name) and node.node.name == "steps":
                use.steps.setdefault(node.attr, set())
        for node in tree.find_all(jinja2.nodes.Getattr):
            inner = node.node
            if (isinstance(inner, jinja2.nodes.Getattr) and isinstance(inner.node, jinja2.nodes.Name)
                    and inner.node.name == "steps"):  # fmt: skip
                use.steps.setdefault(inner.attr, set()).add(node.attr)
        for item in tree.find_all(jinja2.nodes.Getitem):
            if isinstance(item.node, jinja2.nodes.Name) and item.node.name == "steps":
                raise TemplateError(f"step {step.name!r}, {field}: write steps.<name>, not steps[...]: the steps a "
                                    "template uses must be known before it runs")  # fmt: skip
    return use


def _free_names(tree: jinja2.nodes.Template) -> set[str]:
    return set(jinja2.meta.find_undeclared_variables(tree))


def check_pipeline(pipeline: Pipeline, columns: Iterable[str] | None = None) -> list[str]:
    """A topological order of the steps; ``TemplateError`` naming step and field for anything that cannot run."""
    names = [step.name for step in pipeline.steps]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise TemplateError(f"step names must differ: {', '.join(twice)} given more than once")
    known = set(names)
    needs: dict[str, set[str]] = {}
    for step in pipeline.steps:
        use = _uses(step)
        for name, fields in use.steps.items():
            if name not in known:
                raise TemplateError(f"step {step.name!r} uses steps.{name}, but no step is called {name!r}; steps: "
                                    f"{', '.join(names)}")  # fmt: skip
            unknown = sorted(fields - set(STEP_FIELDS))
            if unknown:
                raise TemplateError(f"step {step.name!r} uses steps.{name}.{unknown[0]}; a step offers "
                                    f"{', '.join(STEP_FIELDS)}")  # fmt: skip
            if "json" in fields and not pipeline.step(name).asks_json():
                raise TemplateError(f"step {step.name!r} uses steps.{name}.json, but step {name!r} does not ask for "
                                    "JSON (response_format: json_object or json_schema)")  # fmt: skip
        for name in step.after:
            if name not in known:
                raise TemplateError(f"step {step.name!r}: after names {name!r}, which is not a step")
        if columns is not None:
            missing = sorted(use.variables - set(columns) - ROW_NAMES)
            if missing:
                raise TemplateError(f"step {step.name!r} uses {', '.join(missing)}, which the rows do not have "
                                    f"(columns: {', '.join(sorted(columns)) or 'none'})")  # fmt: skip
        needs[step.name] = set(use.steps) | set(step.after)
    return _order(needs, names)


def step_needs(pipeline: Pipeline) -> dict[str, set[str]]:
    """The steps each step waits for (those its templates name, and its ``after``)."""
    return {step.name: set(_uses(step).steps) | set(step.after) for step in pipeline.steps}


def _order(needs: Mapping[str, set[str]], names: Sequence[str]) -> list[str]:
    """Kahn's algorithm in file order; a cycle is an error naming it."""
    order: list[str] = []
    waiting = {name: set(needs[name]) for name in names}
    while waiting:
        ready = [name for name in names if name in waiting and not waiting[name] - set(order)]
        if not ready:
            cycle = _cycle(waiting)
            raise TemplateError(f"the steps depend on each other in a circle: {' -> '.join(cycle)}")
        for name in ready:
            order.append(name)
            del waiting[name]
    return order


def _cycle(waiting: Mapping[str, set[str]]) -> list[str]:
    start = next(iter(waiting))
    path = [start]
    while True:
        nxt = next(iter(sorted(waiting[path[-1]] & set(waiting))))
        if nxt in path:
            return [*path[path.index(nxt) :], nxt]
        path.append(nxt)


def load_pipeline(source: str | Path | Mapping[str, Any], columns: Iterable[str] | None = None) -> tuple[
        Pipeline, list[str]]:  # fmt: skip
    """A pipeline file (path, YAML text or mapping) checked, with its steps' order; ``TemplateError`` otherwise."""
    where = "pipeline"
    data: Any = source
    if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))
    ):
        path = Path(source)
        where = str(path)
        try:
            data = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"{where}: cannot read the pipeline file: {exc}") from None
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data)
        except (yaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
            raise TemplateError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{where}: the top level must be a mapping with a 'steps' list")
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(part) for part in first["loc"])
        raise TemplateError(f"{where}: {at}: {first['msg']}") from None
    return pipeline, check_pipeline(pipeline, columns)
