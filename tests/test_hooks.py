"""Hooks run in the worker: the example package's redact-pii hook (installed from examples/, found
through the ``inferpool.hooks`` entry points) in a real echo worker, and the chain's error handling."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferpool import Client, HookError
from inferpool.hooks import Generation, Hook, HookChain, Reject
from inferpool.plumbing.local_pool import WorkerProcess, start_worker_process
from inferpool.wire import ChatRequest
from inferpool.workers.echo import echo_vector

from .conftest import _start_workers, _stop_workers

pytestmark = pytest.mark.usefixtures("scheduler")


@pytest.fixture(scope="module")
def redacted_worker(redis_url: str, session_dir: Path) -> Iterator[WorkerProcess]:
    workers = _start_workers(redis_url, session_dir, "echo-redacted")
    yield workers[0]
    _stop_workers(workers)


@pytest.mark.usefixtures("redacted_worker")
@pytest.mark.usefixtures("echo_worker")
def test_the_hook_rewrites_the_prompt_before_the_backend_sees_it(client: Client) -> None:
    prompt = "write to ada@example.org or call +44 20 7946 0958"
    result = client.submit({"model": "echo-redacted", "messages": [{"role": "user", "content": prompt}]}).result(30)
    assert result.response is not None
    assert result.response.text == "echo: write to [email] or call <phone>"  # echo answers what it was sent
    assert result.stats is not None
    assert result.stats.hooks_s is not None
    assert result.stats.hooks_s > 0  # the hook's own time was measured (a regex pass over the prompt)
    plain = client.submit({"model": "echo", "messages": [{"role": "user", "content": prompt}]}).result(30)
    assert plain.stats is not None
    assert plain.stats.hooks_s is None  # a model without hooks records none


@pytest.mark.usefixtures("redacted_worker")
def test_hooks_see_completion_prompts_and_embedding_inputs(client: Client) -> None:
    completion = client.complete("echo-redacted", "mail ada@example.org", max_tokens=10, timeout=30)
    assert completion.text == "echo: mail [email]"
    embedded = client.embed("echo-redacted", ["call +44 20 7946 0958", "plain"], timeout=30)
    assert embedded.vectors()[0] == pytest.approx(echo_vector("call <phone>", 16), abs=1e-6)  # the redacted text's
    with pytest.raises(HookError, match="launch code"):
        client.embed("echo-redacted", "the launch code", timeout=30)


@pytest.mark.usefixtures("redacted_worker")
def test_a_refused_request_is_its_own_hook_error(client: Client) -> None:
    job = client.batches.create([
        {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "echo-redacted", "messages": [{"role": "user", "content": "hello"}]}},
        {"custom_id": "no", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "echo-redacted", "messages": [{"role": "user", "content": "the Launch Code is 1234"}]}},
    ])  # fmt: skip
    job = client.batches.wait(job.id, timeout=60)
    lines = {line.custom_id: line for line in client.batches.results(job.id)}
    assert lines["ok"].response is not None
    assert lines["no"].error is not None
    assert lines["no"].error.code == "hook_error"
    assert lines["no"].error.message == ("hook 'redact-pii' refused the request: the prompt contains the blocked "
                                         "phrase 'launch code'")  # fmt: skip
    with pytest.raises(HookError, match="redact-pii"):
        client.chat("echo-redacted", [{"role": "user", "content": "launch code?"}], timeout=30)


@pytest.mark.usefixtures("redacted_worker")
def test_a_model_whose_hooks_rewrite_answers_streams_only_the_stored_answer(client: Client) -> None:
    chunks = list(client.stream("echo-redacted", [{"role": "user", "content": "mail bob@corp.io please"}], timeout=30))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: mail [email] please"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 1


def test_a_worker_whose_hook_is_not_installed_does_not_start(redis_url: str, tmp_path: Path) -> None:
    worker = start_worker_process("echo-missing-hook", redis_url, tmp_path / "worker.log")
    assert worker.proc.wait(timeout=120) != 0
    log = worker.log_path.read_text()
    assert "no hook named 'no-such-hook' is installed" in log
    assert "redact-pii" in log  # the installed ones are listed


class _Upper(Hook):
    def after_result(self, request: ChatRequest, generation: Generation) -> Generation:
        return dataclasses.replace(generation, text=generation.text.upper())


class _Broken(Hook):
    def before_request(self, request: ChatRequest) -> ChatRequest:
        raise KeyError("oops")

    def after_result(self, request: ChatRequest, generation: Generation) -> Generation:
        raise Reject("no answers today")


class _Wrong(Hook):
    def before_request(self, request: ChatRequest) -> ChatRequest:
        return "not a request"  # type: ignore[return-value]


def test_the_chain_orders_hooks_and_turns_every_failure_into_a_hook_error() -> None:
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    answer = Generation(text="fine", finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    assert HookChain([("upper", _Upper())]).after(request, answer)[0] == dataclasses.replace(answer, text="FINE")
    assert HookChain([("upper", _Upper())]).rewrites_answers
    assert not HookChain([("wrong", _Wrong())]).rewrites_answers
    refused, seconds = HookChain([("upper", _Upper()), ("broken", _Broken())]).before(request)
    assert isinstance(refused, HookError)
    assert refused.message == "hook 'broken' failed: KeyError: 'oops'"
    assert seconds >= 0
    rejected, _ = HookChain([("broken", _Broken()), ("upper", _Upper())]).after(request, answer)
    assert isinstance(rejected, HookError)
    assert rejected.message == "hook 'broken' rejected the answer: no answers today"
    wrong, _ = HookChain([("wrong", _Wrong())]).before(request)
    assert isinstance(wrong, HookError)
    assert "returned str, not a ChatRequest" in wrong.message
