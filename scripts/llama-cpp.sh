#!/usr/bin/env bash
# Builds llama.cpp's CPU tools once, from the llama.cpp source that llama-cpp-python 0.3.16 vendors
# (PyPI), and prints the folder holding the binaries. The build is the one a user who wants speed
# makes: GGML_NATIVE=ON (the kernels for this CPU), Release, no GPU back-ends.
#
# usage: scripts/llama-cpp.sh            # build if needed, print the bin folder
#        scripts/llama-cpp.sh TOOL ARGS…  # build if needed, then run bin/TOOL ARGS…
# tools: llama-perplexity llama-tokenize llama-quantize llama-simple llama-bench llama-cli
# env:   LLAMA_CPP_TARBALL  llama_cpp_python-0.3.16.tar.gz (default: /tmp/lcp/…, else downloaded
#                           with `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.16`)
#        LLAMA_CPP_CACHE    cache folder (default: ${XDG_CACHE_HOME:-~/.cache}/cbq/llama.cpp-0.3.16-native)
#        JOBS               build jobs (default 2)
set -euo pipefail

version=0.3.16
cache="${LLAMA_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cbq/llama.cpp-$version-native}"
jobs="${JOBS:-2}"
tools=(llama-perplexity llama-tokenize llama-quantize llama-simple llama-bench llama-cli)
bindir="$cache/build/bin"

built=1
for t in "${tools[@]}"; do [[ -x "$bindir/$t" ]] || built=0; done
if [[ $built == 0 ]]; then
  # One builder at a time (several scripts may ask at once).
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  built=1
  for t in "${tools[@]}"; do [[ -x "$bindir/$t" ]] || built=0; done
fi
if [[ $built == 0 ]]; then
  tarball="${LLAMA_CPP_TARBALL:-/tmp/lcp/llama_cpp_python-$version.tar.gz}"
  if [[ ! -f "$tarball" ]]; then
    echo "downloading llama-cpp-python $version source into $cache/dl" >&2
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache/dl" >&2
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
  echo "building llama.cpp tools in $cache/build (CPU, GGML_NATIVE=ON, -j$jobs; ~10 min on 2 cores)" >&2
  cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >"$cache/cmake.log"
  cmake --build "$cache/build" --target "${tools[@]}" -j"$jobs" >"$cache/build.log"
fi

if [[ $# -eq 0 ]]; then
  echo "$bindir"
  exit 0
fi
tool="$1"
shift
[[ -x "$bindir/$tool" ]] || { echo "llama-cpp.sh: no tool $tool in $bindir (have: ${tools[*]})" >&2; exit 2; }
exec "$bindir/$tool" "$@"
