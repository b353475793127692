"""Reading wire input safely: JSON from any bytes, and pydantic's errors as one line a user can act on."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Pydantic's errors as one line: ``body.messages: Field required; body.max_tokens: ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p not in ("str", "list[...]"))
        where = f"{prefix}.{where}" if prefix and where else (prefix or where or "line")
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown parameter; remove it"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def load_json(text: str | bytes) -> tuple[Any, str | None]:
    """(value, None), or (None, what is wrong) for any input: never raises, whatever the bytes.

    A lone UTF-16 surrogate (``"\\ud800"``) is refused: Python's parser accepts the escape, but no text holds
    it, so the request could be neither stored nor sent on (pydantic's parser refuses it too)."""
    try:
        value = json.loads(text)
        if _has_lone_surrogate(value):
            return None, "a string holds a lone UTF-16 surrogate escape (such as \\ud800), which is not text"
        return value, None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        return None, f"not usable JSON ({exc})"
    except RecursionError:
        return None, "JSON nested too deeply to read"


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a surrogate code point in any string (key or value)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False
