"""Streamed answers through Redis (DESIGN §8): the worker's ``DeltaSink`` and the readers' ``StreamAssembler``.

A worker serving a request with ``stream: true`` appends to ``inferpool:stream:{request_id}``:

- ``s=<model>``: the worker took the request (written before it runs);
- ``o=<offset> t=<text>``: a piece of the first choice's text, ``offset`` characters into the current
  attempt at the answer;
- ``r=<attempt>``: a new attempt begins (a provider call retried after some text was published): its text
  starts again at offset 0. A reader checks that the new attempt repeats what it has shown and shows only
  what comes after. If the new attempt differs, the text shown is not a prefix of the answer any more; since
  shown text cannot be taken back, the stream ends with the error ``stream_restarted`` (the SSE relay sends
  it as its error event) and the answer is the request's result, which stays correct;
- ``d=1``: the result is written; the result-writing script adds it in the same step as the result.

The stream is capped (``MAXLEN ~``) and expires with the result. It is a view of progress: the result key
stays the one source of truth, written exactly once. A reader turns entries into OpenAI
``chat.completion.chunk`` objects, and ends with the rest of the answer taken from the result (the whole
answer, for backends that cannot stream, and anything a reader missed), the finish reason and the usage.
Nothing blocks on readers: a worker writes whether or not anyone reads.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio

from inferpool._exceptions import RequestError
from inferpool.constants import (
    STREAM_DONE,
    STREAM_MAX_ENTRIES,
    STREAM_OFFSET,
    STREAM_RESTART,
    STREAM_RESTARTED_CODE,
    STREAM_STARTED,
    STREAM_TEXT,
    stream_cancel_key,
    stream_key,
)
from inferpool.wire import ChatCompletionChunk, Choice, ChunkChoice, ChunkDelta, EmbeddingList, RequestResult, Usage

log = logging.getLogger(__name__)

# -- the worker's side ------------------------------------------------------------------------------------


class DeltaSink:
    """Where a backend puts a streamed request's text (its first choice) as it is generated.

    ``emit`` is called on the backend's event loop and never waits: text is published by a thread of the
    loop's executor, one Redis round trip at a time, so pieces made while one is in flight go together in
    the next. ``cancelled`` turns true when a reader asked the worker to stop (its client hung up);
    backends that can stop check it between tokens.
    """

    def __init__(self, client: redis.Redis, request_id: str, ttl_s: int) -> None:
        self._client = client
        self._key = stream_key(request_id)
        self._cancel_key = stream_cancel_key(request_id)
        self._ttl_s = ttl_s
        self._pending: list[str] = []
        self._offset = 0  # where the next published piece starts in the current attempt
        self._attempt = 0
        self._restarted = False  # a restart marker is due before the next piece
        self._in_flight: asyncio.Future[bool] | None = None
        self._broken = False
        self.cancelled = False

    def emit(self, text: str) -> None:
        if text and not self._broken:
            self._pending.append(text)
            self._publish_next()

    def restart(self) -> None:
        """A new attempt at the answer begins (a provider call retried): its text starts at offset 0 again,
        behind an ``r`` entry if the earlier attempt published anything."""
        if self._offset or self._in_flight is not None:
            self._restarted = True
        self._pending.clear()
        self._offset = 0

    async def drain(self) -> None:
        """Wait until everything emitted is published (before the result is written, so ``d`` comes last)."""
        while self._in_flight is not None:
            await asyncio.wait([self._in_flight])
            await asyncio.sleep(0)  # the done callback runs first, and may start the next publish

    def _publish_next(self) -> None:
        if self._in_flight is not None or not self._pending:
            return
        text, offset = "".join(self._pending), self._offset
        self._pending.clear()
        self._offset += len(text)
        restart = 0
        if self._restarted:
            self._attempt += 1
            restart, self._restarted = self._attempt, False
        self._in_flight = asyncio.get_running_loop().run_in_executor(None, self._publish, offset, text, restart)
        self._in_flight.add_done_callback(self._published)

    def _publish(self, offset: int, text: str, restart: int) -> bool:
        pipe = self._client.pipeline(transaction=False)
        if restart:
            pipe.xadd(self._key, {STREAM_RESTART: restart}, maxlen=STREAM_MAX_ENTRIES, approximate=True)
        pipe.xadd(self._key, {STREAM_OFFSET: offset, STREAM_TEXT: text}, maxlen=STREAM_MAX_ENTRIES, approximate=True)
        pipe.exists(self._cancel_key)
        return bool(pipe.execute()[-1])

    def _published(self, future: asyncio.Future[bool]) -> None:
        self._in_flight = None
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            # Readers get the rest of the answer from the result; the answer itself must not fail for this.
            log.warning("stream %s: publishing deltas failed (%s); the rest comes with the result", self._key, error)
            self._broken = True
            self._pending.clear()
            return
        self.cancelled = self.cancelled or future.result()
        self._publish_next()


_SINK: contextvars.ContextVar[DeltaSink | None] = contextvars.ContextVar("inferpool_delta_sink", default=None)


def current_delta_sink() -> DeltaSink | None:
    """The sink of the request a backend is generating now, if a reader waits for its deltas.

    The worker runtime calls a backend with one streamed request at a time and this set; a backend that
    can stream emits the first choice's text into it (and may stop when ``cancelled``). A backend that
    ignores it still works: its readers get the whole answer at once, with the result.
    """
    return _SINK.get()


def bind_delta_sink(sink: DeltaSink) -> contextvars.Token[DeltaSink | None]:
    return _SINK.set(sink)


def unbind_delta_sink(token: contextvars.Token[DeltaSink | None]) -> None:
    _SINK.reset(token)


def open_streams(client: redis.Redis, request_ids: list[str], model: str, ttl_s: int) -> None:
    """Write the ``s`` entry of each streamed request about to run (and the streams' expiry)."""
    if not request_ids:
        return
    pipe = client.pipeline(transaction=False)
    for request_id in request_ids:
        pipe.xadd(stream_key(request_id), {STREAM_STARTED: model}, maxlen=STREAM_MAX_ENTRIES, approximate=True)
        pipe.expire(stream_key(request_id), ttl_s)
    pipe.execute()


# -- the readers' side ------------------------------------------------------------------------------------

#: A reader's blocking read lasts at most this long; between reads it checks the result key, so a result
#: written without a stream (a request settled by the scheduler, a worker that died) still ends the wait.
READ_SLICE_S = 1.0


class StreamAssembler:
    """Turns stream entries and then the result into chunks; no I/O (the sync and async readers share it)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.position = "0-0"
        self.done = False
        self._id = "chatcmpl-" + request_id.removeprefix("req_")
        self._created = int(time.time())
        self._model = ""
        self._shown = ""
        self._received = 0  # characters of the current attempt received so far
        self._gap = False
        self._restarted = False
        self._opened = False

    def feed(self, entries: list[tuple[Any, dict[Any, Any]]]) -> Iterator[ChatCompletionChunk]:
        """Chunks for the text in ``entries`` (as ``XREAD`` returns them); sets ``done`` at the ``d`` entry."""
        for entry_id, raw_fields in entries:
            self.position = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            fields = {_text(k): _text(v) for k, v in raw_fields.items()}
            if STREAM_STARTED in fields:
                # Taken by a worker: not a chunk yet. The first chunk goes with the first token, as vLLM's and
                # OpenAI's servers send it: clients (and `vllm bench serve`) time the first token by it.
                self._model = self._model or fields[STREAM_STARTED]
            elif STREAM_TEXT in fields:
                yield from self._delta(int(fields[STREAM_OFFSET]), fields[STREAM_TEXT])
            elif STREAM_RESTART in fields:
                self._restarted, self._received = True, 0
            elif STREAM_DONE in fields:
                self.done = True
                return

    def _open(self) -> Iterator[ChatCompletionChunk]:
        if not self._opened:
            self._opened = True
            yield self._chunk([ChunkChoice(index=0, delta=ChunkDelta(role="assistant", content=""))])

    def _delta(self, offset: int, text: str) -> Iterator[ChatCompletionChunk]:
        if self._gap:
            return
        if offset != self._received:  # entries trimmed before this reader got them: the rest comes at the end
            self._gap = True
            return
        self._received += len(text)
        overlap = self._shown[offset : offset + len(text)]  # a new attempt must repeat what was shown
        if not text.startswith(overlap):
            raise self._diverged()
        new = text[len(overlap) :]
        if new:
            yield from self._open()
            self._shown += new
            yield self._chunk([ChunkChoice(index=0, delta=ChunkDelta(content=new))])

    def _diverged(self) -> RequestError:
        log.warning("stream of %s: a retried attempt answered differently from the text already shown",
                    self.request_id)  # fmt: skip
        return RequestError(
            "the provider call was retried mid-stream and the new attempt's text differs from what this stream had "
            f"already shown; the request's answer is its result (fetch request {self.request_id}), or retry "
            "without streaming", code=STREAM_RESTARTED_CODE)  # fmt: skip

    def finish(self, result: RequestResult) -> Iterator[ChatCompletionChunk]:
        """The last chunks: the rest of the answer, the finish reasons, other choices, then usage. A result
        that is an error yields nothing: the caller raises it."""
        response = result.response
        if response is None or isinstance(response, EmbeddingList):  # embeddings are never streamed
            return
        self._model = response.model or self._model
        yield from self._open()
        for choice in response.choices:
            message = choice.message if isinstance(choice, Choice) else None
            text = (message.content if message is not None else getattr(choice, "text", "")) or ""  # a completion
            if choice.index == 0:
                if not text.startswith(self._shown):
                    raise self._diverged()  # never let a reader take a spliced text for the answer
                rest = text[len(self._shown) :]
                delta = ChunkDelta(content=rest) if rest else ChunkDelta()
                if message is not None and message.tool_calls:
                    delta.tool_calls = [{"index": index, **call.model_dump()}
                                        for index, call in enumerate(message.tool_calls)]  # fmt: skip
            else:
                delta = ChunkDelta(role="assistant", content=text)
            yield self._chunk([ChunkChoice(index=choice.index, delta=delta, finish_reason=choice.finish_reason,
                                           logprobs=choice.logprobs)])  # fmt: skip
        yield self._chunk([], usage=response.usage)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self._id, created=self._created, model=self._model, choices=choices,
                                   usage=usage)  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ask_to_stop(client: redis.Redis, request_id: str, ttl_s: int) -> None:
    """Tell the worker generating ``request_id`` that nobody reads its stream any more."""
    client.set(stream_cancel_key(request_id), 1, ex=ttl_s)


async def ask_to_stop_async(client: redis.asyncio.Redis, request_id: str, ttl_s: int) -> None:
    """``ask_to_stop`` for asyncio callers."""
    await client.set(stream_cancel_key(request_id), 1, ex=ttl_s)
