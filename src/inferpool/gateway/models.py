"""``GET /v1/models`` and ``GET /v1/models/{model}``: the registry as OpenAI ``model`` objects.

Each object has OpenAI's fields (``id``, ``object``, ``created``, ``owned_by``) and an ``inferpool`` field with
what OpenAI has no place for: live workers now, backend, capabilities, prices, aliases.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inferpool.gateway.common import Gateway, gateway_of
from inferpool.gateway.errors import not_found
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.heartbeats import count_live_workers_async


def model_object(spec: ModelSpec, live_workers: int) -> dict[str, Any]:
    return {
        "id": spec.name,
        "object": "model",
        "created": 0,
        "owned_by": spec.provider or "inferpool",
        "inferpool": {
            "live_workers": live_workers,
            "backend": spec.backend,
            "aliases": spec.aliases,
            "capabilities": spec.capabilities.model_dump(),
            "pricing": spec.pricing.model_dump(),
            "deprecated": spec.deprecation is not None,
            "description": spec.description,
        },
    }


async def _objects(gateway: Gateway, specs: list[ModelSpec]) -> list[dict[str, Any]]:
    live = await count_live_workers_async(gateway.client.redis, [spec.name for spec in specs])
    return [model_object(spec, live[spec.name]) for spec in specs]


async def list_models(request: Request) -> Response:
    """The models the key may use (every model for a key with no model list)."""
    gateway = gateway_of(request)
    allowed = gateway.key_limits.allowed(await gateway.identify(request))
    specs = [spec for spec in gateway.client.registry if allowed is None or spec.name in allowed]
    data = await _objects(gateway, sorted(specs, key=lambda spec: spec.name))
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    gateway = gateway_of(request)
    caller = await gateway.identify(request)
    name = request.path_params["model"]
    if name not in gateway.client.registry:
        raise not_found("model", name)
    gateway.key_limits.check_model(caller, name, gateway.client.registry.get(name).name)
    [data] = await _objects(gateway, [gateway.client.registry.get(name)])
    return JSONResponse(data)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
