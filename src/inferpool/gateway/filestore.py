"""The gateway's file store: uploaded files' bytes in a directory, their metadata in Redis.

``INFERPOOL_FILES_DIR`` (default ``~/.local/share/inferpool/files``) holds one file per upload, named by its
id; several gateways share it through a network file system. Redis holds each file's metadata (owner
tenant, name, size, purpose) and a per-tenant index, so any gateway can list and find files. An upload is
parsed as it streams in (``multipart/form-data``, never whole in memory) into ``<id>.part``, checked, then
renamed: a file is listed only once it is complete.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import redis.asyncio
from pydantic import BaseModel
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from inferpool.constants import file_key, tenant_files_key
from inferpool.gateway.errors import HTTPError
from inferpool.redis_connection import decode_text
from inferpool.wire import random_hex


class FileObject(BaseModel):
    """OpenAI's ``file`` object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    value: bytearray = field(default_factory=bytearray)


class _UploadParser:
    """``multipart/form-data`` with one ``file`` part (written to ``sink``) and small text fields."""

    _FIELD_LIMIT = 1024

    def __init__(self, boundary: bytes, sink: IO[bytes], max_bytes: int) -> None:
        self._sink = sink
        self._max_bytes = max_bytes
        self.file_bytes = 0
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        callbacks: Any = {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
        }  # fmt: skip
        self._parser = MultipartParser(boundary, callbacks)

    def feed(self, data: bytes) -> None:
        self._parser.write(data)

    def _begin(self) -> None:
        self._part = _Part()

    def _header_end(self) -> None:
        self._part.headers[self._header_field.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._part.headers.get("content-disposition", ""))
        self._part.name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self._part.filename = None if filename is None else filename.decode("utf-8", "replace")
        if self._part.name == "file":
            if self.filename is not None:
                raise HTTPError(400, "Send one file per upload.", param="file")
            self.filename = os.path.basename(self._part.filename or "upload.jsonl")[:255] or "upload.jsonl"

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part.name == "file":
            self.file_bytes += end - start
            if self.file_bytes > self._max_bytes:
                raise HTTPError(413, f"The file is over the upload limit of {self._max_bytes} bytes "
                                "(INFERPOOL_BATCH_MAX_BYTES); split it.", code="file_too_large")  # fmt: skip
            self._sink.write(data[start:end])
        else:
            self._part.value.extend(data[start:end])
            if len(self._part.value) > self._FIELD_LIMIT:
                raise HTTPError(400, f"Form field {self._part.name!r} is too long.", param=self._part.name)

    def _end(self) -> None:
        if self._part.name and self._part.name != "file":
            self.fields[self._part.name] = self._part.value.decode("utf-8", "replace")


def multipart_boundary(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise HTTPError(400, "Upload files as multipart/form-data with fields 'file' and 'purpose'.")
    return boundary


class FileStore:
    """Files of every tenant; a tenant sees only its own (another's file is 'not found')."""

    def __init__(self, root: Path, client: redis.asyncio.Redis) -> None:
        self.root = root
        self._redis = client

    def path_of(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    async def upload(
        self, tenant: str, content_type: str, body: AsyncIterator[bytes], max_bytes: int, check: Callable[[Path], None]
    ) -> FileObject:
        """Store an upload streamed in as ``body``; ``check(path)`` may refuse the finished file (raising)."""
        boundary = multipart_boundary(content_type)
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = f"file-{random_hex()}"
        partial = self.root / f"{file_id}.part"
        try:
            with partial.open("wb") as sink:
                parser = _UploadParser(boundary, sink, max_bytes)
                async for data in body:
                    parser.feed(data)
            purpose = parser.fields.get("purpose", "")
            if parser.filename is None:
                raise HTTPError(400, "The upload has no 'file' field.", param="file")
            if purpose != "batch":
                raise HTTPError(400, f"purpose {purpose!r} is not supported; use 'batch'.", param="purpose")
            await asyncio.to_thread(check, partial)
            partial.rename(self.path_of(file_id))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        info = FileObject(id=file_id, bytes=parser.file_bytes, created_at=int(time.time()), filename=parser.filename,
                          purpose=purpose)  # fmt: skip
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(file_key(file_id), mapping={"tenant": tenant, "object": info.model_dump_json()})
        pipe.zadd(tenant_files_key(tenant), {file_id: time.time()})
        await pipe.execute()
        return info

    async def get(self, tenant: str, file_id: str) -> FileObject | None:
        stored = await self._redis.hmget(file_key(file_id), ["tenant", "object"])
        if stored[0] is None or stored[1] is None or decode_text(stored[0]) != tenant:
            return None
        return FileObject.model_validate_json(stored[1])

    async def list(self, tenant: str, limit: int, after: str | None) -> tuple[list[FileObject], bool]:
        """Newest first, older than file ``after`` if given; and whether more remain."""
        index = tenant_files_key(tenant)
        top: float | str = "+inf"
        if after is not None:
            score = await self._redis.zscore(index, after)
            if score is None:
                return [], False
            top = f"({score}"
        ids = [decode_text(i) for i in await self._redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit + 1)]
        files = [info for info in [await self.get(tenant, i) for i in ids[:limit]] if info is not None]
        return files, len(ids) > limit

    async def delete(self, tenant: str, file_id: str) -> bool:
        if await self.get(tenant, file_id) is None:
            return False
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(file_key(file_id))
        pipe.zrem(tenant_files_key(tenant), file_id)
        await pipe.execute()
        self.path_of(file_id).unlink(missing_ok=True)
        return True
