#!/usr/bin/env bash
# The main job on an embedded default: builds Switchyard, generates the built-in `tiny` demo
# model if absent, starts a local cluster (coordinator + 2 worker processes exchanging tokens
# over the TCP all-to-all), streams a chat reply through its gRPC API and shows the cluster's
# status (epoch, workers, expert balance) through the admin API.
# Usage: scripts/demo.sh ["your message"]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
cargo build --release -q -p switchyard-coordinator
bin=target/release/switchyard
[ -f models/tiny/config.json ] || "$bin" gen-model --preset tiny --out models/tiny
log=$(mktemp)
"$bin" up --model models/tiny --workers 2 --grpc-addr 127.0.0.1:0 >"$log" &
up=$!
trap 'kill $up 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
  grep -q '^serving grpc=' "$log" && break
  kill -0 $up 2>/dev/null || { echo "cluster failed to start" >&2; exit 1; }
  sleep 0.1
done
url=$(sed -n 's/^serving grpc=\([^ ]*\).*/\1/p' "$log")
metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' "$log")
http=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$log")
admin=$(sed -n 's/.* admin=\([^ ]*\).*/\1/p' "$log")
echo "local cluster at $url (2 workers; OpenAI-style HTTP at $http/v1; metrics at $metrics)" >&2
"$bin" generate --endpoint "$url" --chat "${1:-Explain expert parallelism in one paragraph.}" --max-tokens 64
"$bin" admin --endpoint "$admin" status
