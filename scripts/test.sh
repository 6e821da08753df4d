#!/usr/bin/env bash
# Runs every test: kernel oracles, fidelity against the Hugging Face goldens, text pipeline,
# error handling and the CLI end to end. Installs what the build needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
# A target directory outside the clone lets repeated runs (and fresh clones) reuse builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/switchyard/target}"
cargo test --workspace --locked
