#!/usr/bin/env bash
# The peer run (issue #27, not in CI): llama.cpp against ouro on the same GGUF files,
# prompts, token counts and thread count. Builds llama.cpp from the copy vendored in the
# llama-cpp-python sdist on PyPI (the sdist file is fetched from the index's simple page
# and checked against its sha256; cmake and ninja come as PyPI wheels) into .tools/llamacpp,
# then runs scripts/peer_llamacpp.py, which writes results/peer/peer.md and peer.json.
# About 40 minutes on a 2-core CPU (the llama.cpp build 10-15 of them, once).
#
#   scripts/peer-llamacpp.sh [peer_llamacpp.py flags, e.g. --set name=humaneval.prompts:0:8]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
tools=.tools/llamacpp
src="$tools/llama_cpp_python-$VERSION/vendor/llama.cpp"
log() { printf '[peer] %s\n' "$*" >&2; }

models=$(scripts/fetch-models.sh all | tail -n 1)
mkdir -p "$tools"
if [ ! -d "$src" ]; then
  url=$(curl -fsS --max-time 60 https://pypi.org/simple/llama-cpp-python/ \
    | grep -o "https://[^\"]*llama_cpp_python-$VERSION\.tar\.gz#sha256=[0-9a-f]*" | head -n 1)
  [ -n "$url" ] || { log "llama-cpp-python $VERSION sdist not on the index page"; exit 1; }
  log "fetching ${url%%#*}"
  curl -fsSL --max-time 600 -o "$tools/sdist.tar.gz" "${url%%#*}"
  echo "${url##*sha256=}  $tools/sdist.tar.gz" | sha256sum -c --quiet
  tar xzf "$tools/sdist.tar.gz" -C "$tools"
fi
if [ ! -x "$tools/venv/bin/cmake" ]; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q cmake ninja
fi
export PATH="$PWD/$tools/venv/bin:$PATH"
if [ ! -x "$tools/build/bin/llama-speculative-simple" ] || [ ! -x "$tools/build/bin/llama-completion" ]; then
  log "building llama.cpp (Release, native CPU flags)"
  cmake -S "$src" -B "$tools/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DBUILD_SHARED_LIBS=OFF >/dev/null
  ninja -C "$tools/build" llama-completion llama-speculative-simple
fi
cargo build --release --locked --bins
python3 scripts/peer_llamacpp.py --models "$models" "$@"
