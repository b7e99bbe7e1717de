#!/usr/bin/env bash
# Ablations in the directions of the paper's Tables 3–6 on stories260K, each over several
# calibration seeds (2-bit/3-bit results move by percents between seeds): window size and
# overlap, rounding (full AdaRound vs LoRA vs none), loss terms, outlier pre-processing.
#   scripts/ablations.sh [BUILD_DIR] [SEEDS...]      (defaults: build, seeds 0 1 2)
# Budget: 32 segments × 512 tokens, 2 epochs (override with SAMPLES / EPOCHS).
set -euo pipefail
build=${1:-build}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
q="$build/examples/cbq-quantize"
[ -x "$q" ] || { echo "build $q first"; exit 1; }
budget=(--samples "${SAMPLES:-32}" --epochs "${EPOCHS:-2}" --quiet)
w3=(--wbits 3 --group 32)
a4=(--wbits 4 --group 32 --abits 4)
rows=(
  "window|B=2, O=1 (default)|${w3[*]}"
  "window|B=1, O=0 (no cross-block)|${w3[*]} --window 1 --overlap 0"
  "window|B=2, O=0|${w3[*]} --window 2 --overlap 0"
  "window|B=3, O=1|${w3[*]} --window 3 --overlap 1"
  "rounding|full-matrix AdaRound (default)|${w3[*]}"
  "rounding|LoRA-Rounding r5 (the paper's)|${w3[*]} --rounding lora"
  "rounding|none (nearest, learned steps)|${w3[*]} --rounding nearest"
  "rounding|LoRA r5, soft forward (paper)|${w3[*]} --rounding lora --soft"
  "loss|L2 + KLD, both targets (default)|${w3[*]}"
  "loss|L2 only|${w3[*]} --no-kld"
  "loss|KLD only|${w3[*]} --no-l2"
  "loss|no homologous term|${w3[*]} --no-hom"
  "loss|homologous term only|${w3[*]} --no-fp"
  "outliers (W4A4)|none|${a4[*]}"
  "outliers (W4A4)|CFP activations|${a4[*]} --cfp"
  "outliers (W4A4)|CFP activations + weights|${a4[*]} --cfp --cfp-weights"
  "outliers (W4A4)|SmoothQuant α=0.5|${a4[*]} --smoothquant"
  "learning rates|paper preset (1e-7/1e-6/1e-4, V=0, soft)|${w3[*]} --preset paper"
)
echo "| table | variant | options | perplexity per seed (${seeds[*]}) | mean ± std | steps moved | codes changed |"
echo "|---|---|---|---|---|---|---|"
for row in "${rows[@]}"; do
  IFS='|' read -r table variant opts <<< "$row"
  ppls=()
  moved="" flips=""
  for s in "${seeds[@]}"; do
    # shellcheck disable=SC2086
    out=$("$q" --method cbq $opts "${budget[@]}" --seed "$s" 2>&1 || true)
    p=$(echo "$out" | sed -n 's/^cbq: perplexity \([0-9.]*\).*/\1/p')
    [ -n "$p" ] || p="error"
    ppls+=("$p")
    moved=$(echo "$out" | sed -n 's/^cbq: weight steps moved \([0-9.]*%\).*/\1/p')
    flips=$(echo "$out" | sed -n 's/.*; \([0-9.]*%\) of the codes differ.*/\1/p')
  done
  stats=$(printf '%s\n' "${ppls[@]}" | awk '$1!="error"{n++; s+=$1; q+=$1*$1} END{if(n){m=s/n; v=q/n-m*m; if(v<0)v=0; printf "%.4f ± %.4f", m, sqrt(v)} else print "error"}')
  echo "| $table | $variant | \`$opts\` | ${ppls[*]} | $stats | $moved | $flips |"
done
