#!/usr/bin/env bash
# The before/after table of docs/RELIABILITY.md ("Hostile and careless input"): runs
# tests/cli/hostile.sh --table against two builds of cbq-quantize and cbq-eval and prints the
# category × GOOD/WEAK/BAD counts side by side, then every case with both statuses.
#
# Usage: scripts/reliability-table.sh BEFORE_BIN AFTER_BIN [TEST_BUILD] [--full]
#   BEFORE_BIN, AFTER_BIN  folders holding cbq-quantize and cbq-eval (e.g. main's and a branch's)
#   TEST_BUILD             the build folder holding tests/cbq_test_edit and
#                          tests/libcbq_kill_shim.so (default: build/ of this checkout)
#   --full                 kill at every write step (default: a sample of the write calls)
# Building the "before" tools of another commit, e.g. main:
#   git worktree add /tmp/cbq-main main
#   cmake -S /tmp/cbq-main -B /tmp/cbq-main/build -DCBQ_ENABLE_CUDA=OFF -DCBQ_BUILD_BENCHMARKS=OFF
#   make -C /tmp/cbq-main/build -j2 cbq-quantize cbq-eval
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,15p' "$0"; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
before=$1 after=$2 build=${3:-$root/build}
extra=()
[ "${4:-}" = --full ] && extra=(--full)
edit=$build/tests/cbq_test_edit
shim=$build/tests/libcbq_kill_shim.so
[ -x "$edit" ] && [ -f "$shim" ] || { echo "build cbq_test_edit and cbq_kill_shim in $build first"; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# A copy: bash reads a script as it runs, so editing the original mid-run would break it.
mkdir -p "$out/cli"
cp "$root/tests/cli/hostile.sh" "$out/cli/"
ln -s "$root/tests/fixtures" "$out/fixtures"
for side in before after; do
  bin=$before; [ $side = after ] && bin=$after
  "$out/cli/hostile.sh" --table "${extra[@]}" --tsv "$out/$side.tsv" "$bin" "$edit" "$shim" \
    "$root/data" > "$out/$side.log" 2>&1 || { cat "$out/$side.log"; exit 1; }
done
echo "| category | before: GOOD | WEAK | BAD | SKIP | after: GOOD | WEAK | BAD | SKIP |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
awk -F'\t' '
  FNR == 1 { side++ }
  { n[side, $2, $1]++; if (!($2 in seen)) { seen[$2] = 1; order[++k] = $2 } }
  END {
    for (i = 1; i <= k; i++) {
      c = order[i]
      printf "| %s | %d | %d | %d | %d | %d | %d | %d | %d |\n", c,
        n[1, c, "GOOD"], n[1, c, "WEAK"], n[1, c, "BAD"], n[1, c, "SKIP"],
        n[2, c, "GOOD"], n[2, c, "WEAK"], n[2, c, "BAD"], n[2, c, "SKIP"]
    }
  }' "$out/before.tsv" "$out/after.tsv"
echo
echo "| category | case | before | after |"
echo "|---|---|---|---|"
awk -F'\t' '
  FNR == 1 { side++ }
  side == 1 { b[$2 "\t" $3] = $1 ": " $4; key[++k] = $2 "\t" $3 }
  side == 2 { a[$2 "\t" $3] = $1 ": " $4; if (!(($2 "\t" $3) in b)) key[++k] = $2 "\t" $3 }
  END {
    for (i = 1; i <= k; i++) {
      split(key[i], p, "\t")
      bb = key[i] in b ? b[key[i]] : "-"; aa = key[i] in a ? a[key[i]] : "-"
      gsub(/\|/, "/", bb); gsub(/\|/, "/", aa)
      printf "| %s | %s | %s | %s |\n", p[1], p[2], substr(bb, 1, 110), substr(aa, 1, 110)
    }
  }' "$out/before.tsv" "$out/after.tsv"
