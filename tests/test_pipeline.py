"""The worker's steps (``inferpool.workers.pipeline``): a concern added as one ``Step`` runs at its hooks and
touches nothing else; a step with no hooks changes nothing. A real WorkerRuntime with the echo backend on
the session's Redis."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from inferpool import Client, RequestError, Settings
from inferpool.model_registry.registry import Registry
from inferpool.wire import ChatRequest, TaskChunk, TaskItem, new_id
from inferpool.workers.backend import Generation
from inferpool.workers.echo import EchoBackend
from inferpool.workers.pipeline import ChunkWork, Generate, Step, default_steps
from inferpool.workers.runtime import WorkerRuntime


class _RefuseSecrets(Step):
    """A concern of a test's own: requests mentioning 'secret' never reach the backend."""

    def __init__(self) -> None:
        self.seen_written: list[bool] = []

    def before_generate(self, runtime: WorkerRuntime, work: ChunkWork) -> None:
        for item in work.undecided():
            if "secret" in item.request.messages[0].text():
                work.outcomes[item.request_id] = RequestError("no secrets here", code="refused_by_test")

    def after_generate(self, runtime: WorkerRuntime, work: ChunkWork, generate: Generate) -> None:
        for item in work.answered():
            outcome = work.outcomes[item.request_id]
            if isinstance(outcome, Generation):
                work.outcomes[item.request_id] = Generation(text=outcome.text.upper(), finish_reason="stop",
                                                            prompt_tokens=1, completion_tokens=1)  # fmt: skip

    def after_write(self, runtime: WorkerRuntime, work: ChunkWork, written: Sequence[bool]) -> None:
        self.seen_written = list(written)


def _items(*texts: str) -> list[TaskItem]:
    return [TaskItem(request_id=new_id("req"), request=ChatRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": text}]})) for text in texts]  # fmt: skip


def test_a_step_added_to_the_pipeline_decides_rewrites_and_sees_the_write(settings: Settings,
                                                                          redis_client: redis.Redis) -> None:  # fmt: skip
    spec = Registry.from_settings(settings).get("echo")
    step = _RefuseSecrets()
    runtime = WorkerRuntime(spec, EchoBackend(spec, settings), redis_client, settings, steps=[*default_steps(), step])
    items = _items("hello there", "the secret plan")
    try:
        report = runtime.process_chunk(TaskChunk(model="echo", items=items, result_ttl_s=60))
        with Client(settings=settings) as client:
            plain, secret = (client.handle(item.request_id).result(timeout=5) for item in items)
    finally:
        runtime.close()
    assert report.written == 2
    assert plain.response is not None
    assert plain.response.text == "ECHO: HELLO THERE"  # rewritten after the backend answered
    assert secret.error is not None
    assert secret.error.code == "refused_by_test"  # decided before: the backend never saw it
    assert step.seen_written == [True, True]


def test_a_step_without_hooks_changes_nothing(settings: Settings, redis_client: redis.Redis) -> None:
    spec = Registry.from_settings(settings).get("echo")
    runtime = WorkerRuntime(spec, EchoBackend(spec, settings), redis_client, settings, steps=[*default_steps(), Step()])
    items = _items("just this")
    try:
        runtime.process_chunk(TaskChunk(model="echo", items=items, result_ttl_s=60))
        with Client(settings=settings) as client:
            result = client.handle(items[0].request_id).result(timeout=5)
    finally:
        runtime.close()
    assert result.response is not None
    assert result.response.text == "echo: just this"
