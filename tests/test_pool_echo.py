"""The whole pool on the echo backend: real Redis, a real Celery worker process, sync and async clients."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from inferpool import (
    AsyncClient,
    Client,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    RedisUnavailable,
    Registry,
    ResultTimeout,
    Settings,
)
from inferpool.plumbing.local_pool import WorkerProcess, free_port
from inferpool.wire import ChatRequest

pytestmark = pytest.mark.usefixtures("echo_worker")

USER_HI = [{"role": "user", "content": "hello pool"}]


def test_submit_returns_a_handle_and_the_result_comes_back(client: Client, echo_worker: WorkerProcess) -> None:
    handle = client.submit({"model": "echo", "messages": USER_HI, "max_tokens": 10})
    result = handle.result(timeout=30)
    assert result.ok
    assert result.response is not None
    assert result.response.text == "echo: hello pool"
    assert result.response.usage.model_dump() == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert result.stats is not None
    assert result.stats.model == "echo"
    assert result.stats.worker.startswith("echo@")
    assert str(echo_worker.proc.pid) in result.stats.worker
    assert handle.done()


def test_chat_waits_and_returns_the_completion(client: Client) -> None:
    completion = client.chat("echo", USER_HI, max_tokens=2, timeout=30)
    assert completion.text == "echo: hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.object == "chat.completion"


def test_a_handle_can_be_reattached_from_another_client(client: Client, settings: Settings) -> None:
    request_id = client.submit(ChatRequest.model_validate({"model": "echo", "messages": USER_HI})).request_id
    with Client(settings=settings) as other:
        assert other.handle(request_id).completion(timeout=30).text == "echo: hello pool"


def test_bad_requests_fail_before_queueing(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="max_tokens"):
        client.submit({"model": "echo", "messages": USER_HI, "max_tokens": -1})
    with pytest.raises(InvalidRequest, match="messages"):
        client.submit({"model": "echo"})
    with pytest.raises(ModelNotFound, match="nope"):
        client.chat("nope", USER_HI)


def test_worker_side_errors_are_raised_by_chat(client: Client) -> None:
    with pytest.raises(ContextLengthExceeded, match="context window"):
        client.chat("echo", [{"role": "user", "content": "word " * 5000}], timeout=30)


def test_result_timeout_when_no_worker_serves_the_model(settings: Settings, tmp_path: Path) -> None:
    extra = tmp_path / "idle.yaml"
    extra.write_text(
        "models:\n  - name: echo-idle\n    backend: echo\n    capabilities: {context_window: 50, max_output_tokens: 5}\n"
    )
    with Client(settings=settings, registry=Registry.load([extra])) as idle_client:
        handle = idle_client.submit({"model": "echo-idle", "messages": USER_HI})
        with pytest.raises(ResultTimeout, match="are workers running"):
            handle.result(timeout=0.5)
        assert not handle.done()


def test_missing_redis_is_one_clear_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailable, match=r"cannot connect to Redis at redis://127\.0\.0\.1.*REDIS_URL"):
        Client(url)


async def test_async_client_awaits_results(async_client: AsyncClient) -> None:
    handle = await async_client.submit({"model": "echo", "messages": USER_HI})
    result = await handle
    assert result.response is not None
    assert result.response.text == "echo: hello pool"


async def test_async_client_many_concurrent_chats(async_client: AsyncClient) -> None:
    texts = [f"message number {i}" for i in range(40)]
    completions = await asyncio.gather(
        *(async_client.chat("echo", [{"role": "user", "content": t}], timeout=60) for t in texts)
    )
    assert [c.text for c in completions] == [f"echo: {t}" for t in texts]


async def test_sync_and_async_clients_agree(client: Client, async_client: AsyncClient) -> None:
    request = {"model": "echo", "messages": USER_HI, "max_tokens": 2, "stop": "hello"}
    sync_result = client.submit(request).result(timeout=30)
    async_result = await (await async_client.submit(request)).result(timeout=30)
    assert sync_result.response is not None
    assert async_result.response is not None
    assert sync_result.response.choices == async_result.response.choices
    assert sync_result.response.usage == async_result.response.usage
    with pytest.raises(InvalidRequest):
        await async_client.submit({"model": "echo", "messages": USER_HI, "max_tokens": 0})


def test_usage_is_counted_per_tenant(settings: Settings) -> None:
    suffix = secrets.token_hex(4)
    acme, globex = f"acme-{suffix}", f"globex-{suffix}"
    with Client(settings=settings, tenant=acme) as a, Client(settings=settings, tenant=globex) as g:
        for i in range(3):
            a.chat("echo", [{"role": "user", "content": f"one two {i}"}], timeout=30)
        g.chat("echo", [{"role": "user", "content": "x"}], timeout=30)
        with pytest.raises(ContextLengthExceeded):
            g.chat("echo", [{"role": "user", "content": "w " * 5000}], timeout=30)
        [acme_row] = a.usage(tenant=acme)
        [globex_row] = a.usage(tenant=globex, model="echo")
    assert (acme_row.model, acme_row.requests, acme_row.errors) == ("echo", 3, 0)
    assert (acme_row.prompt_tokens, acme_row.completion_tokens) == (9, 12)
    assert (globex_row.requests, globex_row.errors, globex_row.prompt_tokens) == (2, 1, 1)


def test_a_request_user_names_no_tenant_unless_the_client_allows_it(settings: Settings) -> None:
    """Review defect 11: by default any line could bill another tenant (and grow the usage keys and metric
    labels) through its `user` field. Now that takes INFERPOOL_USER_TENANTS ('*' or an allow-list), and a
    client's own tenant always wins."""
    allowed, other = f"user-{secrets.token_hex(4)}", f"user-{secrets.token_hex(4)}"

    def tenant_of(client: Client, user: str) -> str | None:
        return client.submit({"model": "echo", "messages": USER_HI, "user": user}).result(timeout=30).tenant

    with Client(settings=settings) as closed:
        assert tenant_of(closed, allowed) == "default"
        assert closed.usage(tenant=allowed) == []
    with Client(settings=settings.model_copy(update={"user_tenants": f"{allowed}, someone-else"})) as listed:
        assert (tenant_of(listed, allowed), tenant_of(listed, other)) == (allowed, "default")
        assert [row.requests for row in listed.usage(tenant=allowed)] == [1]
    with Client(settings=settings.model_copy(update={"user_tenants": "*"})) as open_:
        assert tenant_of(open_, other) == other
    with Client(settings=settings.model_copy(update={"user_tenants": "*"}), tenant="acme-fixed") as fixed:
        assert tenant_of(fixed, other) == "acme-fixed"
