#!/usr/bin/env bash
# The main job on an embedded default: builds Switchyard, generates the built-in `tiny` demo
# model if absent, and streams a chat reply from it. Usage: scripts/demo.sh ["your message"]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
cargo build --release -q -p switchyard-coordinator
bin=target/release/switchyard
[ -f models/tiny/config.json ] || "$bin" gen-model --preset tiny --out models/tiny
exec "$bin" run --model models/tiny --chat "${1:-Explain expert parallelism in one paragraph.}" --max-tokens 64
