"""OpenAI, and any OpenAI-compatible server (vLLM serve, Ollama, LM Studio, Together...) via ``base_url``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.state.streams import current_delta_sink
from inferpool.wire import AnyRequest, ChatRequest, CompletionRequest, EmbeddingRequest
from inferpool.workers.api_backend import (
    ApiBackend,
    ProviderReply,
    StreamedToolCalls,
    classify_sdk_error,
    maybe_await,
    stopped_generation,
    streamed_generation,
)
from inferpool.workers.backend import EmbeddingOutcome, GenerationOutcome
from inferpool.workers.openai_translate import (
    _FINISH,
    completion_generation,
    embeddings_outcome,
    text_completion_generation,
)

if TYPE_CHECKING:
    from inferpool.provider_batch.api import ProviderBatchApi


class OpenAIBackend(ApiBackend):
    name = "openai"
    provider = "openai"
    default_key_env = "OPENAI_API_KEY"

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        super().__init__(spec, settings)
        import openai

        self._sdk = openai
        self._client = openai.AsyncOpenAI(
            api_key=self._api_key, base_url=self.params.base_url, timeout=self.params.timeout_s, max_retries=0
        )

    def translate(self, request: ChatRequest) -> dict[str, Any]:
        return self.translate_any(request)

    def translate_any(self, request: AnyRequest) -> dict[str, Any]:
        """The body as the SDK takes it: inferpool's own fields out; embeddings always asked as base64 (a quarter
        of the bytes, and the form they are stored in)."""
        body = request.model_dump(exclude_none=True)
        if isinstance(request, EmbeddingRequest):
            body["encoding_format"] = "base64"
        body["model"] = self.provider_model
        body.pop("stream", None)  # the backend decides (params.stream, or a reader waiting for deltas)
        body.pop("stream_options", None)
        body.pop("routing", None)  # inferpool's own fields
        body.pop("cache", None)
        body.pop("ignore_eos", None)  # only vLLM models take it (check_request_fits)
        return body

    async def complete(self, requests: list[CompletionRequest]) -> list[GenerationOutcome]:
        return cast(list[GenerationOutcome], await self.serve_all(requests))

    async def embed(self, requests: list[EmbeddingRequest]) -> list[EmbeddingOutcome]:
        return cast(list[EmbeddingOutcome], await self.serve_all(requests))

    async def call_kind(self, kind: str, arguments: dict[str, Any]) -> ProviderReply:
        if kind == "chat":
            return await self.call(arguments)
        if kind == "completions" and (self.params.stream or current_delta_sink() is not None):
            return await self._call_streaming(arguments, completions=True)
        try:
            if kind == "completions":
                raw: Any = await self._client.completions.with_raw_response.create(**arguments)
            else:
                raw = await self._client.embeddings.with_raw_response.create(**arguments)
            parsed = await maybe_await(raw.parse())
        except Exception as exc:  # classify_sdk_error re-raises anything it does not recognise
            raise classify_sdk_error(exc, self._sdk) from exc
        answer = text_completion_generation(parsed) if kind == "completions" else embeddings_outcome(parsed)
        return ProviderReply(answer, dict(raw.headers))

    async def call(self, arguments: dict[str, Any]) -> ProviderReply:
        if self.params.stream or current_delta_sink() is not None:
            return await self._call_streaming(arguments)
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**arguments)
            completion = await maybe_await(raw.parse())  # async clients return a coroutine here
        except Exception as exc:  # classify_sdk_error re-raises anything it does not recognise
            raise classify_sdk_error(exc, self._sdk) from exc
        return ProviderReply(completion_generation(completion), dict(raw.headers))

    async def _call_streaming(self, arguments: dict[str, Any], *, completions: bool = False) -> ProviderReply:
        """The same call as a server-sent-event stream: the first content delta is the first token; a reader
        of the request's own stream (``current_delta_sink``) gets each delta as it comes. A text completion
        (``completions``) streams ``choices[].text`` where chat streams ``choices[].delta``."""
        sink = current_delta_sink()
        if sink is not None:
            sink.restart()  # a retried call streams the answer from its start again
        first_token_at: float | None = None
        parts: list[str] = []
        calls = StreamedToolCalls()
        finish: str | None = None
        usage: Any = None
        try:
            endpoint = self._client.completions if completions else self._client.chat.completions
            raw = await endpoint.with_raw_response.create(
                **arguments, stream=True, stream_options={"include_usage": True}
            )
            stream = await maybe_await(raw.parse())
            async for chunk in stream:
                if sink is not None and sink.cancelled:  # the reader hung up: stop paying for the rest
                    await stream.close()
                    return ProviderReply(stopped_generation(parts, first_token_at), dict(raw.headers))
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    delta = None if completions else choice.delta
                    text = choice.text if completions else (delta.content if delta is not None else None)
                    if text:
                        first_token_at = first_token_at or time.time()
                        parts.append(text)
                        if sink is not None:
                            sink.emit(text)
                    if delta is not None:
                        _add_call_pieces(calls, delta.tool_calls)
                    finish = choice.finish_reason or finish
        except Exception as exc:  # classify_sdk_error re-raises anything it does not recognise
            raise classify_sdk_error(exc, self._sdk) from exc
        generation = streamed_generation(
            parts, None if finish is None else _FINISH.get(finish, "stop"), usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0, first_token_at, missing="finish_reason",
            tool_calls=calls.calls(),
        )  # fmt: skip
        return ProviderReply(generation, dict(raw.headers))

    async def close_client(self) -> None:
        await self._client.close()

    def batch_api(self) -> ProviderBatchApi:
        """OpenAI's Batch API on this backend's client and translation."""
        from inferpool.provider_batch.openai_batch import OpenAIBatchApi

        return OpenAIBatchApi(self._client, self.translate_any)


def _add_call_pieces(calls: StreamedToolCalls, deltas: Any) -> None:
    """A chunk's ``delta.tool_calls`` (None, or pieces of calls by index) into ``calls``."""
    for delta in deltas or ():
        function = delta.function
        calls.piece(delta.index, call_id=delta.id, name=function.name if function else None,
                    arguments=(function.arguments if function else None) or "")  # fmt: skip
