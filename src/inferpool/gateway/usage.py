"""A key's own tenant's usage and spend, in the shape of OpenAI's Usage and Costs APIs.

``GET /v1/organization/usage/completions`` and ``GET /v1/organization/costs`` answer as OpenAI's do (pages of
daily buckets; ``group_by=model``), so scripts and dashboards written for OpenAI's admin API read them
unchanged; unlike OpenAI's, any key may call them, and each sees only its own tenant (OpenAI needs an admin key
because its answer covers the whole organization). The costs answer adds an ``inferpool`` field: the tenant's
and the key's spend budgets, with what is spent, held and left this window.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inferpool.gateway.common import Gateway, gateway_of, list_limit
from inferpool.gateway.errors import HTTPError
from inferpool.gateway.key_limits import Caller
from inferpool.state.budgets import Budgets, scopes_of
from inferpool.state.usage import read_usage
from inferpool.wire import ModelUsage

#: Days one answer may cover (OpenAI's limit for daily buckets).
MAX_DAYS = 31
_DAY = 86400
_LAST_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z: the last second a date can hold


def _days(request: Request) -> list[dt.date]:
    params = request.query_params
    try:
        start = int(params["start_time"])
        end = int(params.get("end_time", str(int(dt.datetime.now(dt.UTC).timestamp()) + 1)))
    except KeyError:
        raise HTTPError(400, "start_time is required (Unix seconds, inclusive).", param="start_time") from None
    except ValueError:
        raise HTTPError(400, "start_time and end_time are Unix seconds (integers).", param="start_time") from None
    if params.get("bucket_width", "1d") != "1d":
        raise HTTPError(400, "bucket_width must be 1d (daily buckets).", param="bucket_width")
    if not 0 <= start < end or end > _LAST_TIME:
        raise HTTPError(400, "start_time and end_time are Unix seconds, end_time after start_time (and before the year "
                        "9999).", param="end_time")  # fmt: skip
    first = dt.datetime.fromtimestamp(start, dt.UTC).date()
    last = dt.datetime.fromtimestamp(end - 1, dt.UTC).date()
    count = min((last - first).days + 1, list_limit(request, 7, MAX_DAYS))
    return [first + dt.timedelta(days=n) for n in range(count)]


def _grouped(request: Request) -> bool:
    groups = [group for value in request.query_params.getlist("group_by") for group in value.split(",") if group]
    unknown = [group for group in groups if group != "model"]
    if unknown:
        raise HTTPError(400, f"group_by {unknown[0]!r} is not supported; use model.", param="group_by")
    return bool(groups)


async def _report(request: Request, result: Callable[[list[ModelUsage], bool], dict[str, Any]]) -> tuple[
        Caller, list[dict[str, Any]]]:  # fmt: skip
    """The caller and its tenant's daily buckets, each with one ``result`` per model (``group_by=model``) or one for
    all its models."""
    gateway = gateway_of(request)
    caller = await gateway.identify(request)
    days, grouped = _days(request), _grouped(request)

    def read() -> list[tuple[dt.date, list[ModelUsage]]]:
        return [(day, read_usage(gateway.jobs.redis, day, day, tenant=caller.tenant)) for day in days]

    data = []
    for day, rows in await asyncio.to_thread(read):
        groups = [[row] for row in rows] if grouped else ([rows] if rows else [])
        start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())
        data.append({"object": "bucket", "start_time": start, "end_time": start + _DAY,
                     "results": [result(group, grouped) for group in groups]})  # fmt: skip
    return caller, data


def _page(data: list[dict[str, Any]], **extra: Any) -> JSONResponse:
    return JSONResponse({"object": "page", "data": data, "has_more": False, "next_page": None, **extra})


def _usage_result(group: list[ModelUsage], grouped: bool) -> dict[str, Any]:
    return {"object": "organization.usage.completions.result",
            "input_tokens": sum(r.prompt_tokens for r in group),
            "output_tokens": sum(r.completion_tokens for r in group),
            "input_cached_tokens": sum(r.prefix_cached_tokens for r in group), "input_audio_tokens": 0,
            "output_audio_tokens": 0, "num_model_requests": sum(r.requests for r in group),
            "project_id": None, "user_id": None, "api_key_id": None, "batch": None,
            "model": group[0].model if grouped else None}  # fmt: skip


def _cost_result(group: list[ModelUsage], grouped: bool) -> dict[str, Any]:
    return {"object": "organization.costs.result", "amount": {"value": sum(r.cost_usd for r in group),
            "currency": "usd"}, "line_item": group[0].model if grouped else None, "project_id": None}  # fmt: skip


async def completions_usage(request: Request) -> Response:
    _caller, data = await _report(request, _usage_result)
    return _page(data)


async def costs(request: Request) -> Response:
    caller, data = await _report(request, _cost_result)
    budgets = await asyncio.to_thread(_budgets, gateway_of(request), caller)
    return _page(data, inferpool={"tenant": caller.tenant, "budgets": budgets})


def _budgets(gateway: Gateway, caller: Caller) -> list[dict[str, Any]]:
    return Budgets(gateway.jobs.redis).standing(scopes_of(caller.tenant, caller.key_id))


routes = [
    Route("/v1/organization/usage/completions", completions_usage, methods=["GET"]),
    Route("/v1/organization/costs", costs, methods=["GET"]),
]
