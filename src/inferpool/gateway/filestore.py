"""The gateway's file store: uploaded files' bytes in a directory, their metadata in Redis.

``INFERPOOL_FILES_DIR`` (default ``~/.local/share/inferpool/files``) holds one file per upload, named by its
id; several gateways share it through a network file system. Redis holds each file's metadata (owner
tenant, name, size, purpose) and a per-tenant index, so any gateway can list and find files. An upload is
parsed as it streams in (``multipart/form-data``, never whole in memory) into ``<id>.part``, checked, then
renamed: a file is listed only once it is complete.

Every byte of the body counts against the upload limit (the file's bytes, and at most
``_BODY_OVERHEAD`` more for part headers, fields and boundaries), there are at most ``_MAX_PARTS`` parts,
and a body that ends before its closing boundary (a cut-off upload) is refused, never stored. Writes to the
store run in a thread, a buffer at a time: the gateway's event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import redis.asyncio
from pydantic import BaseModel
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from inferpool.constants import (
    FILES_BY_AGE_KEY,
    file_key,
    tenant_file_bytes_key,
    tenant_files_key,
)
from inferpool.gateway.errors import HTTPError
from inferpool.plumbing.redis_connection import decode_text
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
    expires_at: int | None = None


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    value: bytearray = field(default_factory=bytearray)


#: The library logs a warning for each malformed body; a client's mistake is answered with a 400 instead.
logging.getLogger("python_multipart").setLevel(logging.ERROR)

#: Bytes of an upload's body beyond its file's that are allowed (headers, fields, boundaries).
_BODY_OVERHEAD = 64 * 1024
#: Most parts in one upload (the file and a few fields: purpose, and what other SDKs send).
_MAX_PARTS = 16
#: Body bytes gathered before they are parsed and written in a thread.
_FEED_BYTES = 1024 * 1024


def _too_large(max_bytes: int) -> HTTPError:
    return HTTPError(413, f"The upload is over the limit of {max_bytes} bytes (INFERPOOL_BATCH_MAX_BYTES, plus room "
                     "for its form fields); split the file.", code="file_too_large")  # fmt: skip


class _UploadParser:
    """``multipart/form-data`` with one ``file`` part (written to ``sink``) and small text fields."""

    _FIELD_LIMIT = 1024

    def __init__(self, boundary: bytes, sink: IO[bytes], max_bytes: int) -> None:
        self._sink = sink
        self._max_bytes = max_bytes
        self.file_bytes = 0
        self.body_bytes = 0
        self.parts = 0
        self.complete = False
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
            "on_end": self._finished,
        }  # fmt: skip
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:  # e.g. a boundary over the library's 256 bytes
            raise HTTPError(400, f"The multipart body cannot be read: {exc}.") from None

    def feed(self, data: bytes) -> None:
        """Parse the next bytes of the body (writing the file's bytes to the sink); 400/413 for a bad body."""
        self.body_bytes += len(data)
        if self.body_bytes > self._max_bytes + _BODY_OVERHEAD:
            raise _too_large(self._max_bytes)
        try:
            self._parser.write(data)
        except FormParserError as exc:
            raise HTTPError(400, f"The multipart body is malformed ({exc}); send the file as multipart/form-data "
                            "with fields 'file' and 'purpose'.") from None  # fmt: skip

    def _finished(self) -> None:
        self.complete = True

    def flush(self) -> None:
        self._sink.flush()

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > _MAX_PARTS:
            raise HTTPError(400, f"The upload has more than {_MAX_PARTS} form parts; send the file and 'purpose' only.")
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


async def _feed_from(body: AsyncIterator[bytes], parser: _UploadParser) -> None:
    """Parse the streamed body a buffer at a time in a thread (parsing and writing never block the loop)."""
    pending = bytearray()
    async for data in body:
        pending += data
        if len(pending) >= _FEED_BYTES:
            await asyncio.to_thread(parser.feed, bytes(pending))
            pending.clear()
    if pending:
        await asyncio.to_thread(parser.feed, bytes(pending))
    await asyncio.to_thread(parser.flush)


def multipart_boundary(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise HTTPError(400, "Upload files as multipart/form-data with fields 'file' and 'purpose'.")
    return boundary


#: Registers an uploaded file if the tenant's quota allows it. KEYS: metadata hash, tenant index, tenant
#: bytes, files by age. ARGV: tenant, object JSON, file id, now, bytes, most bytes, most files.
#: Returns 0 (stored), 1 (over the bytes quota), 2 (over the file count).
_REGISTER = """
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used + tonumber(ARGV[5]) > tonumber(ARGV[6]) then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then return 2 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'object', ARGV[2], 'bytes', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
redis.call('INCRBY', KEYS[3], ARGV[5])
return 0
"""

#: Forgets one file (deleted or expired), once. KEYS: metadata hash, files by age, the tenant's index, the
#: tenant's bytes. ARGV: file id. Returns 1 if this call forgot it.
_FORGET = """
redis.call('ZREM', KEYS[2], ARGV[1])
local size = redis.call('HGET', KEYS[1], 'bytes')
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
if size then redis.call('DECRBY', KEYS[4], size) end
return 1
"""

#: What an uploaded file's id looks like.
_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")

#: Expired files forgotten per sweep (each upload and listing sweeps once).
_SWEEP_BATCH = 100


@dataclass(frozen=True)
class FileLimits:
    """How long files are kept and how much one tenant may keep (``Settings.files_*``)."""

    ttl_s: int
    max_bytes_per_tenant: int
    max_files_per_tenant: int


class FileStore:
    """Files of every tenant; a tenant sees only its own (another's file is 'not found').

    Files expire ``limits.ttl_s`` after their upload: expired ones are never shown, and each upload or
    listing (on any gateway) deletes up to ``_SWEEP_BATCH`` of them, bytes and metadata.
    """

    def __init__(self, root: Path, client: redis.asyncio.Redis, limits: FileLimits) -> None:
        self.root = root
        self._redis = client
        self.limits = limits
        self._register = client.register_script(_REGISTER)
        self._forget = client.register_script(_FORGET)

    def path_of(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    async def upload(
        self,
        tenant: str,
        content_type: str,
        body: AsyncIterator[bytes],
        max_bytes: int,
        check: Callable[[Path], None],
        declared_bytes: int | None = None,
    ) -> FileObject:
        """Store an upload streamed in as ``body``; ``check(path)`` may refuse the finished file (raising). A body
        whose declared length (``Content-Length``) is over the limit is a 413 before a byte of it is parsed, so the
        answer does not depend on how its first bytes happen to be chunked."""
        if declared_bytes is not None and declared_bytes > max_bytes + _BODY_OVERHEAD:
            raise _too_large(max_bytes)
        boundary = multipart_boundary(content_type)
        await self.sweep()
        await self._check_quota(tenant, 0)
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        file_id = f"file-{random_hex()}"
        partial = self.root / f"{file_id}.part"
        sink = await asyncio.to_thread(partial.open, "wb")
        try:
            try:
                parser = _UploadParser(boundary, sink, max_bytes)
                await _feed_from(body, parser)
            finally:
                await asyncio.to_thread(sink.close)
            if not parser.complete:
                raise HTTPError(400, "The upload ended before its closing multipart boundary (it was cut off); "
                                "send the whole file again.")  # fmt: skip
            purpose = parser.fields.get("purpose", "")
            if parser.filename is None:
                raise HTTPError(400, "The upload has no 'file' field.", param="file")
            if purpose != "batch":
                raise HTTPError(400, f"purpose {purpose!r} is not supported; use 'batch'.", param="purpose")
            await asyncio.to_thread(check, partial)
            now = time.time()
            info = FileObject(id=file_id, bytes=parser.file_bytes, created_at=int(now), filename=parser.filename,
                              purpose=purpose, expires_at=int(now) + self.limits.ttl_s)  # fmt: skip
            await asyncio.to_thread(partial.rename, self.path_of(file_id))
            keys = [file_key(file_id), tenant_files_key(tenant), tenant_file_bytes_key(tenant), FILES_BY_AGE_KEY]
            refused = await self._register(keys=keys, args=[tenant, info.model_dump_json(), file_id, now, info.bytes,
                                                            self.limits.max_bytes_per_tenant,
                                                            self.limits.max_files_per_tenant])  # fmt: skip
            if int(refused):
                self.path_of(file_id).unlink(missing_ok=True)
                raise self._over_quota(int(refused), info.bytes)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return info

    async def _check_quota(self, tenant: str, adding: int) -> None:
        """413 at once for a tenant already at its quota (before a large body is read only to be refused)."""
        used, count = await self._quota_use(tenant)
        if used + adding >= self.limits.max_bytes_per_tenant:
            raise self._over_quota(1, adding)
        if count >= self.limits.max_files_per_tenant:
            raise self._over_quota(2, adding)

    async def _quota_use(self, tenant: str) -> tuple[int, int]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(tenant_file_bytes_key(tenant))
        pipe.zcard(tenant_files_key(tenant))
        used, count = await pipe.execute()
        return int(used or 0), int(count)

    def _over_quota(self, which: int, size: int) -> HTTPError:
        limits = self.limits
        if which == 1:
            what = (f"keeping {size} more bytes would pass your quota of {limits.max_bytes_per_tenant} bytes of stored "
                    "files (INFERPOOL_FILES_MAX_BYTES_PER_TENANT)")  # fmt: skip
        else:
            what = f"you already keep {limits.max_files_per_tenant} files (INFERPOOL_FILES_MAX_PER_TENANT)"
        return HTTPError(413, f"Upload refused: {what}; delete files you no longer need (DELETE /v1/files/ID) or "
                         f"wait for them to expire ({limits.ttl_s} s after upload).",
                         code="file_quota_exceeded")  # fmt: skip

    async def sweep(self) -> int:
        """Delete up to ``_SWEEP_BATCH`` expired files (of any tenant); returns how many."""
        cutoff = time.time() - self.limits.ttl_s
        ids = [decode_text(i) for i in await self._redis.zrangebyscore(FILES_BY_AGE_KEY, "-inf", cutoff, 0,
                                                                         _SWEEP_BATCH)]  # fmt: skip
        for file_id in ids:
            await self._remove(file_id)
        return len(ids)

    async def _remove(self, file_id: str) -> bool:
        owner = await self._redis.hget(file_key(file_id), "tenant")
        if owner is None:
            await self._redis.zrem(FILES_BY_AGE_KEY, file_id)
            return False
        tenant = decode_text(owner)
        keys = [file_key(file_id), FILES_BY_AGE_KEY, tenant_files_key(tenant), tenant_file_bytes_key(tenant)]
        forgot = bool(await self._forget(keys=keys, args=[file_id]))
        await asyncio.to_thread(self.path_of(file_id).unlink, missing_ok=True)
        return forgot

    async def get(self, tenant: str, file_id: str) -> FileObject | None:
        if not _FILE_ID.match(file_id):
            return None  # not an id this store makes (and maybe the name of another kind of Redis key)
        stored = await self._redis.hmget(file_key(file_id), ["tenant", "object"])
        if stored[0] is None or stored[1] is None or decode_text(stored[0]) != tenant:
            return None
        info = FileObject.model_validate_json(stored[1])
        if info.expires_at is not None and info.expires_at <= time.time():
            return None  # expired: the next sweep deletes it
        return info

    async def list(self, tenant: str, limit: int, after: str | None) -> tuple[list[FileObject], bool]:
        """Newest first, older than file ``after`` if given; and whether more remain."""
        await self.sweep()
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
        return await self._remove(file_id)
