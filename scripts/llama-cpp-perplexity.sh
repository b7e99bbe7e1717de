#!/usr/bin/env bash
# Scores a GGUF file with llama.cpp's own llama-perplexity (the external check of cbq's GGUF
# export, docs/GGUF.md). Builds llama-perplexity once (CPU only) from the llama.cpp source that
# llama-cpp-python 0.3.16 vendors, into a cache folder, then runs
#   llama-perplexity -m MODEL -f TEXT -c CTX -b CTX -t THREADS
#
# usage: scripts/llama-cpp-perplexity.sh MODEL.gguf [TEXT] [CTX]
#        scripts/llama-cpp-perplexity.sh --build-only
# env:   LLAMA_CPP_TARBALL  llama_cpp_python-0.3.16.tar.gz (default: /tmp/lcp/…, else downloaded
#                           with `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.16`)
#        LLAMA_CPP_CACHE    build folder (default: ${XDG_CACHE_HOME:-~/.cache}/cbq/llama.cpp-0.3.16)
#        JOBS               build jobs (default 2), THREADS  run threads (default 2)
set -euo pipefail

version=0.3.16
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLAMA_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cbq/llama.cpp-$version}"
jobs="${JOBS:-2}"
threads="${THREADS:-2}"
bin="$cache/build/bin/llama-perplexity"

if [[ $# -lt 1 ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

if [[ ! -x "$bin" ]]; then
  mkdir -p "$cache"
  tarball="${LLAMA_CPP_TARBALL:-/tmp/lcp/llama_cpp_python-$version.tar.gz}"
  if [[ ! -f "$tarball" ]]; then
    echo "downloading llama-cpp-python $version source into $cache/dl" >&2
    python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache/dl"
    tarball="$cache/dl/llama_cpp_python-$version.tar.gz"
  fi
  if [[ ! -f "$cache/src/CMakeLists.txt" ]]; then
    echo "extracting vendor/llama.cpp from $tarball" >&2
    rm -rf "$cache/src" "$cache/extract"
    mkdir -p "$cache/extract"
    tar xzf "$tarball" -C "$cache/extract" "llama_cpp_python-$version/vendor/llama.cpp"
    mv "$cache/extract/llama_cpp_python-$version/vendor/llama.cpp" "$cache/src"
    rm -rf "$cache/extract"
  fi
  echo "building llama-perplexity in $cache/build (CPU only, -j$jobs)" >&2
  cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >"$cache/cmake.log"
  cmake --build "$cache/build" --target llama-perplexity -j"$jobs" >"$cache/build.log"
fi

if [[ "$1" == "--build-only" ]]; then
  echo "$bin"
  exit 0
fi

model="$1"
text="${2:-$here/data/text/tinystories_valid_200k.txt}"
ctx="${3:-512}"
[[ -f "$model" ]] || { echo "no such model file: $model" >&2; exit 1; }
[[ -f "$text" ]] || { echo "no such text file: $text (pass it as the second argument)" >&2; exit 1; }
# -b = -c: one chunk per batch, so the run is deterministic and matches the documented protocol.
exec "$bin" -m "$model" -f "$text" -c "$ctx" -b "$ctx" -t "$threads"
