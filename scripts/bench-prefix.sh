#!/usr/bin/env bash
# Automatic prefix caching on a local cluster, in one run: `switchyard up` with the workers'
# prefix cache on, then the same cluster with it off (`--no-prefix-cache`), each under the
# same `switchyard-loadtest` workload of prompts that share a long prefix (the same seed, so
# the same prompts); prints TTFT and end-to-end latency side by side and their ratios.
#
#   scripts/bench-prefix.sh MODEL [WORKERS=2] [PREFIX=1536] [INPUT=1600] [OUTPUT=8]
#                           [REQUESTS=24] [CONCURRENCY=2] [ROUNDS=1]
#
# Uses the release binaries under $CARGO_TARGET_DIR (build them first:
# `cargo build --release -p switchyard-coordinator -p switchyard-loadtest`). Each arm's
# first 2 requests are left out (the cache-on arm computes the prefix there once per worker).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/bench-prefix.sh MODEL [WORKERS] [PREFIX] [INPUT] [OUTPUT] [REQUESTS] [CONCURRENCY] [ROUNDS]}
workers=${2:-2}
prefix=${3:-1536}
input=${4:-1600}
output=${5:-8}
requests=${6:-24}
concurrency=${7:-2}
rounds=${8:-1}
target=${CARGO_TARGET_DIR:-$HOME/.cache/switchyard/target}
bin=$target/release/switchyard
loadtest=$target/release/switchyard-loadtest
out=$(mktemp -d /tmp/sy-prefix.XXXX)

arm() { # label, extra `up` arguments...
  local label=$1
  shift
  local port admin
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  admin=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$bin" up --model "$model" --workers "$workers" --grpc-addr "127.0.0.1:$port" \
    --admin-addr "127.0.0.1:$admin" "$@" >"$out/$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 900); do
    grep -q "serve: ready" "$out/$label.log" && break
    sleep 0.2
  done
  "$loadtest" run --endpoint "http://127.0.0.1:$port" --concurrency "$concurrency" \
    --requests "$((requests + 2))" --input-len "fixed:$input" --output-len "fixed:$output" \
    --shared-prefix "$prefix" --seed 7 --quiet --out "$out/$label" >/dev/null
  "$bin" admin --endpoint "http://127.0.0.1:$admin" status >"$out/$label.status" 2>&1 || true
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

for r in $(seq "$rounds"); do
  arm "on-$r"
  arm "off-$r" --no-prefix-cache
done

python3 - "$out" "$rounds" <<'EOF'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def recs(label):
    rs = [json.loads(l) for l in open(f"{out}/{label}/requests.jsonl")]
    rs.sort(key=lambda r: r["sent_s"])
    return [r for r in rs[2:] if r["status"] == "ok" and r.get("ttft_s") is not None]
def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))] if v else float("nan")
print("round  arm  requests  TTFT p50 / p99 (ms)  e2e p50 (ms)")
for r in range(1, rounds + 1):
    row = {}
    for arm in ("on", "off"):
        rs = recs(f"{arm}-{r}")
        t = [x["ttft_s"] * 1e3 for x in rs]
        e = [(x["end_s"] - x["sent_s"]) * 1e3 for x in rs]
        row[arm] = (pct(t, 0.5), pct(t, 0.99), pct(e, 0.5))
        print(f"{r:>5}  {arm:<3}  {len(rs):>8}  {row[arm][0]:>8.0f} / {row[arm][1]:<8.0f}  {row[arm][2]:>10.0f}")
    print(f"       TTFT p50 off/on {row['off'][0] / row['on'][0]:.1f}x, p99 {row['off'][1] / row['on'][1]:.1f}x, "
          f"e2e p50 {row['off'][2] / row['on'][2]:.1f}x")
for r in range(1, rounds + 1):
    print(open(f"{out}/on-{r}.status").read().strip())
print(f"(logs, status and loadtest output in {out})")
EOF
