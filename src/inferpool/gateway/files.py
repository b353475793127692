"""``/v1/files``: upload batch input files, read them back, list and delete them.

A batch's output and error files are not stored: ``file-out-<batch>`` and ``file-err-<batch>`` are read
from the job's results in Redis as they are asked for (streamed, one page of results at a time), as soon as
the job has ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from inferpool.client.batches import check_batch_file
from inferpool.gateway.batches import owned_job, result_file_job
from inferpool.gateway.common import Gateway, gateway_of, list_limit, list_page
from inferpool.gateway.errors import not_found
from inferpool.wire import BatchJob

MAX_LIST_LIMIT = 10_000


async def upload_file(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    settings = gateway.settings

    def check(path: Path) -> None:
        check_batch_file(path, settings)

    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isascii() and declared.isdigit() and len(declared) <= 18 else None
    info = await gateway.files.upload(tenant, request.headers.get("content-type", ""), request.stream(),
                                      settings.batch_max_bytes, check, length)  # fmt: skip
    return JSONResponse(info.model_dump())


async def list_files(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    purpose = request.query_params.get("purpose")
    files, more = await gateway.files.list(tenant, list_limit(request, 10_000, MAX_LIST_LIMIT),
                                           request.query_params.get("after"))  # fmt: skip
    data = [f.model_dump() for f in files if purpose is None or f.purpose == purpose]
    return list_page(data, more)


async def retrieve_file(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    file_id = request.path_params["file_id"]
    result_file = await _owned_result_file(gateway, tenant, file_id)
    if result_file is not None:
        job = result_file[1]
        return JSONResponse({"id": file_id, "object": "file", "bytes": None, "created_at": job.created_at,
                             "filename": f"{file_id}.jsonl", "purpose": "batch_output", "status": "processed",
                             "status_details": None})  # fmt: skip
    info = await gateway.files.get(tenant, file_id)
    if info is None:
        raise not_found("file", file_id)
    return JSONResponse(info.model_dump())


async def file_content(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    file_id = request.path_params["file_id"]
    result_file = await _owned_result_file(gateway, tenant, file_id)
    if result_file is not None:
        kind, job = result_file
        if not job.status.is_final:
            raise not_found("file", file_id)  # it exists once the batch has ended, as with OpenAI
        lines = _result_lines(gateway, job.id, successes=kind == "out")
        return StreamingResponse(lines, media_type="application/jsonl")
    if await gateway.files.get(tenant, file_id) is None:
        raise not_found("file", file_id)
    return FileResponse(gateway.files.path_of(file_id), media_type="application/jsonl")


async def _owned_result_file(gateway: Gateway, tenant: str, file_id: str) -> tuple[str, BatchJob] | None:
    """("out" or "err", the batch job) for a batch's output or error file the tenant owns; None for an
    uploaded file's id; 404 for another tenant's or an unknown batch."""
    kind_job = result_file_job(file_id)
    if kind_job is None:
        return None
    kind, job_id = kind_job
    return kind, await owned_job(gateway, tenant, job_id, what="file", object_id=file_id)


async def _result_lines(gateway: Gateway, job_id: str, *, successes: bool) -> AsyncIterator[bytes]:
    position = "0-0"
    while True:
        lines, after = await gateway.client.batches.output_json_after(job_id, position)
        if after == position:
            return
        position = after
        page = b"".join(line + b"\n" for line, ok in lines if ok == successes)
        if page:
            yield page


async def delete_file(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    file_id = request.path_params["file_id"]
    if not await gateway.files.delete(tenant, file_id):
        raise not_found("file", file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


routes = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", retrieve_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
]
