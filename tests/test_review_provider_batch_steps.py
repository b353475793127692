"""Issue 25, items 4 and 5: a slow provider-batch step is never run twice (its lock is renewed, and fenced),
and the job's window end collects what the provider finished before it settles the rest. The real runner
and store on the session's Redis, the official OpenAI SDK against the provider emulator."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from inferpool import Settings
from inferpool.constants import job_items_key, job_key, job_pending_key, provider_batch_lock_key
from inferpool.emulators import ProviderEmulator
from inferpool.model_registry.registry import Registry
from inferpool.provider_batch.runner import ProviderBatchRunner
from inferpool.provider_batch.store import LockLost, ProviderBatchStore
from inferpool.state.items import item_record
from inferpool.wire import ChatRequest, PBatchState, TaskItem, new_id
from inferpool.workers.openai_backend import OpenAIBackend
from inferpool.workers.runtime import WorkerRuntime

from .conftest import OPENAI_TEST_KEY

MODEL = "emu-gpt-batch"


class _SlowUpload:
    """The OpenAI Batch API whose file upload takes ``delay_s`` (a big file), counting its uploads and creates."""

    def __init__(self, api: Any, delay_s: float) -> None:
        self._api = api
        self._delay_s = delay_s
        self.upload_calls = 0
        self.create_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    async def upload(self, name: str, path: Path) -> str:
        self.upload_calls += 1
        await asyncio.sleep(self._delay_s)
        return str(await self._api.upload(name, path))

    async def create(self, *args: Any) -> str:
        self.create_calls += 1
        return str(await self._api.create(*args))


@pytest.fixture
def runtime(settings: Settings, redis_client: redis.Redis, emulator: ProviderEmulator,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerRuntime]:  # fmt: skip
    monkeypatch.setenv("OPENAI_BASE_URL", emulator.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_TEST_KEY)
    local = settings.model_copy(update={"provider_batch_step_timeout_s": 1.0})
    spec = Registry.from_settings(local).get(MODEL)
    runtime = WorkerRuntime(spec, OpenAIBackend(spec, local), redis_client, local)
    yield runtime
    runtime.close()


def _provider_batch(client: redis.Redis, store: ProviderBatchStore, lines: int) -> tuple[str, str]:
    """A job in progress with ``lines`` pending lines of the model, formed into one provider batch."""
    job_id = new_id("batch")
    client.hset(job_key(job_id), mapping={"status": "in_progress", "total": lines})
    rids = []
    for n in range(lines):
        request = ChatRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": f"l{n}"}]})
        item = TaskItem(request_id=new_id("req"), custom_id=f"c{n}", request=request)
        client.hset(job_items_key(job_id), item.request_id, item_record(MODEL, item))
        rids.append(item.request_id)
    client.zadd(job_pending_key(job_id, MODEL), dict.fromkeys(rids, 0))
    pbatch_id, moved = store.form(job_id, MODEL, "openai", 100)
    assert moved == lines
    return job_id, pbatch_id


def test_a_slow_step_keeps_its_lock_and_is_not_run_twice(runtime: WorkerRuntime, redis_client: redis.Redis,
                                                         tmp_path: Path) -> None:  # fmt: skip
    store = ProviderBatchStore(redis_client, 3600)
    _, pbatch_id = _provider_batch(redis_client, store, 3)
    api = _SlowUpload(runtime.backend.batch_api(), 2.0)  # type: ignore[attr-defined]
    first = ProviderBatchRunner(runtime, api, store, runtime.settings, work_dir=tmp_path / "a")
    twin = ProviderBatchRunner(runtime, api, store, runtime.settings, work_dir=tmp_path / "b")
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(first.step(pbatch_id)))
    worker.start()
    time.sleep(1.4)  # past the 1 s step timeout: the lock lives on because the step is alive
    assert store.step_running(pbatch_id)  # so the scheduler does not publish the step again
    assert twin.step(pbatch_id).startswith("busy")
    worker.join(timeout=30)
    assert outcome == ["created"]
    assert (api.upload_calls, api.create_calls) == (1, 1)
    batch = store.get(pbatch_id)
    assert batch is not None
    assert batch.state == PBatchState.CREATED
    assert not store.step_running(pbatch_id)  # released at the end


def test_a_step_that_lost_its_lock_records_nothing(runtime: WorkerRuntime, redis_client: redis.Redis,
                                                   tmp_path: Path) -> None:  # fmt: skip
    store = ProviderBatchStore(redis_client, 3600)
    _, pbatch_id = _provider_batch(redis_client, store, 2)
    api = _SlowUpload(runtime.backend.batch_api(), 1.0)  # type: ignore[attr-defined]
    runner = ProviderBatchRunner(runtime, api, store, runtime.settings, work_dir=tmp_path)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(runner.step(pbatch_id)))
    worker.start()
    time.sleep(0.5)  # mid-upload: the lock lapses (a stalled process) and another worker takes it
    redis_client.set(provider_batch_lock_key(pbatch_id), "another-worker", px=60_000)
    worker.join(timeout=30)
    assert outcome == ["lost its lock: another worker advances it now"]
    batch = store.get(pbatch_id)
    assert batch is not None
    assert batch.state == PBatchState.UPLOADING  # the upload was not recorded by the step that lost the lock
    assert api.create_calls == 0
    with pytest.raises(LockLost):
        store.mark(pbatch_id, PBatchState.CREATED, fence=_FakeFence())


class _FakeFence:
    token = "not-the-holder"
