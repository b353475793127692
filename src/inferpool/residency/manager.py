"""``ResidentModels``: which of a worker's models are loaded, within its memory budget.

A chunk for a model is served while the model is *held*: ``hold`` loads it if it is cold, making room
first by evicting idle models, least recently used first. A model with chunks in hand is never evicted.
A model whose chunks are still waiting in its queues is not evicted either, unless the model that needs
the room has waited ``max_wait_s``: the worker serves a model in long runs rather than swapping per chunk,
and no model waits for ever. An idle model is unloaded after ``keep_alive_s`` even if nothing needs the
room (the memory is the host's). A model with no known footprint (no ``memory_gb`` in the registry, never
measured) is loaded as if it took the whole budget, then its measured footprint is recorded for next time.

*Sleep.* A model whose backend can sleep (vLLM's sleep mode on a GPU: weights to host RAM, KV cache dropped)
is put to sleep instead of unloaded when it must make room and the host has the RAM to keep it
(``can_park``): it no longer counts against the budget, and the next chunk for it wakes it, a fraction of a
load. A sleeping model idle past ``keep_alive_s`` is unloaded like a warm one.

Loading and unloading happen outside the lock, in the thread that needs the model; other models' chunks
go on meanwhile. If room cannot be made within ``max_wait_s`` (every resident model busy), ``hold`` raises
``ModelNotResident``: the task puts the chunk back to wait (its lines are safe in Redis).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from inferpool._exceptions import ModelNotResident
from inferpool.model_registry.spec import ModelSpec
from inferpool.provider_batch.runner import ProviderBatchRunner
from inferpool.residency.budget import describe_bytes, resident_bytes
from inferpool.workers.backend import Backend, backend_can_sleep, sleep_backend, wake_backend
from inferpool.workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A loaded model: its runtime (backend, steps, result writing) and its provider-batch runner, if any."""

    runtime: WorkerRuntime
    runner: ProviderBatchRunner | None = None

    def can_sleep(self) -> bool:
        return backend_can_sleep(self.runtime.backend)

    def sleep(self) -> None:
        self.runtime.run_on_backend_loop(sleep_backend(self.runtime.backend))

    def wake(self) -> None:
        self.runtime.run_on_backend_loop(wake_backend(self.runtime.backend))


@dataclass
class _Entry:
    spec: ModelSpec
    reserved: int  # bytes counted against the budget (its footprint, or the whole budget while unknown)
    state: Literal["loading", "warm", "sleeping", "asleep", "waking"] = "loading"
    loaded: Loaded | None = None
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ResidencyCounts:
    """What the worker has done since it started (for heartbeats, stats and Prometheus)."""

    loads: int
    evictions: int
    load_s: float
    sleeps: int = 0
    wakes: int = 0
    wake_s: float = 0.0


class ResidentModels:
    """A worker's models within ``budget`` bytes (thread-safe: Celery task threads share it)."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        budget: int,
        *,
        load: Callable[[ModelSpec], Loaded],
        measure: Callable[[Loaded], int | None] = lambda loaded: None,
        footprint_of: Callable[[ModelSpec], int | None],
        record_footprint: Callable[[str, int], None],
        record_swap: Callable[[str, float, bool], None] = lambda model, seconds, woke: None,
        can_park: Callable[[Loaded, int], bool] = lambda loaded, nbytes: False,
        waiting: Callable[[str], int],
        on_change: Callable[[], None] = lambda: None,
        after_load: Callable[[], None] = lambda: None,
        after_unload: Callable[[], None] = lambda: None,
        keep_alive_s: float = 300.0,
        max_wait_s: float = 60.0,
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.budget = budget
        self.keep_alive_s = keep_alive_s
        self.max_wait_s = max_wait_s
        self._load = load
        self._measure = measure  # the backend's own account of its footprint, if it keeps one
        self._footprint_of = footprint_of
        self._record_footprint = record_footprint
        self._record_swap = record_swap  # what a swap to the model costs (load or wake), for placement to weigh
        self._can_park = can_park  # the backend can sleep and the host has the RAM to keep it asleep
        self._waiting = waiting
        self.on_change = on_change  # a model loaded or unloaded (the heartbeat says so at once)
        self._after_load, self._after_unload = after_load, after_unload  # the process's GC tuning
        self._entries: dict[str, _Entry] = {}
        self._unloading = 0  # bytes of models being unloaded (still held until their release ends)
        self._cond = threading.Condition()
        self._loads = 0
        self._evictions = 0
        self._load_s = 0.0
        self._sleeps = 0
        self._wakes = 0
        self._wake_s = 0.0

    # -- holding a model -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, model: str) -> Iterator[Loaded]:
        """The loaded ``model`` for the duration of the block (loaded first if it is cold)."""
        entry = self._acquire(model)
        try:
            assert entry.loaded is not None
            yield entry.loaded
        finally:
            with self._cond:
                entry.in_use -= 1
                entry.last_used = time.monotonic()
                self._cond.notify_all()

    def _acquire(self, model: str) -> _Entry:
        spec = self.specs[model]
        started = time.monotonic()
        wake = False
        with self._cond:
            while True:
                entry = self._entries.get(model)
                if entry is not None and entry.state == "warm":
                    entry.in_use += 1
                    return entry
                if entry is None or entry.state == "asleep":
                    need = entry.reserved if entry is not None else self._footprint_of(spec) or self.budget
                    victim = self._room_for(need, waited_s=time.monotonic() - started)
                    if victim is None and entry is not None:  # it fits: wake it (outside the lock)
                        entry.state, wake = "waking", True
                        break
                    if victim is None:  # it fits: load it (outside the lock)
                        entry = self._entries[model] = _Entry(spec, reserved=need)
                        break
                    if isinstance(victim, _Entry):
                        self._evict_locked(victim)
                        continue
                remaining = self.max_wait_s - (time.monotonic() - started)
                if remaining <= 0:
                    raise ModelNotResident(
                        f"no room for model {model!r} within {describe_bytes(self.budget)} after "
                        f"{self.max_wait_s:.0f} s: resident and busy: {', '.join(self._busy()) or 'nothing'}"
                    )
                self._cond.wait(timeout=min(remaining, 1.0))
        return self._wake_entry(entry) if wake else self._load_entry(entry)

    def _room_for(self, need: int, *, waited_s: float) -> _Entry | _Wait | None:
        """None if ``need`` bytes fit now; else the idle model to evict first, or ``_WAIT``."""
        held = self._held_locked()
        if held + need <= self.budget or held == 0:
            return None  # (alone, a model larger than the budget still loads: it was checked at start)
        idle = sorted((e for e in self._entries.values() if e.state == "warm" and e.in_use == 0),
                      key=lambda e: e.last_used)  # fmt: skip
        patient = waited_s >= self.max_wait_s / 2
        for entry in idle:
            if patient or self._waiting(entry.spec.name) == 0:
                return entry
        return _WAIT

    def _load_entry(self, entry: _Entry) -> _Entry:
        spec = entry.spec
        before = resident_bytes()
        started = time.monotonic()
        log.info("loading model %s (%s reserved of %s)", spec.name, describe_bytes(entry.reserved),
                 describe_bytes(self.budget))  # fmt: skip
        try:
            loaded = self._load(spec)
        except BaseException:
            with self._cond:
                del self._entries[spec.name]
                self._cond.notify_all()
            raise
        took = time.monotonic() - started
        self._after_load()
        # The backend's own count (weights, caches) where it keeps one; else what this process grew by, which
        # misses memory another process holds and what an unloaded model's freed pages are reused for.
        measured = self._measure(loaded) or max(1, resident_bytes() - before)
        if self._footprint_of(spec) is None:
            self._record_footprint(spec.name, measured)
        with self._cond:
            entry.loaded, entry.state = loaded, "warm"
            entry.reserved = self._footprint_of(spec) or measured
            entry.in_use += 1
            self._loads += 1
            self._load_s += took
            self._cond.notify_all()
        log.info("model %s loaded in %.1f s (%s)", spec.name, took, describe_bytes(entry.reserved))
        self._swapped(spec.name, took, woke=False)
        return entry

    def _swapped(self, model: str, took: float, *, woke: bool) -> None:
        try:
            self._record_swap(model, took, woke)
        except Exception:  # a statistic never fails a load
            log.warning("recording model %s's swap time failed", model, exc_info=True)
        self._changed()

    def _wake_entry(self, entry: _Entry) -> _Entry:
        """Wake ``entry`` (state "waking", its bytes counted again); if waking fails it is unloaded and the
        error is the chunk's, as a failed load's would be."""
        started = time.monotonic()
        assert entry.loaded is not None
        try:
            entry.loaded.wake()
        except BaseException:
            with self._cond:
                self._entries.pop(entry.spec.name, None)
                self._unloading += entry.reserved
            try:
                self._release(entry)
            finally:
                with self._cond:
                    self._unloading -= entry.reserved
                    self._cond.notify_all()
            self._changed()
            raise
        took = time.monotonic() - started
        with self._cond:
            entry.state = "warm"
            entry.in_use += 1
            self._wakes += 1
            self._wake_s += took
            self._cond.notify_all()
        log.info("model %s woke in %.2f s", entry.spec.name, took)
        self._swapped(entry.spec.name, took, woke=True)
        return entry

    # -- letting models go ---------------------------------------------------------------------------

    def _evict_locked(self, entry: _Entry, *, sleep: bool = True) -> None:
        """Make room by ``entry`` (idle; warm, or asleep when ``sleep`` is False): put to sleep where its backend
        can and the host has the RAM, else unloaded. The lock is released meanwhile; its bytes count against the
        budget until the backend has let them go."""
        counted = 0 if entry.state == "asleep" else entry.reserved  # a sleeping model's bytes are the host's
        asleep = sleep and entry.state == "warm" and self._parks(entry)
        if asleep:
            entry.state = "sleeping"  # not woken or used meanwhile: _acquire waits on it
        else:
            del self._entries[entry.spec.name]
        self._unloading += counted
        self._evictions += 1
        self._cond.release()
        try:
            if asleep:
                asleep = self._sleep(entry)
            if not asleep:
                self._release(entry)
            self._changed()
        finally:
            self._cond.acquire()
            self._unloading -= counted
            if self._entries.get(entry.spec.name) is entry:
                if asleep:
                    entry.state = "asleep"
                else:
                    del self._entries[entry.spec.name]
            self._cond.notify_all()

    def _parks(self, entry: _Entry) -> bool:
        assert entry.loaded is not None
        try:
            return self._can_park(entry.loaded, entry.reserved)
        except Exception:
            log.warning("could not tell whether model %s can sleep; unloading it", entry.spec.name, exc_info=True)
            return False

    def _sleep(self, entry: _Entry) -> bool:
        """Put ``entry`` to sleep; False (it is then unloaded) if the backend fails to."""
        log.info("putting model %s to sleep (idle %.0f s)", entry.spec.name, time.monotonic() - entry.last_used)
        assert entry.loaded is not None
        try:
            entry.loaded.sleep()
        except Exception:
            log.warning("model %s could not sleep; unloading it", entry.spec.name, exc_info=True)
            return False
        with self._cond:
            self._sleeps += 1
        return True

    def _release(self, entry: _Entry) -> None:
        log.info("unloading model %s (idle %.0f s)", entry.spec.name, time.monotonic() - entry.last_used)
        if entry.loaded is not None:
            entry.loaded.runtime.release()
            self._after_unload()

    def backend_of(self, model: str) -> Backend | None:
        """The backend of ``model`` while it is loaded and warm (what its engine accepts is read from it)."""
        with self._cond:
            entry = self._entries.get(model)
            if entry is None or entry.loaded is None or entry.state != "warm":
                return None
            return entry.loaded.runtime.backend

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:  # an announcement never fails a load or an eviction
            log.warning("announcing a residency change failed", exc_info=True)

    def expire_idle(self) -> list[str]:
        """Unload the models idle for longer than ``keep_alive_s``; returns their names."""
        now = time.monotonic()
        expired = []
        with self._cond:
            for entry in list(self._entries.values()):
                current = self._entries.get(entry.spec.name) is entry  # (the lock was let go by an eviction)
                if (
                    current
                    and entry.state in ("warm", "asleep")
                    and entry.in_use == 0
                    and now - entry.last_used > self.keep_alive_s
                ):
                    self._evict_locked(entry, sleep=False)
                    expired.append(entry.spec.name)
        return expired

    def close(self) -> None:
        """Unload everything (the worker stops; nothing is in hand any more)."""
        with self._cond:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            if entry.state in ("warm", "asleep"):
                self._release(entry)

    # -- what is resident ----------------------------------------------------------------------------

    def states(self) -> dict[str, str]:
        """Each model's state: warm, loading (or waking), asleep or cold."""
        with self._cond:
            return {name: _STATE_SHOWN[self._entries[name].state] if name in self._entries else "cold"
                    for name in self.specs}  # fmt: skip

    def held_bytes(self) -> int:
        """Bytes of the budget taken now: loaded, loading and waking models, and those still being let go."""
        with self._cond:
            return self._held_locked()

    def _held_locked(self) -> int:
        # (a model going to sleep is counted in _unloading until it is asleep)
        return sum(e.reserved for e in self._entries.values() if e.state not in _PARKED) + self._unloading

    def counts(self) -> ResidencyCounts:
        with self._cond:
            return ResidencyCounts(self._loads, self._evictions, round(self._load_s, 3), self._sleeps, self._wakes,
                                   round(self._wake_s, 3))  # fmt: skip

    def _busy(self) -> list[str]:
        return [name for name, e in self._entries.items() if e.in_use or e.state in ("loading", "waking", "sleeping")]


#: What a heartbeat says of each entry state (a waking model is about to be warm, as a loading one is).
_STATE_SHOWN = {"loading": "loading", "warm": "warm", "sleeping": "asleep", "asleep": "asleep", "waking": "loading"}
_PARKED = ("sleeping", "asleep")


class _Wait:
    """Room can be made later (idle models still have work waiting, or models are loading or busy)."""


_WAIT = _Wait()
