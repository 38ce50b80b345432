#!/usr/bin/env bash
# Throughput of llm-jax against Hugging Face GPT-2 + torch AdamW on this machine, same shapes,
# alternating runs so both see the same machine load. Usage:
#   experiments/compare_torch.sh /path/to/python-with-torch-and-transformers [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PY=${1:?python with torch and transformers}
ROUNDS=${2:-3}
for _ in $(seq "$ROUNDS"); do
  "$TORCH_PY" experiments/bench_torch_gpt2.py
  .venv/bin/llm-jax bench gpt_bench --json
done
