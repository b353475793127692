"""The providers' batch endpoints, emulated: OpenAI's Files and Batches, Anthropic's Message Batches.

A batch's progress is computed from its age when it is looked at (no background work): validating,
then in progress, then done after ``batch_delay_s``; each line fails with ``batch_failure_rate``
(decided by its position, so every look agrees); with ``batch_expire_s`` shorter than the delay the
batch expires with only the lines before that point processed. Answers are the emulators' chat answers.
The emulator counts the batches it was asked to create (``openai_batches_created``,
``anthropic_batches_created``), so tests can check none was created twice, and every request to these
endpoints (``batch_api_requests``).
"""

from __future__ import annotations

import json
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from inferpool.emulators.answers import anthropic_answer, openai_answer
from inferpool.emulators.completions import completions_answer, embeddings_answer

#: The endpoints OpenAI's Batch API takes lines for (and so this emulator).
CHAT_URL, EMBEDDINGS_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/embeddings", "/v1/completions"

if TYPE_CHECKING:
    from inferpool.emulators.server import ProviderEmulator

_FINAL_OPENAI = ("completed", "expired", "cancelled", "failed")
_STAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
           "cancelled_at")  # fmt: skip


@dataclass
class _Batch:
    id: str
    provider: str
    created: float
    lines: list[dict[str, Any]]
    delay_s: float
    expire_s: float | None
    failure_rate: float
    endpoint: str = CHAT_URL
    input_file_id: str = ""
    completion_window: str = "24h"
    metadata: dict[str, Any] | None = None
    cancelled_at: float | None = None
    results: list[dict[str, Any]] | None = None
    files: dict[str, str] = field(default_factory=dict)
    refused: list[dict[str, Any]] = field(default_factory=list)  # validation errors: the batch failed

    def processed_share(self, now: float) -> float:
        """How much of the batch is done at ``now`` (0..1), however it ended."""
        end = min(x for x in (self.cancelled_at, self.expire_end(), now) if x is not None)
        return min(1.0, max(0.0, (end - self.created) / self.delay_s)) if self.delay_s else 1.0

    def expire_end(self) -> float | None:
        if self.expire_s is None or self.expire_s >= self.delay_s:
            return None
        return self.created + self.expire_s

    def state(self, now: float) -> str:
        """validating, in_progress, finalizing, completed, failed, expired or cancelled."""
        if self.refused:
            return "failed"
        if self.cancelled_at is not None:
            return "cancelled"
        expire_end = self.expire_end()
        if expire_end is not None and now >= expire_end:
            return "expired"
        age = now - self.created
        if age >= self.delay_s:
            return "completed"
        if age >= self.delay_s * 0.9:
            return "finalizing"
        return "validating" if age < self.delay_s * 0.2 else "in_progress"

    def fails(self, index: int) -> bool:
        return random.Random(f"{self.id}:{index}").random() < self.failure_rate


class BatchEndpoints:
    """Routes and state of the emulated batch APIs of one ``ProviderEmulator``."""

    def __init__(self, emulator: ProviderEmulator) -> None:
        self._emulator = emulator
        self.files: dict[str, dict[str, Any]] = {}
        self.file_bytes: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files", self._list_files)
        app.router.add_get("/v1/batches", self._list_openai)
        app.router.add_get("/v1/messages/batches", self._list_anthropic)
        app.router.add_get("/v1/files/{file_id}", self._file)
        app.router.add_get("/v1/files/{file_id}/content", self._file_content)
        app.router.add_delete("/v1/files/{file_id}", self._delete_file)
        app.router.add_post("/v1/batches", self._create_openai)
        app.router.add_get("/v1/batches/{batch_id}", self._retrieve_openai)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._cancel_openai)
        app.router.add_post("/v1/messages/batches", self._create_anthropic)
        app.router.add_get("/v1/messages/batches/{batch_id}", self._retrieve_anthropic)
        app.router.add_post("/v1/messages/batches/{batch_id}/cancel", self._cancel_anthropic)
        app.router.add_get("/v1/messages/batches/{batch_id}/results", self._anthropic_results)

    # -- common ----------------------------------------------------------------------------------------

    def _refused(self, request: web.Request) -> web.Response | None:
        """The 401 for a request without a good key (None: go on); counts every batch API request made."""
        self._emulator.count("batch_api_requests")
        keys = self._emulator.config.api_keys
        key = (request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
               or None)  # fmt: skip
        if keys and key not in keys:
            return web.json_response({"error": {"type": "authentication_error", "message": "invalid api key"}},
                                     status=401)  # fmt: skip
        return None

    def _new_batch(self, provider: str, lines: list[dict[str, Any]]) -> _Batch:
        config = self._emulator.config
        prefix = "batch_emu" if provider == "openai" else "msgbatch_emu"
        batch = _Batch(f"{prefix}{secrets.token_hex(8)}", provider, time.time(), lines, config.batch_delay_s,
                       config.batch_expire_s, config.batch_failure_rate)  # fmt: skip
        self.batches[batch.id] = batch
        self._emulator.count(f"{provider}_batches_created")
        return batch

    def _batch(self, request: web.Request, provider: str) -> _Batch:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None or batch.provider != provider:
            raise web.HTTPNotFound(text=json.dumps({"error": {"type": "not_found_error", "message": "no such batch"}}),
                                   content_type="application/json")  # fmt: skip
        return batch

    def _answer(self, batch: _Batch, index: int, body: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """(ok, the answer or the error) for line ``index``, as the real-time endpoint would give it."""

        if batch.fails(index):
            return False, {"type": "api_error", "message": f"emulated failure of line {index}"}
        if batch.provider == "openai":
            if batch.endpoint == EMBEDDINGS_URL:
                other = embeddings_answer(body)
            elif batch.endpoint == COMPLETIONS_URL:
                other = completions_answer(body, index)
            else:
                answer = openai_answer(body, index)
                other = answer if isinstance(answer, str) else answer.completion()
            return (False, {"type": "invalid_request_error", "message": other}) if isinstance(other, str) else (
                True, other)  # fmt: skip
        message = anthropic_answer(body, index)
        return (False, {"type": "invalid_request_error", "message": message}) if isinstance(message, str) else (
            True, message)  # fmt: skip

    def _page(self, request: web.Request, objects: list[dict[str, Any]], after: str | None) -> dict[str, Any]:
        """One page of ``objects`` (in listing order) after the one with id ``after``, in the providers' list
        envelope (OpenAI's and Anthropic's share these fields)."""
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "20"))))
        except ValueError:
            limit = 20
        ids = [o["id"] for o in objects]
        start = ids.index(after) + 1 if after in ids else 0
        page = objects[start : start + limit]
        return {"object": "list", "data": page, "has_more": start + limit < len(objects),
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}  # fmt: skip

    # -- OpenAI files ----------------------------------------------------------------------------------

    async def _list_files(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        purpose = request.query.get("purpose")
        files = [f for f in self.files.values() if purpose is None or f["purpose"] == purpose]
        files.sort(key=lambda f: f["created_at"], reverse=request.query.get("order", "desc") == "desc")
        return web.json_response(self._page(request, files, request.query.get("after")))

    async def _upload(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        form = await request.post()
        upload: Any = form.get("file")
        if upload is None or not hasattr(upload, "file"):
            return web.json_response({"error": {"type": "invalid_request_error", "message": "file is required"}},
                                     status=400)  # fmt: skip
        data = upload.file.read()
        return web.json_response(self._store_file(data, str(getattr(upload, "filename", "upload.jsonl")),
                                                  str(form.get("purpose", "batch"))))  # fmt: skip

    def _store_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-emu{secrets.token_hex(8)}"
        self.file_bytes[file_id] = data
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed",
                               "expires_at": None, "status_details": None}  # fmt: skip
        return self.files[file_id]

    async def _file(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        info = self.files.get(request.match_info["file_id"])
        return web.json_response(info) if info else web.json_response({"error": {"message": "no such file"}},
                                                                      status=404)  # fmt: skip

    async def _file_content(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        data = self.file_bytes.get(request.match_info["file_id"])
        if data is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _delete_file(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        file_id = request.match_info["file_id"]
        self.files.pop(file_id, None)
        self.file_bytes.pop(file_id, None)
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # -- OpenAI batches --------------------------------------------------------------------------------

    async def _create_openai(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.json()
        data = self.file_bytes.get(str(body.get("input_file_id")))
        if data is None:
            return web.json_response({"error": {"type": "invalid_request_error", "message": "no such input file"}},
                                     status=400)  # fmt: skip
        endpoint = body.get("endpoint", CHAT_URL)
        if endpoint not in (CHAT_URL, EMBEDDINGS_URL, COMPLETIONS_URL):
            message = f"unsupported endpoint {endpoint!r}"
            error = {"type": "invalid_request_error", "param": "endpoint", "message": message}
            return web.json_response({"error": error}, status=400)
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        batch = self._new_batch("openai", lines)
        batch.endpoint, batch.input_file_id = endpoint, body["input_file_id"]
        batch.completion_window, batch.metadata = body.get("completion_window", "24h"), body.get("metadata")
        batch.refused = _validation_errors(lines, batch.endpoint)
        return web.json_response(self._openai_object(batch))

    async def _list_openai(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        newest_first = sorted((b for b in self.batches.values() if b.provider == "openai"), key=lambda b: -b.created)
        objects = [self._openai_object(b) for b in newest_first]
        return web.json_response(self._page(request, objects, request.query.get("after")))

    async def _retrieve_openai(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        return web.json_response(self._openai_object(self._batch(request, "openai")))

    async def _cancel_openai(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        batch = self._batch(request, "openai")
        if batch.state(time.time()) not in _FINAL_OPENAI:
            batch.cancelled_at = time.time()
        return web.json_response(self._openai_object(batch))

    def _openai_object(self, batch: _Batch) -> dict[str, Any]:
        now = time.time()
        state = batch.state(now)
        if state in _FINAL_OPENAI and batch.results is None:
            self._finish_openai(batch, now)
        results = batch.results or []
        failed = sum(1 for r in results if not r["ok"])
        ended = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at",
                 "failed": "failed_at"}.get(state)  # fmt: skip
        stamps: dict[str, int | None] = dict.fromkeys(_STAMPS)
        if state != "validating":
            stamps["in_progress_at"] = int(batch.created)
        if state in ("finalizing", "completed"):
            stamps["finalizing_at"] = int(batch.created + batch.delay_s * 0.9)
        if ended:
            stamps[ended] = int(now)
        errors = {"object": "list", "data": batch.refused} if batch.refused else None
        return {"id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": errors,
                "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
                "status": state, "output_file_id": batch.files.get("out"), "error_file_id": batch.files.get("err"),
                "created_at": int(batch.created), "expires_at": int(batch.created + 86400), **stamps,
                "request_counts": {"total": len(batch.lines), "completed": len(results) - failed, "failed": failed},
                "metadata": batch.metadata}  # fmt: skip

    def _finish_openai(self, batch: _Batch, now: float) -> None:
        """Write the output and error files once the batch has ended, however it ended (a batch that failed
        validation has none)."""
        if batch.refused:
            batch.results = []
            return
        done_lines = int(len(batch.lines) * batch.processed_share(now) + 1e-9)
        ended_as = batch.state(now)
        results: list[dict[str, Any]] = []
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for index, line in enumerate(batch.lines):
            custom_id = line.get("custom_id")
            entry_id = f"batch_req_emu{secrets.token_hex(6)}"
            if index >= done_lines:
                code = "batch_expired" if ended_as == "expired" else "batch_cancelled"
                message = f"this request was not run: the batch {ended_as}"
                errors.append({"id": entry_id, "custom_id": custom_id, "response": None,
                               "error": {"code": code, "message": message}})  # fmt: skip
                continue
            ok, answer = self._answer(batch, index, line.get("body") or {})
            results.append({"ok": ok})
            response = {"status_code": 200 if ok else 500, "request_id": f"req_emu{index}",
                        "body": answer if ok else {"error": answer}}  # fmt: skip
            (outputs if ok else errors).append({"id": entry_id, "custom_id": custom_id, "response": response,
                                                "error": None})  # fmt: skip
        batch.results = results
        for kind, entries in (("out", outputs), ("err", errors)):
            if entries:
                data = "".join(json.dumps(entry) + "\n" for entry in entries).encode()
                batch.files[kind] = self._store_file(data, f"{batch.id}_{kind}.jsonl", "batch_output")["id"]

    # -- Anthropic message batches ---------------------------------------------------------------------

    async def _create_anthropic(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.json()
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "requests: a non-empty list"}},
                                     status=400)  # fmt: skip
        batch = self._new_batch("anthropic", requests)
        return web.json_response(self._anthropic_object(batch))

    async def _list_anthropic(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        newest_first = sorted((b for b in self.batches.values() if b.provider == "anthropic"),
                              key=lambda b: -b.created)  # fmt: skip
        objects = [self._anthropic_object(b) for b in newest_first]
        return web.json_response(self._page(request, objects, request.query.get("after_id")))

    async def _retrieve_anthropic(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        return web.json_response(self._anthropic_object(self._batch(request, "anthropic")))

    async def _cancel_anthropic(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        batch = self._batch(request, "anthropic")
        if batch.state(time.time()) not in _FINAL_OPENAI:
            batch.cancelled_at = time.time()
        return web.json_response(self._anthropic_object(batch))

    def _anthropic_object(self, batch: _Batch) -> dict[str, Any]:
        now = time.time()
        ended = batch.state(now) in _FINAL_OPENAI
        results = self._anthropic_results_of(batch, now) if ended else []
        counts = {"processing": 0 if ended else len(batch.lines), "succeeded": 0, "errored": 0, "canceled": 0,
                  "expired": 0}  # fmt: skip
        for result in results:
            counts[result["result"]["type"]] += 1
        return {"id": batch.id, "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                "request_counts": counts, "ended_at": _iso(now) if ended else None, "created_at": _iso(batch.created),
                "expires_at": _iso(batch.created + 86400), "archived_at": None,
                "cancel_initiated_at": _iso(batch.cancelled_at) if batch.cancelled_at else None,
                "results_url": f"{self._emulator.url}/v1/messages/batches/{batch.id}/results" if ended
                else None}  # fmt: skip

    def _anthropic_results_of(self, batch: _Batch, now: float) -> list[dict[str, Any]]:
        if batch.results is None:
            done_lines = int(len(batch.lines) * batch.processed_share(now) + 1e-9)
            ended_as = "expired" if batch.state(now) == "expired" else "canceled"
            results = []
            for index, entry in enumerate(batch.lines):
                if index >= done_lines:
                    results.append({"custom_id": entry.get("custom_id"), "result": {"type": ended_as}})
                    continue
                ok, answer = self._answer(batch, index, entry.get("params") or {})
                result = {"type": "succeeded", "message": answer} if ok else {
                    "type": "errored", "error": {"type": "error", "error": answer}}  # fmt: skip
                results.append({"custom_id": entry.get("custom_id"), "result": result})
            batch.results = results
        return batch.results

    async def _anthropic_results(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        batch = self._batch(request, "anthropic")
        now = time.time()
        if batch.state(now) not in _FINAL_OPENAI:
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "the batch has not ended"}},
                                     status=400)  # fmt: skip
        data = "".join(json.dumps(result) + "\n" for result in self._anthropic_results_of(batch, now))
        return web.Response(text=data, content_type="application/binary")


def _validation_errors(lines: list[Any], endpoint: str) -> list[dict[str, Any]]:
    """What OpenAI's validation of a batch input file would refuse, as its ``errors.data`` entries. A body
    whose model starts with ``no-batch-`` stands for a model the provider does not offer through its Batch
    API."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        problem = None
        body = line.get("body") if isinstance(line, dict) else None
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) or not isinstance(body, dict):
            problem = "each line needs a custom_id and a body"
        elif line["custom_id"] in seen:
            problem = f"the custom_id {line['custom_id']!r} is used twice"
        elif line.get("url") != endpoint:
            problem = f"the url {line.get('url')!r} is not the batch's endpoint {endpoint}"
        elif str(body.get("model", "")).startswith("no-batch-"):
            problem = f"the model {body['model']!r} is not available through the Batch API"
        if problem:
            errors.append({"code": "invalid_request", "message": problem, "param": None, "line": number})
        if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
            seen.add(line["custom_id"])
    return errors


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
