"""The records of a batch job's dispatched, unanswered requests (``job:{id}:inflight``).

Each record is ``<served model>|<task item JSON>``: the model prefix says whose per-model in-flight count
the request holds, so whoever settles the request (its result, or a fallback moving it) frees the right
model's window without parsing the item. Lua scripts that touch the records share ``LUA_INFLIGHT_MODEL``.
"""

from __future__ import annotations

from inferpool.wire import TaskItem

#: Lua: ``inflight_model(record)`` -> the served model a record is counted under. A record that starts
#: with '{' was written before the prefix existed (the item's own model, less any ``:adapter``).
LUA_INFLIGHT_MODEL = """
local function inflight_model(record)
  if string.sub(record, 1, 1) == '{' then
    return string.match(cjson.decode(record)['request']['model'], '^[^:]+')
  end
  return string.sub(record, 1, string.find(record, '|', 1, true) - 1)
end
"""


def inflight_record(model: str, item_json: str) -> str:
    """The record of an item dispatched to ``model`` (a registry name: never contains '|')."""
    return f"{model}|{item_json}"


def inflight_item_json(record: bytes | str) -> str:
    """The task item JSON inside a record."""
    text = record.decode() if isinstance(record, bytes) else record
    return text if text.startswith("{") else text.partition("|")[2]


def inflight_item(record: bytes | str) -> TaskItem:
    return TaskItem.model_validate_json(inflight_item_json(record))


def inflight_model(record: bytes | str) -> str:
    """The served model a record is counted under (see ``LUA_INFLIGHT_MODEL``)."""
    text = record.decode() if isinstance(record, bytes) else record
    return TaskItem.model_validate_json(text).served_model if text.startswith("{") else text.partition("|")[0]
