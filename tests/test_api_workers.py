"""API-proxy workers: the official openai and anthropic SDKs, in real worker processes, against the
emulators (real HTTP servers speaking each wire format). Nothing here mocks an SDK."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from inferpool import Client, InvalidRequest, JobStatus, ProviderError
from inferpool.emulators import ProviderEmulator
from inferpool.plumbing.local_pool import WorkerProcess

from .conftest import ANTHROPIC_TEST_KEY, OPENAI_TEST_KEY

pytestmark = pytest.mark.usefixtures("api_workers", "scheduler")


def line(custom_id: str, model: str, text: str, **body: object) -> str:
    payload = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 20, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": payload})


@pytest.fixture
def quiet_emulator(emulator: ProviderEmulator) -> Iterator[ProviderEmulator]:
    emulator.configure(faults={}, latency_s=0.0, token_latency_s=0.0)
    emulator.reset_counts()
    yield emulator
    emulator.configure(faults={}, latency_s=0.0, token_latency_s=0.0)


def test_openai_model_through_the_pool(client: Client, quiet_emulator: ProviderEmulator) -> None:
    result = client.submit({"model": "emu-gpt", "messages": [{"role": "user", "content": "hello openai"}]}).result(30)
    assert result.response is not None
    assert result.response.text == "emulated: hello openai"
    assert result.response.model == "emu-gpt"
    assert result.response.usage.model_dump() == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert result.stats is not None
    assert result.stats.attempts == 1
    assert result.stats.cost_usd == pytest.approx((2 * 0.15 + 3 * 0.6) / 1e6)
    assert quiet_emulator.counts["answered"] == 1


def test_anthropic_translation_both_ways(client: Client, quiet_emulator: ProviderEmulator) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two three four five six"},
    ]
    cut = client.chat("emu-claude", messages, max_tokens=3, timeout=30)
    assert cut.text == "emulated: one two"
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.prompt_tokens == 2 + 6  # the system prompt went as Anthropic's `system`
    stopped = client.chat("emu-claude", messages, stop=[" four"], temperature=0.5, timeout=30)
    assert stopped.text == "emulated: one two three"
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("plain", "streamed"), [("emu-gpt", "emu-gpt-stream"), ("emu-claude", "emu-claude-stream")])
def test_streaming_calls_give_the_same_answers_and_time_to_first_token(
    client: Client, quiet_emulator: ProviderEmulator, plain: str, streamed: str
) -> None:
    quiet_emulator.configure(latency_s=0.3, token_latency_s=0.05)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three four five six"}]
    variants: list[dict[str, object]] = [{}, {"max_tokens": 3}, {"stop": [" four"]}]
    for extra in variants:
        body = {"messages": messages, "max_tokens": 20, **extra}
        expected = client.submit({"model": plain, **body}).result(30)
        got = client.submit({"model": streamed, **body}).result(30)
        assert expected.response is not None
        assert got.response is not None
        assert got.response.text == expected.response.text
        assert got.response.choices[0].finish_reason == expected.response.choices[0].finish_reason
        assert got.response.usage == expected.response.usage
        assert expected.stats is not None
        assert got.stats is not None
        assert expected.stats.ttft_s is None  # a plain call cannot see its first token
        assert got.stats.ttft_s is not None
        # The emulator waits 0.3 s before the first token and 0.05 s between tokens (at least 2 more).
        assert got.stats.ttft_s >= 0.3
        assert got.stats.latency_s - got.stats.ttft_s >= 0.1
    [usage] = [row for row in client.usage(model=streamed) if row.tenant == "default"]
    assert usage.ttft_count >= 3


def test_requests_anthropic_cannot_serve_fail_clearly(client: Client, quiet_emulator: ProviderEmulator) -> None:
    with pytest.raises(InvalidRequest, match="temperature above 1"):
        client.chat("emu-claude", [{"role": "user", "content": "hi"}], temperature=1.5, timeout=30)
    with pytest.raises(InvalidRequest, match="seed is not supported"):
        client.chat("emu-claude", [{"role": "user", "content": "hi"}], seed=3, timeout=30)
    assert quiet_emulator.counts["received"] == 0  # refused before any call


def test_wrong_key_fails_at_once_without_retries(client: Client, quiet_emulator: ProviderEmulator) -> None:
    with pytest.raises(ProviderError, match=r"HTTP 401.*invalid api key.*after 1 attempt\)"):
        client.chat("emu-gpt-badkey", [{"role": "user", "content": "hi"}], timeout=30)
    assert quiet_emulator.counts["unauthorized"] == 1


def test_injected_faults_end_in_exactly_one_result_each(client: Client, quiet_emulator: ProviderEmulator) -> None:
    quiet_emulator.configure(faults={"429": 0.05, "500": 0.05, "timeout": 0.05, "garbage": 0.05})
    models = ["emu-gpt", "emu-claude", "emu-gpt-stream", "emu-claude-stream"]
    lines = [line(f"f{i}", models[i % 4], f"fault test {i}") for i in range(200)]
    job = client.batches.create(lines)
    done = client.batches.wait(job.id, timeout=300, poll_s=0.2)
    assert done.status == JobStatus.COMPLETED
    output = list(client.batches.results(job.id))
    assert Counter(o.custom_id for o in output) == Counter(f"f{i}" for i in range(200))
    for o in output:
        if o.response is not None:
            assert o.response.body.text == f"emulated: fault test {o.custom_id[1:]}"  # type: ignore[index]
        else:
            assert o.error is not None
            assert o.error.code == "provider_error"
            assert "after 8 attempts" in o.error.message
    injected = sum(quiet_emulator.counts[f"fault_{f}"] for f in ("429", "500", "timeout", "garbage"))
    assert injected > 20  # about 20% of at least 200 calls
    # Every fault was retried: calls made = answers + injected faults, and most lines succeeded.
    assert quiet_emulator.counts["received"] == quiet_emulator.counts["answered"] + injected
    assert done.request_counts.completed >= 195
    retried = [r for r in client.batches.request_results(job.id) if r.stats and r.stats.attempts > 1]
    assert retried


def test_two_workers_share_one_rate_limit(client: Client, quiet_emulator: ProviderEmulator,
                                          api_workers: list[WorkerProcess]) -> None:  # fmt: skip
    limited = [w for w in api_workers if w.model == "emu-gpt-limited"]
    assert len(limited) == 2
    job = client.batches.create([line(f"r{i}", "emu-gpt-limited", f"limit {i}") for i in range(60)])
    done = client.batches.wait(job.id, timeout=120, poll_s=0.2)
    assert done.request_counts.completed == 60
    assert quiet_emulator.counts["limit_exceeded"] == 0  # never over 10 per 2 s, as the emulator saw it
    assert 0 < quiet_emulator.max_in_window["gpt-limited"] <= 10
    workers_used = Counter(r.stats.worker for r in client.batches.request_results(job.id) if r.stats)
    assert len(workers_used) == 2  # both workers served, and still the shared limit held


def test_api_keys_never_reach_redis_or_logs(client: Client, redis_client: redis.Redis,
                                            api_workers: list[WorkerProcess], quiet_emulator: ProviderEmulator) -> None:  # fmt: skip
    client.chat("emu-gpt", [{"role": "user", "content": "key check"}], timeout=30)
    client.chat("emu-claude", [{"role": "user", "content": "key check"}], timeout=30)
    secrets_ = [OPENAI_TEST_KEY.encode(), ANTHROPIC_TEST_KEY.encode()]
    for key in redis_client.scan_iter(count=1000):
        kind = redis_client.type(key)
        if kind == b"string":
            values = [redis_client.get(key) or b""]
        elif kind == b"hash":
            values = [b"%s=%s" % kv for kv in redis_client.hgetall(key).items()]
        elif kind == b"list":
            values = redis_client.lrange(key, 0, -1)
        elif kind == b"zset":
            values = redis_client.zrange(key, 0, -1)
        elif kind == b"stream":
            values = [repr(entry).encode() for entry in redis_client.xrange(key)]
        else:
            values = [repr(redis_client.dump(key)).encode()]
        for blob in [key, *values]:
            assert not any(secret in blob for secret in secrets_), key
    for worker in api_workers:
        log = worker.log_path.read_bytes()
        assert log  # the workers did log
        assert not any(secret in log for secret in secrets_), worker.log_path


@pytest.mark.model
@pytest.mark.usefixtures("smollm2_worker", "echo_worker")
def test_one_batch_mixes_local_and_cloud_models(client: Client, quiet_emulator: ProviderEmulator) -> None:
    models = ["smollm2-135m", "echo", "emu-gpt", "emu-claude"]
    lines = [line(f"{m}-{i}", m, "What is the capital of France?", temperature=0) for m in models for i in range(3)]
    done = client.batches.wait(client.batches.create(lines).id, timeout=600, poll_s=0.5)
    assert done.request_counts.model_dump() == {"total": 12, "completed": 12, "failed": 0}
    served = Counter(r.stats.model for r in client.batches.request_results(done.id) if r.stats)
    assert served == dict.fromkeys(models, 3)
    texts = {o.custom_id: o.response.body.text for o in client.batches.results(done.id) if o.response}
    assert "Paris" in texts["smollm2-135m-0"]
    assert texts["emu-claude-1"] == "emulated: What is the capital of France?"
    assert {row.model for row in done.usage} == set(models)
