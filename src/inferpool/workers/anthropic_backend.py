"""Anthropic's Messages API, from the OpenAI chat format and back."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from inferpool._exceptions import InvalidRequest
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.state.streams import current_delta_sink
from inferpool.wire import ChatRequest
from inferpool.workers.anthropic_translate import (
    FINISH_REASONS,
    conversation,
    message_generation,
    tool_arguments,
)
from inferpool.workers.api_backend import (
    ApiBackend,
    ProviderReply,
    StreamedToolCalls,
    classify_sdk_error,
    maybe_await,
    stopped_generation,
    streamed_generation,
)

if TYPE_CHECKING:
    from inferpool.provider_batch.api import ProviderBatchApi


class AnthropicBackend(ApiBackend):
    name = "anthropic"
    provider = "anthropic"
    default_key_env = "ANTHROPIC_API_KEY"

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        super().__init__(spec, settings)
        import anthropic

        self._sdk = anthropic
        self._client = anthropic.AsyncAnthropic(
            api_key=self._api_key, base_url=self.params.base_url, timeout=self.params.timeout_s, max_retries=0
        )

    def translate(self, request: ChatRequest) -> dict[str, Any]:
        """OpenAI chat body -> Messages API arguments; what has no equivalent is refused, not dropped."""
        for name in ("seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs"):
            if getattr(request, name) is not None:
                raise InvalidRequest(f"{name} is not supported by Anthropic models; leave it out")
        system = [m.text() for m in request.messages if m.role in ("system", "developer")]
        arguments: dict[str, Any] = {
            "model": self.provider_model,
            "messages": conversation(request),
            "max_tokens": request.output_limit() or self.spec.capabilities.default_max_tokens,
            **tool_arguments(request),
        }
        if system:
            arguments["system"] = "\n\n".join(system)
        if request.stop_sequences():
            arguments["stop_sequences"] = request.stop_sequences()
        extra: dict[str, Any] = {}
        if request.temperature is not None:
            if request.temperature > 1:
                raise InvalidRequest("temperature above 1 is not supported by Anthropic models (range 0-1)")
            extra["temperature"] = request.temperature
        if request.top_p is not None:
            extra["top_p"] = request.top_p
        if extra:
            arguments["extra_body"] = extra
        return arguments

    async def call(self, arguments: dict[str, Any]) -> ProviderReply:
        if self.params.stream or current_delta_sink() is not None:
            return await self._call_streaming(arguments)
        try:
            raw = await self._client.messages.with_raw_response.create(**arguments)
            message = await maybe_await(raw.parse())  # async clients return a coroutine here
        except Exception as exc:  # classify_sdk_error re-raises anything it does not recognise
            raise classify_sdk_error(exc, self._sdk) from exc
        return ProviderReply(message_generation(message), dict(raw.headers))

    async def _call_streaming(self, arguments: dict[str, Any]) -> ProviderReply:
        """The same call as an event stream: the first text delta is the first token; a reader of the
        request's own stream (``current_delta_sink``) gets each delta as it comes."""
        sink = current_delta_sink()
        if sink is not None:
            sink.restart()  # a retried call streams the answer from its start again
        first_token_at: float | None = None
        parts: list[str] = []
        tool_uses = StreamedToolCalls(empty_arguments="{}")  # a tool_use's input is a JSON object
        stop_reason: str | None = None
        input_tokens = output_tokens = 0
        try:
            raw = await self._client.messages.with_raw_response.create(**arguments, stream=True)
            stream = await maybe_await(raw.parse())
            async for event in stream:
                if sink is not None and sink.cancelled:  # the reader hung up: stop paying for the rest
                    await stream.close()
                    return ProviderReply(stopped_generation(parts, first_token_at), dict(raw.headers))
                if event.type == "message_start":
                    input_tokens = event.message.usage.input_tokens
                elif event.type == "content_block_start":
                    block = event.content_block
                    if getattr(block, "type", "") == "tool_use":
                        tool_uses.piece(event.index, call_id=block.id, name=block.name)
                elif event.type == "content_block_delta" and getattr(event.delta, "type", "") == "text_delta":
                    first_token_at = first_token_at or time.time()
                    parts.append(event.delta.text)
                    if sink is not None:
                        sink.emit(event.delta.text)
                elif event.type == "content_block_delta" and getattr(event.delta, "type", "") == "input_json_delta":
                    first_token_at = first_token_at or time.time()
                    tool_uses.piece(event.index, arguments=event.delta.partial_json)
                elif event.type == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    output_tokens = event.usage.output_tokens
        except Exception as exc:  # classify_sdk_error re-raises anything it does not recognise
            raise classify_sdk_error(exc, self._sdk) from exc
        finish = None if stop_reason is None else FINISH_REASONS.get(stop_reason, "stop")
        generation = streamed_generation(
            parts,
            finish,
            input_tokens,
            output_tokens,
            first_token_at,
            missing="stop_reason",
            tool_calls=tool_uses.calls(),
        )
        return ProviderReply(generation, dict(raw.headers))

    async def close_client(self) -> None:
        await self._client.close()

    def batch_api(self) -> ProviderBatchApi:
        """Anthropic's Message Batches on this backend's client and translation."""
        from inferpool.provider_batch.anthropic_batch import AnthropicBatchApi

        return AnthropicBatchApi(self._client, self.translate)
