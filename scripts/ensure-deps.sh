#!/usr/bin/env bash
# Installs what the build needs on a fresh Debian machine: protoc (for the gRPC contracts).
# With `test` as argument also what the tests need: etcd (a real server for the membership
# tests), a Python venv with grpcio (the cross-language client test) and NVRTC (the CUDA
# kernels' compile test).
# Sourced by the other scripts; does nothing when everything is present.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ "${1:-}" = test ]; then
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  # Debian's python3 makes venvs only with python3-venv (ensurepip) installed.
  if ! command -v python3 >/dev/null 2>&1; then
    need+=(python3 python3-venv)
  elif ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
    need+=(python3-venv)
  fi
fi
if ((${#need[@]})); then
  echo "installing: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "${1:-}" = test ]; then
  venv="$HOME/.cache/switchyard/venv"
  if ! "$venv/bin/python" -c "import grpc, grpc_tools, grpc_reflection, grpc_health, openai, prometheus_client" >/dev/null 2>&1; then
    echo "creating $venv with grpcio, openai, prometheus_client" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q grpcio grpcio-tools grpcio-reflection grpcio-health-checking \
      openai prometheus_client
  fi
  export SWITCHYARD_PYTHON="$venv/bin/python"
  # NVRTC alone (no toolkit, no GPU) compiles the CUDA kernels in the tests. 13.0 matches the
  # driver of the GPU machines the kernels are checked on.
  nvrtc_lib=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null || true)
  if [ ! -e "$nvrtc_lib/libnvrtc.so.13" ]; then
    echo "installing the NVRTC wheel into $venv" >&2
    "$venv/bin/pip" install -q "nvidia-cuda-nvrtc==13.0.*"
    nvrtc_lib=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))")
  fi
  export SWITCHYARD_NVRTC_LIB="$nvrtc_lib"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
