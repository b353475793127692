"""Reading an OpenAI Batch JSONL file line by line, with a clear error for each bad line.

A bad line never stops the others: it becomes a ``RejectedLine`` with an error code and a message that
says what to fix, and ends up as an error line in the output.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from inferpool._exceptions import RequestError
from inferpool.affinity.prefix import group_key
from inferpool.client.routing import Router
from inferpool.constants import TEMPLATE_ERROR_CODE, split_adapter
from inferpool.model_registry.costs import line_costs
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.items import PendingRecord, item_json
from inferpool.templates.prompt import UnrenderedRow
from inferpool.wire import (
    CHAT_COMPLETIONS_URL,
    REQUEST_TYPES,
    AnyRequest,
    BatchInputLine,
    ChatRequest,
    ErrorInfo,
    InferenceRequest,
    describe_validation_error,
    load_json,
    new_id,
    supported_urls_text,
)

#: Default cap on one input line, in bytes.
MAX_LINE_BYTES = 1_000_000


class _AnyBatchLine(BatchInputLine):
    """A batch line whose body is a request of any kind (its ``url`` must name that kind's endpoint)."""

    body: InferenceRequest  # type: ignore[assignment]  # narrows BatchInputLine.body from a plain dict


@dataclass(frozen=True)
class AcceptedLine:
    line_number: int
    custom_id: str
    request: AnyRequest
    spec: ModelSpec
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RejectedLine:
    line_number: int
    custom_id: str | None
    error: ErrorInfo


ParsedLine = AcceptedLine | RejectedLine


class BatchLineParser:
    """Turns raw lines into accepted requests (routed) or rejected lines, tracking duplicate ids."""

    def __init__(self, router: Router, *, max_line_bytes: int = MAX_LINE_BYTES,
                 allowed: Collection[str] | None = None) -> None:  # fmt: skip
        self.router = router
        self.allowed = allowed  # the only models lines may use (a gateway key's); None: any
        self.max_line_bytes = max_line_bytes
        self._seen: dict[str, int] = {}

    def parse(self, lines: Iterable[str | bytes | UnrenderedRow]) -> Iterator[ParsedLine]:
        """Lines as text, or as the file's bytes (then never decoded in Python: pydantic reads UTF-8); a
        template's row that could not be rendered is its line's ``template_error``."""
        for number, raw in enumerate(lines, start=1):
            if isinstance(raw, UnrenderedRow):
                if raw.custom_id is not None:
                    self._seen.setdefault(raw.custom_id, number)
                yield RejectedLine(number, raw.custom_id, ErrorInfo(code=TEMPLATE_ERROR_CODE, message=raw.message))
            elif raw and not raw.isspace():  # not ``raw.strip()``: that copies every line to test for blanks
                yield self.parse_line(number, raw)

    def parse_line(self, number: int, raw: str | bytes) -> ParsedLine:
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        if size > self.max_line_bytes:
            return _reject(number, "line_too_large",
                           f"{size} bytes, over the limit of {self.max_line_bytes}; split the prompt")  # fmt: skip
        try:  # the common case, a good line: parsed and validated in one pass (pydantic's Rust JSON parser)
            line = _AnyBatchLine.model_validate_json(raw)
        except ValidationError:
            return self._parse_bad_line(number, raw)  # the slow path, which says exactly what is wrong
        if line.body.url != line.url and line.url in REQUEST_TYPES:
            return self._parse_bad_line(number, raw)  # a body of another kind than its url: said exactly there
        refused = self._refuse_id_or_url(number, line.custom_id, line.url)
        return refused or self._route(number, line.custom_id, line.body)

    def parse_body(self, number: int, custom_id: str, body: Mapping[str, Any]) -> ParsedLine:
        """A chat body made by a template (a pipeline step's), validated and routed. No custom_id bookkeeping (a
        resumed pipeline renders a row again) and no ``line N:`` in messages: the caller says where it is."""
        try:
            request = ChatRequest.model_validate(body)
        except ValidationError as exc:
            return RejectedLine(number, custom_id, ErrorInfo(code="invalid_request",
                                                             message=describe_validation_error(exc)))  # fmt: skip
        parsed = self._route(number, custom_id, request)
        if isinstance(parsed, RejectedLine):
            message = parsed.error.message.removeprefix(f"line {number}: ")
            return RejectedLine(number, custom_id, ErrorInfo(code=parsed.error.code, message=message))
        return parsed

    def _parse_bad_line(self, number: int, raw: str | bytes) -> ParsedLine:
        data, problem = load_json(raw)
        if problem is not None:
            return _reject(number, "invalid_json", f"{problem}; each line must be one JSON object")
        if not isinstance(data, dict):
            return _reject(number, "invalid_json",
                           "each line must be a JSON object with custom_id, method, url and body")  # fmt: skip
        raw_id = data.get("custom_id")
        custom_id = raw_id if isinstance(raw_id, str) and raw_id else None
        if custom_id is None:
            return _reject(number, "missing_custom_id",
                           "custom_id is missing or not a non-empty string; give each line a unique one")  # fmt: skip
        url = data.get("url")
        refused = self._refuse_id_or_url(number, custom_id, url if isinstance(url, str) else CHAT_COMPLETIONS_URL)
        if refused is not None:
            return refused
        try:
            line = BatchInputLine.model_validate(data)
        except ValidationError as exc:
            in_body = all(err["loc"][:1] == ("body",) for err in exc.errors())
            code = "invalid_request" if in_body else "invalid_line"
            return _reject(number, code, describe_validation_error(exc), custom_id)
        try:
            request = REQUEST_TYPES[line.url].model_validate(line.body)
        except ValidationError as exc:
            return _reject(number, "invalid_request", describe_validation_error(exc, prefix="body"), custom_id)
        return self._route(number, custom_id, request)

    def _refuse_id_or_url(self, number: int, custom_id: str, url: str) -> RejectedLine | None:
        first = self._seen.setdefault(custom_id, number)
        if first != number:
            return _reject(number, "duplicate_custom_id",
                           f"custom_id {custom_id!r} was already used on line {first}; make it unique",
                           custom_id)  # fmt: skip
        if url not in REQUEST_TYPES:
            return _reject(number, "unsupported_url", f"url {url!r} is not supported; use one of "
                           f"{supported_urls_text()}", custom_id)  # fmt: skip
        return None

    def _route(self, number: int, custom_id: str, request: AnyRequest) -> ParsedLine:
        if request.stream:
            return _reject(number, "invalid_request",
                           "stream is not supported in batch jobs (their answers are read from the output file); "
                           "remove it", custom_id)  # fmt: skip
        try:
            route = self.router.route(request, self.allowed)
        except RequestError as exc:
            return _reject(number, exc.code, exc.message, custom_id)
        if self.allowed is not None and route.spec.name not in self.allowed:
            return _reject(number, "model_not_found", f"The model `{request.model}` does not exist or you do not have "
                           "access to it.", custom_id)  # fmt: skip
        if request.model != route.model:  # an alias or a deprecated model: carry the canonical name
            request = request.model_copy(update={"model": route.model})
        return AcceptedLine(number, custom_id, request, route.spec, route.warnings)


def pending_record(
    parsed: AcceptedLine,
    *,
    number: float,
    tenant: str | None,
    routing: str | None = None,
    cache: bool | None = None,
    costed: bool = False,
) -> PendingRecord:
    """An accepted line as a request ready to queue: a new request id, the item its worker reads, its place in the
    model's pending set (``number``, or its prefix group key under prefix routing: a document's questions wait
    together), and the most it can cost when its job has a budget."""
    request = parsed.request
    if cache is not None and request.cache is None:
        request = request.model_copy(update={"cache": cache})
    model = split_adapter(request.model)[0]
    record = item_json(request, parsed.custom_id, tenant, list(parsed.warnings) or None)
    score = group_key(request) if (routing or parsed.spec.routing) == "prefix" else number
    cost = line_costs(parsed.spec, request) if costed else ""
    return PendingRecord(new_id("req"), model, model.encode() + b"|" + record, score, cost)


def _reject(number: int, code: str, message: str, custom_id: str | None = None) -> RejectedLine:
    return RejectedLine(number, custom_id, ErrorInfo(code=code, message=f"line {number}: {message}"))


class BodyLines:
    """Request bodies a template made (a pipeline step's, for a row) as lines ready to queue, or the error that
    stops each: what ``inferpool.pipelines.plan.RowPlanner`` is given to make lines (it never imports the client)."""

    def __init__(self, router: Router, *, tenant: str | None, costed: bool,
                 allowed: Collection[str] | None = None) -> None:  # fmt: skip
        self._parser = BatchLineParser(router, allowed=allowed)
        self._tenant = tenant
        self._costed = costed

    def __call__(self, row: int, body: Mapping[str, Any]) -> PendingRecord | ErrorInfo:
        parsed = self._parser.parse_body(row, str(row), body)
        if isinstance(parsed, RejectedLine):
            return parsed.error
        try:
            return pending_record(parsed, number=row, tenant=self._tenant, costed=self._costed)
        except PydanticSerializationError:  # text no JSON can carry: a lone surrogate from a row or an answer
            return ErrorInfo(code="invalid_request", message="the rendered request holds text that is not valid "
                             "Unicode (a lone surrogate); clean that row's data")  # fmt: skip
