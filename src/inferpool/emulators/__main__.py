"""``python -m inferpool.emulators --latency 0.2``: run an emulator (chat, and the batch APIs) until Ctrl-C."""

from __future__ import annotations

import argparse
import time

from inferpool.emulators.server import EmulatorConfig, ProviderEmulator


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve emulated OpenAI and Anthropic APIs (tests, demos).")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument("--api-key", default=None, help="require this key")
    parser.add_argument("--batch-delay", type=float, default=0.5, help="seconds a provider batch takes")
    parser.add_argument("--batch-failure-rate", type=float, default=0.0, help="share of batch lines that fail")
    args = parser.parse_args()
    config = EmulatorConfig(latency_s=args.latency, api_keys=[args.api_key] if args.api_key else [],
                            batch_delay_s=args.batch_delay, batch_failure_rate=args.batch_failure_rate)  # fmt: skip
    emulator = ProviderEmulator(config).start(args.port, args.host)
    print(f"OpenAI base URL: {emulator.openai_base_url}   Anthropic base URL: {emulator.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.stop()


if __name__ == "__main__":
    main()
