#!/usr/bin/env bash
# Reproduces the perplexity tables of docs/RESULTS.md on stories260K (or any model given as $MODEL):
# FP, RTN, GPTQ and CBQ at every setting of the issue, with the paper's calibration budget scaled
# to the model (128 segments of its context, 3 epochs). Writes results/results-<seed>.md.
#   scripts/reproduce-results.sh [BUILD_DIR] [SEED]
set -euo pipefail
build=${1:-build}
seed=${2:-0}
q="$build/examples/cbq-quantize"
[ -x "$q" ] || { echo "build $q first (cmake --build $build --target cbq-quantize)"; exit 1; }
mkdir -p results
out="results/results-$seed.md"
common=(--samples "${SAMPLES:-128}" --epochs "${EPOCHS:-3}" --seed "$seed" --quiet ${EXTRA:-})
settings=(
  "--wbits 4 --group 32 --abits 16"
  "--wbits 4 --group 0 --abits 16"
  "--wbits 3 --group 32 --abits 16"
  "--wbits 2 --group 32 --abits 16"
  "--wbits 8 --group 0 --abits 16"
  "--wbits 4 --group 32 --abits 8"
  "--wbits 4 --group 32 --abits 4"
)
echo "| setting | method | configuration | perplexity | vs FP | KL from FP | time | peak RSS |" > "$out"
echo "|---|---|---|---|---|---|---|---|" >> "$out"
for s in "${settings[@]}"; do
  echo "== $s" >&2
  # shellcheck disable=SC2086
  "$q" ${MODEL:-} --method rtn,gptq,cbq $s "${common[@]}" | grep '^| ' | grep -v '^| method' |
    sed "s/^/| $s /" >> "$out"
done
cat "$out"
