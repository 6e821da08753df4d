#!/usr/bin/env bash
# Cache-aware homing against homing that ignores the caches, in one run: for each worker
# count, `switchyard up` with `--prefix-homing $WEIGHT` (default 0.25, the coordinator's) and with
# `--prefix-homing off`, the workers' prefix caches on in both, under the same
# `switchyard-loadtest` workload: prompts drawn from GROUPS different shared prefixes (several
# system prompts). Prints the share of prompt blocks found cached (every worker's counters
# from the Admin API) and TTFT per arm; the first worker count is the reference the others'
# hit rates are divided by (1 worker: homing has no choice to make).
#
#   scripts/bench-prefix-homing.sh MODEL [WORKERS=1,2,4] [GROUPS=8] [PREFIX=512] [INPUT=576]
#                                  [REQUESTS=48] [CONCURRENCY=4] [OUTPUT=4]
#
# Uses the release binaries under $CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/bench-prefix-homing.sh MODEL [WORKERS] [GROUPS] [PREFIX] [INPUT] [REQUESTS] [CONCURRENCY] [OUTPUT]}
IFS=, read -r -a counts <<<"${2:-1,2,4}"
groups=${3:-8}
prefix=${4:-512}
input=${5:-576}
requests=${6:-48}
concurrency=${7:-4}
output=${8:-4}
target=${CARGO_TARGET_DIR:-$HOME/.cache/switchyard/target}
bin=$target/release/switchyard
loadtest=$target/release/switchyard-loadtest
out=$(mktemp -d /tmp/sy-homing.XXXX)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

arm() { # label, workers, --prefix-homing value
  local label=$1 workers=$2 homing=$3 port admin pid
  port=$(free_port)
  admin=$(free_port)
  "$bin" up --model "$model" --workers "$workers" --grpc-addr "127.0.0.1:$port" \
    --admin-addr "127.0.0.1:$admin" --prefix-homing "$homing" >"$out/$label.log" 2>&1 &
  pid=$!
  for _ in $(seq 900); do
    grep -q "serve: ready" "$out/$label.log" && break
    sleep 0.2
  done
  "$loadtest" run --endpoint "http://127.0.0.1:$port" --concurrency "$concurrency" \
    --requests "$requests" --input-len "fixed:$input" --output-len "fixed:$output" \
    --shared-prefix "$prefix" --prefix-groups "$groups" --seed 11 --quiet \
    --out "$out/$label" >/dev/null
  "$bin" admin --endpoint "http://127.0.0.1:$admin" --json status >"$out/$label.json"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

for n in "${counts[@]}"; do
  arm "aware-$n" "$n" "${WEIGHT:-0.25}"
  [ "$n" -gt 1 ] && arm "blind-$n" "$n" off
done

python3 - "$out" "${counts[*]}" <<'EOF'
import json, sys
out, counts = sys.argv[1], [int(c) for c in sys.argv[2].split()]
def hit_rate(label):
    ws = json.load(open(f"{out}/{label}.json"))["workers"]
    q = sum(w["prefix_queried_blocks"] for w in ws)
    return sum(w["prefix_hit_blocks"] for w in ws) / q if q else float("nan"), ws
def ttft(label):
    rs = [json.loads(l) for l in open(f"{out}/{label}/requests.jsonl")]
    t = sorted(r["ttft_s"] * 1e3 for r in rs if r["status"] == "ok" and r.get("ttft_s") is not None)
    return t[len(t) // 2] if t else float("nan"), len(t)
ref = None
print("workers  homing  requests  prompt blocks found  / reference  TTFT p50 (ms)  per worker found/looked up")
for n in counts:
    for arm in ("aware", "blind"):
        label = f"{arm}-{n}"
        try:
            h, ws = hit_rate(label)
        except FileNotFoundError:
            continue
        t, k = ttft(label)
        ref = h if ref is None else ref
        per = ", ".join(f"{w['prefix_hit_blocks']}/{w['prefix_queried_blocks']}" for w in ws)
        print(f"{n:>7}  {arm:<6}  {k:>8}  {h:>19.1%}  {h / ref:>11.2f}  {t:>13.0f}  {per}")
print(f"(logs, status and loadtest output in {out})")
EOF
