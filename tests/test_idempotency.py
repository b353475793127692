"""A chunk that runs twice (redelivery after a crash, or two workers racing) writes each result once.

These drive a real ``WorkerRuntime`` with the echo backend against the session's real Redis, in this
process, so the two deliveries can be ordered (and raced) deterministically.
"""

from __future__ import annotations

import json
import threading

import redis

from inferpool import Registry, Settings
from inferpool.constants import job_completed_stream_key, job_key, result_key
from inferpool.state.jobs import JobStore, NewJob
from inferpool.state.results import ResultRecord, ResultWriter, parse_result
from inferpool.wire import ChatRequest, TaskChunk, TaskItem, new_id
from inferpool.workers import WorkerRuntime, create_backend


def _items(n: int) -> list[TaskItem]:
    return [
        TaskItem(
            request_id=new_id("req"),
            custom_id=f"c{i}",
            request=ChatRequest.model_validate({"model": "echo", "messages": [{"role": "user", "content": f"n{i}"}]}),
        )
        for i in range(n)
    ]


def _chunk(redis_client: redis.Redis, job_id: str, n: int) -> TaskChunk:
    """A chunk of ``n`` echo requests of a new job ``job_id``, dispatched as the scheduler does (by id)."""
    store = JobStore(redis_client, 600)
    store.create(job_id, NewJob(window_s=600, window_label="10m"))
    store.add_pending(job_id, _items(n), ["echo"])
    refs = [rid for rid, _ in store.take_pending(job_id, "echo", n)]
    return TaskChunk(job_id=job_id, model="echo", refs=refs, result_ttl_s=600)


def _stored_request_ids(redis_client: redis.Redis, job_id: str) -> list[str]:
    """The request ids of every result stored in the job's completion stream, sorted (a duplicate shows twice)."""
    stored, _ = JobStore(redis_client, 600).read_raw_results(job_id, count=1_000_000)
    return sorted(parse_result(raw).request_id for raw in stored)


def _runtime(settings: Settings, redis_client: redis.Redis) -> WorkerRuntime:
    spec = Registry.load().get("echo")
    return WorkerRuntime(spec, create_backend(spec, settings), redis_client, settings, worker_id="test-runtime")


def test_second_delivery_skips_finished_requests(settings: Settings, redis_client: redis.Redis) -> None:
    runtime = _runtime(settings, redis_client)
    try:
        chunk = _chunk(redis_client, new_id("job-twice"), 20)
        first = runtime.process_chunk(chunk)
        second = runtime.process_chunk(chunk)
    finally:
        runtime.close()
    assert (first.written, first.skipped_existing) == (20, 0)
    assert (second.written, second.skipped_existing) == (0, 20)
    assert _stored_request_ids(redis_client, chunk.job_id or "") == sorted(chunk.refs)
    assert redis_client.hget(job_key(chunk.job_id or ""), "completed") == b"20"


def test_racing_deliveries_write_each_result_once(settings: Settings, redis_client: redis.Redis) -> None:
    runtimes = [_runtime(settings, redis_client) for _ in range(4)]
    chunk = _chunk(redis_client, new_id("job-race"), 200)
    reports = []
    barrier = threading.Barrier(len(runtimes))

    def deliver(runtime: WorkerRuntime) -> None:
        barrier.wait()
        reports.append(runtime.process_chunk(chunk))

    threads = [threading.Thread(target=deliver, args=(r,)) for r in runtimes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for runtime in runtimes:
        runtime.close()
    assert sum(r.written for r in reports) == 200
    assert sum(r.written + r.skipped_existing + r.duplicates_ignored for r in reports) == 4 * 200
    assert _stored_request_ids(redis_client, chunk.job_id or "") == sorted(chunk.refs)
    assert redis_client.hget(job_key(chunk.job_id or ""), "completed") == b"200"


def test_first_deliveries_that_skip_the_lookup_still_write_once(settings: Settings, redis_client: redis.Redis) -> None:
    """A single request's chunk, on its first delivery, does not look results up before running (none can
    exist); if the same requests arrive twice as 'first' deliveries anyway, each result is stored once."""
    runtimes = [_runtime(settings, redis_client) for _ in range(3)]
    chunk = TaskChunk(model="echo", items=_items(100), result_ttl_s=600)
    try:
        reports = [runtime.process_chunk(chunk, maybe_answered=False) for runtime in runtimes]
    finally:
        for runtime in runtimes:
            runtime.close()
    assert [r.skipped_existing for r in reports] == [0, 0, 0]
    assert [r.written for r in reports] == [100, 0, 0]
    assert [r.duplicates_ignored for r in reports] == [0, 100, 100]
    assert redis_client.exists(*(result_key(item.request_id) for item in chunk.items)) == 100


def test_a_partly_duplicate_write_stores_only_the_new_results(redis_client: redis.Redis) -> None:
    """One stream entry holds a call's results; the ones not written (already answered) are marked, not read."""
    chunk = _chunk(redis_client, new_id("job-partly"), 5)
    job_id, writer = chunk.job_id or "", ResultWriter(redis_client)

    def record(request_id: str) -> ResultRecord:
        payload = json.dumps({"request_id": request_id, "error": {"code": "x", "message": "y"}}).encode()
        return ResultRecord(request_id, False, 0, 0, 0.0, 0.01, payload)

    assert writer.write_records(job_id, "echo", [record(r) for r in chunk.refs[1:4:2]], 600) == [True, True]
    again = writer.write_records(job_id, "echo", [record(r) for r in chunk.refs], 600)
    assert again == [True, False, True, False, True]
    entries = redis_client.xrange(job_completed_stream_key(job_id))
    assert [fields.get(b"s") for _, fields in entries] == [None, b"1,3"]
    assert _stored_request_ids(redis_client, job_id) == sorted(chunk.refs)
    assert redis_client.hget(job_key(job_id), "failed") == b"5"
