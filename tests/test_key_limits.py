"""Per-key limits at the gateway (issue 30): the models a key may use, requests and tokens per minute and
requests in flight, shared by every gateway process through Redis; the official openai SDK sees OpenAI's own
errors (404 ``model_not_found``, 429 ``rate_limit_exceeded`` with ``Retry-After``)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from inferpool import AsyncClient, Client, ConfigurationError, ModelNotFound, RateLimited
from inferpool.state.api_keys import ApiKeys, KeyLimits

from .conftest import start_gateway, stop_gateway

pytestmark = pytest.mark.usefixtures("echo_worker", "echo_trickle_worker")


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def gateways(redis_url: str, session_dir: Path) -> Iterator[list[str]]:
    """Two gateway processes on the same pool, as behind a load balancer."""
    started = [start_gateway(redis_url, session_dir / f"gateway-limits-{i}.log", {}) for i in range(2)]
    yield [url for _, url in started]
    for i, (proc, _) in enumerate(started):
        stop_gateway(proc, session_dir / f"gateway-limits-{i}.log")


def _key(redis_url: str, **limits: object) -> str:
    return ApiKeys(redis.Redis.from_url(redis_url)).create("limited", KeyLimits.model_validate(limits))[0]


def test_a_key_uses_only_its_models(gateways: list[str], redis_url: str) -> None:
    sdk = openai.OpenAI(base_url=f"{gateways[0]}/v1", api_key=_key(redis_url, models=["echo"]), max_retries=0)
    assert sdk.chat.completions.create(model="echo", messages=ask("hi")).choices[0].message.content == "echo: hi"  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.chat.completions.create(model="echo-trickle", messages=ask("hi"))  # type: ignore[arg-type]
    assert refused.value.code == "model_not_found"
    assert "The model `echo-trickle` does not exist or you do not have access to it." in refused.value.message
    assert [model.id for model in sdk.models.list()] == ["echo"]
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("echo-trickle")
    # "auto" chooses only among the key's models.
    chosen = httpx.post(f"{gateways[0]}/v1/chat/completions", headers={"authorization": f"Bearer {sdk.api_key}"},
                        json={"model": "auto", "messages": ask("x")}, timeout=30)  # fmt: skip
    assert chosen.status_code == 200, chosen.text
    assert chosen.json()["model"] == "echo"


@pytest.mark.usefixtures("scheduler")
def test_a_keys_batch_lines_use_only_its_models(gateways: list[str], redis_url: str, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=f"{gateways[0]}/v1", api_key=_key(redis_url, models=["echo"]), max_retries=0)
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": ask("x")}}
             for name, model in (("ok", "echo"), ("other", "echo-trickle"), ("auto", "auto"))]  # fmt: skip
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch = sdk.batches.create(input_file_id=sdk.files.create(file=path.open("rb"), purpose="batch").id,
                               endpoint="/v1/chat/completions", completion_window="24h")  # fmt: skip
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.output_file_id is not None
    assert batch.error_file_id is not None  # failed lines go to the error file, as OpenAI's do
    outputs = [json.loads(line) for file_id in (batch.output_file_id, batch.error_file_id)
               for line in sdk.files.content(file_id).text.splitlines()]  # fmt: skip
    errors = {out["custom_id"]: (out["error"] or {}).get("code") for out in outputs}
    assert errors == {"ok": None, "other": "model_not_found", "auto": None}
    assert {out["custom_id"]: out["response"]["body"]["model"] for out in outputs if out["response"]} == {
        "ok": "echo", "auto": "echo"}  # fmt: skip


def test_requests_per_minute_hold_across_gateways_and_concurrent_clients(gateways: list[str], redis_url: str) -> None:
    key, rpm = _key(redis_url, rpm=10), 10
    headers = {"authorization": f"Bearer {key}"}

    def send(i: int) -> httpx.Response:
        url = gateways[i % 2]
        return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60,
                          json={"model": "echo", "messages": ask(f"r{i}")})  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(send, range(64)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] * rpm + [429] * (64 - rpm)  # exactly the limit, however the 64 raced
    refused = [answer for answer in answers if answer.status_code == 429]
    assert {answer.json()["error"]["code"] for answer in refused} == {"rate_limit_exceeded"}
    assert all(1 <= int(answer.headers["retry-after"]) <= 60 for answer in refused)
    assert "requests per minute on this key: limit 10" in refused[0].json()["error"]["message"]


def test_tokens_per_minute_and_requests_in_flight(gateways: list[str], redis_url: str) -> None:
    sdk = openai.OpenAI(base_url=f"{gateways[0]}/v1", api_key=_key(redis_url, tpm=300), max_retries=0)
    with pytest.raises(openai.RateLimitError, match="Request too large"):
        sdk.chat.completions.create(model="echo", messages=ask("hi"), max_tokens=400)  # type: ignore[arg-type]
    sdk.chat.completions.create(model="echo", messages=ask("hi"), max_tokens=200)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError, match="tokens per minute on this key: limit 300"):
        sdk.chat.completions.create(model="echo", messages=ask("hi"), max_tokens=200)  # type: ignore[arg-type]

    # Two streams open at once; a third request waits for one of them to end.
    key = _key(redis_url, max_in_flight=2)
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "echo-trickle", "messages": ask("one two three"), "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{gateways[0]}/v1/chat/completions", headers=headers, json=body) as first, \
                http.stream("POST", f"{gateways[1]}/v1/chat/completions", headers=headers, json=body) as second:  # fmt: skip
            assert (first.status_code, second.status_code) == (200, 200)
            third = http.post(f"{gateways[0]}/v1/chat/completions", headers=headers,
                              json={"model": "echo", "messages": ask("x")})  # fmt: skip
            assert third.status_code == 429
            assert "has 2 requests open, its limit" in third.json()["error"]["message"]
            assert "[DONE]" in "".join(first.iter_text())
            assert "[DONE]" in "".join(second.iter_text())
        deadline = time.monotonic() + 10
        while (after := http.post(f"{gateways[0]}/v1/chat/completions", headers=headers,
                                  json={"model": "echo", "messages": ask("x")})).status_code == 429:  # fmt: skip
            assert time.monotonic() < deadline, "the streams' slots were not given back"
            time.sleep(0.1)
        assert after.status_code == 200


def test_changed_limits_apply_at_once(gateways: list[str], redis_url: str) -> None:
    store = ApiKeys(redis.Redis.from_url(redis_url))
    key, info = store.create("limited")
    sdk = openai.OpenAI(base_url=f"{gateways[0]}/v1", api_key=key, max_retries=0)
    sdk.chat.completions.create(model="echo-trickle", messages=ask("a"))  # type: ignore[arg-type]
    store.set_limits(info.key_id, KeyLimits(models=["echo"]))
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="echo-trickle", messages=ask("a"))  # type: ignore[arg-type]


def test_gateways_look_a_key_up_once_and_a_revocation_still_applies_at_once(gateways: list[str],
                                                                          redis_url: str) -> None:  # fmt: skip
    """The gateways keep the keys they read (an HGET a request cost ~8% of a gateway's CPU); a change made with
    ``inferpool keys`` is announced, so it applies from the next request on every gateway."""
    client = redis.Redis.from_url(redis_url)
    store = ApiKeys(client)
    key, info = store.create("cached")
    headers = {"authorization": f"Bearer {key}"}

    def chat(url: str) -> int:
        return httpx.post(f"{url}/v1/chat/completions", headers=headers, json={"model": "echo", "messages": ask("x")},
                          timeout=30).status_code  # fmt: skip

    assert [chat(url) for url in gateways] == [200, 200]  # each gateway has read the key once now

    def lookups() -> int:
        return int(client.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))

    before = lookups()
    assert [chat(url) for url in gateways for _ in range(20)] == [200] * 40
    assert lookups() - before < 10  # not one a request (no other HGET is on a chat's way through)
    store.revoke(info.key_id)
    assert [chat(url) for url in gateways] == [401, 401]


async def test_the_client_library_holds_to_its_key(redis_url: str) -> None:
    key = _key(redis_url, models=["echo"], rpm=3)
    with Client(redis_url, api_key=key) as client:
        assert client.settings.tenant == "limited"  # the key's tenant
        assert client.chat("echo", ask("a")).choices[0].message.content == "echo: a"
        with pytest.raises(ModelNotFound, match="The model `echo-trickle` does not exist or you do not have access"):
            client.chat("echo-trickle", ask("a"))
        client.chat("echo", ask("b"))
        async with AsyncClient(redis_url, api_key=key) as aclient:
            await aclient.chat("echo", ask("c"))
            with pytest.raises(RateLimited, match="requests per minute on this key: limit 3") as refused:
                await aclient.chat("echo", ask("d"))
        assert 1 <= refused.value.retry_after_s <= 60
        job = client.batches.create([{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": "echo-trickle", "messages": ask("x")}}])  # fmt: skip
        assert client.batches.retrieve(job.id).tenant == "limited"
        [line] = list(client.batches.request_results(job.id))
        assert line.error is not None
        assert line.error.code == "model_not_found"
    with pytest.raises(ConfigurationError, match="unknown or revoked"):
        Client(redis_url, api_key="ipk-not-a-key")
    with pytest.raises(ConfigurationError, match="belongs to tenant 'limited'"):
        Client(redis_url, api_key=key, tenant="someone-else")
