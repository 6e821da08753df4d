#!/usr/bin/env bash
# Runs every test: kernel oracles, fidelity against the Hugging Face goldens, text pipeline,
# error handling, the CLI and the cluster end to end (real worker processes, a real etcd, a
# Python grpcio client), and the CUDA backend's kernels compiled by NVRTC. Installs what the
# build and the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh test
# A target directory outside the clone lets repeated runs (and fresh clones) reuse builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/switchyard/target}"
# Formatting is part of the tests (rustfmt ships with rustup's default profile; added if not).
if ! cargo fmt --version >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt
fi
cargo fmt --all -- --check
# The engine has no network or async dependency (those live in switchyard-runtime).
engine_deps="$(cargo tree --locked -p switchyard-worker -e normal)"
if grep -E "^[^a-z]*(tonic|tokio|etcd-client|switchyard-proto) " <<<"$engine_deps"; then
  echo "switchyard-worker (the engine) must not depend on tonic, tokio, etcd-client or the protos" >&2
  exit 1
fi
cargo test --workspace --locked
# The CUDA backend (feature `cuda`): every kernel file compiled by NVRTC (required: a kernel
# that does not compile fails here), and the GPU tests, which print why they skip where no GPU
# is present.
export LD_LIBRARY_PATH="$SWITCHYARD_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
SWITCHYARD_REQUIRE_NVRTC=1 cargo test --locked -p switchyard-kernels --features cuda --test cuda -- --nocapture
cargo test --locked -p switchyard-tests --features cuda --test fidelity --test expert_parallel \
  -- --nocapture on_gpu nccl
