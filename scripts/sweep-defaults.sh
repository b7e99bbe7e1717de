#!/usr/bin/env bash
# Sweep for CBQ's defaults across models, settings and seeds (issue 18, item 2): RTN, GPTQ and
# candidate CBQ configurations, each run at `nice -n 19` on one thread, resumable (a run whose log
# already has its perplexity is not repeated), then mean ± std tables of perplexity and of the KL
# divergence from the FP model (the line cbq-quantize prints per method) in OUT/tables.md. Every
# run also writes a report (cbq-quantize --report) into OUT/reports/RUN/.
#
#   scripts/sweep-defaults.sh BUILD OUT
#
# Environment (all optional):
#   MODELS      stories260K aidreams260K            (names below; SmolLM2 needs cbq's tokenizer)
#   SETTINGS    w4g32 w4pc w3g32 w2g32 w4a8 w4a4    (wBgG | wBpc | w4aA; g64, g128 too)
#   SEEDS       0 1
#   CANDIDATES  classic default                     (names in the table below)
#   ROTATIONS   none                                (none, r12 = R1+R2, r124 = R1+R2+R4 with the
#               random orthogonal kernel where a size has no Hadamard matrix, r124fit = r124 with
#               the fitted online transforms; rotation seed = the run's seed; docs/ROTATION.md)
#   SAMPLES     calibration segments (default: cbq-quantize's 128)
#   EPOCHS      epochs per window (default: cbq-quantize's 3)
#   EVAL_BYTES  evaluate on the first N bytes of the evaluation text, cut at a line break
#               (default: all of tinystories_valid_200k.txt)
#   JOBS        runs at once (default 1)
#   NICE        nice level (default 19)
#   TABLES_ONLY 1: run nothing, only write OUT/tables.md from the logs already there
#
# Candidates (CBQ options; the baselines run once per model × setting × seed):
#   classic        the defaults before issue 18 (unscaled loss, every window keeps its training)
#   default        the current defaults (cbq-quantize's: GPTQ start since the issue-18 sweep,
#                  full-matrix rounding since 2026-12-06: logs made before that are LoRA r5)
#   rtn            the current defaults with the RTN start (--init rtn; the default before)
#   window         loss relative to the window's target energy
#   nokeep         current defaults without the held-out start-vs-trained rule
#   nokld          current defaults without the KL terms (L2 only)
#   absolute       current defaults with the paper's unscaled loss terms
#   full           full-matrix AdaRound rounding (the default since 2026-12-06)
#   lora           LoRA-Rounding r5 (the default before 2026-12-06)
#   full-okld      full-matrix rounding and the output KL (weight 1) in the last window
#   gptq           GPTQ start (fixed grid)
#   gptq-full      GPTQ start, full-matrix rounding
#   gptq-learned   GPTQ start with the learned grid (the behaviour before the fix)
#   gamma-X        --gamma X (e.g. gamma-0.1)
#   lrstep-X, lrround-X, epochs-X, rank-X
# ACBQ (docs/ACBQ.md) and its ablations; a candidate may join several with '+' (acbq+lam-10):
#   acbq           cbq-quantize --method acbq (sub-block units, adaptive groups ≤ 2, overlap 1,
#                  windows ≥ 4 units, half-block windows ¾ of the steps, λ = 0)
#   lam-X          --attention-kl X (the attention-map weight; 0 = off)
#   hom            --attention-kl-homologous (match FP weights' maps on the quantized input)
#   bnd-X          --boundary-loss X (the frozen units' output in the window's loss; 0 = off)
#   span-N         --min-window N (adaptive windows extended to at least N units)
#   hsteps-F       --half-block-steps F (a window freezing half a block trains F of the steps)
#   ov-N           --group-overlap N (adaptive: each window a group and the N after it)
#   dep-entropy    --dependency entropy (dep-error: error-gain)
#   h-X, max-N     --group-threshold X, --max-group N
#   sub            --units sub-block (cbq's sliding window over halves)
#   adaptive       --schedule adaptive (cbq over whole blocks in adaptive groups)
#   win-W-O        --window W --overlap O
set -euo pipefail

BUILD=${1:?usage: sweep-defaults.sh BUILD OUT}
OUT=${2:?usage: sweep-defaults.sh BUILD OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOL="$BUILD/examples/cbq-quantize"
[[ -x "$TOOL" ]] || { echo "sweep-defaults: $TOOL not built" >&2; exit 2; }
MODELS=${MODELS:-"stories260K aidreams260K"}
SETTINGS=${SETTINGS:-"w4g32 w4pc w3g32 w2g32 w4a8 w4a4"}
SEEDS=${SEEDS:-"0 1"}
CANDIDATES=${CANDIDATES:-"classic default"}
ROTATIONS=${ROTATIONS:-none}
JOBS=${JOBS:-1}
NICE=${NICE:-19}
EXTRA_DATA=${CBQ_EXTRA_DATA_DIR:-$ROOT/../shared/data}
mkdir -p "$OUT/logs" "$OUT/reports"
EVAL="$ROOT/data/text/tinystories_valid_200k.txt"
if [[ -n ${EVAL_BYTES:-} ]]; then
  # The first EVAL_BYTES bytes and the rest of that line.
  # (sed reads to the end: `head -n 1` would end the pipe early, which pipefail counts as failure)
  { head -c "$EVAL_BYTES" "$EVAL"; tail -c +"$((EVAL_BYTES + 1))" "$EVAL" | sed -n 1p; } > "$OUT/eval.txt"
  EVAL="$OUT/eval.txt"
fi

model_args() {
  case "$1" in
    stories260K) echo "$ROOT/data/models/stories260K.bin --tokenizer $ROOT/data/models/tok512.bin" ;;
    aidreams260K)
      # Trained on text that is not public: calibrated and evaluated on TinyStories.
      echo "$EXTRA_DATA/models/aidreams260K.bin --tokenizer $EXTRA_DATA/models/aidreams_tok512.bin" ;;
    *) echo "sweep-defaults: unknown model $1" >&2; exit 2 ;;
  esac
}
setting_args() {
  local s=$1 bits group abits=16
  if [[ $s =~ ^w([0-9])a([0-9]+)$ ]]; then
    bits=${BASH_REMATCH[1]}; abits=${BASH_REMATCH[2]}; group=32
  elif [[ $s =~ ^w([0-9])pc$ ]]; then
    bits=${BASH_REMATCH[1]}; group=0
  elif [[ $s =~ ^w([0-9])g([0-9]+)$ ]]; then
    bits=${BASH_REMATCH[1]}; group=${BASH_REMATCH[2]}
  else
    echo "sweep-defaults: unknown setting $s" >&2; exit 2
  fi
  echo "--wbits $bits --group $group --abits $abits"
}
candidate_args() {
  if [[ $1 == *+* ]]; then
    local part out=""
    for part in ${1//+/ }; do out+=" $(candidate_args "$part")"; done
    echo "$out"
    return
  fi
  case "$1" in
    lam-*) echo "--attention-kl ${1#lam-}" ;;
    hom) echo "--attention-kl-homologous" ;;
    bnd-*) echo "--boundary-loss ${1#bnd-}" ;;
    span-*) echo "--min-window ${1#span-}" ;;
    hsteps-*) echo "--half-block-steps ${1#hsteps-}" ;;
    dep-entropy) echo "--dependency entropy" ;;
    dep-error) echo "--dependency error-gain" ;;
    h-*) echo "--group-threshold ${1#h-}" ;;
    max-*) echo "--max-group ${1#max-}" ;;
    ov-*) echo "--group-overlap ${1#ov-}" ;;
    sub) echo "--units sub-block" ;;
    adaptive) echo "--schedule adaptive" ;;
    win-*-*) local wo=${1#win-}; echo "--window ${wo%-*} --overlap ${wo#*-}" ;;
    classic) echo "--preset classic" ;;
    default|acbq) echo "" ;;
    rtn) echo "--init rtn" ;;
    window) echo "--loss-scale window" ;;
    nokeep) echo "--no-keep-better" ;;
    nokld) echo "--no-kld" ;;
    absolute) echo "--loss-scale absolute" ;;
    full) echo "--rounding full" ;;
    lora) echo "--rounding lora" ;;
    full-okld) echo "--rounding full --output-kld 1" ;;
    gptq) echo "--init gptq" ;;
    gptq-full) echo "--init gptq --rounding full" ;;
    gptq-learned) echo "--init gptq --grid learned" ;;
    gamma-*) echo "--gamma ${1#gamma-}" ;;
    lrstep-*) echo "--lr-step ${1#lrstep-}" ;;
    lrround-*) echo "--lr-round ${1#lrround-}" ;;
    epochs-*) echo "--epochs ${1#epochs-}" ;;
    rank-*) echo "--rounding lora --rank ${1#rank-}" ;;
    *) echo "sweep-defaults: unknown candidate $1" >&2; exit 2 ;;
  esac
}
rotation_args() {
  case "$1" in
    none) echo "" ;;
    r12) echo "--rotate r1,r2 --rotate-seed $2" ;;
    r124) echo "--rotate r1,r2,r4 --rotate-fallback --rotate-seed $2" ;;
    r4) echo "--rotate r4 --rotate-fallback --rotate-seed $2" ;;
    r124fit) echo "--rotate r1,r2,r4 --rotate-fallback --fit-online down,mlp --rotate-seed $2" ;;
    *) echo "sweep-defaults: unknown rotation $1" >&2; exit 2 ;;
  esac
}
# The method a candidate runs: acbq for acbq candidates, cbq otherwise.
cand_method() { [[ $1 == acbq || $1 == acbq+* ]] && echo acbq || echo cbq; }
# A run's name: the rotation appears only when there is one (older logs keep their names).
run_name() { [[ $3 == none ]] && echo "$1.$2" || echo "$1.$2.$3"; }
budget_args() {
  local a=""
  [[ -n ${SAMPLES:-} ]] && a+=" --samples $SAMPLES"
  [[ -n ${EPOCHS:-} ]] && a+=" --epochs $EPOCHS"
  echo "$a --eval $EVAL"
}

# One run: METHODS (rtn,gptq or cbq) into LOG unless LOG already holds its perplexities.
run() {
  local log=$1 methods=$2; shift 2
  if [[ -f $log ]] && grep -q "^| ${methods##*,} |" "$log"; then return 0; fi
  echo "sweep: $(basename "$log")"
  local report="$OUT/reports/$(basename "$log" .log)"
  # shellcheck disable=SC2086
  nice -n "$NICE" "$TOOL" "$@" --method "$methods" --threads 1 --quiet --report "$report" \
    > "$log.tmp" 2>&1 \
    && mv "$log.tmp" "$log" || { echo "sweep: FAILED $log (see $log.tmp)" >&2; }
}

jobs_list=()
for model in $MODELS; do
  for setting in $SETTINGS; do
    for rot in $ROTATIONS; do
      name=$(run_name "$model" "$setting" "$rot")
      for seed in $SEEDS; do
        base="$(model_args "$model") $(setting_args "$setting") --seed $seed$(budget_args)"
        base+=" $(rotation_args "$rot" "$seed")"
        jobs_list+=("$OUT/logs/$name.$seed.baselines.log|rtn,gptq|$base")
        for cand in $CANDIDATES; do
          jobs_list+=("$OUT/logs/$name.$seed.$cand.log|$(cand_method "$cand")|$base $(candidate_args "$cand")")
        done
      done
    done
  done
done

running=0
[[ ${TABLES_ONLY:-0} == 1 ]] && jobs_list=()  # only rebuild OUT/tables.md from the logs there
for job in "${jobs_list[@]}"; do
  IFS='|' read -r log methods args <<< "$job"
  # shellcheck disable=SC2086
  run "$log" "$methods" $args &
  running=$((running + 1))
  if (( running >= JOBS )); then wait -n || true; running=$((running - 1)); fi
done
wait

# Tables: perplexity of METHOD in LOG ("| method | config | perplexity | ...").
ppl() { awk -F'|' -v m=" $2 " '$2 == m { gsub(/ /, "", $4); print $4 }' "$1" 2>/dev/null | head -1; }
# Mean KL divergence from FP of METHOD in LOG ("METHOD: KL divergence from FP X ± …").
kl() { sed -n "s/^$2: KL divergence from FP \([0-9.e+-]*\).*/\1/p" "$1" 2>/dev/null | head -1; }
# mean ± sample std (n) of the numbers on stdin, in printf format ${1:-%.4f}.
stats() { awk -v f="${1:-%.4f}" '{ s += $1; q += $1 * $1; n++ } END { if (n == 0) { print "—"; exit }
  m = s / n; v = n > 1 ? (q - n * m * m) / (n - 1) : 0; if (v < 0) v = 0;
  printf f " ± " f " (n=%d)", m, sqrt(v), n }'; }
mean() { awk '{ s += $1; n++ } END { if (n) printf "%.6f", s / n }'; }
{
  echo "# Sweep of CBQ defaults"
  echo
  echo "Generated by \`scripts/sweep-defaults.sh\` at $(date -u +%FT%TZ), commit $(git -C "$ROOT" rev-parse --short HEAD)."
  echo "MODELS='$MODELS' SETTINGS='$SETTINGS' SEEDS='$SEEDS' CANDIDATES='$CANDIDATES'" \
       "ROTATIONS='$ROTATIONS' SAMPLES='${SAMPLES:-128}' EPOCHS='${EPOCHS:-3}' EVAL_BYTES='${EVAL_BYTES:-all}';" \
       "each run 1 thread at nice $NICE."
  echo "Perplexity mean ± std over seeds; \"closer\" = 1 − (CBQ − FP)/(GPTQ − FP) of the means."
  for model in $MODELS; do
    echo
    echo "## $model"
    echo
    header="| setting | FP | RTN | GPTQ |"; sep="|---|---|---|---|"
    for cand in $CANDIDATES; do header+=" cbq $cand | closer |"; sep+="---|---|"; done
    echo "$header"; echo "$sep"
    for setting in $SETTINGS; do for rot in $ROTATIONS; do
      name=$(run_name "$model" "$setting" "$rot")
      label=$([[ $rot == none ]] && echo "$setting" || echo "$setting $rot")
      fp=$(for s in $SEEDS; do ppl "$OUT/logs/$name.$s.baselines.log" fp32; done | mean)
      rtn=$(for s in $SEEDS; do ppl "$OUT/logs/$name.$s.baselines.log" rtn; done | stats)
      gptq_vals=$(for s in $SEEDS; do ppl "$OUT/logs/$name.$s.baselines.log" gptq; done)
      gptq=$(echo "$gptq_vals" | sed '/^$/d' | stats)
      gmean=$(echo "$gptq_vals" | sed '/^$/d' | mean)
      row="| $label | ${fp:-—} | $rtn | $gptq |"
      for cand in $CANDIDATES; do
        vals=$(for s in $SEEDS; do ppl "$OUT/logs/$name.$s.$cand.log" "$(cand_method "$cand")"; done | sed '/^$/d')
        cmean=$(echo "$vals" | mean)
        closer=$(awk -v f="$fp" -v g="$gmean" -v c="$cmean" 'BEGIN {
          if (f == "" || g == "" || c == "" || g == f) print "—"; else printf "%+.0f%%", 100 * (1 - (c - f) / (g - f)) }')
        row+=" $(echo "$vals" | stats) | $closer |"
      done
      echo "$row"
    done; done
    echo
    echo "KL divergence of the next-token distribution from FP's (nats per token, llama.cpp's protocol;"
    echo "mean ± std over seeds); \"closer\" = 1 − KL(CBQ)/KL(GPTQ) of the means."
    echo
    header="| setting | RTN | GPTQ |"; sep="|---|---|---|"
    for cand in $CANDIDATES; do header+=" cbq $cand | closer |"; sep+="---|---|"; done
    echo "$header"; echo "$sep"
    for setting in $SETTINGS; do for rot in $ROTATIONS; do
      name=$(run_name "$model" "$setting" "$rot")
      label=$([[ $rot == none ]] && echo "$setting" || echo "$setting $rot")
      rtn=$(for s in $SEEDS; do kl "$OUT/logs/$name.$s.baselines.log" rtn; done | sed '/^$/d' | stats %.5f)
      gptq_vals=$(for s in $SEEDS; do kl "$OUT/logs/$name.$s.baselines.log" gptq; done | sed '/^$/d')
      gmean=$(echo "$gptq_vals" | mean)
      row="| $label | $rtn | $(echo "$gptq_vals" | stats %.5f) |"
      for cand in $CANDIDATES; do
        vals=$(for s in $SEEDS; do kl "$OUT/logs/$name.$s.$cand.log" "$(cand_method "$cand")"; done | sed '/^$/d')
        cmean=$(echo "$vals" | mean)
        closer=$(awk -v g="$gmean" -v c="$cmean" 'BEGIN {
          if (g == "" || c == "" || g == 0) print "—"; else printf "%+.0f%%", 100 * (1 - c / g) }')
        row+=" $(echo "$vals" | stats %.5f) | $closer |"
      done
      echo "$row"
    done; done
  done
} > "$OUT/tables.md"
echo "sweep: wrote $OUT/tables.md"
