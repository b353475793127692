"""The providers' model-listing endpoints, with the metadata each really returns:

- OpenAI: ``GET /v1/models`` and ``/v1/models/{id}`` (id, ``owned_by``, ``created``); an entry with
  ``max_model_len`` set answers as vLLM and SGLang do (``owned_by: vllm`` and the engine's window).
- Anthropic (a request with an ``anthropic-version`` header): the same paths, paginated by ``after_id``, with
  ``max_input_tokens``, ``max_tokens`` and ``capabilities``.
- Ollama: ``GET /api/tags`` and ``POST /api/show`` (``model_info`` with ``<arch>.context_length``, ``capabilities``).

``models_body`` replaces every one of these answers with raw bytes (hostile-source tests).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from inferpool.emulators.server import ProviderEmulator


class EmulatedModel(BaseModel):
    """One model an emulated provider lists."""

    id: str
    provider: Literal["openai", "anthropic", "ollama"] = "openai"
    owned_by: str = "system"
    max_model_len: int | None = Field(default=None, description="Set: listed as vLLM lists it (its engine's window).")
    max_input_tokens: int | None = None
    max_tokens: int | None = None
    vision: bool = False
    tools: bool = True
    embedding: bool = False


def default_models() -> list[EmulatedModel]:
    """What the emulator lists unless told otherwise: the ids the tests and examples use, plus real-looking ones."""
    openai_ids = ["gpt-emu", "gpt-limited", "no-batch-gpt", "text-embedding-emu", "gpt-4o-mini", "gpt-4o",
                  "text-embedding-3-small"]  # fmt: skip
    claude = {"max_input_tokens": 200_000, "max_tokens": 64_000, "vision": True}
    return [
        *(EmulatedModel(id=model_id) for model_id in openai_ids),
        EmulatedModel(id="claude-emu", provider="anthropic", **claude),
        EmulatedModel(id="claude-sonnet-4-5", provider="anthropic", **claude),
        EmulatedModel(id="llama3.2:latest", provider="ollama", max_input_tokens=131072),
    ]


class ModelEndpoints:
    """Routes for the models endpoints of one emulator."""

    def __init__(self, emulator: ProviderEmulator) -> None:
        self.emulator = emulator

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._list)
        app.router.add_get("/v1/models/{model_id:.+}", self._one)
        app.router.add_get("/api/tags", self._ollama_tags)
        app.router.add_post("/api/show", self._ollama_show)

    def _models(self, provider: str) -> list[EmulatedModel]:
        self.emulator.count("models_listed")
        return [model for model in self.emulator.config.models if model.provider == provider]

    def _raw(self) -> web.Response | None:
        raw = self.emulator.config.models_body
        return None if raw is None else web.Response(body=raw, content_type="application/json")

    def _refused(self, request: web.Request) -> web.Response | None:
        keys = self.emulator.config.api_keys
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if keys and given not in keys:
            return web.json_response({"error": {"type": "authentication_error", "message": "invalid api key"}},
                                     status=401)  # fmt: skip
        return None

    async def _list(self, request: web.Request) -> web.Response:
        refused = self._refused(request) or self._raw()
        if refused is not None:
            return refused
        if "anthropic-version" in request.headers:
            models = self._models("anthropic")
            after = request.query.get("after_id")
            limit = int(request.query.get("limit", "20"))
            start = next((i + 1 for i, model in enumerate(models) if model.id == after), 0)
            page = models[start : start + limit]
            return web.json_response({"data": [_anthropic(model) for model in page],
                                      "has_more": start + limit < len(models),
                                      "first_id": page[0].id if page else None,
                                      "last_id": page[-1].id if page else None})  # fmt: skip
        return web.json_response({"object": "list", "data": [_openai(model) for model in self._models("openai")]})

    async def _one(self, request: web.Request) -> web.Response:
        refused = self._refused(request) or self._raw()
        if refused is not None:
            return refused
        model_id = request.match_info["model_id"]
        anthropic = "anthropic-version" in request.headers
        for model in self._models("anthropic" if anthropic else "openai"):
            if model.id == model_id:
                return web.json_response(_anthropic(model) if anthropic else _openai(model))
        kind = "not_found_error" if anthropic else "invalid_request_error"
        return web.json_response({"error": {"type": kind, "message": f"model: {model_id}"}}, status=404)

    async def _ollama_tags(self, request: web.Request) -> web.Response:
        raw = self._raw()
        if raw is not None:
            return raw
        return web.json_response({"models": [{"name": model.id, "model": model.id, "size": 2_019_393_189,
                                              "details": {"format": "gguf", "family": "llama"}}
                                             for model in self._models("ollama")]})  # fmt: skip

    async def _ollama_show(self, request: web.Request) -> web.Response:
        raw = self._raw()
        if raw is not None:
            return raw
        body = await request.json()
        name = body.get("model") if isinstance(body, dict) else None
        for model in self._models("ollama"):
            if model.id == name:
                capabilities = ["embedding"] if model.embedding else ["completion"]
                capabilities += (["vision"] if model.vision else []) + (["tools"] if model.tools else [])
                info = {
                    "general.architecture": "llama",
                    "general.parameter_count": 3_212_749_888,
                    "llama.context_length": model.max_input_tokens or 8192,
                    "llama.embedding_length": 3072,
                }
                return web.json_response({"modelfile": "", "parameters": "stop \"<|eot_id|>\"", "template": "",
                                          "details": {"family": "llama", "parameter_size": "3.2B"},
                                          "model_info": info, "capabilities": capabilities})  # fmt: skip
        return web.json_response({"error": f"model '{name}' not found"}, status=404)


def _openai(model: EmulatedModel) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": model.id, "object": "model", "created": 1_700_000_000, "owned_by": model.owned_by}
    if model.max_model_len is not None:  # as vLLM's /v1/models says it
        entry.update(owned_by="vllm", root=model.id, parent=None, max_model_len=model.max_model_len,
                     permission=[{"id": f"modelperm-{model.id}", "object": "model_permission",
                                  "created": int(time.time()), "allow_sampling": True}])  # fmt: skip
    return entry


def _anthropic(model: EmulatedModel) -> dict[str, Any]:
    supported = {"supported": True}
    return {"type": "model", "id": model.id, "display_name": model.id.replace("-", " ").title(),
            "created_at": "2025-09-29T00:00:00Z", "max_input_tokens": model.max_input_tokens,
            "max_tokens": model.max_tokens,
            "capabilities": {"batch": supported, "image_input": {"supported": model.vision},
                             "structured_outputs": supported, "pdf_input": supported,
                             "citations": supported}}  # fmt: skip
