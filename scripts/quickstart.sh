#!/usr/bin/env bash
# Set up inferpool and run the example batch: examples/prompts.jsonl through a local pool
# (embedded Redis, an echo worker and a SmolLM2-135M worker), writing results.jsonl.
source "$(dirname "$0")/_env.sh" hf
echo "==> inferpool batch run examples/prompts.jsonl -o results.jsonl"
inferpool batch run examples/prompts.jsonl -o results.jsonl "$@"
