"""The inferpool exception tree. Every error inferpool raises on purpose is an ``InferpoolError``.

::

    InferpoolError
    ├── ConfigurationError          bad settings, registry file or command-line usage
    │   ├── RegistryError           a registry YAML file that does not validate
    │   └── TemplateError           a prompt template or rows file that cannot be used at all
    ├── RedisUnavailable            cannot reach Redis at the configured URL
    ├── RequestError                one request cannot be served; carries an OpenAI-style ``code``
    │   ├── InvalidRequest          malformed body, unknown or unsupported parameter
    │   │   └── ContextLengthExceeded   prompt + max_tokens larger than the model's context window
    │   ├── ModelNotFound           no model or alias of that name in the registry
    │   ├── CapabilityMismatch      the model cannot do what the request asks (images, tools...)
    │   ├── ProviderError           the backend failed while generating
    │   ├── HookError               a request or result hook refused, rejected or failed
    │   ├── BudgetExceeded          the most it could cost does not fit a tenant's or key's spend budget
    │   └── RateLimited             over its API key's requests or tokens per minute (retry after ``retry_after_s``)
    ├── DetectionError              a capability source (provider, engine, checkpoint) could not be read or
    │                               answered something unusable (a clear message, never a crash)
    ├── ModelLoadError              a worker cannot load its model
    │   └── ModelNotResident        a budgeted worker could not make room for a model in time (its work waits)
    ├── ResultTimeout               waited for a result longer than asked
    ├── BatchRefused                a whole batch file refused up front (not JSONL, over the job limits)
    ├── JobNotFound                 no batch job with that id (never created, or its retention ended)
    └── PoolStartError              the local pool (embedded Redis, worker processes) failed to start

A ``RequestError`` never escapes a worker: it becomes that request's error result, with ``code`` and
``message``, and the other requests in the same batch or chunk go on.
"""

from __future__ import annotations

from typing import ClassVar


class InferpoolError(Exception):
    """Root of every error inferpool raises on purpose."""


class ConfigurationError(InferpoolError):
    """Settings, registry or command-line arguments that cannot work."""


class RegistryError(ConfigurationError):
    """A registry YAML file that does not parse or validate; the message names file, entry and field."""


class RedisUnavailable(InferpoolError):
    """Redis cannot be reached at the configured URL."""


class TemplateError(ConfigurationError):
    """A prompt template (or its rows file) that cannot be used at all: bad YAML or Jinja syntax, an
    unreadable file. A single row that cannot be rendered is that line's error instead."""


class DetectionError(InferpoolError):
    """A capability detector could not read its source (unreachable, refused, not JSON, too large) or the
    source reported something unusable (a context window of 10^30); the message names source and field."""


class ModelLoadError(InferpoolError):
    """A worker could not load the model it was asked to serve."""


class ModelNotResident(ModelLoadError):
    """A worker holding several models within a memory budget could not make room for one in time: every
    resident model was busy. The chunk goes back to wait (its lines stay in Redis) and is tried again."""


class ResultTimeout(InferpoolError, TimeoutError):
    """A result did not arrive within the time the caller allowed."""


class BatchRefused(InferpoolError):
    """A batch input refused as a whole: not JSONL at all, or over the job limits."""


class JobNotFound(InferpoolError):
    """No batch job with that id exists (any more)."""


class PoolStartError(InferpoolError):
    """The local pool could not start (embedded Redis or a worker process failed)."""


class RequestError(InferpoolError):
    """One request that cannot be served. ``code`` is what appears in the request's error result."""

    code: ClassVar[str] = "request_error"

    def __init__(self, message: str, *, code: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts  # how many times a provider was asked before giving up
        if code is not None:
            self.code = code  # type: ignore[misc]  # per-instance override of the class default


class InvalidRequest(RequestError):
    """The request body is malformed or uses a parameter the model does not support."""

    code: ClassVar[str] = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus ``max_tokens`` does not fit in the model's context window."""

    code: ClassVar[str] = "context_length_exceeded"


class ModelNotFound(RequestError):
    """No model or alias of that name is registered."""

    code: ClassVar[str] = "model_not_found"


class CapabilityMismatch(RequestError):
    """The model lacks a capability the request needs."""

    code: ClassVar[str] = "capability_mismatch"


class ProviderError(RequestError):
    """The backend failed while generating."""

    code: ClassVar[str] = "provider_error"


class HookError(RequestError):
    """A hook (``inferpool.hooks``) refused the request, rejected its answer, or failed; names the hook."""

    code: ClassVar[str] = "hook_error"


class BudgetExceeded(RequestError):
    """What the request could cost does not fit what its tenant or gateway key has left of its spend budget this
    window (``inferpool tenants``); refused before it reached a worker (the gateway answers OpenAI's 429
    ``insufficient_quota``)."""

    code: ClassVar[str] = "budget_exceeded"


class RateLimited(RequestError):
    """Over its API key's requests or tokens per minute (``inferpool keys``): ``retry_after_s`` says when a slot
    frees (the gateway's 429 ``rate_limit_exceeded`` with ``Retry-After``)."""

    code: ClassVar[str] = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, limit: str = "requests") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit  # requests or tokens (OpenAI's error type)


_REQUEST_ERRORS_BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        ContextLengthExceeded,
        ModelNotFound,
        CapabilityMismatch,
        ProviderError,
        HookError,
        BudgetExceeded,
    )
}


def request_error_from_code(code: str, message: str) -> RequestError:
    """Rebuild the exception for an error result, so ``chat()`` can raise what the worker reported."""
    cls = _REQUEST_ERRORS_BY_CODE.get(code, RequestError)
    return cls(message, code=code)
