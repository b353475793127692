"""The HTTP gateway against the direct client, in one run: requests/s, added latency, time to first token.

    python bench/gateway.py --requests 400 --json bench/results/gateway.json
    python bench/gateway.py --litellm-bin /tmp/litellm-venv/bin/litellm   # also a LiteLLM proxy
    python bench/gateway.py --gateway-workers 2                           # uvicorn worker processes

One private Redis, one echo worker, one gateway process (``inferpool gateway``, with an API key). First table
(with ``wrk`` on PATH: Debian's ``wrk``): at 1, 16, 128 and 1,024 connections ``wrk`` (one thread, a Lua script
for the POST body and key) sends non-streaming chats to the gateway for ``--seconds``, against ``AsyncClient.chat``
directly at the same number in flight; ``wrk`` costs little, so the gateway, not the load generator, is what is
measured. Second table: the same chats at 1, 16 and 128 through the official ``openai`` SDK (``AsyncOpenAI``)
against the direct client, alternating rounds so drift on a shared machine hits both. Prints requests/s,
p50/p99 latency, the gateway's added p50 and the ratio of throughputs; then time to first streamed token
(client sends -> first content delta) both ways.

``--litellm-bin`` (the ``litellm`` command of a separate environment: ``pip install 'litellm[proxy]'``)
adds a second table in front of the OpenAI emulator (its own process): direct client -> API-proxy worker
-> emulator, gateway -> worker -> emulator, and a LiteLLM proxy (started here, one worker) -> emulator.
LiteLLM cannot reach the Redis queue, so it fronts the same provider rather than the same pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

MESSAGES: Any = [{"role": "user", "content": "ping the pool"}]
#: The bench registry's model behind the OpenAI emulator (its requests ask the emulator for "bench-emu").
EMULATED = "bench-gpt"
#: The LiteLLM proxy's master key (it refuses to start without one); requests carry it, as ours carry a key.
LITELLM_KEY = "sk-bench-" + secrets.token_hex(16)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(call: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    queue = iter(range(requests))

    errors = 0

    async def lane() -> None:
        nonlocal errors
        for _ in queue:
            started = time.perf_counter()
            try:
                await call()
            except Exception:  # counted and shown: a target that drops requests must not look fast
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    if not latencies:
        return {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "errors": errors}
    return {"rps": len(latencies) / wall, "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000, "errors": errors}  # fmt: skip


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


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_KEY")
wrk.body = os.getenv("WRK_BODY")
"""
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str) -> float:
    number = text.rstrip("usm")
    return float(number) * _WRK_UNITS[text[len(number) :]]


def wrk_run(url: str, key: str, model: str, connections: int, seconds: float, workdir: Path) -> dict[str, float]:
    """``wrk`` at ``connections`` for ``seconds`` (after a 2 s warm-up at the same load): requests/s, p50, p99."""
    script = workdir / "chat.lua"
    script.write_text(_WRK_SCRIPT)
    env = {**os.environ, "WRK_KEY": key, "WRK_BODY": json.dumps({"model": model, "messages": MESSAGES})}
    command = ["wrk", "-t1", f"-c{connections}", "--latency", "-s", str(script), f"{url}/chat/completions"]
    subprocess.run([*command[:4], "-d2s", *command[4:]], env=env, capture_output=True, check=True)
    out = subprocess.run([*command[:4], f"-d{seconds:g}s", *command[4:]], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    figures = {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": 0.0}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            figures["rps"] = float(words[1])
        elif words[:1] == ["50%"]:
            figures["p50_ms"] = _wrk_ms(words[1])
        elif words[:1] == ["99%"]:
            figures["p99_ms"] = _wrk_ms(words[1])
        elif line.strip().startswith(("Non-2xx", "Socket errors")):
            figures["errors"] += sum(int(w.strip(",")) for w in words if w.strip(",").isdigit())
    return figures


async def wrk_table(direct_call: Callable[[], Awaitable[None]], gateway_url: str, key: str, seconds: float,
                    workdir: Path, litellm: str | None = None, model: str = "echo") -> dict[str, Any]:  # fmt: skip
    """The gateway under ``wrk`` against the direct client at the same number in flight (and the LiteLLM proxy
    under the same ``wrk``, in front of the emulator, if given)."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for concurrency in (1, 16, 128, 1024):
        print(f"  wrk: {concurrency} connections ...", file=sys.stderr, flush=True)
        direct = await run_load(direct_call, max(400, int(concurrency * 4)), concurrency)
        gateway = await asyncio.to_thread(wrk_run, gateway_url, key, model, concurrency, seconds, workdir)
        rows[str(concurrency)] = {"direct": direct, "gateway": gateway}
        if litellm is not None:
            rows[str(concurrency)]["litellm"] = await asyncio.to_thread(wrk_run, litellm, LITELLM_KEY, EMULATED,
                                                                        concurrency, seconds, workdir)  # fmt: skip
    return rows


def openai_sdk(base_url: str, api_key: str) -> Any:
    import openai

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                              http_client=httpx.AsyncClient(limits=limits, timeout=60))  # fmt: skip


async def load_table(targets: dict[str, Callable[[], Awaitable[None]]], requests: int) -> dict[str, Any]:
    """requests/s and latency of each target at 1, 16 and 128 concurrent requests, rounds alternating."""
    for call in targets.values():  # warm connections, scripts, imports
        await run_load(call, 50, 4)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for concurrency in (1, 16, 128):
        print(f"  {concurrency} concurrent ...", file=sys.stderr, flush=True)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(2):  # alternate, so drift on a shared machine hits all
            for name, call in targets.items():
                rounds[name].append(await run_load(call, requests // 2, concurrency))
        rows[str(concurrency)] = {
            name: {key: statistics.mean(r[key] for r in results) for key in ("rps", "p50_ms", "p99_ms", "errors")}
            for name, results in rounds.items()
        }
    return rows


async def bench(
    args: argparse.Namespace, redis_url: str, gateway: str, key: str, litellm: str | None
) -> dict[str, object]:
    from inferpool import AsyncClient, Settings

    direct = await AsyncClient.connect(settings=Settings(redis_url=redis_url))
    sdk = openai_sdk(gateway, key)

    def targets(model: str) -> dict[str, Callable[[], Awaitable[None]]]:
        async def via_direct() -> None:
            await direct.chat(model, MESSAGES, timeout=60)

        async def via_gateway() -> None:
            await sdk.chat.completions.create(model=model, messages=MESSAGES)

        return {"direct": via_direct, "gateway": via_gateway}

    figures: dict[str, object] = {"requests": args.requests}
    if shutil.which("wrk"):
        figures["wrk"] = await wrk_table(targets("echo")["direct"], gateway, key, args.seconds, args.workdir)
    figures["load"] = await load_table(targets("echo"), args.requests)
    if litellm is not None:
        proxy = openai_sdk(litellm, LITELLM_KEY)

        async def via_litellm() -> None:
            await proxy.chat.completions.create(model=EMULATED, messages=MESSAGES)

        emulated = {**targets(EMULATED), "litellm": via_litellm}
        if shutil.which("wrk"):
            figures["wrk_emulator"] = await wrk_table(targets(EMULATED)["direct"], gateway, key, args.seconds,
                                                      args.workdir, litellm, EMULATED)  # fmt: skip
        figures["emulator_load"] = await load_table(emulated, args.requests)
        await proxy.close()
    figures["ttft"] = await measure_ttft(direct, sdk)
    await direct.aclose()
    await sdk.close()
    return figures


def print_table(load: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"{'concurrency':>11} {'target':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs direct':>10} {'errors':>7}")
    for concurrency, row in load.items():
        for name, stats in row.items():
            ratio = stats["rps"] / row["direct"]["rps"]
            print(f"{concurrency:>11} {name:>8} {stats['rps']:8.0f} {stats['p50_ms']:8.2f} {stats['p99_ms']:8.2f} "
                  f"{ratio:9.2f}x {stats['errors']:7.0f}")  # fmt: skip
        added = row["gateway"]["p50_ms"] - row["direct"]["p50_ms"]
        print(f"{'':>11} gateway p50 added: {added:+.2f} ms")
        if "litellm" in row:
            ratio = row["gateway"]["rps"] / max(row["litellm"]["rps"], 1e-9)
            print(f"{'':>11} gateway vs LiteLLM requests/s: {ratio:.2f}x")


def report(figures: dict[str, Any]) -> None:
    if "wrk" in figures:
        print("echo pool, the gateway driven by wrk (direct client at the same number in flight):")
        print_table(figures["wrk"])
    print("echo pool (direct client vs gateway through the openai SDK):")
    print_table(figures["load"])
    if "wrk_emulator" in figures:
        print(f"OpenAI emulator behind each, driven by wrk ({EMULATED}: API-proxy worker; LiteLLM proxy straight to "
              "the emulator):")  # fmt: skip
        print_table(figures["wrk_emulator"])
    if "emulator_load" in figures:
        print(f"OpenAI emulator behind each ({EMULATED}: API-proxy worker; LiteLLM proxy straight to the emulator):")
        print_table(figures["emulator_load"])
    ttft: dict[str, float] = figures["ttft"]
    print(f"time to first streamed token (median of 20): direct {ttft['direct_ms']:.1f} ms, "
          f"gateway {ttft['gateway_ms']:.1f} ms")  # fmt: skip


def wait_http(url: str, proc: subprocess.Popen[Any], what: str, deadline_s: float = 180) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        time.sleep(0.3)
    raise SystemExit(f"{what} did not answer {url} within {deadline_s:.0f} s")


def start_litellm(binary: str, emulator_url: str, workdir: Path) -> tuple[subprocess.Popen[Any], str]:
    from inferpool.plumbing.local_pool import free_port

    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(json.dumps({"general_settings": {"master_key": LITELLM_KEY}, "model_list": [{
        "model_name": EMULATED, "litellm_params": {"model": "openai/bench-emu", "api_base": emulator_url,
                                                   "api_key": "sk-unused"}}]}))  # fmt: skip
    log = (workdir / "litellm.log").open("wb")
    command = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, "the LiteLLM proxy")
    return proc, f"http://127.0.0.1:{port}/v1"


def start_emulator(workdir: Path) -> tuple[subprocess.Popen[Any], str]:
    """The OpenAI emulator in its own process; returns it and its OpenAI base URL."""
    log_path = workdir / "emulator.log"
    proc = subprocess.Popen([sys.executable, "-m", "inferpool.emulators"], stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        first = log_path.read_text().partition("\n")[0]
        if first.startswith("OpenAI base URL:"):
            return proc, first.split()[3]
        time.sleep(0.1)
    raise SystemExit("the emulator did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per target and concurrency")
    parser.add_argument("--litellm-bin", default=None, help="the `litellm` command: also measure its proxy")
    parser.add_argument("--seconds", type=float, default=8.0, help="each wrk run's duration")
    parser.add_argument("--gateway-workers", type=int, default=1, help="the gateway's uvicorn processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from inferpool.plumbing.local_pool import (
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
        # One key sends everything here: its tenant may hold as many requests open as wrk's 1,024 connections.
        env = {**os.environ, "INFERPOOL_LOG_LEVEL": "WARNING", "INFERPOOL_REGISTRY": str(registry),
               "INFERPOOL_FILES_DIR": str(workdir / "files"),
               "INFERPOOL_GATEWAY_MAX_IN_FLIGHT_PER_TENANT": "4096"}  # fmt: skip
        os.environ["INFERPOOL_REGISTRY"] = str(registry)
        helpers: list[subprocess.Popen[Any]] = []
        models = ["echo", "echo-trickle"]
        litellm_url = None
        if args.litellm_bin:
            emulator, emulator_url = start_emulator(workdir)
            helpers.append(emulator)
            env.update({"OPENAI_BASE_URL": emulator_url, "OPENAI_API_KEY": "sk-unused"})
            models.append(EMULATED)
        workers = [start_worker_process(m, server.url, workdir / f"{m}.log", env=env) for m in models]
        port = free_port()
        gateway = start_inferpool_process(["gateway", "--port", str(port), "--workers", str(args.gateway_workers)],
                                          server.url, workdir / "gateway.log", env)  # fmt: skip
        args.workdir = workdir
        try:
            import redis

            from inferpool.state.api_keys import ApiKeys

            key, _ = ApiKeys(redis.Redis.from_url(server.url)).create("bench")
            if args.litellm_bin:
                proxy, litellm_url = start_litellm(args.litellm_bin, emulator_url, workdir)
                helpers.append(proxy)
            wait_for_workers(redis.Redis.from_url(server.url), workers, 120)
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/ready", gateway, "the gateway")
            print(f"gateway at {url}/v1", flush=True)
            figures = asyncio.run(bench(args, server.url, f"{url}/v1", key, litellm_url))
        finally:
            for name in ("gateway", "litellm"):
                log_path = workdir / f"{name}.log"
                if log_path.exists() and "Traceback" in (text := log_path.read_text(errors="replace")):
                    print(f"--- {name}.log (tail) ---\n{text[-3000:]}", file=sys.stderr)
            stop_process(gateway, grace_s=10)
            for worker in workers:
                stop_process(worker.proc, grace_s=10)
            for helper in helpers:
                stop_process(helper, grace_s=10)
            server.stop()
    report(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
