"""The scheduler lease's fence: a script that changes shared state runs only for the leader."""

from __future__ import annotations

from typing import Any

import redis

#: The error a fenced script answers when the lease is not the caller's any more.
NOT_LEADER_ERROR = "inferpool: not the leader"


def lua_fence(lease: str, fence: str) -> str:
    """The first lines of a script fenced by the scheduler lease: ``lease`` and ``fence`` are the Lua
    expressions of the lease key and the caller's lease value ('' = unfenced)."""
    return (f"if {fence} ~= '' and redis.call('GET', {lease}) ~= {fence} then\n"
            f"  return redis.error_reply('{NOT_LEADER_ERROR}')\nend\n")  # fmt: skip


class NotLeader(Exception):
    """A fenced script refused: another scheduler holds the lease now."""


def fenced_call(script: Any, keys: list[str], args: list[Any], *, refusal: str = NOT_LEADER_ERROR,
                raises: type[Exception] = NotLeader) -> Any:  # fmt: skip
    """Run a fenced script; its ``refusal`` error (the fence did not hold) is raised as ``raises``."""
    try:
        return script(keys=keys, args=args)
    except redis.ResponseError as exc:
        if refusal in str(exc):
            raise raises(str(exc)) from exc
        raise
