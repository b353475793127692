"""One bounded JSON request to a detection source (stdlib only: detection needs no SDK).

Whatever the source answers (any bytes, a body of gigabytes, JSON nested a million deep) ends as parsed
JSON or a ``DetectionError`` that names the URL: a worker detecting its model at start never crashes on it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from inferpool._exceptions import DetectionError
from inferpool.detection.base import MAX_BODY_BYTES


def request_json(url: str, *, headers: dict[str, str] | None = None, body: Any = None, timeout_s: float = 10.0,
                 missing_ok: bool = False, max_bytes: int = MAX_BODY_BYTES) -> Any:  # fmt: skip
    """The JSON body of ``GET url`` (``POST`` when ``body`` is given). ``missing_ok``: a 404 returns ``None``."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    for name, value in {"accept": "application/json", **(headers or {})}.items():
        request.add_header(name, value)
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and missing_ok:
            return None
        raise DetectionError(f"{url}: HTTP {exc.code} {_reason(exc)}{_hint(exc.code)}") from None
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DetectionError(f"cannot reach {url}: {reason}") from None
    except Exception as exc:  # http.client's errors on a garbled status line or headers (RemoteDisconnected...)
        raise DetectionError(f"{url}: not a usable HTTP answer ({type(exc).__name__}: {exc})") from None
    if len(raw) > max_bytes:
        raise DetectionError(f"{url}: the answer is larger than {max_bytes // (1024 * 1024)} MB; no models list is "
                             "that large, so it is not read")  # fmt: skip
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DetectionError(f"{url}: the answer is not JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


def _reason(exc: urllib.error.HTTPError) -> str:
    """The provider's error message if its body says one (bounded), else the status's reason."""
    try:
        body = json.loads(exc.read(64 * 1024) or b"{}")
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            return f"({message[:200]})"
    except Exception:  # an error body is optional decoration; the status says enough
        pass
    return f"({exc.reason})"


def _hint(status: int) -> str:
    if status in (401, 403):
        return "; check the model's API key (its api_key_env or api_key_file)"
    return ""


def expect(value: Any, kind: type, where: str) -> Any:
    """``value`` if it is a ``kind`` (dict, list, str...), else a ``DetectionError`` saying what ``where`` was."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DetectionError(f"{where} should be a {kind.__name__}, not {type(value).__name__}")
    return value


def optional_int(value: Any) -> int | None:
    """An integer field a source may give (a JSON number, maybe a float like 4096.0); anything else: unknown.
    Too large numbers are kept, so the ``Detection`` refuses them with the field's name."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e300:
        return int(value)
    return None
