"""Review defects of the exactly-once paths (issue 17, items 3, 4, 6, 13, 15 and 16), on real Redis.

3. A redelivered copy of a chunk whose request moved to a fallback freed the wrong model's window.
4. A chunk that outlived its job recreated the job's record (without a status) and counted usage twice.
6. A batch whose upload broke off stayed 'validating' for ever; over-long integers killed the upload.
13. Reading results stopped at the first page whose results had expired.
15. A malformed usage number left a result written but its counters not.
16. Cancelling was read-then-write, and could turn a completed job into a cancelling one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inferpool import BatchRefused, Client, JobStatus, ProviderError, Registry, Settings
from inferpool.cli.batch import ResultFiles
from inferpool.constants import (
    MODEL_INFLIGHT_KEY,
    job_completed_stream_key,
    job_inflight_since_key,
    job_items_key,
    job_key,
    queue_name,
    result_key,
)
from inferpool.plumbing.celery_app import create_celery_app, publish_chunk
from inferpool.state.items import item_record
from inferpool.state.jobs import _ENTRIES_PER_READ, JobStore, NewJob
from inferpool.state.results import ResultRecord, ResultWriter, stored_results
from inferpool.wire import ChatRequest, TaskChunk, TaskItem, new_id
from inferpool.workers import WorkerRuntime, create_backend
from inferpool.workers.failures import FailurePolicy


def _line(custom_id: str, model: str = "echo", text: str = "hi") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def _item(model: str, text: str = "hi") -> TaskItem:
    request = ChatRequest.model_validate({"model": model, "messages": [{"role": "user", "content": text}]})
    return TaskItem(request_id=new_id("req"), custom_id=new_id("c"), request=request)


def _new_job(redis_client: redis.Redis, ttl_s: int = 600) -> str:
    job_id = new_id("batch")
    JobStore(redis_client, ttl_s).create(job_id, NewJob(window_s=ttl_s, window_label="x"))
    return job_id


def _record(request_id: str, prompt_tokens: object = 3) -> ResultRecord:
    payload = json.dumps({"request_id": request_id, "error": {"code": "x", "message": "y"}}).encode()
    return ResultRecord(request_id, False, prompt_tokens, 0, 0.0, 0.01, payload)  # type: ignore[arg-type]


def _count(redis_client: redis.Redis, model: str) -> int:
    return int(redis_client.hget(MODEL_INFLIGHT_KEY, model) or 0)


# -- 3 ------------------------------------------------------------------------------------------------


def test_a_result_frees_the_window_of_the_model_now_holding_the_request(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The request moved from echo-flaky to a fallback; then a redelivered copy of the original chunk
    answered it on echo-flaky. The fallback's count must come down, echo-flaky's must not (twice)."""
    registry = Registry.from_settings(settings)
    celery = create_celery_app(settings)
    policy = FailurePolicy(registry.get("echo-flaky"), registry, redis_client, celery,
                           dead_letter_ttl_s=settings.result_ttl_s)  # fmt: skip
    job_id = _new_job(redis_client)
    item = _item("echo-flaky", "FAIL once")
    redis_client.hset(job_items_key(job_id), item.request_id,
                      item_record("echo-flaky", item))  # fmt: skip
    redis_client.zadd(job_inflight_since_key(job_id), {item.request_id: time.time()})
    redis_client.hincrby(MODEL_INFLIGHT_KEY, "echo-flaky", 1)
    target = registry.get("smollm2-135m-vllm")  # no worker of this session serves it
    before = {m: _count(redis_client, m) for m in ("echo-flaky", target.name)}
    chunk = TaskChunk(job_id=job_id, model="echo-flaky", items=[item], result_ttl_s=600)
    policy.forward(chunk, [(item, ProviderError("down"), target)])
    [written] = ResultWriter(redis_client).write_records(job_id, "echo-flaky", [_record(item.request_id)], 600)
    assert written
    after = {m: _count(redis_client, m) for m in ("echo-flaky", target.name)}
    assert after == {"echo-flaky": before["echo-flaky"] - 1, target.name: before[target.name]}
    assert redis_client.hlen(job_items_key(job_id)) == 0
    redis_client.delete(queue_name(target.name))  # the forwarded chunk: no worker of this session takes it
    celery.close()


# -- 4 ------------------------------------------------------------------------------------------------


@pytest.fixture
def runtime(settings: Settings, redis_client: redis.Redis) -> Iterator[WorkerRuntime]:
    spec = Registry.load().get("echo")
    worker = WorkerRuntime(spec, create_backend(spec, settings), redis_client, settings, worker_id="review-runtime")
    yield worker
    worker.close()


def test_a_chunk_that_outlived_its_job_writes_and_counts_nothing(
    runtime: WorkerRuntime, redis_client: redis.Redis
) -> None:
    gone = new_id("batch")  # its record expired with its retention
    items = [_item("echo") for _ in range(3)]
    refs = [item.request_id for item in items]
    report = runtime.process_chunk(TaskChunk(job_id=gone, model="echo", refs=refs, result_ttl_s=600))
    assert (report.written, report.skipped_existing) == (0, 3)
    inline = runtime.process_chunk(TaskChunk(job_id=gone, model="echo", items=items, result_ttl_s=600))
    assert (inline.written, inline.duplicates_ignored) == (0, 3)  # refused by the write script
    assert redis_client.exists(job_key(gone), job_completed_stream_key(gone)) == 0
    assert redis_client.exists(*(result_key(item.request_id) for item in items)) == 0
    # The write script refuses on its own too (a job gone between the worker's check and its write).
    flags = ResultWriter(redis_client).write_records(gone, "echo", [_record(items[0].request_id)], 600)
    assert flags == [False]
    assert redis_client.exists(job_key(gone)) == 0
    # A single request queued longer than its results live is dropped unrun.
    stale = TaskChunk(model="echo", items=[_item("echo")], result_ttl_s=5, enqueued_at=time.time() - 10)
    assert runtime.process_chunk(stale).written == 0


def test_a_partial_job_record_reads_as_gone(client: Client, redis_client: redis.Redis) -> None:
    job_id = _new_job(redis_client)
    redis_client.delete(job_key(job_id))
    redis_client.hincrby(job_key(job_id), "completed", 1)  # what a late chunk used to leave behind
    assert JobStore(redis_client, 600).get(job_id) is None
    assert all(job.id != job_id for job in client.batches.list(1000))


def test_chunks_expire_and_windows_longer_than_the_retention_are_refused(
    settings: Settings, client: Client, redis_client: redis.Redis
) -> None:
    celery = create_celery_app(settings)
    model = f"nobody-serves-{os.getpid()}"
    publish_chunk(celery, TaskChunk(model=model, items=[_item("echo")], result_ttl_s=120))
    [(queue, message)] = [(q, redis_client.lindex(q, 0)) for q in (k.decode() for k in redis_client.keys(
        f"inferpool.model.{model}.*"))]  # fmt: skip
    headers = json.loads(message or b"{}")["headers"]
    assert headers["expires"] is not None  # the worker discards it unrun once the results' retention is over
    redis_client.delete(queue)
    celery.close()
    days = settings.result_ttl_s // 86400 + 1
    with pytest.raises(BatchRefused, match="longer than the result retention"):
        client.batches.create([_line("w")], completion_window=f"{days}d")


# -- 6 ------------------------------------------------------------------------------------------------


def _newest_job(client: Client) -> str:
    return client.batches.list(1)[0].id


@pytest.mark.usefixtures("echo_worker", "scheduler")
@pytest.mark.parametrize("abort", [RuntimeError("disk gone"), KeyboardInterrupt()])
def test_an_upload_that_breaks_off_fails_the_job(client: Client, abort: BaseException) -> None:
    def lines() -> Iterator[str]:
        yield _line("a1")
        yield _line("a2")
        raise abort

    with pytest.raises(type(abort)):
        client.batches.create(lines())
    job = client.batches.retrieve(_newest_job(client))
    assert job.status == JobStatus.FAILED
    expected = "interrupted" if isinstance(abort, KeyboardInterrupt) else "disk gone"
    assert expected in job.errors[0]


@pytest.mark.usefixtures("echo_worker", "scheduler")
def test_hostile_lines_end_as_their_own_errors(client: Client) -> None:
    huge_int = '{"custom_id": "big", "method": "POST", "url": "/v1/chat/completions", "body": {"seed": ' + "9" * 5000
    deep = "[" * 100_000 + "]" * 100_000
    job = client.batches.create([_line("good"), huge_int + "}}", deep, _line("seed", text="s")])
    done = client.batches.wait(job.id, timeout=60, poll_s=0.1)
    output = list(client.batches.results(job.id))
    assert done.request_counts.model_dump() == {"total": 4, "completed": 2, "failed": 2}
    assert {line.custom_id for line in output if line.response} == {"good", "seed"}
    errors = [line.error for line in output if line.error]
    assert [e.code for e in errors] == ["invalid_json", "invalid_json"]
    assert any("4300" in e.message for e in errors)
    assert any("nested too deeply" in e.message for e in errors)


# -- 13 -----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("echo_worker", "scheduler")
def test_results_after_an_unreadable_page_are_still_read(
    client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    job = client.batches.create([_line(f"p{i}") for i in range(2300)])
    client.batches.wait(job.id, timeout=120, poll_s=0.2)
    # The first entries become unreadable (fields of a version this one does not know): a page of them reads
    # as empty, and the reader must still go on to the next.
    stream = job_completed_stream_key(job.id)
    entries = redis_client.xrange(stream)
    assert len(entries) > 3 * _ENTRIES_PER_READ  # several pages of entries
    lost = 2 * _ENTRIES_PER_READ + 1
    readable = sum(len(stored_results(fields)) for _, fields in entries[lost:])
    redis_client.delete(stream)
    for n, (entry_id, fields) in enumerate(entries):
        redis_client.xadd(stream, {b"z9": b"?"} if n < lost else fields, id=entry_id)
    assert len(list(client.batches.results(job.id))) == readable
    with ResultFiles(client, job.id, tmp_path / "out.jsonl", None) as files:
        files.drain()
    assert files.count == readable > 0


# -- 15 -----------------------------------------------------------------------------------------------


def test_a_malformed_usage_number_writes_nothing(redis_client: redis.Redis) -> None:
    job_id = _new_job(redis_client)
    good, bad = _record(new_id("req")), _record(new_id("req"), prompt_tokens="twelve")
    with pytest.raises(redis.ResponseError, match="malformed usage number"):
        ResultWriter(redis_client).write_records(job_id, "echo", [good, bad], 600)
    assert redis_client.exists(result_key(good.request_id), result_key(bad.request_id)) == 0
    assert redis_client.hget(job_key(job_id), "failed") == b"0"
    nan = _record(new_id("req"), prompt_tokens=float("nan"))
    with pytest.raises(redis.ResponseError, match="malformed usage number"):
        ResultWriter(redis_client).write_records(job_id, "echo", [nan], 600)


# -- 16 -----------------------------------------------------------------------------------------------


def test_cancel_never_turns_a_finished_job_back(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, 600)
    for _ in range(150):
        job_id = _new_job(redis_client)
        store.open(job_id, 1, ["echo"])
        finisher = threading.Thread(target=store.finalize, args=(job_id, JobStatus.COMPLETED))
        canceller = threading.Thread(target=store.cancel, args=(job_id,))
        canceller.start()
        finisher.start()
        finisher.join()
        canceller.join()
        # Either order ends completed: a cancel that comes second sees the final status and leaves it.
        assert redis_client.hget(job_key(job_id), "status") == b"completed"
    assert store.cancel(new_id("batch")) is None
