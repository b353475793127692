"""Dead letters: requests that failed after their retries and every fallback, kept for an operator.

Each such request still gets its one error result (nothing waits for ever); the dead-letter stream
keeps a copy of the request with its error, so ``inferpool dlq list`` can show it and ``inferpool dlq
retry`` can send it again once the cause is fixed (as a new batch job, optionally to another model).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from pydantic import BaseModel

from inferpool.constants import DEAD_LETTERS_KEY, DEAD_LETTERS_MAX
from inferpool.plumbing.redis_connection import decode_text
from inferpool.wire import TaskItem


class DeadLetter(BaseModel):
    """One request that ended in an error no fallback could avoid."""

    id: str  # the stream entry id
    request_id: str
    job_id: str | None
    custom_id: str | None
    model: str
    error_code: str
    error_message: str
    at: float
    item: TaskItem

    def batch_line_custom_id(self) -> str:
        return self.custom_id or self.request_id


class DeadLetters:
    """The dead-letter stream in Redis. Letters hold whole prompts, so they are kept no longer than
    results (``ttl_s``): older entries are trimmed whenever letters are added or listed."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def _oldest_kept_id(self) -> str:
        """Stream ids are milliseconds: entries before this one are past their retention."""
        return str(max(0, int((time.time() - self.ttl_s) * 1000)))

    def trim(self) -> None:
        """Drop letters past their retention."""
        self.redis.xtrim(DEAD_LETTERS_KEY, minid=self._oldest_kept_id(), approximate=False)

    def add_many(
        self, entries: Iterable[tuple[TaskItem, str | None, str, str, str]], pipe: redis.client.Pipeline | None = None
    ) -> None:
        """Add (item, job id, model, error code, error message) entries, in one round trip."""
        own = pipe is None
        target = self.redis.pipeline(transaction=False) if pipe is None else pipe
        for item, job_id, model, code, message in entries:
            fields = {"rid": item.request_id, "job": job_id or "", "cid": item.custom_id or "", "model": model,
                      "code": code, "message": message, "at": repr(time.time()),
                      "item": item.model_dump_json(exclude_none=True)}  # fmt: skip
            target.xadd(DEAD_LETTERS_KEY, fields, maxlen=DEAD_LETTERS_MAX, approximate=True)  # type: ignore[arg-type]
        target.xtrim(DEAD_LETTERS_KEY, minid=self._oldest_kept_id(), approximate=True)
        if own:
            target.execute()

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first (none past their retention)."""
        self.trim()
        entries: Any = self.redis.xrange(DEAD_LETTERS_KEY, count=limit)
        letters = []
        for entry_id, raw in entries or []:
            fields = {decode_text(k): decode_text(v) for k, v in raw.items()}
            letters.append(DeadLetter(
                id=decode_text(entry_id), request_id=fields["rid"], job_id=fields["job"] or None,
                custom_id=fields["cid"] or None, model=fields["model"], error_code=fields["code"],
                error_message=fields["message"], at=float(fields["at"]),
                item=TaskItem.model_validate_json(fields["item"]),
            ))  # fmt: skip
        return letters

    def count(self) -> int:
        return int(self.redis.xlen(DEAD_LETTERS_KEY))

    def remove(self, ids: Sequence[str]) -> int:
        return int(self.redis.xdel(DEAD_LETTERS_KEY, *ids)) if ids else 0


def retry_lines(letters: Sequence[DeadLetter], model: str | None = None) -> list[str]:
    """OpenAI batch lines that send ``letters`` again (to ``model`` instead of their own, if given).

    A letter keeps its custom_id where that is unique among them, else it is named by its request id.
    """
    import json
    from collections import Counter

    counts = Counter(letter.custom_id for letter in letters)
    lines = []
    for letter in letters:
        body = letter.item.request.model_dump(mode="json", exclude_none=True)
        if model is not None:
            body["model"] = model
        custom_id = letter.custom_id if letter.custom_id and counts[letter.custom_id] == 1 else letter.request_id
        lines.append(json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}))  # fmt: skip
    return lines
