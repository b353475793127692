"""The ``transformers-embeddings`` backend: sentence embeddings from an encoder model (BERT-like) with
transformers, as sentence-transformers computes them, through the dynamic batcher.

Every input of every request (whichever chunk or thread it came from) is one item of a ``DynamicBatcher``:
inputs that arrive together are tokenized in one call, sorted by length (so each forward pass pads little, as
``SentenceTransformer.encode`` does), encoded ``encode_batch_size`` at a time, pooled as the checkpoint's
``1_Pooling/config.json`` says (mean of the token states by default, or the CLS state) and L2-normalised where
its ``modules.json`` lists ``Normalize``. An input longer than the model takes is that request's
``context_length_exceeded``; a token id outside the vocabulary is its ``invalid_request``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from inferpool._exceptions import ContextLengthExceeded, InvalidRequest, ModelLoadError, RequestError
from inferpool.model_registry.checkpoints import CheckpointParams
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.wire import EmbeddingRequest, pack_vector
from inferpool.workers.backend import EmbeddingOutcome, Embeddings, gather_outcomes, parse_params
from inferpool.workers.batcher import DynamicBatcher
from inferpool.workers.local_model import module_bytes, torch_device

log = logging.getLogger(__name__)

#: One input's answer from the batch thread: (packed vector, tokens), or why it cannot be embedded.
_Vector = tuple[str, int] | RequestError


class EmbeddingParams(CheckpointParams):
    """Registry ``params`` of the transformers-embeddings backend (the checkpoint: ``path``, or ``package`` +
    ``package_dir``)."""

    pooling: Literal["auto", "mean", "cls"] = Field(default="auto", description="auto: the checkpoint's 1_Pooling.")
    normalize: bool | None = Field(default=None, description="L2-normalise (default: as its modules.json says).")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field(default="auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'...")
    max_batch_size: int = Field(
        default=1024, ge=1,
        description="Most inputs gathered, sorted by length and encoded together: the more, the less padding (256 "
        "inputs of 20-200 words cost 10% more than 2,048; bench/README.md), the longer the gathered ones wait.",
    )  # fmt: skip
    encode_batch_size: int = Field(default=32, ge=1, description="Inputs per forward pass.")
    max_wait_ms: float = Field(default=20.0, ge=0.0, description="Longest wait to gather inputs while they arrive.")
    gap_ms: float = Field(default=2.0, ge=0.0, description="Gathering ends when no input came for this long.")


def _checkpoint_options(directory: Path) -> tuple[str, bool]:
    """(pooling, normalise) as the sentence-transformers files of ``directory`` say (mean, no: plain models)."""
    pooling, normalize = "mean", False
    try:
        modules = json.loads((directory / "modules.json").read_text())
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        for module in modules:
            if str(module.get("type", "")).endswith("Pooling"):
                config = json.loads((directory / module["path"] / "config.json").read_text())
                pooling = "cls" if config.get("pooling_mode_cls_token") else "mean"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # not a sentence-transformers checkpoint: mean pooling, as for most encoders
    return pooling, normalize


def input_problem(
    tokenizer: Any, row: list[int], given_as_ids: bool, max_tokens: int, model: str
) -> RequestError | None:
    """Why one input's tokens cannot be embedded, or None. Ids given by the caller are the text's own: they are
    checked against the vocabulary and get the model's markers around them (``row`` is changed in place)."""
    if given_as_ids:
        vocab = int(tokenizer.vocab_size)
        bad = next((token for token in row if token >= vocab), None)
        if bad is not None:
            return InvalidRequest(f"token id {bad} is out of range: model {model!r}'s vocabulary has {vocab} tokens "
                                  f"(ids 0-{vocab - 1})")  # fmt: skip
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        if cls is not None and sep is not None and (row[:1] != [cls] or row[-1:] != [sep]):
            row[:] = [cls, *row, sep]
    if len(row) > max_tokens:
        return ContextLengthExceeded(f"it is {len(row)} tokens, more than model {model!r} takes ({max_tokens}); "
                                     "shorten or split it")  # fmt: skip
    return None


class TransformersEmbeddingBackend:
    name = "transformers-embeddings"

    @staticmethod
    def preload() -> None:
        import torch  # noqa: F401
        from transformers import AutoModel, AutoTokenizer  # noqa: F401

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.spec = spec
        self.params = parse_params(EmbeddingParams, spec, self.name)
        directory = self.params.checkpoint_dir(settings.cache_dir)
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        device = torch_device(self.params.device, torch)
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(directory)
            model: Any = AutoModel.from_pretrained(directory, dtype=getattr(torch, self.params.dtype))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {spec.name!r}: cannot load checkpoint {directory}: {exc}") from exc
        self.model: Any = model.to(device).eval()
        self.device = device
        pooling, normalize = _checkpoint_options(directory)
        self.pooling = pooling if self.params.pooling == "auto" else self.params.pooling
        self.normalize = normalize if self.params.normalize is None else self.params.normalize
        caps = spec.capabilities.embeddings
        positions = int(getattr(self.model.config, "max_position_embeddings", 512))
        self.max_tokens = min(positions, caps.max_input_tokens if caps is not None else positions)
        self.vocab_size = int(self.tokenizer.vocab_size)
        self.tokenizer.model_max_length = 1 << 30  # lengths are checked here, per input (no tokenizer warning)
        self._memory_bytes = module_bytes(self.model)
        self.batcher: DynamicBatcher[str | list[int], _Vector] = DynamicBatcher(
            self._run_batch, key=lambda _: None, max_batch_size=self.params.max_batch_size,
            max_wait_s=self.params.max_wait_ms / 1000, gap_s=self.params.gap_ms / 1000, name=f"embed-{spec.name}",
        )  # fmt: skip

    def memory_bytes(self) -> int:
        return int(self._memory_bytes)

    async def embed(self, requests: Sequence[EmbeddingRequest]) -> list[EmbeddingOutcome]:
        return await gather_outcomes(self.name, (self._embed_one(request) for request in requests))

    async def _embed_one(self, request: EmbeddingRequest) -> EmbeddingOutcome:
        answers = await asyncio.gather(*(self.batcher.submit(item) for item in request.inputs()))
        vectors, tokens = [], 0
        for index, answer in enumerate(answers):
            if isinstance(answer, RequestError):
                return type(answer)(f"input {index}: {answer.message}")
            vectors.append(answer[0])
            tokens += answer[1]
        return Embeddings(vectors=tuple(vectors), prompt_tokens=tokens)

    async def aclose(self) -> None:
        self.batcher.close()

    # -- on the batcher's thread -----------------------------------------------------------------------

    def _run_batch(self, items: list[str | list[int]]) -> list[_Vector]:
        texts = [(i, item) for i, item in enumerate(items) if isinstance(item, str)]
        ids: list[list[int] | None] = [list(item) if isinstance(item, list) else None for item in items]
        if texts:
            encoded = self.tokenizer([text for _, text in texts], add_special_tokens=True, truncation=False)
            for (position, _), row in zip(texts, encoded["input_ids"], strict=True):
                ids[position] = row
        answers: list[_Vector | None] = [None] * len(items)
        ready: list[int] = []
        for position, row in enumerate(ids):
            assert row is not None
            problem = self._problem(row, isinstance(items[position], list))
            if problem is not None:
                answers[position] = problem
            else:
                ready.append(position)
        ready.sort(key=lambda position: len(ids[position] or ()))
        started = time.perf_counter()
        step = self.params.encode_batch_size
        for start in range(0, len(ready), step):
            group = ready[start : start + step]
            for position, vector in zip(group, self._encode([ids[p] or [] for p in group]), strict=True):
                answers[position] = (vector, len(ids[position] or ()))
        log.info("embedded a batch of %d inputs in %.3f s", len(ready), time.perf_counter() - started)
        return [answer if answer is not None else InvalidRequest("not embedded") for answer in answers]

    def _problem(self, row: list[int], given_as_ids: bool) -> RequestError | None:
        return input_problem(self.tokenizer, row, given_as_ids, self.max_tokens, self.spec.name)

    def _encode(self, rows: list[list[int]]) -> list[str]:
        torch = self._torch
        width = max(len(row) for row in rows)
        pad = int(self.tokenizer.pad_token_id or 0)
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=self.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=self.device)
        with torch.inference_mode():
            states = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            if self.pooling == "cls":
                pooled = states[:, 0]
            else:
                weights = mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            array = pooled.float().cpu().numpy()
        return [pack_vector(row) for row in array]
