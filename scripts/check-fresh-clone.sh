#!/usr/bin/env bash
# Runs the README's main command in a clone that has nothing beside it (no ../shared), with a
# small budget, and fails unless it exits 0 and prints a perplexity table. This is what a new
# user on a fresh machine does first.
# Usage: scripts/check-fresh-clone.sh [REPO_ROOT]   (default: this repo; clones its HEAD)
set -euo pipefail
root=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/cbq"
cd "$work/cbq"
[ ! -e ../shared ] || { echo "check-fresh-clone: $work/shared exists; the check needs a clone alone" >&2; exit 1; }
# The README's main command, with a smaller budget for CI (the README runs the full default).
scripts/install-deps.sh && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null &&
  cmake --build build -j2 --target cbq-quantize >/dev/null &&
  build/examples/cbq-quantize --samples 8 --epochs 1 --threads 2 | tee "$work/run.log"
grep -q '^| cbq |' "$work/run.log" || { echo "check-fresh-clone: no result table" >&2; exit 1; }
echo "check-fresh-clone: the main job ran in a clone without ../shared"
