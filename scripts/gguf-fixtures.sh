#!/usr/bin/env bash
# Writes the GGUF fixtures of the import tests: the transformers fixtures under tests/fixtures
# converted by llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist on PyPI)
# at f32 and q8_0, into tests/fixtures/gguf/. The fixture tokenizer's pre-tokenizer hash is not
# in the converter's list; it is a Qwen2-style BPE, so the converter is told so.
#
#   scripts/gguf-fixtures.sh [FIXTURE ...]     (default: every family llama.cpp converts)
#
# Needs torch and transformers: the venv of scripts/bench-peers.sh (created where missing).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="$HOME/.cache/switchyard"
venv="$cache/bench-venv"
py="$venv/bin/python"
if [[ ! -x "$py" ]] || ! "$py" -c "import torch, transformers, safetensors, numpy, sentencepiece, gguf" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers safetensors accelerate numpy pyyaml tqdm sentencepiece gguf
fi
source scripts/llama-src.sh
fixtures=("$@")
((${#fixtures[@]})) || fixtures=(tiny-mixtral tiny-qwen3-moe tiny-qwen2-moe tiny-olmoe tiny-deepseek-v3 tiny-gpt-oss)
mkdir -p tests/fixtures/gguf
for f in "${fixtures[@]}"; do
  for t in f32 q8_0; do
    out="tests/fixtures/gguf/$f-$t.gguf"
    "$py" - "$src" "tests/fixtures/$f" "$out" "$t" >"/tmp/gguf-$f-$t.log" 2>&1 <<'PY' || { tail -20 "/tmp/gguf-$f-$t.log" >&2; exit 1; }
import runpy, sys
src, model, out, dtype = sys.argv[1:5]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", dtype]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
PY
    echo "wrote $out ($(stat -c %s "$out") bytes)"
  done
done
