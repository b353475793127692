"""Ollama: ``GET /api/tags`` lists the models pulled, ``POST /api/show`` describes one.

``model_info`` holds the GGUF metadata (``<arch>.context_length``, ``general.parameter_count``,
``<arch>.embedding_length``), ``capabilities`` what Ollama serves it for (``completion``, ``vision``,
``tools``, ``embedding``, ``insert``). Ollama answers within ``num_ctx`` (set in a Modelfile's parameters, else
its server default), truncating longer prompts silently: when ``num_ctx`` is set it is the window reported.
"""

from __future__ import annotations

import re
from typing import Any

from inferpool.detection.base import Detection, Target, detection, missing, server_root
from inferpool.detection.http import expect, optional_int, request_json

_NUM_CTX = re.compile(r"^\s*num_ctx\s+(\d{1,12})\s*$", re.MULTILINE)
#: Models described at most by one listing (each is a request).
_MAX_MODELS = 200


class OllamaDetector:
    """An Ollama server (its base URL with or without the OpenAI-compatible ``/v1``)."""

    name = "ollama"

    def list_models(self, target: Target) -> list[Detection]:
        root = server_root(target, self.name)
        url = f"{root}/api/tags"
        body = expect(request_json(url, timeout_s=target.timeout_s), dict, f"{url}'s answer")
        entries = expect(body.get("models"), list, f"{url}'s 'models'")
        names = [expect(entry, dict, f"{url}'s models[{i}]").get("name") for i, entry in enumerate(entries)]
        return [self.detect(target, name) for name in names[:_MAX_MODELS] if isinstance(name, str) and name]

    def detect(self, target: Target, model: str) -> Detection:
        root = server_root(target, self.name)
        url = f"{root}/api/show"
        body = request_json(url, body={"model": model}, timeout_s=target.timeout_s, missing_ok=True)
        if body is None:
            return missing(self.name, target, model, [])
        body = expect(body, dict, f"{url}'s answer for {model!r}")
        return detection(self.name, root, model, **_fields(body))


def _fields(body: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {"owned_by": "ollama"}
    raw_info = body.get("model_info")
    info: dict[str, Any] = raw_info if isinstance(raw_info, dict) else {}
    arch = info.get("general.architecture")
    if isinstance(arch, str):
        fields["context_window"] = optional_int(info.get(f"{arch}.context_length"))
        fields["embedding_dimensions"] = optional_int(info.get(f"{arch}.embedding_length"))
    fields["parameters"] = optional_int(info.get("general.parameter_count"))
    parameters = body.get("parameters")
    match = _NUM_CTX.search(parameters) if isinstance(parameters, str) else None
    if match:
        fields["context_window"] = int(match.group(1))
    capabilities = body.get("capabilities")
    if isinstance(capabilities, list):
        served = {item for item in capabilities if isinstance(item, str)}
        fields.update(chat="completion" in served, completions="completion" in served, vision="vision" in served,
                      tools="tools" in served)  # fmt: skip
        if "embedding" not in served:
            fields["embedding_dimensions"] = None
    return {name: value for name, value in fields.items() if value is not None}
