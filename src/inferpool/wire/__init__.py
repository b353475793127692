"""Wire formats: every pydantic model that crosses a process boundary (client, gateway, Redis, Celery,
files), and only those. ``client`` and ``workers`` never import each other: both speak these models.

- ``requests``: the OpenAI chat-completions body as inferpool accepts it;
- ``completions``, ``embeddings``: the ``/v1/completions`` and ``/v1/embeddings`` bodies and responses;
- ``kinds``: the three request kinds by endpoint (``AnyRequest``, ``InferenceRequest``);
- ``results``: ``chat.completion`` objects, serving stats, errors; ``tokens``: usage counts;
- ``chunks``: streamed ``chat.completion.chunk`` objects;
- ``tasks``: what Celery carries (chunks of items);
- ``batch_lines``: OpenAI Batch JSONL input and output lines;
- ``jobs``: a batch job as clients see it (status, counts, the path chosen per model);
- ``pipelines``: a pipeline's status, its steps' progress, a row's outcome per step;
- ``usage``: usage rows; ``provider_batches``: a provider batch's record (``batch status`` shows it);
- ``via``: the path a request takes (real time or a provider's Batch API);
- ``ids``: the random ids everything carries; ``parsing``: JSON and validation errors from any input.

Everything is re-exported here: ``from inferpool.wire import ChatRequest``.
"""

from __future__ import annotations

from inferpool.wire.batch_lines import BatchInputLine, BatchOutputLine, BatchResponse
from inferpool.wire.chunks import ChatCompletionChunk, ChunkChoice, ChunkDelta, as_completion_chunk
from inferpool.wire.completions import (
    COMPLETIONS_URL,
    DEFAULT_COMPLETION_TOKENS,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
)
from inferpool.wire.embeddings import (
    EMBEDDINGS_URL,
    MAX_EMBEDDING_INPUTS,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    pack_vector,
    unpack_vector,
)
from inferpool.wire.ids import TENANT_NAME, check_tenant, new_id, random_hex
from inferpool.wire.jobs import BatchJob, JobStatus, RequestCounts
from inferpool.wire.kinds import REQUEST_TYPES, SUPPORTED_URLS, AnyRequest, InferenceRequest, supported_urls_text
from inferpool.wire.parsing import describe_validation_error, load_json
from inferpool.wire.pipelines import PipelineRow, PipelineRun, PipelineStatus, StepOutcome, StepProgress
from inferpool.wire.provider_batches import PBatchState, ProviderBatch
from inferpool.wire.requests import (
    AUTO_MODEL,
    CHAT_COMPLETIONS_URL,
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
    FunctionCall,
    RequestResult,
    Response,
    ServingStats,
    ToolCall,
)
from inferpool.wire.tasks import TaskChunk, TaskItem, chunk_json, describe_chunk
from inferpool.wire.tokens import FinishReason, PromptTokensDetails, Usage
from inferpool.wire.usage import ModelUsage
from inferpool.wire.via import VIA_CHOICES, ServedVia, Via, ViaChoice, as_via

__all__ = [
    "AUTO_MODEL",
    "CHAT_COMPLETIONS_URL",
    "COMPLETIONS_URL",
    "DEFAULT_COMPLETION_TOKENS",
    "EMBEDDINGS_URL",
    "MAX_EMBEDDING_INPUTS",
    "MAX_JSON_DEPTH",
    "REQUEST_TYPES",
    "SUPPORTED_URLS",
    "TENANT_NAME",
    "VIA_CHOICES",
    "AnyRequest",
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
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionRequest",
    "ContentPart",
    "Embedding",
    "EmbeddingList",
    "EmbeddingRequest",
    "EmbeddingUsage",
    "ErrorInfo",
    "FinishReason",
    "FunctionCall",
    "ImagePart",
    "ImageURL",
    "InferenceRequest",
    "JobStatus",
    "ModelUsage",
    "PBatchState",
    "PipelineRow",
    "PipelineRun",
    "PipelineStatus",
    "PromptTokensDetails",
    "ProviderBatch",
    "RequestCounts",
    "RequestResult",
    "Response",
    "RoutingHints",
    "ServedVia",
    "ServingStats",
    "StepOutcome",
    "StepProgress",
    "StreamOptions",
    "TaskChunk",
    "TaskItem",
    "TextPart",
    "ToolCall",
    "Usage",
    "Via",
    "ViaChoice",
    "as_completion_chunk",
    "as_via",
    "check_json_depth",
    "check_tenant",
    "chunk_json",
    "describe_chunk",
    "describe_validation_error",
    "load_json",
    "new_id",
    "pack_vector",
    "random_hex",
    "supported_urls_text",
    "unpack_vector",
]
