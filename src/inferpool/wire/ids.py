"""Random ids: 128 bits from the OS's CSPRNG with a readable prefix (``req_...``, ``batch_...``); and the names
tenants may have."""

from __future__ import annotations

import os
import re
import threading

from inferpool._exceptions import ConfigurationError

#: What a tenant may be called (it names usage keys and metric labels).
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


def check_tenant(tenant: str | None) -> str | None:
    """``tenant`` if it is a usable tenant name (or None); ``ConfigurationError`` otherwise."""
    if tenant is not None and not TENANT_NAME.match(tenant):
        raise ConfigurationError(f"tenant {tenant!r}: use letters, digits, '.', '_', '@', '-' (max 128)")
    return tenant


class _RandomIds:
    """128-bit random ids from the OS's CSPRNG, read 16 KiB at a time (one system call per 1,024 ids
    instead of one per id: ids are minted per batch line and per answer). A forked child drops the
    bytes it inherited, so two processes never hand out the same id."""

    _CHUNK = 16 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._buffer, self._offset = b"", 0
        self._lock = threading.Lock()

    def hex(self) -> str:
        with self._lock:
            if self._offset + 16 > len(self._buffer):
                self._buffer, self._offset = os.urandom(self._CHUNK), 0
            start = self._offset
            self._offset += 16
            return self._buffer[start : start + 16].hex()


_IDS = _RandomIds()


def random_hex() -> str:
    """32 hex digits (128 random bits)."""
    return _IDS.hex()


def new_id(prefix: str) -> str:
    """A random id (128 bits) with a readable prefix, e.g. ``req_5f0c...``."""
    return f"{prefix}_{_IDS.hex()}"
