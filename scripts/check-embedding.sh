#!/usr/bin/env bash
# Builds and runs examples/embedding (an engine with its own block type quantized by cbq) both
# ways a project consumes cbq: find_package(cbq) from an install of BUILD_DIR, and
# add_subdirectory(REPO_ROOT). Exits non-zero on any failure.
# Usage: scripts/check-embedding.sh [REPO_ROOT] [BUILD_DIR]   (defaults: this repo, build)
set -euo pipefail
root=$(cd "${1:-$(dirname "$0")/..}" && pwd)
build=${2:-$root/build}
[ -f "$build/CMakeCache.txt" ] || { echo "check-embedding: $build is not a configured cbq build tree" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
jobs=${CBQ_EMBED_JOBS:-2}

echo "== embedding example via find_package(cbq) (cbq installed from $build)"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
cmake -S "$root/examples/embedding" -B "$work/find" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$work/prefix" >"$work/find.log" || { cat "$work/find.log"; exit 1; }
grep "cbq: find_package" "$work/find.log"
cmake --build "$work/find" -j "$jobs" >"$work/find-build.log" || { cat "$work/find-build.log"; exit 1; }
"$work/find/engine"

echo "== embedding example via add_subdirectory($root)"
cmake -S "$root/examples/embedding" -B "$work/sub" -DCMAKE_BUILD_TYPE=Release \
  -DCBQ_SOURCE_DIR="$root" >"$work/sub.log" || { cat "$work/sub.log"; exit 1; }
grep "cbq: add_subdirectory" "$work/sub.log"
# The subproject must not bring in cbq's tests, examples, benchmarks or CUDA backend.
for opt in CBQ_BUILD_TESTS CBQ_BUILD_EXAMPLES CBQ_BUILD_BENCHMARKS CBQ_ENABLE_CUDA CBQ_INSTALL; do
  grep -q "^$opt:BOOL=OFF" "$work/sub/CMakeCache.txt" || { echo "check-embedding: $opt is not OFF in the subproject" >&2; exit 1; }
done
cmake --build "$work/sub" -j "$jobs" >"$work/sub-build.log" || { cat "$work/sub-build.log"; exit 1; }
"$work/sub/engine"
echo "check-embedding: the example built and ran via find_package and via add_subdirectory"
