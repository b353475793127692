"""Publishing chunk tasks without Celery: the message ``send_task`` would make, in one ``LPUSH``.

Kept apart from ``celery_app`` so that a client publishing single requests never imports Celery (~40 ms of its
start-up).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio

from inferpool.constants import TASK_PROCESS_CHUNK, chunk_queue_name
from inferpool.wire import TaskChunk


class ChunkPublisher:
    """Publishes chunk tasks with one ``LPUSH`` each: the message Celery's ``send_task`` would make (task protocol 2,
    kombu's Redis envelope), built directly. ``send_task`` spent ~80% of a single request's submit in kombu's
    per-message machinery (entity copies, declarations, producer pool) around that one ``LPUSH``.

    Only for what the clients publish (single requests): queues exist once a worker of their model started, and
    task-sent events are off (``task_send_sent_event``), so nothing else is owed. ``tests/test_single_requests.py``
    checks the message against ``send_task``'s, field by field.
    """

    def __init__(self, client: redis.Redis,
                 connect_async: Callable[[], Awaitable[redis.asyncio.Redis]] | None = None) -> None:  # fmt: skip
        """``client`` publishes (``publish``); ``connect_async`` gives an ``AsyncClient``'s asyncio connection, for
        ``publish_async``."""
        self._redis = client
        self._connect_async = connect_async
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(uuid.uuid4())

    def message(self, payload: str, *, queue: str, description: str, expires_s: int,
                headers: dict[str, object] | None = None) -> bytes:  # fmt: skip
        """The message, as kombu's Redis transport stores it in the queue's list; ``headers`` are added to the
        task's (``send_task(headers=...)``: its traces)."""
        task_id = str(uuid.uuid4())
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_s)).isoformat()
        body = json.dumps([[payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
        return json.dumps({
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": TASK_PROCESS_CHUNK, "id": task_id, "shadow": None, "eta": None,
                "expires": expires, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
                "root_id": task_id, "parent_id": None, "argsrepr": description, "kwargsrepr": "{}",
                "origin": self._origin, "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
                "stamps": {}, **(headers or {}),
            },
            "properties": {
                "correlation_id": task_id, "reply_to": self._reply_to, "argsrepr": description, "kwargsrepr": "{}",
                "delivery_mode": 2, "expiration": str(expires_s * 1000),
                "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }).encode()  # fmt: skip

    def publish(self, chunk: TaskChunk, worker: str | None = None) -> None:
        """``publish_chunk``, in one round trip."""
        self._redis.lpush(*self._queued(chunk, worker))

    async def publish_async(self, chunk: TaskChunk) -> None:
        """``publish`` to the model's shared queue on the asyncio connection: no thread hop on an event loop."""
        if self._connect_async is None:
            raise RuntimeError("this ChunkPublisher was made without an asyncio connection (connect_async)")
        client = await self._connect_async()
        await client.lpush(*self._queued(chunk, None))

    def _queued(self, chunk: TaskChunk, worker: str | None) -> tuple[str, bytes]:
        """The queue ``chunk`` goes to (``worker``'s own, or the model's shared one), and its message."""
        queue = chunk_queue_name(chunk.model, chunk.priority, worker)
        message = self.message(chunk.model_dump_json(exclude_none=True), queue=queue, description=chunk.describe(),
                               expires_s=chunk.result_ttl_s, headers=chunk.trace_headers())  # fmt: skip
        return queue, message
