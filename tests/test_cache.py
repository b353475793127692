"""The response cache, in real echo workers on the session's Redis: hits, what may be cached, identical
requests computed once (in a job, and across clients), usage and savings counted, and the size cap."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from inferpool import Client, JobStatus, Settings
from inferpool.constants import CACHE_INDEX_KEY, cache_entry_key
from inferpool.plumbing.local_pool import WorkerProcess
from inferpool.wire import RequestResult
from inferpool.workers.backend import Generation
from inferpool.workers.cache import ResponseCache, cache_key

from .conftest import _start_workers, _stop_workers

pytestmark = pytest.mark.usefixtures("scheduler")


@pytest.fixture(scope="module")
def cached_worker(redis_url: str, session_dir: Path) -> Iterator[WorkerProcess]:
    workers = _start_workers(redis_url, session_dir, "echo-cached")
    yield workers[0]
    _stop_workers(workers)


def ask(text: str, **params: Any) -> dict[str, Any]:
    return {"model": "echo-cached", "messages": [{"role": "user", "content": text}], **params}


def cached(result: RequestResult) -> bool:
    assert result.stats is not None, result.error
    return bool(result.stats.cached)


@pytest.mark.usefixtures("cached_worker")
def test_a_repeated_deterministic_request_is_answered_from_the_cache(client: Client) -> None:
    text = f"cache me {secrets.token_hex(4)}"
    first = client.submit(ask(text, temperature=0)).result(30)
    second = client.submit(ask(text, temperature=0, user="someone", metadata={"run": "2"})).result(30)
    assert not cached(first)
    assert cached(second)  # user and metadata do not change the answer
    assert first.response is not None
    assert second.response is not None
    assert second.response.text == first.response.text
    assert second.response.id != first.response.id
    assert second.response.usage == first.response.usage  # tokens recorded as they were
    assert first.stats is not None
    assert second.stats is not None
    assert first.stats.cost_usd > 0
    assert second.stats.cost_usd == 0
    rows = [row for row in client.usage(model="echo-cached") if row.cache_hits]
    assert sum(row.cache_hits for row in rows) >= 1
    assert sum(row.saved_usd for row in rows) >= first.stats.cost_usd


@pytest.mark.usefixtures("cached_worker")
def test_what_may_be_cached(client: Client) -> None:
    def twice(text: str, **params: Any) -> tuple[bool, bool]:
        a = client.submit(ask(text, **params)).result(30)
        b = client.submit(ask(text, **params)).result(30)
        return cached(a), cached(b)

    tag = secrets.token_hex(4)
    assert twice(f"samples {tag}") == (False, False)  # no temperature 0, no seed: not deterministic
    assert twice(f"seeded {tag}", seed=7) == (False, True)
    assert twice(f"asked {tag}", cache=True) == (False, True)  # the request opts in
    assert twice(f"refused {tag}", temperature=0, cache=False) == (False, False)  # or out
    assert twice(f"other params {tag}", temperature=0, max_tokens=5) == (False, True)
    assert cached(client.submit(ask(f"other params {tag}", temperature=0, max_tokens=6)).result(30)) is False


@pytest.mark.usefixtures("cached_worker")
def test_a_job_computes_each_distinct_line_once_and_a_rerun_costs_nothing(client: Client) -> None:
    tag = secrets.token_hex(4)
    lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": ask(f"{tag} question {i // 3}", temperature=0)} for i in range(30)]  # fmt: skip
    first = client.batches.wait(client.batches.create(lines).id, timeout=120)
    assert first.status is JobStatus.COMPLETED
    results = list(client.batches.results(first.id))
    assert len(results) == 30
    flags = [bool(line.response and line.response.body) for line in results]
    assert all(flags)
    (usage,) = first.usage
    assert usage.requests == 30
    assert usage.cache_hits == 20  # 10 distinct prompts, each computed once
    assert usage.cost_usd > 0
    assert usage.saved_usd == pytest.approx(2 * usage.cost_usd)

    again = client.batches.wait(client.batches.create(lines).id, timeout=120)
    (rerun,) = again.usage
    assert (rerun.cache_hits, rerun.cost_usd) == (30, 0.0)
    assert rerun.prompt_tokens == usage.prompt_tokens

    skipped = client.batches.wait(client.batches.create(lines, cache=False).id, timeout=120)  # --no-cache
    assert skipped.usage[0].cache_hits == 0


@pytest.mark.usefixtures("cached_worker")
def test_identical_requests_from_two_clients_at_once_are_computed_once(settings: Settings) -> None:
    request = ask(f"together {secrets.token_hex(4)}", temperature=0)
    results: list[RequestResult] = []

    def submit() -> None:
        with Client(settings=settings) as client:
            results.append(client.submit(request).result(60))

    threads = [threading.Thread(target=submit) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(cached(r) for r in results) == [False, True, True]


def test_the_cache_is_bounded(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    cache = ResponseCache(client, Settings(redis_url=redis_url, cache_max_entries=3, cache_max_entry_bytes=400))
    client.delete(CACHE_INDEX_KEY)
    answer = Generation(text="short", finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    digests = [f"bounded-{i}" for i in range(5)]
    for digest in digests:
        cache.put_many({digest: (answer, 60)}, "test")
    assert client.zcard(CACHE_INDEX_KEY) == 3
    assert [client.exists(cache_entry_key(d)) for d in digests] == [0, 0, 1, 1, 1]  # the oldest went first
    assert cache.get_many(digests) == {d: answer for d in digests[2:]}
    huge = Generation(text="x" * 1000, finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    cache.put_many({"huge": (huge, 60)}, "test")
    assert not client.exists(cache_entry_key("huge"))  # over cache_max_entry_bytes: not stored
    assert 0 < client.pttl(cache_entry_key(digests[-1])) <= 60_000
    client.set(cache_entry_key("garbled"), b"\xff not json")
    assert cache.get_many(["garbled"]) == {}  # an unreadable entry is a miss, not an error
    client.delete(CACHE_INDEX_KEY)


def test_the_key_covers_what_changes_the_answer() -> None:
    from inferpool.client._base import build_request

    base = ask("hi", temperature=0)
    key = cache_key(build_request(base))
    assert cache_key(build_request({**base, "user": "u", "metadata": {"a": "b"}, "cache": True})) == key
    for change in ({"temperature": 0.5}, {"seed": 1}, {"max_tokens": 3}, {"model": "echo"},
                   {"messages": [{"role": "user", "content": "hi!"}]}, {"stop": ["x"]}):  # fmt: skip
        assert cache_key(build_request({**base, **change})) != key, json.dumps(change)


def test_embeddings_and_completions_are_cached_by_what_changes_them(redis_url: str) -> None:
    """An embedding never samples (always cacheable on a caching model), its vectors round-trip through the cache,
    and ``encoding_format`` (stored packed either way) does not split the key."""
    from inferpool.client._base import build_request
    from inferpool.model_registry.registry import Registry
    from inferpool.workers.backend import Embeddings
    from inferpool.workers.cache import cache_ttl_s

    spec = Registry.from_settings(Settings()).get("echo-cached")
    embed = build_request({"model": "echo-cached", "input": ["a", "b"]})
    assert cache_ttl_s(spec, embed, 60) is not None
    key = cache_key(embed)
    assert cache_key(build_request({"model": "echo-cached", "input": ["a", "b"], "encoding_format": "base64"})) == key
    assert cache_key(build_request({"model": "echo-cached", "input": ["a", "b"], "dimensions": 8})) != key
    prompt = build_request({"model": "echo-cached", "prompt": ["a", "b"]})
    assert cache_key(prompt) != key  # same texts, another kind
    assert cache_key(build_request({"model": "echo-cached", "prompt": ["a", "b"], "echo": True})) != cache_key(prompt)
    cache = ResponseCache(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url))
    vectors = Embeddings(vectors=("AACAPw==", "AAAAQA=="), prompt_tokens=2)
    cache.put_many({key: (vectors, 60)}, "test")
    assert cache.get_many([key]) == {key: vectors}


@pytest.mark.usefixtures("cached_worker")
def test_one_tenants_answers_are_not_another_tenants_hits(settings: Settings) -> None:
    """Issue 25.14: an exact repeat of another tenant's request is computed again (no timing or zero-cost tell)."""
    text = f"tenant scoped {secrets.token_hex(4)}"
    with Client(settings=settings, tenant="cache-a") as a, Client(settings=settings, tenant="cache-b") as b:
        first = a.submit(ask(text, temperature=0)).result(30)
        other = b.submit(ask(text, temperature=0)).result(30)
        again = a.submit(ask(text, temperature=0)).result(30)
    assert not cached(first)
    assert not cached(other)
    assert cached(again)


def test_a_shared_cache_and_a_tenant_scoped_one_key_differently(settings: Settings) -> None:
    from inferpool.client._base import build_request
    from inferpool.model_registry.registry import Registry
    from inferpool.workers.cache import cache_scope

    spec = Registry.from_settings(settings).get("echo-cached")
    request = build_request(ask("hi", temperature=0))
    assert cache_scope(spec, "a") == "a"
    assert cache_scope(spec, None) == "default"
    assert cache_key(request, "a") != cache_key(request, "b")
    assert spec.cache is not None
    shared = spec.model_copy(update={"cache": spec.cache.model_copy(update={"shared_across_tenants": True})})
    assert cache_scope(shared, "a") is None
    assert cache_key(request, cache_scope(shared, "a")) == cache_key(request, cache_scope(shared, "b"))


def test_releasing_a_lock_leaves_another_owners_lock(redis_url: str) -> None:
    from inferpool.constants import cache_lock_key

    client = redis.Redis.from_url(redis_url)
    cache = ResponseCache(client, Settings(redis_url=redis_url))
    digest = f"lock-{secrets.token_hex(4)}"
    assert cache.claim_many([digest], "worker-1") == {digest}
    client.set(cache_lock_key(digest), "worker-2")  # worker-1's lock lapsed and worker-2 took it
    cache.release([digest], "worker-1")
    assert client.get(cache_lock_key(digest)) == b"worker-2"
    cache.release([digest], "worker-2")
    assert not client.exists(cache_lock_key(digest))
