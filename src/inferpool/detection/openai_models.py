"""OpenAI's models API and every server that speaks it (vLLM, SGLang, llama.cpp, OpenRouter, LiteLLM...).

``GET {base_url}/models`` lists the ids a key may use (and their owner) everywhere; servers that know more
say it in extra fields of each entry: vLLM and SGLang ``max_model_len`` (the window the engine was started
with, which is what it accepts), OpenRouter and Together ``context_length``, others ``context_window`` or
``max_context_length``; OpenRouter also ``top_provider.max_completion_tokens``, input modalities and
supported parameters. Whatever an entry does not say stays the registry's.
"""

from __future__ import annotations

from typing import Any

from inferpool.detection.base import Detection, ListingDetector, Target, detection, require_url
from inferpool.detection.http import expect, optional_int, request_json

#: Fields servers use for the context window, in the order trusted (vLLM/SGLang first: the engine's own).
_WINDOW_FIELDS = ("max_model_len", "context_length", "context_window", "max_context_length")


class OpenAIModelsDetector(ListingDetector):
    """``GET /v1/models`` of OpenAI or any OpenAI-compatible server."""

    name = "openai"

    def list_models(self, target: Target) -> list[Detection]:
        base = require_url(target, self.name)
        headers = {"authorization": f"Bearer {target.api_key.get_secret_value()}"} if target.api_key else {}
        url = f"{base}/models"
        body = expect(request_json(url, headers=headers, timeout_s=target.timeout_s), dict, f"{url}'s answer")
        entries = expect(body.get("data"), list, f"{url}'s 'data'")
        found: dict[str, Detection] = {}
        for index, entry in enumerate(entries):
            entry = expect(entry, dict, f"{url}'s data[{index}]")
            model_id = expect(entry.get("id"), str, f"{url}'s data[{index}].id")
            found[model_id] = detection(self.name, base, model_id, **_fields(entry))
        return list(found.values())


def _fields(entry: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    owner = entry.get("owned_by")
    if isinstance(owner, str):
        fields["owned_by"] = owner[:512]
    window = next((optional_int(entry[name]) for name in _WINDOW_FIELDS if name in entry), None)
    if window is not None:
        fields["context_window"] = window
    provider = entry.get("top_provider")
    if isinstance(provider, dict) and optional_int(provider.get("max_completion_tokens")) is not None:
        fields["max_output_tokens"] = optional_int(provider.get("max_completion_tokens"))
    architecture = entry.get("architecture")
    modalities = architecture.get("input_modalities") if isinstance(architecture, dict) else None
    if isinstance(modalities, list):
        fields["vision"] = "image" in modalities
    parameters = entry.get("supported_parameters")
    if isinstance(parameters, list):
        fields["tools"] = "tools" in parameters
        fields["json_mode"] = "response_format" in parameters or "structured_outputs" in parameters
    return fields
