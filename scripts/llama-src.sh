# Sourced: sets `src` to llama.cpp's source tree, fetched once from the llama-cpp-python sdist
# on PyPI (the registry's copy of it, under vendor/llama.cpp) into ~/.cache/switchyard/llama.cpp.
# Needs `py` (a Python 3) and curl.
lc="$HOME/.cache/switchyard/llama.cpp"
mkdir -p "$lc"
src="$(ls -d "$lc"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | tail -1 || true)"
if [[ -z "$src" ]]; then
  url="$("$py" - <<'PY'
import json, urllib.parse, urllib.request
meta = "https://pypi.org/pypi/llama-cpp-python/json"
d = json.load(urllib.request.urlopen(meta))
sdist = [u["url"] for u in d["urls"] if u["packagetype"] == "sdist"][0]
print(urllib.parse.urljoin(meta, sdist))
PY
)"
  curl -sSL -o "$lc/sdist.tar.gz" "$url"
  tar xzf "$lc/sdist.tar.gz" -C "$lc" --wildcards '*/vendor/llama.cpp'
  rm "$lc/sdist.tar.gz"
  src="$(ls -d "$lc"/llama_cpp_python-*/vendor/llama.cpp | tail -1)"
fi
