"""Fallback chains and dead letters, with real workers of echo models that fail on demand.

echo-flaky and echo-doomed fail (provider_error) every prompt containing FAIL; echo-flaky's chain is
echo-doomed, then echo. echo-tiny has a 64-token window and falls back to echo-flaky.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inferpool import ChatRequest, Client, JobStatus, ProviderError, Registry, Settings
from inferpool.constants import MODEL_INFLIGHT_KEY, job_inflight_since_key, job_items_key, queue_name
from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.local_pool import WorkerProcess
from inferpool.state.items import item_from_record, item_record
from inferpool.wire import TaskChunk, TaskItem
from inferpool.workers.failures import FailurePolicy

from .conftest import _start_workers, _stop_workers

pytestmark = pytest.mark.usefixtures("echo_worker", "scheduler", "failing_workers")


@pytest.fixture(scope="module")
def failing_workers(redis_url: str, session_dir: Path) -> Iterator[list[WorkerProcess]]:
    workers = _start_workers(redis_url, session_dir, "echo-flaky", "echo-doomed", "echo-tiny")
    yield workers
    _stop_workers(workers)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_failed_request_moves_down_its_chain_and_records_who_served_it(client: Client) -> None:
    result = client.submit({"model": "echo-flaky", "messages": ask("please FAIL here")}).result(30)
    assert result.response is not None
    assert result.response.text == "echo: please FAIL here"
    assert result.stats is not None
    assert result.stats.model == "echo"  # the third model of the chain served it
    assert result.warnings is not None
    assert len(result.warnings) == 2
    assert result.warnings[0].startswith("model 'echo-flaky' failed (provider_error: injected failure")
    assert result.warnings[0].endswith("passed to fallback 'echo-doomed'")
    assert result.warnings[1].endswith("passed to fallback 'echo'")
    fine = client.submit({"model": "echo-flaky", "messages": ask("all good")}).result(30)
    assert fine.stats is not None
    assert fine.stats.model == "echo-flaky"
    assert fine.warnings is None


def test_a_prompt_too_long_for_the_window_goes_to_a_larger_model(client: Client) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(100))  # 100 tokens for echo, over echo-tiny's 64
    result = client.submit({"model": "echo-tiny", "messages": ask(long_prompt), "max_tokens": 4}).result(30)
    assert result.response is not None
    assert result.stats is not None
    assert result.stats.model == "echo-flaky"
    assert result.warnings is not None
    assert "context_length_exceeded" in result.warnings[0]


def test_a_batch_job_with_fallbacks_counts_every_line_once(client: Client, redis_client: redis.Redis) -> None:
    lines = [json.dumps({"custom_id": f"f{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "echo-flaky", "messages": ask(f"line {i}" + (" FAIL" if i % 3 == 0 else "")),
                                  "max_tokens": 8}}) for i in range(60)]  # fmt: skip
    job = client.batches.wait(client.batches.create(lines).id, timeout=120, poll_s=0.1)
    assert job.status == JobStatus.COMPLETED
    assert job.request_counts.model_dump() == {"total": 60, "completed": 60, "failed": 0}
    by_model = {row.model: row.requests for row in job.usage}
    assert by_model == {"echo-flaky": 40, "echo": 20}  # the 20 FAIL lines were served by the chain's end
    served = {line.custom_id: line.response.body.model for line in client.batches.results(job.id) if line.response}
    assert served == {f"f{i}": "echo" if i % 3 == 0 else "echo-flaky" for i in range(60)}
    inflight = {k.decode(): int(v) for k, v in redis_client.hgetall(MODEL_INFLIGHT_KEY).items()}
    assert all(inflight.get(m, 0) == 0 for m in ("echo-flaky", "echo-doomed", "echo"))


def _cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url}
    return subprocess.run([sys.executable, "-m", "inferpool", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)  # fmt: skip


def test_exhausted_requests_become_dead_letters_and_can_be_retried(client: Client, redis_url: str) -> None:
    marker = f"FAIL-{id(client)}"
    with pytest.raises(ProviderError, match="injected failure"):
        client.chat("echo-doomed", ask(f"doomed {marker} 1"), timeout=30)
    lines = [json.dumps({"custom_id": f"d{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "echo-doomed", "messages": ask(f"doomed {marker} {i + 2}")}})
             for i in range(3)]  # fmt: skip
    job = client.batches.wait(client.batches.create(lines).id, timeout=60)
    assert job.request_counts.model_dump() == {"total": 3, "completed": 0, "failed": 3}

    listed = _cli("dlq", "list", "--json", redis_url=redis_url)
    assert listed.returncode == 0, listed.stderr
    mine = [entry for entry in json.loads(listed.stdout) if entry["model"] == "echo-doomed"]
    assert len(mine) == 4
    assert {entry["error_code"] for entry in mine} == {"provider_error"}
    assert sorted(e["custom_id"] for e in mine if e["job_id"] == job.id) == ["d0", "d1", "d2"]
    table = _cli("dlq", "list", redis_url=redis_url)
    assert "echo-doomed" in table.stdout

    # The cause is "fixed" by sending them to another model.
    retried = _cli("dlq", "retry", *(entry["id"] for entry in mine), "--model", "echo", redis_url=redis_url)
    assert retried.returncode == 0, retried.stderr
    new_job_id = retried.stdout.split(":")[0]
    done = client.batches.wait(new_job_id, timeout=60)
    assert done.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
    texts = sorted(line.response.body.text for line in client.batches.results(new_job_id) if line.response)
    assert texts == sorted(f"echo: doomed {marker} {i}" for i in range(1, 5))
    remaining = {letter.id for letter in client.dead_letters.list()}
    assert not remaining & {entry["id"] for entry in mine}
    refused = _cli("dlq", "retry", redis_url=redis_url)
    assert refused.returncode != 0
    assert "IDS or --all" in refused.stderr


def test_a_redelivered_chunk_does_not_forward_a_request_twice(settings: Settings, redis_client: redis.Redis) -> None:
    """The first run of a chunk moved the request to its fallback; a second run of the same chunk (after a
    crash and a redelivery) finds the in-flight record moved and leaves the counts alone."""
    registry = Registry.from_settings(settings)
    celery = create_celery_app(settings)
    policy = FailurePolicy(registry.get("echo-flaky"), registry, redis_client, celery,
                           dead_letter_ttl_s=settings.result_ttl_s)  # fmt: skip
    job_id = f"batch_redelivery_{os.getpid()}"
    item = TaskItem(request_id=f"req_{job_id}", custom_id="r1",
                    request=ChatRequest(model="echo-flaky", messages=[{"role": "user", "content": "FAIL"}]))  # type: ignore[list-item]  # fmt: skip
    redis_client.hset(job_items_key(job_id), item.request_id,
                      item_record("echo-flaky", item))  # fmt: skip
    redis_client.zadd(job_inflight_since_key(job_id), {item.request_id: time.time()})
    # The fallback here is a model no worker of this session serves, so nothing answers the moved request
    # while the counts are read.
    target = registry.get("smollm2-135m-vllm")
    counted = ("echo-flaky", target.name)
    before = {k: int(redis_client.hget(MODEL_INFLIGHT_KEY, k) or 0) for k in counted}
    chunk = TaskChunk(job_id=job_id, model="echo-flaky", items=[item], result_ttl_s=60)
    failure = ProviderError("down")
    policy.forward(chunk, [(item, failure, target)])
    policy.forward(chunk, [(item, failure, target)])  # the redelivered run
    after = {k: int(redis_client.hget(MODEL_INFLIGHT_KEY, k) or 0) for k in counted}
    assert after == {"echo-flaky": before["echo-flaky"] - 1, target.name: before[target.name] + 1}
    moved = item_from_record(item.request_id, redis_client.hget(job_items_key(job_id), item.request_id) or "")
    assert (moved.request.model, moved.tried) == (target.name, ["echo-flaky"])
    assert redis_client.llen(queue_name(target.name)) == 1  # published once
    celery.close()
