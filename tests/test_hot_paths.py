"""The hot paths' fast versions give exactly what the plain versions give (bench/README.md, issue 16)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.connection import PythonRespSerializer

from inferpool import Registry, Settings
from inferpool.client.batches import _count_lines
from inferpool.constants import job_final_key
from inferpool.plumbing.redis_connection import CommandPacker
from inferpool.state.jobs import JobStore, NewJob
from inferpool.wire import ChatRequest, JobStatus, new_id
from inferpool.workers.backend import Generation, create_backend
from inferpool.workers.echo import count_words, echo_answer

_WHITESPACE_HEAVY = st.text(alphabet=st.sampled_from(" \t\n\r\x0b\x0c\x1c\x1f\x85\u3000ab.é"), max_size=60)


@given(st.text(max_size=200) | _WHITESPACE_HEAVY)
@settings(max_examples=500, deadline=None)
def test_count_words_is_len_split(text: str) -> None:
    assert count_words(text) == len(text.split())


@given(_WHITESPACE_HEAVY | st.text(max_size=80), st.integers(min_value=1, max_value=12))
@settings(max_examples=300, deadline=None)
def test_echo_answer_is_the_plain_split(text: str, max_tokens: int) -> None:
    """The echo backend splits the prompt as it is; the answer is that of splitting ``"echo: " + prompt``."""
    request = ChatRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    )
    [answer] = asyncio.run(create_backend(Registry.load().get("echo"), Settings()).generate([request]))
    words = echo_answer(request).split(maxsplit=max_tokens)
    assert isinstance(answer, Generation)
    assert answer.text == " ".join(words[:max_tokens])
    assert answer.finish_reason == ("length" if len(words) > max_tokens else "stop")


_ARG = st.binary(max_size=40) | st.text(max_size=20) | st.integers() | st.floats(allow_nan=False)


@given(st.sampled_from(["SET", "HSET", "CONFIG GET", "EVALSHA", b"GET", b"CLIENT SETNAME"]), st.lists(_ARG, max_size=8))
@settings(max_examples=300, deadline=None)
def test_command_packer_packs_what_redis_py_packs(command: str | bytes, args: list[object]) -> None:
    reference = PythonRespSerializer(6000, _reference_encode)
    assert b"".join(CommandPacker().pack(command, *args)) == b"".join(reference.pack(command, *args))


def _reference_encode(value: object) -> bytes:
    from redis._parsers.encoders import Encoder  # redis-py's own default encoder

    return Encoder("utf-8", "strict", False).encode(value)  # type: ignore[no-any-return]


def test_command_packer_refuses_what_redis_py_refuses() -> None:
    with pytest.raises(redis.DataError, match="bool"):
        CommandPacker().pack("SET", "k", True)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_count_lines_counts_what_iteration_counts(data: bytes) -> None:
    assert _count_lines(io.BytesIO(data)) == sum(1 for _ in io.BytesIO(data))


def test_waiters_wake_on_the_final_status_signal(redis_client: redis.Redis) -> None:
    """``wait_final`` times out while the job runs; once the job is final it returns at once for every
    waiter (the signal is read without being taken), for a finished job and for a failed one."""
    store = JobStore(redis_client, 600)
    done, broken = new_id("job-final"), new_id("job-failed")
    for job_id in (done, broken):
        store.create(job_id, NewJob(window_s=600, window_label="10m"))
        assert store.wait_final(job_id, 0.05) is False
    store.finalize(done, JobStatus.COMPLETED)
    store.fail(broken, "upload broke off")
    for job_id in (done, broken):
        assert [store.wait_final(job_id, 5) for _ in range(3)] == [True, True, True]
    assert redis_client.ttl(job_final_key(done)) > 0


def test_gc_tuning_freezes_startup_objects_and_raises_the_first_threshold() -> None:
    code = ("import gc; from inferpool.plumbing.process_tuning import GEN0_THRESHOLD, tune_gc_for_throughput; "
            "tune_gc_for_throughput(); print(gc.get_threshold()[0] == GEN0_THRESHOLD, gc.get_freeze_count() > 1000)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
