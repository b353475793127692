"""Errors as OpenAI's API sends them: ``{"error": {"message", "type", "param", "code"}}`` with the status
codes the official SDKs turn into their own exceptions (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 413, 429 ``RateLimitError``, 503 ``InternalServerError``).
"""

from __future__ import annotations

import logging
import math

import redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from inferpool._exceptions import (
    BatchRefused,
    BudgetExceeded,
    InferpoolError,
    JobNotFound,
    RateLimited,
    RedisUnavailable,
    RequestError,
    ResultTimeout,
)

log = logging.getLogger(__name__)


class HTTPError(InferpoolError):
    """A gateway request refused with an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers


def not_found(what: str, object_id: str) -> HTTPError:
    """404 for an object that does not exist or belongs to another tenant (they cannot be told apart)."""
    return HTTPError(404, f"No {what} found with id '{object_id}'.", code=f"{what}_not_found")


#: Request error codes a worker or the router reports, as HTTP statuses.
_STATUS_OF_CODE = {"model_not_found": 404, "rate_limited": 429, "provider_error": 502, "request_cancelled": 499,
                   "stream_restarted": 502}  # fmt: skip


def error_body(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def request_error_status(exc: RequestError) -> int:
    return _STATUS_OF_CODE.get(exc.code, 500 if exc.code.startswith("batch_") else 400)


def _response(status: int, message: str, type_: str, code: str | None, param: str | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(status, message, type_, code, param), status_code=status, headers=headers)


def _request_error_response(exc: RequestError) -> Response:
    if isinstance(exc, RateLimited):  # a key's requests or tokens per minute: when to retry, as OpenAI says it
        headers = {"retry-after": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s > 0 else None
        return _response(429, exc.message, exc.limit, exc.code, None, headers)
    if isinstance(exc, BudgetExceeded):  # OpenAI's answer to an account out of credit
        return _response(429, exc.message, "insufficient_quota", "insufficient_quota")
    status = request_error_status(exc)
    return _response(status, exc.message, "invalid_request_error" if status < 500 else "api_error", exc.code)


async def handle_error(request: Request, exc: Exception) -> Response:
    """Every exception a route raises, as an OpenAI error response (never a traceback)."""
    if isinstance(exc, HTTPError):
        return _response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)
    if isinstance(exc, StarletteHTTPException):  # Starlette's own: no such route (404), or method (405)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see the API reference for its methods."
            return _response(405, message, "invalid_request_error", "method_not_allowed", None, dict(exc.headers or {}))
        message = f"Unknown request URL: {request.method} {request.url.path}."
        if exc.status_code != 404:
            message = str(exc.detail)
        return _response(exc.status_code, message, "invalid_request_error", "unknown_url")
    if isinstance(exc, RequestError):
        return _request_error_response(exc)
    if isinstance(exc, JobNotFound):
        return _response(404, str(exc), "invalid_request_error", "batch_not_found")
    if isinstance(exc, BatchRefused):
        return _response(400, str(exc), "invalid_request_error", "invalid_file")
    if isinstance(exc, ResultTimeout):
        return _response(504, str(exc), "api_error", "timeout")
    if isinstance(exc, RedisUnavailable | redis.RedisError):
        log.warning("gateway: Redis unavailable: %s", exc)
        return _response(503, "the pool's Redis is unavailable; retry shortly", "api_error", "service_unavailable")
    if isinstance(exc, InferpoolError):
        return _response(400, str(exc), "invalid_request_error", None)
    log.error("gateway: %s %s failed", request.method, request.url.path, exc_info=exc)
    return _response(500, f"internal error ({type(exc).__name__}); see the gateway's log", "api_error", None)
