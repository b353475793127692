"""``/v1/batches``: OpenAI's Batch API over inferpool's batch jobs.

``POST /v1/batches`` validates the uploaded input file and queues its lines before it answers (a
100k-line file takes a few seconds); the batch object then follows the job in Redis. Its
``output_file_id`` (successful lines) and ``error_file_id`` (failed ones) appear when the job has ended.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inferpool.constants import DEFAULT_TENANT
from inferpool.gateway.common import Gateway, gateway_of, list_limit, list_page, read_json_body
from inferpool.gateway.errors import HTTPError, not_found
from inferpool.model_registry.spec import Routing
from inferpool.wire import SUPPORTED_URLS, VIA_CHOICES, BatchJob, as_via, describe_validation_error, supported_urls_text

_OUTPUT_PREFIX = "file-out-"
_ERRORS_PREFIX = "file-err-"
_JOB_PREFIX = "batch_"


#: The batch's ``metadata`` entry that chooses ``--via`` (OpenAI's batch object has no field of its own for it).
VIA_METADATA_KEY = "inferpool_via"
#: The batch's ``metadata`` entry that chooses ``--routing`` (load or prefix; absent: each model's own).
ROUTING_METADATA_KEY = "inferpool_routing"
_ROUTINGS: dict[str, Routing] = {"load": "load", "prefix": "prefix"}


class CreateBatch(BaseModel):
    """The body of ``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(min_length=1, max_length=200)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def result_file_job(file_id: str) -> tuple[str, str] | None:
    """("out" or "err", job id) for a batch's output or error file id; None for an uploaded file's id."""
    for kind, prefix in (("out", _OUTPUT_PREFIX), ("err", _ERRORS_PREFIX)):
        if file_id.startswith(prefix):
            return kind, _JOB_PREFIX + file_id.removeprefix(prefix)
    return None


def batch_object(job: BatchJob) -> dict[str, Any]:
    """The OpenAI ``batch`` object of ``job``."""
    short = job.id.removeprefix(_JOB_PREFIX)
    ended = job.status.is_final
    errors = None
    if job.errors:
        data = [{"code": "batch_failed", "message": m, "param": None, "line": None} for m in job.errors]
        errors = {"object": "list", "data": data}
    return {
        "id": job.id, "object": "batch", "endpoint": job.endpoint, "errors": errors,
        "input_file_id": job.input_file_id or "", "completion_window": job.completion_window,
        "status": job.status.value,
        "output_file_id": _OUTPUT_PREFIX + short if ended and job.request_counts.completed else None,
        "error_file_id": _ERRORS_PREFIX + short if ended and job.request_counts.failed else None,
        "created_at": job.created_at, "in_progress_at": job.in_progress_at, "expires_at": job.expires_at,
        "finalizing_at": job.finalizing_at, "completed_at": job.completed_at, "failed_at": job.failed_at,
        "expired_at": job.expired_at, "cancelling_at": job.cancelling_at, "cancelled_at": job.cancelled_at,
        "request_counts": job.request_counts.model_dump(), "metadata": job.metadata or None,
    }  # fmt: skip


def _owner(gateway: Gateway, job: BatchJob) -> str | None:
    # Without keys, jobs made outside the gateway (the CLI, the client) belong to the one tenant served.
    return job.tenant if gateway.require_keys else job.tenant or gateway.settings.tenant or DEFAULT_TENANT


#: What a batch id looks like; anything else (``batch_x:pending:echo`` names another Redis key) is not found.
_JOB_ID = re.compile(r"^batch_[A-Za-z0-9_-]{1,160}$")


async def owned_job(
    gateway: Gateway, tenant: str, job_id: str, *, what: str = "batch", object_id: str = ""
) -> BatchJob:
    """The job, if ``tenant`` owns it; 404 otherwise (another tenant's job does not exist for this one)."""
    if not _JOB_ID.match(job_id):
        raise not_found(what, object_id or job_id)
    job = await asyncio.to_thread(gateway.jobs.get, job_id)
    if job is None or _owner(gateway, job) != tenant:
        raise not_found(what, object_id or job_id)
    return job


async def create_batch(request: Request) -> Response:
    gateway = gateway_of(request)
    caller = await gateway.identify(request)
    tenant = caller.tenant
    try:
        body = CreateBatch.model_validate(await read_json_body(request, 64 * 1024))
    except ValidationError as exc:
        raise HTTPError(400, describe_validation_error(exc), code="invalid_request") from None
    if body.endpoint not in SUPPORTED_URLS:
        raise HTTPError(400, f"endpoint {body.endpoint!r} is not supported; use one of {supported_urls_text()}.",
                        param="endpoint")  # fmt: skip
    info = await gateway.files.get(tenant, body.input_file_id)
    if info is None:
        raise not_found("file", body.input_file_id)
    if info.purpose != "batch":
        raise HTTPError(400, f"file {info.id} was uploaded with purpose {info.purpose!r}, not 'batch'.",
                        param="input_file_id")  # fmt: skip
    asked = (body.metadata or {}).get(VIA_METADATA_KEY, "auto")
    via = as_via(asked)
    if via is None:
        raise HTTPError(400, f"metadata.{VIA_METADATA_KEY} must be one of {', '.join(VIA_CHOICES)} (the path of the "
                        f"lines of models with a provider Batch API), not {asked!r}.",
                        param=f"metadata.{VIA_METADATA_KEY}")  # fmt: skip
    asked_routing = (body.metadata or {}).get(ROUTING_METADATA_KEY)
    routing = _ROUTINGS.get(asked_routing) if asked_routing is not None else None
    if asked_routing is not None and routing is None:
        raise HTTPError(400, f"metadata.{ROUTING_METADATA_KEY} must be load or prefix (how lines pick a worker), "
                        f"not {asked_routing!r}.", param=f"metadata.{ROUTING_METADATA_KEY}")  # fmt: skip
    job = await gateway.client.batches.create(gateway.files.path_of(info.id), completion_window=body.completion_window,
                                              metadata=body.metadata, tenant=tenant, input_file_id=info.id,
                                              via=via, routing=routing, endpoint=body.endpoint,
                                              allowed_models=gateway.key_limits.allowed(caller),
                                              key_id=caller.key_id)  # fmt: skip
    return JSONResponse(batch_object(job))


async def retrieve_batch(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    return JSONResponse(batch_object(await owned_job(gateway, tenant, request.path_params["batch_id"])))


async def cancel_batch(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    job = await owned_job(gateway, tenant, request.path_params["batch_id"])
    return JSONResponse(batch_object(await gateway.client.batches.cancel(job.id)))


async def list_batches(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    limit = list_limit(request, 20, 100)
    ids = await asyncio.to_thread(gateway.jobs.tenant_job_ids, tenant, limit + 1, request.query_params.get("after"))
    jobs = [job for job in [await asyncio.to_thread(gateway.jobs.get, i) for i in ids[:limit]] if job is not None]
    data = [batch_object(job) for job in jobs]
    return list_page(data, len(ids) > limit)


routes = [
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
]
