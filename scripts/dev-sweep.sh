#!/usr/bin/env bash
# The development sweep of docs/RESULTS.md ("What made CBQ work"): forward mode, V0, rounding and
# step-size learning rates on stories260K W4A16 g32 with a reduced budget (32 segments × 512
# tokens, 2 epochs, seed 0). One line per variant: options | perplexity. The rows name LoRA-Rounding
# where they measured it (the default until 2026-12-06; the default is full-matrix now).
#   scripts/dev-sweep.sh [BUILD_DIR]
set -euo pipefail
q="${1:-build}/examples/cbq-quantize"
[ -x "$q" ] || { echo "build $q first"; exit 1; }
variants=(
  "--rounding lora --soft --frozen-v0"
  "--rounding lora --soft"
  "--soft --rounding full"
  "--rounding nearest"
  "--rounding lora --frozen-v0"
  "--rounding lora"
  "--rounding full"
  "--rounding lora --rank 16"
  "--rounding lora --gamma 0"
  "--rounding lora --lr-step 3e-3"
  "--rounding lora --lr-step 3e-2"
  "--rounding lora --lr-step 1e-1"
  "--rounding lora --lr-round 1e-3"
  "--preset paper"
)
echo "| options (besides the defaults) | perplexity |"
echo "|---|---|"
for v in "${variants[@]}"; do
  # shellcheck disable=SC2086
  p=$("$q" --method cbq --samples 32 --epochs 2 --seed 0 --quiet $v 2>&1 |
      sed -n 's/^cbq: perplexity \([0-9.]*\).*/\1/p')
  echo "| \`${v:-(defaults)}\` | ${p:-error} |"
done
