"""The HTTP gateway against the direct client, in one run: requests/s, added latency, time to first token.

    python bench/gateway.py --requests 400 --json bench/results/gateway.json
    python bench/gateway.py --litellm-url http://127.0.0.1:4000/v1 --litellm-model echo   # also a LiteLLM proxy

One private Redis, one echo worker, one gateway process (``inferpool gateway --no-auth``). At each
concurrency (1, 16, 128) the same number of non-streaming chats go through ``AsyncClient.chat`` (direct)
and through the gateway with the official ``openai`` SDK (``AsyncOpenAI``), alternating rounds so drift on
a shared machine hits both. Prints requests/s, p50/p99 latency, the gateway's added p50 and the ratio of
throughputs; then time to first streamed token (client sends -> first content delta) both ways.

``--litellm-url`` adds a LiteLLM proxy the caller started in front of the same pool, e.g. with a config
whose model ``echo`` is ``openai/echo`` at ``api_base`` = this run's gateway (printed at start; use
``--port`` to fix it), so the proxy's own cost is measured on the same machine and backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

MESSAGES = [{"role": "user", "content": "ping the pool"}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(call: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    queue = iter(range(requests))

    async def lane() -> None:
        for _ in queue:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"rps": requests / wall, "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000}  # fmt: skip


async def first_token_s(stream: Callable[[], Awaitable[float]], rounds: int) -> float:
    return statistics.median([await stream() for _ in range(rounds)])


async def measure_ttft(direct: Any, sdk: Any) -> dict[str, float]:
    """Median time from sending a streamed request to its first content delta, direct and through the gateway."""

    async def direct_ttft() -> float:
        started = time.perf_counter()
        async for chunk in await direct.stream("echo-trickle", MESSAGES, timeout=60):
            if chunk.text:
                return time.perf_counter() - started
        return float("nan")

    async def gateway_ttft() -> float:
        started = time.perf_counter()
        stream = await sdk.chat.completions.create(model="echo-trickle", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                await stream.close()
                return time.perf_counter() - started
        return float("nan")

    return {"direct_ms": await first_token_s(direct_ttft, 20) * 1000,
            "gateway_ms": await first_token_s(gateway_ttft, 20) * 1000}  # fmt: skip


async def bench(args: argparse.Namespace, redis_url: str, gateway: str) -> dict[str, object]:
    import openai

    from inferpool import AsyncClient, Settings

    direct = await AsyncClient.connect(settings=Settings(redis_url=redis_url))
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    sdk = openai.AsyncOpenAI(base_url=gateway, api_key="unused", max_retries=0,
                             http_client=httpx.AsyncClient(limits=limits, timeout=60))  # fmt: skip
    targets: dict[str, Callable[[], Awaitable[None]]] = {}

    async def via_direct() -> None:
        await direct.chat("echo", MESSAGES, timeout=60)

    async def via_gateway() -> None:
        await sdk.chat.completions.create(model="echo", messages=MESSAGES)  # type: ignore[arg-type]

    targets = {"direct": via_direct, "gateway": via_gateway}
    if args.litellm_url:
        litellm = openai.AsyncOpenAI(base_url=args.litellm_url, api_key=args.litellm_key, max_retries=0,
                                     http_client=httpx.AsyncClient(limits=limits, timeout=60))  # fmt: skip

        async def via_litellm() -> None:
            await litellm.chat.completions.create(model=args.litellm_model, messages=MESSAGES)  # type: ignore[arg-type]

        targets["litellm"] = via_litellm
    for call in targets.values():  # warm connections, scripts, imports
        await run_load(call, 50, 4)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for concurrency in (1, 16, 128):
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(2):  # alternate, so drift on a shared machine hits both
            for name, call in targets.items():
                rounds[name].append(await run_load(call, args.requests // 2, concurrency))
        rows[str(concurrency)] = {
            name: {key: statistics.mean(r[key] for r in results) for key in ("rps", "p50_ms", "p99_ms")}
            for name, results in rounds.items()
        }

    ttft = await measure_ttft(direct, sdk)
    await direct.aclose()
    await sdk.close()
    return {"requests": args.requests, "load": rows, "ttft": ttft}


def report(figures: dict[str, object]) -> None:
    load: dict[str, dict[str, dict[str, float]]] = figures["load"]  # type: ignore[assignment]
    print(f"{'concurrency':>11} {'target':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs direct':>10}")
    for concurrency, row in load.items():
        for name, stats in row.items():
            ratio = stats["rps"] / row["direct"]["rps"]
            print(f"{concurrency:>11} {name:>8} {stats['rps']:8.0f} {stats['p50_ms']:8.2f} {stats['p99_ms']:8.2f} "
                  f"{ratio:9.2f}x")  # fmt: skip
        added = row["gateway"]["p50_ms"] - row["direct"]["p50_ms"]
        print(f"{'':>11} gateway p50 added: {added:+.2f} ms")
    ttft: dict[str, float] = figures["ttft"]  # type: ignore[assignment]
    print(f"time to first streamed token (median of 20): direct {ttft['direct_ms']:.1f} ms, "
          f"gateway {ttft['gateway_ms']:.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per target and concurrency")
    parser.add_argument("--port", type=int, default=0, help="the gateway's port (default: a free one)")
    parser.add_argument("--litellm-url", default=None, help="a LiteLLM proxy in front of this pool (see above)")
    parser.add_argument("--litellm-model", default="echo")
    parser.add_argument("--litellm-key", default="sk-unused")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from inferpool.local_pool import (
        EmbeddedRedis,
        free_port,
        start_inferpool_process,
        start_worker_process,
        stop_process,
        wait_for_workers,
    )

    registry = BENCH / "registry.yaml"
    with tempfile.TemporaryDirectory(prefix="inferpool-gw-") as tmp:
        workdir = Path(tmp)
        server = EmbeddedRedis(workdir / "redis")
        server.start()
        env = {**os.environ, "INFERPOOL_LOG_LEVEL": "WARNING", "INFERPOOL_REGISTRY": str(registry),
               "INFERPOOL_FILES_DIR": str(workdir / "files")}  # fmt: skip
        os.environ["INFERPOOL_REGISTRY"] = str(registry)
        workers = [start_worker_process(m, server.url, workdir / f"{m}.log", env=env) for m in ("echo", "echo-trickle")]
        port = args.port or free_port()
        gateway = start_inferpool_process(["gateway", "--no-auth", "--port", str(port)], server.url,
                                          workdir / "gateway.log", env)  # fmt: skip
        try:
            import redis

            wait_for_workers(redis.Redis.from_url(server.url), workers, 120)
            url = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    if httpx.get(f"{url}/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            print(f"gateway at {url}/v1", flush=True)
            figures = asyncio.run(bench(args, server.url, f"{url}/v1"))
        finally:
            stop_process(gateway, grace_s=10)
            for worker in workers:
                stop_process(worker.proc, grace_s=10)
            server.stop()
    report(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
