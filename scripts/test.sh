#!/usr/bin/env bash
# Runs every test: kernel oracles, fidelity against the Hugging Face goldens, text pipeline,
# error handling, the CLI and the cluster end to end (real worker processes, a real etcd, a
# Python grpcio client). Installs what the build and the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh test
# A target directory outside the clone lets repeated runs (and fresh clones) reuse builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/switchyard/target}"
cargo test --workspace --locked
