"""What tracing costs: the batch path and the single-request round trip, with OpenTelemetry on and off, in one run.

    python bench/tracing.py --lines 30000 --round-trips 2000 --rounds 4 --json bench/results/tracing.json

Two local pools run side by side (each its Redis, scheduler and one ``echo-bench`` worker): "on" with
``OTEL_EXPORTER_OTLP_ENDPOINT`` set for every process, exporting to a local OTLP/HTTP receiver
(``inferpool.emulators.otlp``, in this process, counting the exports without decoding them: a collector's CPU is
another host's) with the SDK's default batching; "off" with nothing set. The work
alternates between them so this host's drift (up to 25% within minutes) hits both alike:

- batch: ``--rounds`` pairs of ``inferpool batch run`` jobs of ``--lines`` lines, one per pool, the order swapped
  each round; each side's figure is its median job;
- round trip: one client process, tracing installed, sends ``--round-trips`` sequential chats to each pool,
  alternating request by request; those to "off" run under OpenTelemetry's ``suppress_instrumentation`` (so the
  client makes no spans for them either).

Prints both sides and the cost; the exports received show tracing was on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def round_trip_driver(count: int, off_url: str, on_url: str) -> None:
    """(The child process.) ``count`` sequential chats to each pool, alternating; prints ms figures as JSON."""
    from opentelemetry import context
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

    from inferpool import Client, Settings
    from inferpool.tracing.setup import flush_tracing, install_tracing

    settings = Settings()
    install_tracing(settings.tracing, "bench")
    suppressed = context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True)
    took: dict[str, list[float]] = {"off": [], "on": []}
    with (
        Client(settings=settings.with_redis_url(off_url)) as off,
        Client(settings=settings.with_redis_url(on_url)) as on,
    ):

        def chat(side: str, client: Client, text: str) -> float:
            token = context.attach(suppressed) if side == "off" else None
            started = time.perf_counter()
            try:
                client.chat("echo-bench", [{"role": "user", "content": text}], timeout=30)
            finally:
                if token is not None:
                    context.detach(token)
            return time.perf_counter() - started

        for _ in range(50):  # warm both (connections, scripts)
            chat("off", off, "ping")
            chat("on", on, "ping")
        for i in range(count):
            pairs = (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off))
            for side, client in pairs:
                took[side].append(chat(side, client, f"ping {i}"))
    flush_tracing()
    print(json.dumps({side: {"p50_ms": statistics.median(values) * 1000, "mean_ms": statistics.fmean(values) * 1000,
                             "p99_ms": sorted(values)[int(0.99 * len(values))] * 1000}
                      for side, values in took.items()}))  # fmt: skip


def batch_job(lines: Path, output: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "inferpool", "batch", "run", str(lines), "-o", str(output), "--no-local",
                    "--no-show-answers"], env=env, check=True, capture_output=True)  # fmt: skip
    took = time.perf_counter() - started
    with output.open() as handle:
        failed = sum(1 for line in handle if json.loads(line)["error"] is not None)
    if failed:
        raise SystemExit(f"{failed} lines failed")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=30_000, help="lines of each batch job")
    parser.add_argument("--round-trips", type=int, default=2000, help="sequential chats to each pool")
    parser.add_argument("--rounds", type=int, default=4, help="pairs of batch jobs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--round-trip-driver", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round_trip_driver is not None:
        count, off_url, on_url = args.round_trip_driver
        round_trip_driver(int(count), off_url, on_url)
        return

    from batch_100k import write_input

    from inferpool.emulators.otlp import OtlpReceiver
    from inferpool.plumbing.local_pool import LocalPool

    receiver = OtlpReceiver(keep=False).start()
    base = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    base.update(INFERPOOL_REGISTRY=str(BENCH / "registry.yaml"), INFERPOOL_LOG_LEVEL="WARNING")
    envs = {"off": dict(base), "on": {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}}
    batch_s: dict[str, list[float]] = {"off": [], "on": []}
    try:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="inferpool-bench-trace-"))
            off = stack.enter_context(LocalPool(["echo-bench"], env=envs["off"]))
            on = stack.enter_context(LocalPool(["echo-bench"], env=envs["on"]))
            source = Path(tmp) / "input.jsonl"
            write_input(source, args.lines, 20)
            envs["off"]["REDIS_URL"], envs["on"]["REDIS_URL"] = off.redis_url, on.redis_url
            for index in range(args.rounds):
                for side in ("off", "on") if index % 2 == 0 else ("on", "off"):
                    batch_s[side].append(batch_job(source, Path(tmp) / f"{side}-{index}.jsonl", envs[side]))
                print(f"batch round {index + 1}: off {batch_s['off'][-1]:.2f} s, on {batch_s['on'][-1]:.2f} s",
                      flush=True)  # fmt: skip
            driver = subprocess.run([sys.executable, __file__, "--round-trip-driver", str(args.round_trips),
                                     off.redis_url, on.redis_url], env=envs["on"], check=True,
                                    capture_output=True)  # fmt: skip
    finally:
        receiver.stop()
    trips = json.loads(driver.stdout.decode().strip().splitlines()[-1])
    figures: dict[str, Any] = {side: {"lines_per_s": args.lines / statistics.median(batch_s[side]), **trips[side]}
                               for side in ("off", "on")}  # fmt: skip
    costs = {"batch": 1 - figures["on"]["lines_per_s"] / figures["off"]["lines_per_s"],
             "round_trip_p50": figures["on"]["p50_ms"] / figures["off"]["p50_ms"] - 1,
             "round_trip_mean": figures["on"]["mean_ms"] / figures["off"]["mean_ms"] - 1}  # fmt: skip
    print(f"\n{'':<22}{'tracing off':>13}{'tracing on':>13}{'cost':>9}")
    for label, key, cost, fmt in (("batch lines/s", "lines_per_s", "batch", ",.0f"),
                                  ("round trip p50 ms", "p50_ms", "round_trip_p50", ".3f"),
                                  ("round trip mean ms", "mean_ms", "round_trip_mean", ".3f")):  # fmt: skip
        print(f"{label:<22}{figures['off'][key]:>13{fmt}}{figures['on'][key]:>13{fmt}}{costs[cost]:>9.1%}")
    print(f"OTLP exports received: {receiver.count:,} ({receiver.bytes / 2**20:.1f} MiB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"figures": figures, "costs": costs, "exports": receiver.count, "export_bytes": receiver.bytes,
                   "batch_seconds": batch_s, "args": {key: str(val) for key, val in vars(args).items()}}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
