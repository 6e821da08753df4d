#!/usr/bin/env bash
# Switchyard against its peers on one checkpoint, in one run, alternating: `switchyard bench`,
# Hugging Face transformers (scripts/bench-hf.py, torch from PyPI) and llama.cpp's llama-bench
# (built from the llama-cpp-python sdist's vendor/llama.cpp, the checkpoint converted with its
# convert_hf_to_gguf.py). Prints each run's figures and the ratios per run, then one JSON line.
#
#   scripts/bench-peers.sh MODEL_DIR [f32|bf16] [RUNS]
#
# Switchyard reads MODEL_DIR as it is (quantized checkpoints stay quantized); the peers get
# it at DTYPE (transformers loads at that dtype; llama.cpp converts to that outtype). Needs
# a release build (`cargo build --release -p switchyard-coordinator`). Installs cmake (Debian)
# and a Python venv for the peers (~/.cache/switchyard/bench-venv) where missing; llama.cpp is
# built once under ~/.cache/switchyard/llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(realpath "${1:?usage: scripts/bench-peers.sh MODEL_DIR [f32|bf16] [RUNS]}")"
dtype="${2:-bf16}"
runs="${3:-3}"
case "$dtype" in f32 | bf16) ;; *) echo "dtype must be f32 or bf16, got $dtype" >&2; exit 2 ;; esac
cache="$HOME/.cache/switchyard"
target="${CARGO_TARGET_DIR:-$cache/target}"
switchyard="$target/release/switchyard"
[[ -x "$switchyard" ]] || { echo "build first: cargo build --release -p switchyard-coordinator" >&2; exit 2; }
threads="$(nproc)"

SUDO=""
[[ "$(id -u)" == 0 ]] || SUDO="sudo"
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake g++ >/dev/null
fi

venv="$cache/bench-venv"
py="$venv/bin/python"
if [[ ! -x "$py" ]] || ! "$py" -c "import torch, transformers, safetensors, accelerate, numpy, yaml, tqdm, sentencepiece" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers safetensors accelerate numpy pyyaml tqdm sentencepiece
fi

# llama.cpp from the llama-cpp-python sdist (the registry's copy of its source).
source scripts/llama-src.sh
bench="$src/build/bin/llama-bench"
if [[ ! -x "$bench" ]]; then
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$src/build" --target llama-bench -j "$threads" >/dev/null
fi

# The checkpoint in GGUF at DTYPE. The fixture tokenizer's pre-tokenizer hash is not in the
# converter's list; it is a Qwen2-style BPE, so the converter is told so.
gguf="$lc/gguf/$(basename "$model")-$(sha256sum "$model/config.json" | cut -c1-12)-$dtype.gguf"
if [[ ! -s "$gguf" ]]; then
  mkdir -p "$lc/gguf"
  echo "converting $model to $gguf (log: $gguf.log)" >&2
  "$py" - "$src" "$model" "$gguf" "$dtype" >"$gguf.log" 2>&1 <<'EOF' || { tail -20 "$gguf.log" >&2; exit 1; }
import runpy, sys
src, model, out, dtype = sys.argv[1:5]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", dtype]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
EOF
fi

out="$(mktemp -d)"
for r in $(seq 1 "$runs"); do
  "$switchyard" bench --model "$model" --batch 8 --json >"$out/sy-$r.json"
  "$py" scripts/bench-hf.py "$model" --device cpu --dtype "$dtype" --batch 8 --steps 32 \
    --prefill 512 >"$out/hf-$r.json" 2>"$out/hf-$r.err" || { cat "$out/hf-$r.err" >&2; exit 1; }
  "$bench" -m "$gguf" -p 512 -n 64 -t "$threads" -r 3 -o json >"$out/lc-$r.json" 2>"$out/lc-$r.err" \
    || { cat "$out/lc-$r.err" >&2; exit 1; }
done
"$py" - "$out" "$runs" "$dtype" <<'EOF'
import json, sys
out, runs, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
for r in range(1, runs + 1):
    sy = json.load(open(f"{out}/sy-{r}.json"))
    hf = json.loads(open(f"{out}/hf-{r}.json").read().strip().splitlines()[-1])
    lc = json.load(open(f"{out}/lc-{r}.json"))
    pp = next(x["avg_ts"] for x in lc if x["n_prompt"] > 0 and x["n_gen"] == 0)
    tg = next(x["avg_ts"] for x in lc if x["n_gen"] > 0 and x["n_prompt"] == 0)
    rows.append({
        "run": r,
        "switchyard": {"dtype": sy["dtype"], "decode_b1": sy["decode_tok_s_b1"],
                       "decode_b8": sy["decode_tok_s_batch"], "prefill_512": sy["prefill_tok_s"],
                       "b1_fraction_of_bound": sy["decode_b1_fraction_of_bound"],
                       "bytes_per_token": sy["bytes_per_token"], "peak_rss": sy["peak_rss_bytes"]},
        "transformers": {"dtype": dtype, "decode_b1": hf["decode_tok_s_b1"],
                         "decode_b8": hf["decode_tok_s_batch"], "prefill_512": hf["prefill_tok_s"]},
        "llama.cpp": {"dtype": dtype, "decode_b1": tg, "prefill_512": pp},
    })
print(f"{'run':>3} {'':12} {'decode b=1':>11} {'decode b=8':>11} {'prefill 512':>12}")
for row in rows:
    for k in ("switchyard", "transformers", "llama.cpp"):
        v = row[k]
        print(f"{row['run']:>3} {k:12} {v['decode_b1']:11.1f} {v.get('decode_b8', float('nan')):11.1f} {v['prefill_512']:12.1f}")
    s, h, l = row["switchyard"], row["transformers"], row["llama.cpp"]
    row["ratios"] = {
        "b1_vs_llama.cpp": s["decode_b1"] / l["decode_b1"],
        "prefill_vs_llama.cpp": s["prefill_512"] / l["prefill_512"],
        "b1_vs_transformers": s["decode_b1"] / h["decode_b1"],
        "b8_vs_transformers": s["decode_b8"] / h["decode_b8"],
        "prefill_vs_transformers": s["prefill_512"] / h["prefill_512"],
    }
    print("    ratios " + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
          + f"; b=1 at {s['b1_fraction_of_bound']:.0%} of its bound")
print(json.dumps(rows))
EOF
rm -rf "$out"
