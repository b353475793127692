"""Batch jobs on the session pool: a real scheduler process and real echo workers on a real Redis."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from inferpool import AsyncClient, BatchRefused, Client, JobNotFound, JobStatus, Settings

pytestmark = pytest.mark.usefixtures("scheduler", "echo_worker", "echo_slow_worker")

USER_HI = [{"role": "user", "content": "hello pool"}]


def echo_line(custom_id: str, text: str, model: str = "echo", **body: object) -> str:
    payload = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 5, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": payload})


BAD_LINES = {
    "not json at all": "invalid_json",
    json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}): "missing_custom_id",
    json.dumps({"custom_id": "ok-3", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "echo", "messages": USER_HI}}): "duplicate_custom_id",
    json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/moderations", "body": {}}): "unsupported_url",
    json.dumps({"custom_id": "bad-model", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-unknown", "messages": USER_HI}}): "model_not_found",
    json.dumps({"custom_id": "no-msgs", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "echo"}}): "invalid_request",
    json.dumps({"custom_id": "neg", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "echo", "messages": USER_HI, "max_tokens": -5}}): "invalid_request",
    json.dumps({"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "echo", "messages": [{"role": "user", "content": "w " * 5000}]}}):
        "context_length_exceeded",
}  # fmt: skip


def test_ten_thousand_lines_with_bad_ones_mixed_in(client: Client, redis_client: redis.Redis, tmp_path: Path) -> None:
    lines = [echo_line(f"ok-{i}", f"prompt {i}") for i in range(10_000)]
    for offset, raw in enumerate(BAD_LINES):
        lines.insert(offset * 1000 + 7, raw)
    source = tmp_path / "big.jsonl"
    source.write_text("\n".join(lines) + "\n")
    job = client.batches.create(source)
    assert job.status == JobStatus.IN_PROGRESS
    assert job.request_counts.total == len(lines)
    done = client.batches.wait(job.id, timeout=300, poll_s=0.2)
    assert done.status == JobStatus.COMPLETED
    assert done.request_counts.model_dump() == {"total": len(lines), "completed": 10_000, "failed": len(BAD_LINES)}
    output = list(client.batches.results(job.id))
    assert len(output) == len(lines)
    errors = Counter(o.error.code for o in output if o.error is not None)
    assert errors == Counter(BAD_LINES.values())
    answers = {o.custom_id: o.response.body.text for o in output if o.response is not None}
    assert answers == {f"ok-{i}": f"echo: prompt {i}" for i in range(10_000)}
    # Every custom_id once, except the deliberate duplicate (its second line is reported, not dropped)
    # and the two lines that had none to give (not JSON; no custom_id).
    ids = Counter(o.custom_id for o in output)
    assert {cid: n for cid, n in ids.items() if n > 1} == {"ok-3": 2, None: 2}
    assert len({r.request_id for r in client.batches.request_results(job.id)}) == len(lines)  # one result each
    usage = {row.model: row for row in done.usage}
    assert usage["echo"].requests == 10_001
    assert usage["echo"].errors == 1  # the over-long prompt, refused by the worker
    assert usage["echo"].prompt_tokens == sum(len(f"prompt {i}".split()) for i in range(10_000))
    assert usage["echo"].completion_tokens == 3 * 10_000
    assert usage["-"].requests == len(BAD_LINES) - 1


def test_mixed_models_in_one_file(client: Client) -> None:
    lines = [echo_line(f"a{i}", f"x {i}") for i in range(30)] + [
        echo_line(f"b{i}", f"y {i}", model="echo-slow") for i in range(30)
    ]
    job = client.batches.create(lines)
    assert sorted(job.models) == ["echo", "echo-slow"]
    done = client.batches.wait(job.id, timeout=120, poll_s=0.2)
    assert done.request_counts.completed == 60
    served = Counter(o.response.body.model for o in client.batches.results(job.id) if o.response)
    assert served == {"echo": 30, "echo-slow": 30}


def test_results_can_be_read_while_the_job_runs(client: Client) -> None:
    job = client.batches.create([echo_line(f"s{i}", f"slow {i}", model="echo-slow") for i in range(400)])
    deadline = time.monotonic() + 120
    partial: list[object] = []
    while time.monotonic() < deadline:
        partial = list(client.batches.results(job.id))
        if partial:
            break
        time.sleep(0.05)
    assert 0 < len(partial) < 400
    assert client.batches.retrieve(job.id).status == JobStatus.IN_PROGRESS
    client.batches.wait(job.id, timeout=120, poll_s=0.2)
    assert len(list(client.batches.results(job.id))) == 400


def test_cancel_ends_queued_lines_as_cancelled(client: Client) -> None:
    job = client.batches.create([echo_line(f"c{i}", f"slow {i}", model="echo-slow") for i in range(2000)])
    while client.batches.retrieve(job.id).finished == 0:
        time.sleep(0.05)
    assert client.batches.cancel(job.id).status == JobStatus.CANCELLING
    done = client.batches.wait(job.id, timeout=120, poll_s=0.2)
    assert done.status == JobStatus.CANCELLED
    output = list(client.batches.results(job.id))
    assert len(output) == 2000
    assert len({o.custom_id for o in output}) == 2000
    cancelled = [o for o in output if o.error is not None]
    assert all(o.error is not None and o.error.code == "batch_cancelled" for o in cancelled)
    assert len(cancelled) > 1000  # most lines were still queued when cancel came
    assert done.request_counts.completed == 2000 - len(cancelled)


def test_small_job_is_not_stuck_behind_a_big_one(client: Client) -> None:
    big = client.batches.create([echo_line(f"big{i}", f"b {i}", model="echo-slow") for i in range(3000)])
    small = client.batches.create([echo_line(f"small{i}", f"s {i}", model="echo-slow") for i in range(30)])
    finished_small = client.batches.wait(small.id, timeout=120, poll_s=0.1)
    assert finished_small.status == JobStatus.COMPLETED
    big_now = client.batches.retrieve(big.id)
    assert big_now.status == JobStatus.IN_PROGRESS
    assert big_now.finished < 3000
    client.batches.cancel(big.id)
    client.batches.wait(big.id, timeout=120, poll_s=0.2)


def test_completion_window_expires_unfinished_lines(client: Client) -> None:
    job = client.batches.create([echo_line(f"e{i}", f"slow {i}", model="echo-slow") for i in range(2000)],
                                completion_window="2")  # fmt: skip
    done = client.batches.wait(job.id, timeout=120, poll_s=0.2)
    assert done.status == JobStatus.EXPIRED
    output = list(client.batches.results(job.id))
    assert len(output) == 2000
    expired = [o for o in output if o.error is not None]
    assert expired
    assert all(o.error is not None and o.error.code == "batch_expired" for o in expired)
    assert done.request_counts.completed + len(expired) == 2000


def test_file_that_is_not_jsonl_is_refused_up_front(client: Client, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("Dear diary,\ntoday I wrote some prompts.\n")
    with pytest.raises(BatchRefused, match="does not look like JSONL"):
        client.batches.create(source)


def test_job_limits_are_enforced(settings: Settings, tmp_path: Path) -> None:
    source = tmp_path / "five.jsonl"
    source.write_text("\n".join(echo_line(f"l{i}", "x") for i in range(5)) + "\n")
    limited = settings.model_copy(update={"batch_max_lines": 3})
    with Client(settings=limited) as client:
        with pytest.raises(BatchRefused, match="5 lines, over the batch limit of 3"):
            client.batches.create(source)
        with pytest.raises(BatchRefused, match="more than 3 lines"):
            client.batches.create(source.read_text().splitlines())


def test_unknown_job_and_bad_window_are_clear_errors(client: Client) -> None:
    with pytest.raises(JobNotFound, match="no batch job 'batch_nope'"):
        client.batches.retrieve("batch_nope")
    with pytest.raises(BatchRefused, match="completion window"):
        client.batches.create([echo_line("a", "x")], completion_window="soon")


def test_list_shows_newest_first(client: Client) -> None:
    first = client.batches.create([echo_line("a", "x")])
    second = client.batches.create([echo_line("a", "y")])
    ids = [job.id for job in client.batches.list(limit=50)]
    assert ids.index(second.id) < ids.index(first.id)


def test_higher_priority_job_overtakes_an_earlier_one(client: Client) -> None:
    low = client.batches.create([echo_line(f"lo{i}", f"l {i}", model="echo-slow") for i in range(1000)])
    high = client.batches.create([echo_line(f"hi{i}", f"h {i}", model="echo-slow") for i in range(1000)], priority=10)
    assert client.batches.wait(high.id, timeout=120, poll_s=0.1).status == JobStatus.COMPLETED
    # Taking turns would have run about as many low lines by now; priority ran only the few in flight.
    assert client.batches.retrieve(low.id).finished < 500
    client.batches.cancel(low.id)
    client.batches.wait(low.id, timeout=120, poll_s=0.2)


async def test_async_client_batches_match_the_sync_ones(client: Client, async_client: AsyncClient) -> None:
    lines = [echo_line(f"p{i}", f"parity {i}") for i in range(200)] + ["broken"]
    sync_job = client.batches.wait(client.batches.create(lines).id, timeout=120, poll_s=0.1)
    async_job = await async_client.batches.create(lines)
    assert async_job.status in (JobStatus.VALIDATING, JobStatus.IN_PROGRESS, JobStatus.COMPLETED)
    async_job = await async_client.batches.wait(async_job.id, timeout=120, poll_s=0.1)
    assert async_job.request_counts == sync_job.request_counts
    sync_lines = {(o.custom_id, o.response.body.text if o.response else o.error.code if o.error else None)
                  for o in client.batches.results(sync_job.id)}  # fmt: skip
    async_lines = {(o.custom_id, o.response.body.text if o.response else o.error.code if o.error else None)
                   async for o in async_client.batches.results(async_job.id)}  # fmt: skip
    assert sync_lines == async_lines
    assert len(async_lines) == 201
    assert (await async_client.batches.retrieve(async_job.id)).id in {j.id for j in await async_client.batches.list(50)}
