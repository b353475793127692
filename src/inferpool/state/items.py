"""A batch job's item records (``job:{id}:items``): one per unanswered request, pending or in flight.

Each record is ``<served model>|<task item JSON>``, the JSON without the request id (the hash field
already says it) and without defaults, which is a third of an echo job's Redis memory at its peak. The
model prefix says which model holds the request
(whose per-model in-flight count it takes while dispatched), so whoever settles the request (its
result, or a fallback moving it) frees the right model's window without parsing the item. Lua scripts
that read records share ``LUA_ITEM_HOLDER``.
"""

from __future__ import annotations

from typing import NamedTuple

from pydantic_core import to_json

from inferpool.wire import AnyRequest, TaskItem

#: Lua: ``inflight_model(record)`` -> the served model a record is held by.
LUA_ITEM_HOLDER = """
local function inflight_model(record)
  return string.sub(record, 1, string.find(record, '|', 1, true) - 1)
end
"""


class PendingRecord(NamedTuple):
    """A request ready to queue: its id, the model holding it, its record, and its place in the model's
    pending set (its line number, or its prefix group key: ``inferpool.state.jobs``)."""

    request_id: str
    model: str
    record: bytes
    score: float = 0.0
    cost: str = ""  # the most it can cost, nano-USD ('REALTIME' or 'REALTIME,BATCH'), when the job has a budget


def item_json(request: AnyRequest, custom_id: str | None = None, tenant: str | None = None,
              warnings: list[str] | None = None, tried: list[str] | None = None) -> bytes:  # fmt: skip
    """A ``TaskItem``'s JSON as a record stores it (no request id, no defaults), from its parts: the upload of
    a big job makes one per line without building the ``TaskItem`` (``model_construct`` alone cost 10 us)."""
    parts = []
    if custom_id is not None:
        parts.append(b'"custom_id":' + to_json(custom_id))
    if tenant is not None:
        parts.append(b'"tenant":' + to_json(tenant))
    serializer = type(request).__pydantic_serializer__
    parts.append(b'"request":' + serializer.to_json(request, exclude_none=True, exclude_defaults=True))
    if warnings is not None:
        parts.append(b'"warnings":' + to_json(warnings))
    if tried is not None:
        parts.append(b'"tried":' + to_json(tried))
    return b"{" + b",".join(parts) + b"}"


def record_json(item: TaskItem) -> bytes:
    """The item as a record stores it: no request id, no defaults; bytes, as pydantic makes them."""
    return item_json(item.request, item.custom_id, item.tenant, item.warnings, item.tried)


def item_record(model: str, item: TaskItem) -> bytes:
    """The record of an item held by ``model`` (a registry name: never contains '|')."""
    return model.encode() + b"|" + record_json(item)


def held_by(record: bytes, model: str) -> bool:
    """Whether ``record`` is held by ``model`` (without decoding the record: a worker checks 500 per chunk)."""
    return record.startswith(model.encode() + b"|")


def split_record(record: bytes | str) -> tuple[str, str]:
    """(holding model, task item JSON) of a record."""
    text = record.decode() if isinstance(record, bytes) else record
    model, _, item_json = text.partition("|")
    return model, item_json


def item_from_record(request_id: str, record: bytes | str) -> TaskItem:
    """The item of ``request_id`` from its record; ``ValueError`` (pydantic's ``ValidationError``) if the record
    is not one. Validated straight from the record's bytes with the id spliced in (one copy of the prompt:
    a worker reads 500 of them per chunk)."""
    raw = record.encode() if isinstance(record, str) else record
    start = raw.index(b"|") + 2  # after "<model>|{"
    return TaskItem.model_validate_json(b'{"request_id":' + to_json(request_id) + b"," + raw[start:])
