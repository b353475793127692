"""Prefix affinity (issue 27): requests that share a prompt prefix go to the worker that holds it.

The keys and the owner table are checked on their own (hypothesis for the keys); the routing is checked
through real pools (private Redis, scheduler, two echo worker processes of a prefix-routed model): a
job's lines about one document are answered by one worker while both share the load within the bound,
a conversation's turns follow each other, and a killed or draining owner loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from inferpool import Client, JobStatus
from inferpool.affinity.owners import OwnerTable
from inferpool.affinity.prefix import BLOCK_CHARS, group_key, prefix_levels, request_keys
from inferpool.constants import Priority, queue_name, worker_queue_name, worker_queues
from inferpool.plumbing.celery_app import create_celery_app, publish_chunk_json
from inferpool.plumbing.local_pool import LocalPool, WorkerProcess
from inferpool.plumbing.settings import Settings
from inferpool.state.worker_queues import WorkerQueues
from inferpool.wire import BatchOutputLine, ChatRequest, RequestResult

MODEL = "echo-prefix"
# Short heartbeats and visibility timeout: a killed worker is seen gone, and its unacked chunks come back,
# within seconds. The scheduler's stale re-send is put out of reach: only the hand-over of own queues can
# bring back what a killed or draining worker left waiting, so a job that completes proves it works.
POOL_ENV = {"INFERPOOL_VISIBILITY_TIMEOUT_S": "4", "INFERPOOL_SCHEDULER_LEASE_S": "1", "INFERPOOL_HEARTBEAT_TTL_S": "3",
            "INFERPOOL_RESEND_STALE_AFTER_S": "3600"}  # fmt: skip
DOCS, QUESTIONS = 24, 4


def _request(model: str, document: str, question: str) -> ChatRequest:
    return ChatRequest.model_validate({"model": model, "messages": [
        {"role": "system", "content": document}, {"role": "user", "content": question}]})  # fmt: skip


def _document(d: int) -> str:
    return f"Document {d}. " + f"Fact {d} is worth remembering. " * 20  # ~600 characters, distinct from the start


# -- the keys ------------------------------------------------------------------------------------------------

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.characters(), max_size=80)


@settings(max_examples=60, deadline=None)
@given(shared=text, q1=text, q2=text)
def test_the_group_key_is_the_shared_document_not_the_question(shared: str, q1: str, q2: str) -> None:
    document = "d" * BLOCK_CHARS + shared  # at least one block before the question starts
    first, second = _request("m", document, q1), _request("m", document, q2)
    assert group_key(first) == group_key(second)
    assert group_key(first) == group_key(_request("m", document, q1))  # stable
    assert 0 <= group_key(first) < 2**52  # exact as a sorted-set score
    levels, group = request_keys(first)
    assert levels == prefix_levels(first)
    assert group == group_key(first)


@settings(max_examples=60, deadline=None)
@given(document=text, question=text)
def test_the_key_differs_for_other_models_and_adapters(document: str, question: str) -> None:
    keys = {group_key(_request(model, document, question)) for model in ("m", "n", "m:adapter-a", "m:adapter-b")}
    assert len(keys) == 4


def test_levels_of_a_conversation_continue_the_last_turn() -> None:
    turn1 = {"role": "user", "content": "tell me about " + "the sea " * 100}
    first = ChatRequest.model_validate({"model": "m", "messages": [turn1]})
    second = ChatRequest.model_validate({"model": "m", "messages": [
        turn1, {"role": "assistant", "content": "it is wet " * 80}, {"role": "user", "content": "and deep?"}]})  # fmt: skip
    shorter, longer = prefix_levels(first), prefix_levels(second)
    assert longer[: len(shorter)] == shorter  # every step of turn 1 is a step of turn 2
    assert len(longer) > len(shorter)


def test_the_owner_table_keeps_owners_and_bounds_the_load() -> None:
    table = OwnerTable()
    table.set_workers(["a", "b", "c"])
    keys = list(range(1000, 1300))
    owners = {key: table.choose(key, 5) for key in keys}
    assert all(table.choose(key, 1) == owners[key] for key in keys[:50])  # a known key keeps its owner
    shares = table.shares()
    assert set(shares) == {"a", "b", "c"}
    assert max(shares.values()) / (sum(shares.values()) / 3) <= 1.25
    other = OwnerTable()
    other.set_workers(["c", "b", "a"])
    assert [other.order(key) for key in keys] == [table.order(key) for key in keys]  # the same in every process
    table.set_workers(["a", "b"])  # c is gone: its keys are chosen again among the live
    assert {table.choose(key, 1) for key in keys} <= {"a", "b", None}


# -- own queues ----------------------------------------------------------------------------------------------


def test_hand_over_moves_waiting_chunks_to_the_shared_queue(redis_url: str, redis_client: redis.Redis) -> None:
    app = create_celery_app(Settings(redis_url=redis_url))
    model, worker = "echo-handover", "echo-handover@host-1"
    for n in range(3):
        publish_chunk_json(app, f'{{"n": {n}}}', model=model, description=f"n={n}", expires_s=60,
                           priority=Priority.LOW, worker=worker)  # fmt: skip
    own, shared = worker_queue_name(model, worker, Priority.LOW), queue_name(model, Priority.LOW)
    assert redis_client.llen(own) == 3
    assert WorkerQueues(redis_client).hand_over(model, [worker]) == 3
    assert redis_client.llen(own) == 0
    moved = [json.loads(raw) for raw in redis_client.lrange(shared, 0, -1)]
    assert [m["properties"]["delivery_info"]["routing_key"] for m in moved] == [shared] * 3  # restores go there
    assert [m["headers"]["argsrepr"] for m in reversed(moved)] == ["n=0", "n=1", "n=2"]  # oldest next in line
    assert sorted([*worker_queues(model, worker), shared])[0].endswith("@" + worker)  # own polled first
    redis_client.delete(shared)
    app.close()


# -- through real pools --------------------------------------------------------------------------------------


def _job_lines() -> list[str]:
    """Question-major: every document's first question, then every second question..."""
    return [
        json.dumps({"custom_id": f"d{d}-q{q}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": MODEL, "max_tokens": 4, "messages": [
                        {"role": "system", "content": _document(d)}, {"role": "user", "content": f"question {q}"}]}})
        for q in range(QUESTIONS) for d in range(DOCS)
    ]  # fmt: skip


def _workers_by_document(client: Client, job_id: str) -> tuple[dict[str, set[str]], Counter[str]]:
    done = client.batches.wait(job_id, timeout=180, poll_s=0.2)
    assert done.status == JobStatus.COMPLETED
    assert done.request_counts.model_dump() == {"total": DOCS * QUESTIONS, "completed": DOCS * QUESTIONS, "failed": 0}
    output: list[BatchOutputLine] = list(client.batches.results(job_id))
    assert sorted(o.custom_id or "" for o in output) == sorted(f"d{d}-q{q}" for d in range(DOCS)
                                                             for q in range(QUESTIONS))  # fmt: skip
    results = list(client.batches.request_results(job_id))
    assert len({r.request_id for r in results}) == DOCS * QUESTIONS  # exactly one result each
    by_document: dict[str, set[str]] = defaultdict(set)
    lines: Counter[str] = Counter()
    for result in results:
        assert result.stats is not None
        assert result.custom_id is not None
        by_document[result.custom_id.split("-")[0]].add(result.stats.worker)
        lines[result.stats.worker] += 1
    return by_document, lines


@pytest.fixture
def pool() -> Iterator[LocalPool]:
    with LocalPool([MODEL], env=POOL_ENV, workers_per_model=2) as local:
        yield local


def test_a_documents_questions_go_to_one_worker_and_conversations_follow(pool: LocalPool) -> None:
    with Client(pool.redis_url) as client:
        job = client.batches.create(_job_lines(), routing="prefix")
        by_document, lines = _workers_by_document(client, job.id)
        assert all(len(workers) == 1 for workers in by_document.values()), by_document
        assert len(lines) == 2  # both workers served
        assert max(lines.values()) / (DOCS * QUESTIONS / 2) <= 1.25, lines

        # Load routing of the same file scatters documents (the same job, routed by load alone).
        scattered, _ = _workers_by_document(client, client.batches.create(_job_lines(), routing="load").id)
        assert any(len(workers) > 1 for workers in scattered.values())

        # Single requests: each conversation's turns go to one worker; conversations spread over both.
        served: dict[int, set[str]] = defaultdict(set)
        for conversation in range(8):
            messages: list[dict[str, str]] = [{"role": "user", "content": f"conversation {conversation} " * 40}]
            for turn in range(3):
                result = client.submit({"model": MODEL, "messages": messages, "max_tokens": 8}).result(timeout=30)
                assert result.ok
                assert result.stats is not None
                assert result.response is not None
                served[conversation].add(result.stats.worker)
                messages = [*messages, {"role": "assistant", "content": result.response.text},
                            {"role": "user", "content": f"and then {turn}?"}]  # fmt: skip
        assert all(len(workers) == 1 for workers in served.values()), served
        assert len(set().union(*served.values())) == 2


def _wait_for_some(client: Client, job_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while client.batches.retrieve(job_id).finished < at_least:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.01)


def _three_rounds() -> list[str]:
    """The job's lines three times over (custom ids r0..., r1..., r2...): long enough to act mid-job."""
    return [line.replace('"custom_id": "d', f'"custom_id": "r{n // (DOCS * QUESTIONS)}d', 1)
            for n, line in enumerate(_job_lines() * 3)]  # fmt: skip


def _worker_id(process: WorkerProcess) -> str:
    return f"{MODEL}@{socket.gethostname()}-{process.proc.pid}"  # the worker's default id


def _answered_once(client: Client, job_id: str, lines: list[str]) -> list[RequestResult]:
    """The job's results, once it completed with every line answered exactly once."""
    done = client.batches.wait(job_id, timeout=120, poll_s=0.2)
    assert done.status == JobStatus.COMPLETED
    assert done.request_counts.model_dump() == {"total": len(lines), "completed": len(lines), "failed": 0}
    results = list(client.batches.request_results(job_id))
    assert len({r.request_id for r in results}) == len(lines)
    assert Counter(r.custom_id for r in results) == Counter(json.loads(line)["custom_id"] for line in lines)
    return results


def test_a_killed_owner_loses_nothing_and_its_prefixes_move(pool: LocalPool) -> None:
    with Client(pool.redis_url) as client:
        lines = _three_rounds()
        job = client.batches.create(lines, routing="prefix")
        _wait_for_some(client, job.id, 20)
        victim, survivor = pool.workers
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        results = _answered_once(client, job.id, lines)
        assert str(survivor.proc.pid) in " ".join(r.stats.worker for r in results if r.stats)
        # The dead worker's own queues were handed over: nothing waits where nobody will look.
        assert sum(client.redis.llen(q) for q in worker_queues(MODEL, _worker_id(victim))) == 0


def test_a_draining_owner_hands_its_prefixes_on(pool: LocalPool) -> None:
    with Client(pool.redis_url) as client:
        lines = _three_rounds()
        job = client.batches.create(lines, routing="prefix")
        _wait_for_some(client, job.id, 20)
        leaving, staying = pool.workers
        os.killpg(leaving.proc.pid, signal.SIGTERM)
        assert leaving.proc.wait(timeout=60) == 0  # a warm shutdown: chunks in hand finish
        results = _answered_once(client, job.id, lines)
        assert any(r.stats and str(staying.proc.pid) in r.stats.worker for r in results)
        assert sum(client.redis.llen(q) for q in worker_queues(MODEL, _worker_id(leaving))) == 0
