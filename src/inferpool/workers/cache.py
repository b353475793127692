"""The response cache: answers to identical requests are reused instead of computed again.

A request's cache key is a SHA-256 of the canonical JSON of everything that changes its answer: the
served model (with its adapter), the messages, the sampling parameters, tools, response format and seed.
What does not change the answer (``user``, ``metadata``, ``stream``, ``routing``, ``cache``) is left out.

The worker asks the cache before calling its backend (``CachePlan``): a stored answer is used at once;
identical requests in one chunk are computed once; an identical request being computed elsewhere (another
worker, another client's chunk) is waited for, through a lock key its computer holds. Entries expire
(the model's ``cache.ttl_s``), are skipped when larger than ``cache_max_entry_bytes``, and past
``cache_max_entries`` the oldest are evicted, so the cache's size is bounded:
at most ``cache_max_entries x cache_max_entry_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import pydantic_core
import redis

from inferpool.constants import CACHE_INDEX_KEY, DEFAULT_TENANT, cache_entry_key, cache_lock_key
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.wire import AnyRequest, ChatRequest, EmbeddingRequest
from inferpool.workers.backend import Embeddings, ExtraChoice, Generation

#: What the cache stores: a chat or completion answer, or an embeddings request's vectors.
Answer = Generation | Embeddings

#: Bumped when what a key covers, or how answers are stored, changes (old entries are then never read).
CACHE_FORMAT = "1"
#: Request fields that change the answer (with the model): the cache key covers exactly these.
ANSWER_FIELDS = frozenset({
    "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
    "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice", "parallel_tool_calls",
    "logprobs", "top_logprobs",
})  # fmt: skip
#: What a key leaves out of a completion or embeddings request (it does not change the answer; the vectors are
#: stored packed whatever ``encoding_format`` asked).
NOT_ANSWER_FIELDS = frozenset({"model", "user", "stream", "stream_options", "routing", "cache", "encoding_format"})
#: A request computing an answer holds its lock this long at most (a crashed worker's lapses by itself).
LOCK_S = 600
_POLL_S = 0.05

# KEYS: the index; ARGV: max entries, max bytes, now (ms), then key, ttl (ms), value per entry.
# Stores what fits, records it in the index, then evicts the oldest past the cap (and what has expired).
_PUT = """
local cap, max_bytes, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local stored = 0
for i = 4, #ARGV, 3 do
  local key, ttl, value = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if #value <= max_bytes then
    redis.call('SET', key, value, 'PX', ttl)
    redis.call('ZADD', KEYS[1], now, key)
    stored = stored + 1
  end
end
local over = redis.call('ZCARD', KEYS[1]) - cap
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #popped, 2 do redis.call('DEL', popped[i]) end
end
return stored
"""


# Deletes each lock (KEYS) still held by its owner ARGV[1].
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


def cache_ttl_s(spec: ModelSpec, request: AnyRequest, default_ttl_s: int) -> int | None:
    """How long ``request``'s answer may be reused, or None if it must not be cached.

    ``cache: false`` never caches; ``cache: true`` caches on any model (the model's TTL, else the default);
    otherwise a model with a ``cache`` entry caches requests that do not sample (``temperature: 0`` or a
    ``seed``), or every request if it says ``any_temperature``.
    """
    if request.cache is False or (spec.cache is None and request.cache is not True):
        return None
    ttl = spec.cache.ttl_s if spec.cache is not None else default_ttl_s
    if request.cache is True or (spec.cache is not None and spec.cache.any_temperature):
        return ttl
    if request.kind == "embeddings":
        return ttl  # an embedding never samples
    assert not isinstance(request, EmbeddingRequest)
    return ttl if request.temperature == 0 or request.seed is not None else None


def cache_scope(spec: ModelSpec, tenant: str | None) -> str | None:
    """Whose answers a request may reuse: its tenant's only, unless the model's cache is shared (None)."""
    if spec.cache is not None and spec.cache.shared_across_tenants:
        return None
    return tenant or DEFAULT_TENANT


def cache_key(request: AnyRequest, scope: str | None = None) -> str:
    """The digest of what changes ``request``'s answer (``request.model`` is the served model), within
    ``scope`` (a tenant; None: shared by every tenant)."""
    if isinstance(request, ChatRequest):
        covered = request.model_dump(include=set(ANSWER_FIELDS), exclude_none=True, mode="json")
    else:
        covered = request.model_dump(exclude=set(NOT_ANSWER_FIELDS), exclude_none=True, mode="json")
    head: list[object] = [CACHE_FORMAT, request.model] if scope is None else [CACHE_FORMAT, request.model, scope]
    if not isinstance(request, ChatRequest):
        head.append(request.kind)
    canonical = json.dumps([*head, covered], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode_generation(generation: Answer) -> bytes:
    fields = asdict(generation)
    fields.pop("first_token_at", None)
    fields.pop("attempts", None)
    return pydantic_core.to_json(fields)


def decode_generation(raw: bytes | str) -> Answer | None:
    """The stored answer, or None if it cannot be read (treated as a miss)."""
    try:
        fields: dict[str, Any] = json.loads(raw)
        if "vectors" in fields:
            return Embeddings(**{**fields, "vectors": tuple(fields["vectors"])})
        extra = tuple(ExtraChoice(**choice) for choice in fields.pop("extra_choices", ()))
        calls = tuple(fields.pop("tool_calls", ()))
        return Generation(**fields, extra_choices=extra, tool_calls=calls)
    except (ValueError, TypeError):
        return None


class ResponseCache:
    """The cache's Redis operations (on the pool's Redis, or ``INFERPOOL_CACHE_REDIS_URL``)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self._put = client.register_script(_PUT)
        self._release = client.register_script(_RELEASE)

    def get_many(self, digests: Sequence[str]) -> dict[str, Answer]:
        if not digests:
            return {}
        found: dict[str, Answer] = {}
        for digest, raw in zip(digests, self._redis.mget([cache_entry_key(d) for d in digests]), strict=True):
            generation = decode_generation(raw) if raw is not None else None
            if generation is not None:
                found[digest] = generation
        return found

    def claim_many(self, digests: Iterable[str], owner: str) -> set[str]:
        """The digests whose lock this call took (their answers are this caller's to compute)."""
        ordered = list(digests)
        pipe = self._redis.pipeline(transaction=False)
        for digest in ordered:
            pipe.set(cache_lock_key(digest), owner, nx=True, ex=LOCK_S)
        return {digest for digest, took in zip(ordered, pipe.execute(), strict=True) if took}

    def put_many(self, answers: Mapping[str, tuple[Answer, int]], owner: str) -> None:
        """Store answers (digest -> (answer, ttl)) and release the locks ``owner`` holds on them."""
        if not answers:
            return
        args: list[str | bytes | int] = [self._settings.cache_max_entries, self._settings.cache_max_entry_bytes,
                                         int(time.time() * 1000)]  # fmt: skip
        for digest, (generation, ttl_s) in answers.items():
            args += [cache_entry_key(digest), ttl_s * 1000, encode_generation(generation)]
        self._put(keys=[CACHE_INDEX_KEY], args=args)
        self.release(answers, owner)

    def release(self, digests: Iterable[str], owner: str) -> None:
        """Free the locks ``owner`` holds (one that lapsed and another worker took is left to that one)."""
        keys = [cache_lock_key(d) for d in digests]
        if keys:
            self._release(keys=keys, args=[owner])

    def wait_for(self, digests: Sequence[str]) -> dict[str, Answer]:
        """Answers to ``digests`` as the requests computing them store them; a digest whose computer gave up
        (its lock is gone, no answer) or that is still not there after ``cache_wait_s`` is left out."""
        pending = list(digests)
        found: dict[str, Answer] = {}
        deadline = time.monotonic() + self._settings.cache_wait_s
        while pending:
            found.update(self.get_many(pending))
            pending = [d for d in pending if d not in found]
            if not pending or time.monotonic() > deadline:
                break
            pipe = self._redis.pipeline(transaction=False)
            for digest in pending:
                pipe.exists(cache_lock_key(digest))
            abandoned = [d for d, locked in zip(pending, pipe.execute(), strict=True) if not locked]
            if abandoned:  # nobody computes these any more: one last look, then the caller computes them
                found.update(self.get_many(abandoned))
                pending = [d for d in pending if d not in abandoned]
            if pending:
                time.sleep(_POLL_S)
        return found


class CachePlan:
    """How one chunk's requests meet the cache: stored answers (hits), identical requests in the chunk
    computed once (a leader and its followers), and identical requests computed elsewhere (waited for).

    ``keys`` maps the request ids that may use the cache to (digest, ttl).
    """

    def __init__(self, cache: ResponseCache, keys: Mapping[str, tuple[str, int]], owner: str) -> None:
        self._cache = cache
        self._owner = owner
        self.keys = dict(keys)
        self.hits: dict[str, Answer] = {}
        self.leader: dict[str, str] = {}
        self.followers: dict[str, list[str]] = {}
        self.ttl: dict[str, int] = {}
        stored = cache.get_many(list(dict.fromkeys(digest for digest, _ in self.keys.values())))
        for request_id, (digest, ttl) in self.keys.items():
            if digest in stored:
                self.hits[request_id] = stored[digest]
            elif digest in self.leader:
                self.followers.setdefault(digest, []).append(request_id)
            else:
                self.leader[digest], self.ttl[digest] = request_id, ttl
        self.mine = cache.claim_many(self.leader, owner)
        self.elsewhere = [digest for digest in self.leader if digest not in self.mine]

    def first_run(self) -> set[str]:
        """Request ids (of those with a key) to compute now: the leaders this worker holds the lock for."""
        return {self.leader[digest] for digest in self.mine}

    def store(self, outcomes: Mapping[str, Any], digests: Iterable[str]) -> None:
        """Cache the answers computed for ``digests`` (an error is not cached) and release their locks."""
        answers: dict[str, tuple[Answer, int]] = {}
        for digest in digests:
            outcome = outcomes.get(self.leader[digest])
            if isinstance(outcome, Generation | Embeddings):
                answers[digest] = (outcome, self.ttl[digest])
        self._cache.put_many(answers, self._owner)
        self._cache.release((digest for digest in digests if digest not in answers), self._owner)

    def wait(self) -> list[str]:
        """Wait for the answers computed elsewhere; returns the digests nobody finished (compute them here)."""
        found = self._cache.wait_for(self.elsewhere)
        for digest, generation in found.items():
            self.hits[self.leader[digest]] = generation
        return [digest for digest in self.elsewhere if digest not in found]

    def fill(self, outcomes: dict[str, Any]) -> set[str]:
        """Put hits and followers' answers into ``outcomes``; returns the request ids served from the cache."""
        outcomes.update(self.hits)
        cached = set(self.hits)
        for digest, request_ids in self.followers.items():
            outcome = outcomes[self.leader[digest]]
            if isinstance(outcome, Generation):  # reused, not generated: no time to first token of its own
                outcome = replace(outcome, first_token_at=None)
            for request_id in request_ids:
                outcomes[request_id] = outcome
                if isinstance(outcome, Generation | Embeddings):
                    cached.add(request_id)
        return cached
