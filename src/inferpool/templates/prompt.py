"""A prompt template: the model, its parameters and messages whose contents are Jinja2 templates.

::

    model: smollm2-135m
    temperature: 0                         # request parameters as in an OpenAI body (or under params:)
    max_tokens: 64
    custom_id: "{{ id }}"                  # optional; default "row-{{ row_number }}" (1-based)
    messages:
      - {role: system, content: "Answer in one word."}
      - {role: user, content: "Capital of {{ country }}?"}

Templates render in Jinja's sandbox (no attribute tricks, no file access) with undefined variables as
errors, so a row without a column the template uses is that row's error, naming the row and the column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferpool._exceptions import TemplateError
from inferpool.wire import CHAT_COMPLETIONS_URL, ChatRequest

DEFAULT_CUSTOM_ID = "row-{{ row_number }}"
#: Job metadata key holding the custom_id template of a job made from a template (to join results back).
CUSTOM_ID_METADATA = "inferpool_custom_id"
_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")
_ENVIRONMENT = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


class TemplateMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(min_length=1)
    content: str = Field(description="A Jinja2 template over the row's columns.")


class PromptTemplate(BaseModel):
    """What a template file holds; ``model`` and ``custom_id`` are templates too."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Request fields besides model and messages; they may also be given at the top level, as in "
        "an OpenAI request body.",
    )
    messages: list[TemplateMessage] = Field(min_length=1)
    custom_id: str = Field(default=DEFAULT_CUSTOM_ID, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _top_level_params(cls, data: Any) -> Any:
        """Request parameters written beside ``model`` (mirroring an OpenAI body) go into ``params``."""
        if not isinstance(data, dict):
            return data
        own = set(cls.model_fields)
        body_fields = set(ChatRequest.model_fields) - {"model", "messages"}
        moved = {key: value for key, value in data.items() if key not in own and key in body_fields}
        if not moved:
            return data
        params = data.get("params") or {}
        if not isinstance(params, dict):
            return data  # the field's own validation says what is wrong
        twice = sorted(set(moved) & set(params))
        if twice:
            raise ValueError(f"{', '.join(twice)} given both at the top level and under params; keep one")
        return {**{k: v for k, v in data.items() if k not in moved}, "params": {**params, **moved}}

    def compiled(self) -> CompiledTemplate:
        """The template with every field compiled; ``TemplateError`` names the field with bad syntax."""
        for name in ("model", "messages"):
            if name in self.params:
                raise TemplateError(f"params.{name}: give {name} at the top of the template, not in params")
        fields = {"model": self.model, **{f"messages[{i}].content": m.content for i, m in enumerate(self.messages)}}
        compiled = {where: _compile(where, text) for where, text in fields.items()}
        return CompiledTemplate(self, compiled, RowCustomIds(self.custom_id))


def _compile(where: str, text: str) -> jinja2.Template:
    try:
        return _ENVIRONMENT.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{where}: Jinja syntax error on line {exc.lineno}: {exc.message}") from exc


def _render(template: jinja2.Template, where: str, row_number: int, row: Mapping[str, Any]) -> str:
    try:
        return template.render({**row, "row_number": row_number})
    except jinja2.UndefinedError as exc:
        found = _UNDEFINED_NAME.search(str(exc.message))
        if found:
            raise _RowProblem(f"column {found.group(1)!r} is missing (used in {where})") from exc
        raise _RowProblem(f"{where}: {exc.message}") from exc
    except jinja2.TemplateError as exc:  # SecurityError and friends: the row's data met the sandbox
        raise _RowProblem(f"{where} cannot be rendered: {exc}") from exc
    except (TypeError, ValueError, ArithmeticError) as exc:  # a filter given a value it cannot take
        raise _RowProblem(f"{where} cannot be rendered with this row: {type(exc).__name__}: {exc}") from exc


class RowCustomIds:
    """Each row's custom_id from a custom_id template: what a template job's lines are named by, and what
    ``--join`` matches results to rows with (from the template kept in the job's metadata)."""

    def __init__(self, text: str) -> None:
        self._template = _compile("custom_id", text)

    def of(self, row_number: int, row: Mapping[str, Any] | Exception) -> str | UnrenderedRow:
        """Row ``row_number``'s custom_id, or why it has none."""
        try:
            if isinstance(row, Exception):
                raise _RowProblem(str(row))
            return _render(self._template, "custom_id", row_number, row).strip()
        except _RowProblem as problem:
            return UnrenderedRow(None, f"row {row_number}: {problem}")


@dataclass(frozen=True)
class UnrenderedRow:
    """A row the template could not be rendered with: it becomes its batch line's ``template_error``."""

    custom_id: str | None
    message: str


@dataclass(frozen=True)
class CompiledTemplate:
    template: PromptTemplate
    fields: dict[str, jinja2.Template]
    custom_ids: RowCustomIds

    def line(self, row_number: int, row: Mapping[str, Any] | Exception) -> dict[str, Any] | UnrenderedRow:
        """Row ``row_number`` (1-based) as a batch line, or what stopped it."""
        custom_id = self.custom_ids.of(row_number, row)
        if isinstance(custom_id, UnrenderedRow):
            return custom_id
        assert not isinstance(row, Exception)  # a row that could not be read has no custom_id either
        try:
            messages = [{"role": m.role, "content": self._render(f"messages[{i}].content", row_number, row)}
                        for i, m in enumerate(self.template.messages)]  # fmt: skip
            body = {"model": self._render("model", row_number, row).strip(), "messages": messages,
                    **self.template.params}  # fmt: skip
        except _RowProblem as problem:
            return UnrenderedRow(custom_id, f"row {row_number}: {problem}")
        return {"custom_id": custom_id, "method": "POST", "url": CHAT_COMPLETIONS_URL, "body": body}

    def lines(self, rows: Iterable[Mapping[str, Any] | Exception]) -> Iterator[str | UnrenderedRow]:
        """Every row as a JSONL line (or an ``UnrenderedRow``), in order."""
        for number, row in enumerate(rows, start=1):
            line = self.line(number, row)
            yield line if isinstance(line, UnrenderedRow) else json.dumps(line, ensure_ascii=False)

    def _render(self, where: str, row_number: int, row: Mapping[str, Any]) -> str:
        return _render(self.fields[where], where, row_number, row)


class _RowProblem(Exception):
    pass


def load_template(source: str | Path | PromptTemplate | Mapping[str, Any]) -> PromptTemplate:
    """A template from a YAML (or JSON) file path, a mapping, or as given; ``TemplateError`` says what
    is wrong."""
    if isinstance(source, PromptTemplate):
        return source
    where = "the template"
    if isinstance(source, str | Path):
        where = str(source)
        try:
            data = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        except OSError as exc:
            raise TemplateError(f"cannot read template {source}: {exc.strerror}") from exc
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise TemplateError(f"{source} is not a YAML template: {exc}") from exc
    else:
        data = dict(source)
    if not isinstance(data, dict):
        raise TemplateError(f"{where}: a template is a mapping with model, messages and optional params")
    try:
        return PromptTemplate.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'template'}: {_problem(e)}" for e in exc.errors())
        raise TemplateError(f"{where}: {problems}") from exc


def _problem(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return ("not a template field nor a chat request parameter (a template has model, messages, custom_id "
                "and the request's parameters, at the top level or under params)")  # fmt: skip
    return str(error["msg"])
