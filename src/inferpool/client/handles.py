"""Handles of submitted requests: ``ResultHandle`` (``client.submit``) and its asyncio twin, and how a result
becomes the answer or the request's error raised."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from inferpool._exceptions import ProviderError, request_error_from_code
from inferpool.constants import result_key
from inferpool.state.streams import ask_to_stop, ask_to_stop_async
from inferpool.wire import ChatCompletion, ChatCompletionChunk, Completion, EmbeddingList, RequestResult, Response

if TYPE_CHECKING:
    from inferpool.client.client import AsyncClient, Client

AnswerT = TypeVar("AnswerT", ChatCompletion, Completion, EmbeddingList)


def completion_or_raise(result: RequestResult) -> Response:
    """The result's answer (embeddings in the format their request asked for), or the ``RequestError`` the worker
    reported."""
    if isinstance(result.response, EmbeddingList):
        return result.response.as_requested()
    if result.response is not None:
        return result.response
    assert result.error is not None  # RequestResult guarantees exactly one of the two
    raise request_error_from_code(result.error.code, result.error.message)


def expect(response: Response, kind: type[AnswerT]) -> AnswerT:
    """``response`` as the object its request's kind answers with (a mismatch is a worker's bug, said so)."""
    if not isinstance(response, kind):
        raise ProviderError(f"expected a {kind.__name__} answer, got {type(response).__name__}")
    return response


class ResultHandle:
    """A submitted request. ``result()`` waits for it; the handle can be recreated from ``request_id``."""

    def __init__(self, client: Client, request_id: str) -> None:
        self._client = client
        self.request_id = request_id

    def done(self) -> bool:
        return bool(self._client.redis.exists(result_key(self.request_id)))

    def result(self, timeout: float | None = None) -> RequestResult:
        return self._client.wait_result(self.request_id, timeout)

    def completion(self, timeout: float | None = None) -> Response:
        """The answer (a ``ChatCompletion``, ``Completion`` or ``EmbeddingList``, as the request's kind), or the
        request's error raised as an ``InferpoolError``."""
        return completion_or_raise(self.result(timeout))

    def stream(self, timeout: float | None = None) -> Iterator[ChatCompletionChunk]:
        """The answer as ``chat.completion.chunk`` objects while it is generated (a request submitted with
        ``stream: true``), from the start, from any process; the last chunk carries usage. The request's
        error is raised after the chunks shown. Without ``stream: true`` the whole answer comes at the end."""
        return self._client.read_stream(self.request_id, timeout)

    def stop(self) -> None:
        """Ask the worker to stop generating a streamed request nobody reads any more (where its backend can:
        echo, vLLM, the API providers). The request still ends with one result: ``request_cancelled``."""
        ask_to_stop(self._client.redis, self.request_id, self._client.settings.result_ttl_s)


class AsyncResultHandle:
    """The asyncio twin of ``ResultHandle``; ``await handle`` waits with no time limit."""

    def __init__(self, client: AsyncClient, request_id: str) -> None:
        self._client = client
        self.request_id = request_id

    async def done(self) -> bool:
        return bool(await self._client.redis.exists(result_key(self.request_id)))

    async def result(self, timeout: float | None = None) -> RequestResult:
        return await self._client.wait_result(self.request_id, timeout)

    async def completion(self, timeout: float | None = None) -> Response:
        return completion_or_raise(await self.result(timeout))

    def stream(self, timeout: float | None = None) -> AsyncGenerator[ChatCompletionChunk, None]:
        """``ResultHandle.stream``, as an async iterator (close it, or ``contextlib.aclosing``, to let go of its
        connection before its end)."""
        return self._client.read_stream(self.request_id, timeout)

    async def stop(self) -> None:
        """``ResultHandle.stop``."""
        await ask_to_stop_async(self._client.redis, self.request_id, self._client.settings.result_ttl_s)

    def __await__(self) -> Generator[Any, None, RequestResult]:
        return self.result().__await__()
