"""Anthropic's models API: ``GET /v1/models`` (paginated by ``after_id``) and ``GET /v1/models/{id}``.

Each ``ModelInfo`` carries the id and, in current API versions, ``max_input_tokens`` (the context window),
``max_tokens`` (the largest ``max_tokens``) and ``capabilities`` (``image_input``, ``structured_outputs``...,
each ``{"supported": bool}``). A 404 on the id means the key cannot use that model.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from inferpool.detection.base import Detection, Target, detection, missing, server_root
from inferpool.detection.http import expect, optional_int, request_json

API_VERSION = "2023-06-01"
#: Pages read at most (1,000 models each): a source that says has_more for ever is not followed for ever.
_MAX_PAGES = 20


class AnthropicModelsDetector:
    """Anthropic's models API (or anything that speaks it)."""

    name = "anthropic"

    def _headers(self, target: Target) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if target.api_key is not None:
            headers["x-api-key"] = target.api_key.get_secret_value()
        return headers

    def list_models(self, target: Target) -> list[Detection]:
        base = server_root(target, self.name)
        found: dict[str, Detection] = {}
        after = ""
        for _ in range(_MAX_PAGES):
            url = f"{base}/v1/models?limit=1000" + (f"&after_id={quote(after, safe='')}" if after else "")
            page = expect(request_json(url, headers=self._headers(target), timeout_s=target.timeout_s), dict,
                          f"{url}'s answer")  # fmt: skip
            entries = expect(page.get("data"), list, f"{url}'s 'data'")
            for index, entry in enumerate(entries):
                info = self._info(expect(entry, dict, f"{url}'s data[{index}]"), base, f"{url}'s data[{index}]")
                found[info.model] = info
            last = page.get("last_id")
            if page.get("has_more") is not True or not isinstance(last, str) or not last or last == after:
                break
            after = last
        return list(found.values())

    def detect(self, target: Target, model: str) -> Detection:
        base = server_root(target, self.name)
        url = f"{base}/v1/models/{quote(model, safe='')}"
        entry = request_json(url, headers=self._headers(target), timeout_s=target.timeout_s, missing_ok=True)
        if entry is None:
            return missing(self.name, target, model, [])
        return self._info(expect(entry, dict, f"{url}'s answer"), base, url)

    def _info(self, entry: dict[str, Any], base: str, where: str) -> Detection:
        model_id = expect(entry.get("id"), str, f"{where}.id")
        fields: dict[str, Any] = {"owned_by": "anthropic"}
        for ours, theirs in (("context_window", "max_input_tokens"), ("max_output_tokens", "max_tokens")):
            value = optional_int(entry.get(theirs))
            if value is not None:
                fields[ours] = value
        capabilities = entry.get("capabilities")
        if isinstance(capabilities, dict):
            for ours, theirs in (("vision", "image_input"), ("json_mode", "structured_outputs")):
                flag = capabilities.get(theirs)
                if isinstance(flag, dict) and isinstance(flag.get("supported"), bool):
                    fields[ours] = flag["supported"]
        return detection(self.name, base, model_id, **fields)
