"""Wire formats: every pydantic model that crosses a process boundary (client, gateway, Redis, Celery,
files), and only those. ``client`` and ``workers`` never import each other: both speak these models.

- ``requests``: the OpenAI chat-completions body as inferpool accepts it;
- ``results``: ``chat.completion`` objects, serving stats, errors;
- ``chunks``: streamed ``chat.completion.chunk`` objects;
- ``tasks``: what Celery carries (chunks of items);
- ``batch_lines``: OpenAI Batch JSONL input and output lines;
- ``jobs``: a batch job as clients see it (status, counts, the path chosen per model);
- ``usage``: usage rows; ``provider_batches``: a provider batch's record (``batch status`` shows it);
- ``via``: the path a request takes (real time or a provider's Batch API);
- ``ids``: the random ids everything carries; ``parsing``: JSON and validation errors from any input.

Everything is re-exported here: ``from inferpool.wire import ChatRequest``.
"""

from __future__ import annotations

from inferpool.wire.batch_lines import CHAT_COMPLETIONS_URL, BatchInputLine, BatchOutputLine, BatchResponse
from inferpool.wire.chunks import ChatCompletionChunk, ChunkChoice, ChunkDelta
from inferpool.wire.ids import new_id, random_hex
from inferpool.wire.jobs import BatchJob, JobStatus, RequestCounts
from inferpool.wire.parsing import describe_validation_error, load_json
from inferpool.wire.provider_batches import PBatchState, ProviderBatch
from inferpool.wire.requests import (
    AUTO_MODEL,
    MAX_JSON_DEPTH,
    Capability,
    ChatMessage,
    ChatRequest,
    ContentPart,
    ImagePart,
    ImageURL,
    RoutingHints,
    StreamOptions,
    TextPart,
    check_json_depth,
)
from inferpool.wire.results import (
    AssistantMessage,
    ChatCompletion,
    Choice,
    ErrorInfo,
    FinishReason,
    FunctionCall,
    RequestResult,
    ServingStats,
    ToolCall,
    Usage,
)
from inferpool.wire.tasks import TaskChunk, TaskItem, chunk_json, describe_chunk
from inferpool.wire.usage import ModelUsage
from inferpool.wire.via import VIA_CHOICES, ServedVia, Via, ViaChoice, as_via

__all__ = [
    "AUTO_MODEL",
    "CHAT_COMPLETIONS_URL",
    "MAX_JSON_DEPTH",
    "VIA_CHOICES",
    "AssistantMessage",
    "BatchInputLine",
    "BatchJob",
    "BatchOutputLine",
    "BatchResponse",
    "Capability",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChatRequest",
    "Choice",
    "ChunkChoice",
    "ChunkDelta",
    "ContentPart",
    "ErrorInfo",
    "FinishReason",
    "FunctionCall",
    "ImagePart",
    "ImageURL",
    "JobStatus",
    "ModelUsage",
    "PBatchState",
    "ProviderBatch",
    "RequestCounts",
    "RequestResult",
    "RoutingHints",
    "ServedVia",
    "ServingStats",
    "StreamOptions",
    "TaskChunk",
    "TaskItem",
    "TextPart",
    "ToolCall",
    "Usage",
    "Via",
    "ViaChoice",
    "as_via",
    "check_json_depth",
    "chunk_json",
    "describe_chunk",
    "describe_validation_error",
    "load_json",
    "new_id",
    "random_hex",
]
