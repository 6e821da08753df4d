#!/usr/bin/env bash
# The cost of constrained decoding on real vocabularies: `switchyard bench-grammar` on
# StarCoder's 49,152-entry vocabulary (the size of SmolLM2's), GPT-2's 50,257 and Qwen2's
# 151,936, taken from llama.cpp's vocabulary files (`switchyard import --tokenizer-only`) and run RUNS
# times each, alternating. Needs a release build (`cargo build --release -p
# switchyard-coordinator`); fetches llama.cpp's source once (scripts/llama-src.sh).
#
#   scripts/bench-grammar.sh [RUNS] [TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
tokens="${2:-2000}"
target="${CARGO_TARGET_DIR:-$HOME/.cache/switchyard/target}"
switchyard="$target/release/switchyard"
[[ -x "$switchyard" ]] || { echo "build first: cargo build --release -p switchyard-coordinator" >&2; exit 2; }
py=python3
source scripts/llama-src.sh
vocabs="$HOME/.cache/switchyard/vocab"
for v in starcoder gpt-2 qwen2; do
  [[ -f "$vocabs/$v/tokenizer.json" ]] \
    || "$switchyard" import --tokenizer-only "$src/models/ggml-vocab-$v.gguf" --out "$vocabs/$v"
done
for r in $(seq "$runs"); do
  for v in starcoder gpt-2 qwen2; do
    echo "run $r $v $("$switchyard" bench-grammar --tokenizer "$vocabs/$v" --tokens "$tokens" --seed "$r" --json)"
  done
done
