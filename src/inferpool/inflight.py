"""A batch job's item records (``job:{id}:items``): one per unanswered request, pending or in flight.

Each record is ``<served model>|<task item JSON>``: the model prefix says which model holds the request
(whose per-model in-flight count it takes while dispatched), so whoever settles the request (its
result, or a fallback moving it) frees the right model's window without parsing the item. Lua scripts
that read records share ``LUA_INFLIGHT_MODEL``.
"""

from __future__ import annotations

from inferpool.wire import TaskItem

#: Lua: ``inflight_model(record)`` -> the served model a record is held by.
LUA_INFLIGHT_MODEL = """
local function inflight_model(record)
  return string.sub(record, 1, string.find(record, '|', 1, true) - 1)
end
"""


def inflight_record(model: str, item_json: str) -> str:
    """The record of an item held by ``model`` (a registry name: never contains '|')."""
    return f"{model}|{item_json}"


def split_record(record: bytes | str) -> tuple[str, str]:
    """(holding model, task item JSON) of a record."""
    text = record.decode() if isinstance(record, bytes) else record
    model, _, item_json = text.partition("|")
    return model, item_json


def inflight_item(record: bytes | str) -> TaskItem:
    return TaskItem.model_validate_json(split_record(record)[1])
