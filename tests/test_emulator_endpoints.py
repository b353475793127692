"""The OpenAI emulator's embeddings and text-completions endpoints (issue 29's provider side), driven by the
official openai SDK exactly as the API workers will drive them."""

from __future__ import annotations

import math

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferpool.emulators import ProviderEmulator

from .conftest import OPENAI_TEST_KEY


@pytest.fixture
def sdk(emulator: ProviderEmulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=emulator.openai_base_url, api_key=OPENAI_TEST_KEY, max_retries=0)


def test_embeddings_are_deterministic_unit_vectors_in_both_encodings(sdk: openai.OpenAI) -> None:
    texts = ["the sea", "bread", "the sea"]
    floats = sdk.embeddings.create(model="text-embedding-3-small", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert all(len(d.embedding) == 1536 for d in floats.data)
    assert floats.data[0].embedding == floats.data[2].embedding != floats.data[1].embedding
    assert math.isclose(sum(v * v for v in floats.data[1].embedding), 1.0, rel_tol=1e-9)
    assert floats.usage.prompt_tokens == 5  # words: 2 + 1 + 2
    # The SDK asks for base64 by default and decodes it: the same vectors, to float32 precision.
    packed = sdk.embeddings.create(model="text-embedding-3-small", input=texts, dimensions=384)
    short = sdk.embeddings.create(model="text-embedding-3-small", input=texts, dimensions=384, encoding_format="float")
    assert all(len(d.embedding) == 384 for d in packed.data)
    for a, b in zip(packed.data, short.data, strict=True):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
    by_ids = sdk.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3]], encoding_format="float")
    assert by_ids.usage.prompt_tokens == 3


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"input": []}, "non-empty"),
        ({"input": ["ok", ""]}, "non-empty string"),
        ({"input": ["x"] * 2049}, "at most 2048"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_embedding_requests_are_400s_that_say_why(sdk: openai.OpenAI, body: dict[str, object], says: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model="text-embedding-3-small", **body)
    assert says in str(refused.value)


def test_completions_whole_and_streamed(sdk: openai.OpenAI) -> None:
    whole = sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt=["one two three", "four"], max_tokens=3, n=2)
    assert whole.object == "text_completion"
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert [(c.text, c.finish_reason) for c in whole.choices[::2]] == [("emulated: one two", "length"),
                                                                         ("emulated: four", "stop")]  # fmt: skip
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (4, 10)
    stopped = sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="a b c d", stop=[" c"], echo=True)
    assert stopped.choices[0].text == "a b c demulated: a b"
    streamed = sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="one two three", stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == "emulated: one two three"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(sdk.base_url), api_key="sk-wrong", max_retries=0).completions.create(
            model="gpt-3.5-turbo-instruct", prompt="x")  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=200))
def test_any_text_gets_a_vector(sdk: openai.OpenAI, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return  # a lone surrogate cannot travel in JSON the SDK sends
    result = sdk.embeddings.create(model="text-embedding-3-small", input=text, dimensions=8, encoding_format="float")
    assert len(result.data[0].embedding) == 8
