"""A worker's detection of its own model: what its provider, engine or files say it accepts.

It runs on a thread of its own at start and every ``detect_interval_s`` (a slow or unreachable source never
holds up a heartbeat or the worker's start). What it finds goes into the heartbeat: the window the engine
accepts (the smaller of the detector's and the loaded engine's, e.g. vLLM's ``max_model_len``), which routing
then uses instead of a larger registry value. A model the provider says does not exist for this key is
recorded as unavailable and the heartbeat stops, so routing treats it like a model with no live worker until
a later detection finds it again. A detection that fails (source down, hostile answer) changes nothing but a
warning: the registry's values stand.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from inferpool._exceptions import DetectionError
from inferpool.detection.base import Detection
from inferpool.detection.targets import plan_for
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.workers.backend import Backend

log = logging.getLogger(__name__)


def engine_window(backend: Backend | None) -> int | None:
    """The window a loaded local engine accepts (an optional ``context_window`` attribute of the backend)."""
    value = getattr(backend, "context_window", None) if backend is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class OwnDetection:
    """The latest detection of one model on this worker; ``on_change`` is called when availability flips."""

    def __init__(self, spec: ModelSpec, settings: Settings, backend: Callable[[], Backend | None],
                 on_change: Callable[[bool], None] | None = None) -> None:  # fmt: skip
        self.spec, self.settings = spec, settings
        self._backend = backend
        self._on_change = on_change
        self.found: Detection | None = None
        self.error: str | None = None
        self.available = True
        self._reported: bool | None = None  # the availability last published (None: not yet)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.settings.detect_interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="detect", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            if self._stop.wait(self.settings.detect_interval_s):
                return

    def run_once(self) -> None:
        """Detect now; keep what was found (or why it failed) for the next heartbeat."""
        try:
            plan = plan_for(self.spec)
            found = plan.run() if plan is not None else None
        except DetectionError as exc:
            self.error = str(exc)
            log.warning("model %s: capability detection failed (registry values stand): %s", self.spec.name, exc)
            return
        except Exception as exc:  # a third-party detector's bug must not kill the thread or the worker
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model %s: detector failed (registry values stand)", self.spec.name)
            return
        self.found, self.error = found, None
        window = self.window()
        if window is not None and window < self.spec.capabilities.context_window:
            log.warning("model %s: the registry says a context window of %d, but its engine accepts %d; routing "
                        "uses %d (update the registry: inferpool models detect %s --write FILE)", self.spec.name,
                        self.spec.capabilities.context_window, window, window, self.spec.name)  # fmt: skip
        available = found is None or found.available
        self.available = available
        if available != self._reported:
            self._reported = available
            if not available:
                log.error("model %s is not available: %s; this worker leaves routing until it is", self.spec.name,
                          found.note if found else "")  # fmt: skip
            if self._on_change is not None:
                self._on_change(available)

    def window(self) -> int | None:
        """The smallest window the detector and the loaded engine report (None: neither says)."""
        known = [value for value in (self.found.context_window if self.found else None,
                                     engine_window(self._backend())) if value is not None]  # fmt: skip
        return min(known) if known else None

    def beat_fields(self) -> dict[str, Any]:
        """What the heartbeat says about the detection."""
        if self.found is None and self.error is None:
            window = engine_window(self._backend())
            return {"detected": {"context_window": window, "detector": "engine"}} if window else {}
        if self.found is None:
            return {"detected": {"error": self.error}}
        fields = {**self.found.capabilities(), "context_window": self.window()}
        return {"detected": {**fields, "detector": self.found.detector, "at": self.found.at.isoformat(),
                             "available": self.found.available}}  # fmt: skip

    def unavailable_record(self) -> dict[str, Any]:
        found = self.found
        return {"model": self.spec.name, "note": found.note if found else "", "source": found.source if found else "",
                "detector": found.detector if found else "", "at": found.at.isoformat() if found else ""}  # fmt: skip
