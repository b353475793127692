"""``python -m inferpool.emulators --latency 0.2``: run an emulator until Ctrl-C."""

from __future__ import annotations

import argparse
import time

from inferpool.emulators.server import EmulatorConfig, ProviderEmulator


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve emulated OpenAI and Anthropic APIs on 127.0.0.1.")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument("--api-key", default=None, help="require this key")
    args = parser.parse_args()
    emulator = ProviderEmulator(
        EmulatorConfig(latency_s=args.latency, api_keys=[args.api_key] if args.api_key else [])
    ).start()
    print(f"OpenAI base URL: {emulator.openai_base_url}   Anthropic base URL: {emulator.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.stop()


if __name__ == "__main__":
    main()
