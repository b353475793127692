"""inferpool: a distributed job-queue inference worker pool on Celery and Redis."""

from inferpool._exceptions import (
    BatchRefused,
    BudgetExceeded,
    CapabilityMismatch,
    ConfigurationError,
    ContextLengthExceeded,
    DetectionError,
    HookError,
    InferpoolError,
    InvalidRequest,
    JobNotFound,
    ModelLoadError,
    ModelNotFound,
    PoolStartError,
    ProviderError,
    RedisUnavailable,
    RegistryError,
    RequestError,
    ResultTimeout,
    TemplateError,
)
from inferpool.client import AsyncClient, AsyncResultHandle, Batches, Client, ResultHandle
from inferpool.constants import Priority
from inferpool.model_registry import ModelSpec, Registry
from inferpool.plumbing.settings import Settings
from inferpool.wire import (
    BatchInputLine,
    BatchJob,
    BatchOutputLine,
    ChatCompletion,
    ChatMessage,
    ChatRequest,
    JobStatus,
    RequestResult,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncResultHandle",
    "BatchInputLine",
    "BatchJob",
    "BatchOutputLine",
    "BatchRefused",
    "Batches",
    "BudgetExceeded",
    "CapabilityMismatch",
    "ChatCompletion",
    "ChatMessage",
    "ChatRequest",
    "Client",
    "ConfigurationError",
    "ContextLengthExceeded",
    "DetectionError",
    "HookError",
    "InferpoolError",
    "InvalidRequest",
    "JobNotFound",
    "JobStatus",
    "ModelLoadError",
    "ModelNotFound",
    "ModelSpec",
    "PoolStartError",
    "Priority",
    "ProviderError",
    "RedisUnavailable",
    "Registry",
    "RegistryError",
    "RequestError",
    "RequestResult",
    "ResultHandle",
    "ResultTimeout",
    "Settings",
    "TemplateError",
    "__version__",
]
