"""Request and result hooks: code a team runs on every request of a model, inside the worker.

A hook subclasses ``Hook`` and overrides what it needs (both do nothing by default)::

    class RedactEmails(Hook):
        def before_request(self, request: AnyRequest) -> AnyRequest:
            ...  # return the request to send (rewritten, or as it came); raise Reject("why") to refuse it

        def after_result(self, request: AnyRequest, generation: Generation) -> Generation:
            ...  # return the answer to store (dataclasses.replace(generation, text=...)); Reject to fail it

``request`` is any kind the model serves: a ``ChatRequest``, a ``CompletionRequest`` (its ``prompt``) or an
``EmbeddingRequest`` (its ``input``); ``before_request`` returns one of the same kind. ``after_result`` sees
chat and completion answers (text); embedding vectors are stored as the model made them.

and registers its factory, which takes the registry's ``params`` for it, in the ``inferpool.hooks``
entry-point group (the same mechanism as backends)::

    [project.entry-points."inferpool.hooks"]
    redact-emails = "mypackage.hooks:RedactEmails"

A model (or its provider) lists hooks in the registry: ``hooks: [redact-emails, {name: x, params: {...}}]``;
they run in that order before the backend call, and in reverse order on the answer. A hook that raises
fails that request alone with ``hook_error`` naming the hook; the time hooks take is the request's
``stats.hooks_s``. A model whose hooks rewrite answers does not stream deltas (the stored answer is the
only one shown).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from inferpool._exceptions import ConfigurationError, HookError
from inferpool.constants import HOOK_ENTRY_POINT_GROUP
from inferpool.model_registry.spec import HookSpec
from inferpool.wire import AnyRequest
from inferpool.workers.backend import Generation


class Reject(Exception):
    """Raised by a hook to refuse a request or reject an answer; its message is shown to the caller."""


class Hook:
    """Base of hooks: both methods pass things through unchanged."""

    def before_request(self, request: AnyRequest) -> AnyRequest:
        return request

    def after_result(self, request: AnyRequest, generation: Generation) -> Generation:
        return generation


class HookFactory(Protocol):
    def __call__(self, params: Mapping[str, Any]) -> Hook: ...


def available_hooks() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=HOOK_ENTRY_POINT_GROUP)}


def load_hooks(specs: Sequence[HookSpec]) -> HookChain:
    """The hooks ``specs`` name, built with their params; ``ConfigurationError`` for one not installed."""
    installed = {ep.name: ep for ep in entry_points(group=HOOK_ENTRY_POINT_GROUP)}
    hooks: list[tuple[str, Hook]] = []
    for spec in specs:
        entry = installed.get(spec.name)
        if entry is None:
            names = ", ".join(sorted(installed)) or "(none)"
            raise ConfigurationError(f"no hook named {spec.name!r} is installed (entry-point group "
                                     f"{HOOK_ENTRY_POINT_GROUP}); installed hooks: {names}")  # fmt: skip
        factory: HookFactory = entry.load()
        try:
            hooks.append((spec.name, factory(spec.params)))
        except Exception as exc:
            raise ConfigurationError(f"hook {spec.name!r} cannot start with params {spec.params}: {exc}") from exc
    return HookChain(hooks)


@dataclass(frozen=True)
class HookChain:
    """A model's hooks in order, and how long they take."""

    hooks: Sequence[tuple[str, Hook]] = ()

    @property
    def rewrites_answers(self) -> bool:
        return any(type(hook).after_result is not Hook.after_result for _, hook in self.hooks)

    def before(self, request: AnyRequest) -> tuple[AnyRequest | HookError, float]:
        """The request after every hook, or the error of the first that refused; and the seconds spent."""
        started = time.perf_counter()
        kind = type(request)
        for name, hook in self.hooks:
            try:
                request = hook.before_request(request)
            except Exception as exc:
                return _hook_error(name, exc, "refused the request"), time.perf_counter() - started
            if not isinstance(request, kind):
                return HookError(f"hook {name!r} failed: before_request returned {type(request).__name__}, "
                                 f"not a {kind.__name__}"), time.perf_counter() - started  # fmt: skip
        return request, time.perf_counter() - started

    def after(self, request: AnyRequest, generation: Generation) -> tuple[Generation | HookError, float]:
        """The answer after every hook (last first), or the error of the first that rejected it."""
        started = time.perf_counter()
        for name, hook in reversed(self.hooks):
            try:
                generation = hook.after_result(request, generation)
            except Exception as exc:
                return _hook_error(name, exc, "rejected the answer"), time.perf_counter() - started
            if not isinstance(generation, Generation):
                return HookError(f"hook {name!r} failed: after_result returned {type(generation).__name__}, "
                                 "not a Generation"), time.perf_counter() - started  # fmt: skip
        return generation, time.perf_counter() - started


def _hook_error(name: str, exc: Exception, what: str) -> HookError:
    if isinstance(exc, Reject):
        return HookError(f"hook {name!r} {what}: {exc}")
    return HookError(f"hook {name!r} failed: {type(exc).__name__}: {exc}")
