"""The gateway application: an OpenAI-compatible HTTP API in front of the pool (``inferpool gateway``).

Starlette on uvicorn. Each route module is one API area, like openai-python's resources: ``chat``,
``completions``, ``embeddings`` (all three served by ``serving``), ``models``, ``files``, ``batches``. The
gateway keeps no state of its own: every request becomes a client call on the pool's Redis (keys, jobs,
results, file metadata there; file bytes in the file store), so any number of gateways can stand behind one
load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inferpool._exceptions import InferpoolError
from inferpool.client.client import AsyncClient
from inferpool.gateway import batches, chat, completions, embeddings, files, models, usage
from inferpool.gateway.admission import Admission
from inferpool.gateway.common import Gateway, gateway_of
from inferpool.gateway.errors import handle_error
from inferpool.gateway.filestore import FileLimits, FileStore
from inferpool.gateway.key_cache import KeyCache
from inferpool.gateway.key_limits import KeyLimiter
from inferpool.gateway.tracing import TracingMiddleware
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.redis_connection import redis_from_url
from inferpool.plumbing.settings import Settings
from inferpool.state.jobs import JobStore
from inferpool.state.key_limits import KeyLimitStore
from inferpool.tracing.setup import install_tracing

log = logging.getLogger(__name__)


async def health(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness: the pool's Redis answers (a load balancer sends traffic only then)."""
    try:
        await gateway_of(request).client.redis.ping()
    except (redis.RedisError, OSError) as exc:
        return JSONResponse({"status": "unavailable", "reason": f"Redis: {exc}"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def _close_idle_redis(client: AsyncClient, every_s: float) -> None:
    """Close the idle connections of the client's asyncio pool every ``every_s`` (they reconnect when next used,
    ~1 ms): a burst of concurrent commands opens a connection each, and redis-py's pool never lets one go."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await client.redis.connection_pool.disconnect(inuse_connections=False)
        except (redis.RedisError, OSError) as exc:  # nothing to keep: a reconnect will say what is wrong
            log.debug("closing idle Redis connections: %s", exc)


def create_app(settings: Settings, *, require_keys: bool = True, registry: Registry | None = None) -> Starlette:
    """The gateway for the pool ``settings`` point at. ``require_keys=False`` serves everyone as one tenant."""
    install_tracing(settings.tracing, "gateway")  # here: each of uvicorn's worker processes makes its app

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = await AsyncClient.connect(settings=settings, registry=registry)
        jobs = JobStore(redis_from_url(client.redis_url, socket_connect_timeout=5), settings.result_ttl_s)
        limits = FileLimits(settings.files_ttl_s, settings.files_max_bytes_per_tenant, settings.files_max_per_tenant)
        files = FileStore(settings.files_dir, client.redis, limits)
        admission = Admission(settings.gateway_max_in_flight, settings.gateway_max_in_flight_per_tenant)
        limiter = KeyLimiter(KeyLimitStore(client.redis), client.registry, settings.gateway_request_timeout_s + 60)
        keys = KeyCache(client.redis)
        keys.start()
        app.state.gateway = Gateway(settings, client, jobs, files, require_keys, admission, limiter, keys)
        trimming = asyncio.get_running_loop().create_task(
            _close_idle_redis(client, settings.gateway_idle_redis_close_s)
        )
        try:
            yield
        finally:
            trimming.cancel()
            await keys.close()
            jobs.redis.close()
            await client.aclose()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        *chat.routes,
        *completions.routes,
        *embeddings.routes,
        *models.routes,
        *files.routes,
        *batches.routes,
        *usage.routes,
    ]
    # InferpoolError and Redis errors are answered by Starlette's ExceptionMiddleware; anything else (a bug) by
    # its ServerErrorMiddleware, which also logs the traceback.
    handlers: dict[Any, Any] = {InferpoolError: handle_error, redis.RedisError: handle_error,
                                StarletteHTTPException: handle_error, Exception: handle_error}  # fmt: skip
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers,
                     middleware=[Middleware(TracingMiddleware)])  # fmt: skip
