"""What every route module of the gateway shares: the ``Gateway`` (the pool's client, job and file
stores, admission), authentication, bodies read within limits and parsed off the loop, list pages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse

from inferpool.client.client import AsyncClient
from inferpool.constants import DEFAULT_TENANT, model_availability_key
from inferpool.gateway.admission import Admission
from inferpool.gateway.errors import HTTPError
from inferpool.gateway.filestore import FileStore
from inferpool.gateway.key_cache import KeyCache
from inferpool.gateway.key_limits import Caller, KeyLimiter
from inferpool.plumbing.settings import Settings
from inferpool.state.heartbeats import count_live_workers_async
from inferpool.state.jobs import JobStore
from inferpool.wire import load_json

#: Seconds a model seen with a live worker is trusted to have one (``Gateway.require_live_worker``).
LIVE_TRUSTED_S = 1.0

_A = TypeVar("_A")
_T = TypeVar("_T")


@dataclass
class Gateway:
    """What the routes share: the pool's client, the job store, the file store, and whether keys are required."""

    settings: Settings
    client: AsyncClient
    jobs: JobStore
    files: FileStore
    require_keys: bool
    admission: Admission
    key_limits: KeyLimiter
    keys: KeyCache
    live_seen: dict[str, float] = field(default_factory=dict)  # model -> when it was last seen with a live worker

    async def authenticate(self, request: Request) -> str:
        """The tenant of the request's API key; 401 without a valid one (unless started with ``--no-auth``)."""
        return (await self.identify(request)).tenant

    async def identify(self, request: Request) -> Caller:
        """The request's tenant and key (with its limits); 401 without a valid key (unless ``--no-auth``)."""
        if not self.require_keys:
            return Caller(self.settings.tenant or DEFAULT_TENANT)
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HTTPError(401, "You didn't provide an API key: send 'Authorization: Bearer <key>' (an operator "
                            "creates keys with `inferpool keys create --tenant NAME`).",
                            code="missing_api_key")  # fmt: skip
        info = await self.keys.lookup(key.strip())
        if info is None:
            raise HTTPError(401, "Incorrect API key provided (unknown or revoked).", code="invalid_api_key")
        return Caller(info.tenant, info)

    async def require_live_worker(self, model: str) -> None:
        """503 if no worker serves ``model`` now: the request would only wait in its queue. A model seen served
        is trusted for ``LIVE_TRUSTED_S`` (one read a second, not one a request; a worker gone meanwhile has its
        requests answered by its peers or redelivered); one seen unserved is read again each time."""
        seen = self.live_seen.get(model)
        if seen is not None and time.monotonic() - seen < LIVE_TRUSTED_S:
            return
        if (await count_live_workers_async(self.client.redis, [model]))[model] > 0:
            self.live_seen[model] = time.monotonic()
        else:
            self.live_seen.pop(model, None)
            gone = await self.client.redis.get(model_availability_key(model))
            if gone is not None:  # its workers left routing: the provider says there is no such model
                note = _unavailable_note(gone)
                raise HTTPError(503, f"Model '{model}' is not available at its provider right now ({note}); "
                                "operators: `inferpool models` says why.", type_="api_error",
                                code="model_unavailable")  # fmt: skip
            raise HTTPError(503, f"No live worker serves model '{model}' right now; retry later (operators: start one "
                            f"with `inferpool worker {model}`).", type_="api_error",
                            code="no_live_worker")  # fmt: skip


def _unavailable_note(raw: bytes | str) -> str:
    try:
        record = json.loads(raw)
    except ValueError:
        return ""
    return str(record.get("note", "")) if isinstance(record, dict) else ""


def list_page(data: list[dict[str, Any]], has_more: bool) -> JSONResponse:
    """OpenAI's ``list`` object with cursor fields."""
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return JSONResponse({"object": "list", "data": data, "has_more": has_more, "first_id": first, "last_id": last})


def list_limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit", str(default))
    # ASCII digits only: str.isdigit() is also true for '²', which int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not 1 <= int(raw) <= most:
        raise HTTPError(400, f"limit must be an integer from 1 to {most}.", param="limit")
    return int(raw)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


#: Bodies larger than this are parsed in a thread: a 1 MB chat body takes ~200 ms to parse and validate,
#: which must not stall every other request on the event loop (a small one costs less than the hop).
OFF_LOOP_BYTES = 64 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, read up to ``limit`` bytes (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"The request body is {declared} bytes, over the limit of {limit}.", code="too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise HTTPError(413, f"The request body is over the limit of {limit} bytes.", code="too_large")
    return bytes(body)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as one JSON object, or a 400 saying what is wrong (any bytes: never another exception)."""
    data, problem = load_json(body)
    if problem is not None:
        raise HTTPError(400, f"We could not parse the JSON body of your request ({problem}). The body must be one "
                        "JSON object.", code="invalid_json")  # fmt: skip
    if not isinstance(data, dict):
        raise HTTPError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read up to ``limit`` bytes (413 beyond), or a 400 saying what is wrong."""
    return await off_loop_for(len(body := await read_body(request, limit)), parse_json_object, body)


async def off_loop_for(size: int, work: Callable[[_A], _T], argument: _A) -> _T:
    """``work(argument)``, in a thread where ``size`` (the input's bytes) makes it long enough to stall the loop."""
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(work, argument)
    return work(argument)
