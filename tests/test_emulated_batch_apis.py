"""The emulators' batch APIs (OpenAI Files + Batches, Anthropic Message Batches), driven by the official
SDKs exactly as a provider-batch path will drive the real ones: create, poll, read results, fail lines,
cancel and expire."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from inferpool.emulators import EmulatorConfig, ProviderEmulator

KEY = "sk-batch-test"


@pytest.fixture
def emulator() -> Iterator[ProviderEmulator]:
    server = ProviderEmulator(EmulatorConfig(api_keys=[KEY], batch_delay_s=0.3)).start()
    yield server
    server.stop()


def openai_client(emulator: ProviderEmulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=emulator.openai_base_url, api_key=KEY, max_retries=0)


def anthropic_client(emulator: ProviderEmulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=emulator.url, api_key=KEY, max_retries=0)


def openai_lines(count: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "gpt-emu", "messages": [{"role": "user", "content": f"q {i}"}]}}) + "\n"
                   for i in range(count)).encode()  # fmt: skip


def wait_openai(client: openai.OpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + 30
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "expired", "cancelled", "failed"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)
    return batch


def test_openai_files_and_batches(emulator: ProviderEmulator) -> None:
    client = openai_client(emulator)
    uploaded = client.files.create(file=("input.jsonl", openai_lines(20)), purpose="batch")
    assert uploaded.bytes == len(openai_lines(20))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"job": "j1"})  # fmt: skip
    assert batch.status in ("validating", "in_progress")
    done = wait_openai(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (20, 20, 0)
    assert done.output_file_id is not None
    lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(20)]
    assert lines[3]["response"]["body"]["choices"][0]["message"]["content"] == "emulated: q 3"
    assert done.error_file_id is None
    assert emulator.counts["openai_batches_created"] == 1


def test_openai_batch_line_failures_cancel_and_expiry(emulator: ProviderEmulator) -> None:
    client = openai_client(emulator)
    emulator.configure(batch_failure_rate=0.5)
    failing = wait_openai(client, client.batches.create(input_file_id=client.files.create(
        file=("in.jsonl", openai_lines(40)), purpose="batch").id, endpoint="/v1/chat/completions",
        completion_window="24h").id)  # fmt: skip
    assert failing.request_counts is not None
    assert 0 < failing.request_counts.failed < 40
    assert failing.error_file_id is not None
    errors = client.files.content(failing.error_file_id).text.splitlines()
    assert len(errors) == failing.request_counts.failed
    assert json.loads(errors[0])["response"]["status_code"] == 500

    emulator.configure(batch_failure_rate=0.0, batch_delay_s=30)
    cancelled = client.batches.cancel(client.batches.create(input_file_id=client.files.create(
        file=("in.jsonl", openai_lines(10)), purpose="batch").id, endpoint="/v1/chat/completions",
        completion_window="24h").id)  # fmt: skip
    assert cancelled.status == "cancelled"
    assert cancelled.error_file_id is not None
    codes = {
        json.loads(line)["error"]["code"] for line in client.files.content(cancelled.error_file_id).text.splitlines()
    }
    assert codes == {"batch_cancelled"}

    emulator.configure(batch_delay_s=10, batch_expire_s=0.2)
    expiring = client.batches.create(input_file_id=client.files.create(
        file=("in.jsonl", openai_lines(10)), purpose="batch").id, endpoint="/v1/chat/completions",
        completion_window="24h")  # fmt: skip
    expired = wait_openai(client, expiring.id)
    assert expired.status == "expired"
    assert expired.request_counts is not None
    assert expired.request_counts.completed < 10
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=emulator.openai_base_url, api_key="wrong", max_retries=0).batches.retrieve(expiring.id)


def test_anthropic_message_batches(emulator: ProviderEmulator) -> None:
    client = anthropic_client(emulator)
    requests: Any = [{"custom_id": f"m{i}", "params": {"model": "claude-emu", "max_tokens": 20,
                                                       "messages": [{"role": "user", "content": f"hello {i}"}]}}
                     for i in range(12)]  # fmt: skip
    batch = client.messages.batches.create(requests=requests)
    assert batch.processing_status == "in_progress"
    deadline = time.monotonic() + 30
    while (batch := client.messages.batches.retrieve(batch.id)).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert batch.request_counts.succeeded == 12
    results = list(client.messages.batches.results(batch.id))
    assert [r.custom_id for r in results] == [f"m{i}" for i in range(12)]
    first = results[0].result
    assert first.type == "succeeded"
    assert first.message.content[0].text == "emulated: hello 0"  # type: ignore[union-attr]
    assert emulator.counts["anthropic_batches_created"] == 1

    emulator.configure(batch_delay_s=30)
    cancelled = client.messages.batches.cancel(client.messages.batches.create(requests=requests).id)
    assert cancelled.processing_status == "ended"
    assert {r.result.type for r in client.messages.batches.results(cancelled.id)} == {"canceled"}


def test_large_inputs_and_listings(emulator: ProviderEmulator) -> None:
    """Inputs past aiohttp's default 1 MiB body limit are taken (an OpenAI file, an Anthropic create), and the
    list endpoints page newest first as the SDKs' auto-pagination expects."""
    client = openai_client(emulator)
    big = openai_lines(12_000)
    assert len(big) > 1024 * 1024
    uploaded = client.files.create(file=("big.jsonl", big), purpose="batch")
    assert uploaded.bytes == len(big)
    names = [f.filename for f in client.files.list(purpose="batch", order="desc", limit=1)]
    assert names == ["big.jsonl"]
    created = [client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h", metadata={"n": str(n)}).id for n in range(3)]  # fmt: skip
    listed = [b.id for b in client.batches.list(limit=2)]  # pages of 2, followed by the SDK
    assert listed == created[::-1]
    requests = [{"custom_id": f"r{i}", "params": {"model": "claude-emu", "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": "x" * 200}]}}
                for i in range(6_000)]  # fmt: skip
    batch = anthropic_client(emulator).messages.batches.create(requests=requests)
    assert [b.id for b in anthropic_client(emulator).messages.batches.list(limit=1)] == [batch.id]


def test_openai_batches_of_embeddings_and_completions(emulator: ProviderEmulator) -> None:
    """OpenAI's Batch API takes /v1/embeddings and /v1/completions lines too: each answered as the real-time
    endpoint would (the same vector), a bad line as its own error, an endpoint it does not serve refused."""
    client = openai_client(emulator)
    bodies = {"/v1/embeddings": [{"model": "emb", "input": ["a b", "c"], "encoding_format": "float"}, {"model": "emb", "input": []}],
              "/v1/completions": [{"model": "inst", "prompt": "one two", "max_tokens": 2}, {"model": "inst", "prompt": 3}]}  # fmt: skip
    for endpoint, lines in bodies.items():
        data = "".join(json.dumps({"custom_id": f"e{i}", "method": "POST", "url": endpoint, "body": body}) + "\n"
                       for i, body in enumerate(lines)).encode()  # fmt: skip
        uploaded = client.files.create(file=("input.jsonl", data), purpose="batch")
        done = wait_openai(client, client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,
                                                         completion_window="24h").id)  # fmt: skip
        assert done.status == "completed"
        assert done.output_file_id is not None
        assert done.error_file_id is not None
        [ok] = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        [bad] = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
        assert (ok["custom_id"], bad["custom_id"]) == ("e0", "e1")
        assert bad["response"]["body"]["error"]["type"] == "invalid_request_error"
        answer = ok["response"]["body"]
        if endpoint == "/v1/embeddings":
            direct = client.embeddings.create(model="emb", input=["a b", "c"], encoding_format="float")
            assert [d["embedding"] for d in answer["data"]] == [d.embedding for d in direct.data]
        else:
            assert answer["choices"][0]["text"] == "emulated: one"
    uploaded = client.files.create(file=("input.jsonl", openai_lines(1)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="unsupported endpoint"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/moderations", completion_window="24h")
