#!/usr/bin/env bash
# Issue 15's SmolLM2-135M table: RTN, GPTQ and CBQ at W4 g128, W4 per-channel, W3 g128, W2 g64,
# W4A8 and W4A4 (g128 weights), and the Q4_0 (W4 g32 symmetric) GGUF exports scored by
# llama-perplexity beside llama-quantize's own Q4_0 of the same model.
#
# Data split (disjoint): wikitext2_test.txt cut at the first line break after 40 % of its bytes;
# the first part is the calibration text, the rest the evaluation text. Perplexity: cbq's GPTQ
# protocol at context 2048 on the evaluation text (EVAL_BYTES limits it for shorter runs);
# llama.cpp's scores: llama-perplexity -c 2048 on the same evaluation text.
#
# usage: scripts/smollm2-results.sh [OUT_DIR]      (default results/smollm2)
# env:   SAMPLES (32) SEQ_LEN (2048) EPOCHS (1) SEEDS ("0 1") THREADS (2)
#        SETTINGS (all: "w4g128 w4pc w3g128 w2g64 w4a8 w4a4"; none: only the GGUF exports)
#        METHODS (rtn,gptq,cbq; with several, each export's name ends in -METHOD)
#        EVAL_BYTES (0 = the whole evaluation part)  GGUF (1 = also the Q4_0 exports)
#        BUILD (build) — the folder with examples/cbq-quantize
#        ROTATIONS ("none"; also r12 = --rotate r1,r2, r124 = --rotate r1,r2,r4: docs/ROTATION.md;
#        the rotation seed is the run's seed; a rotated run's name ends in -r12 / -r124)
#        GGUF_TYPES ("q4_0"; q4_1 too) GGUF_ROTATIONS ("none"; r12 too: R4 cannot be exported)
#        REPORT (1 = each run also writes its report with charts to OUT_DIR/NAME.report)
# Each run is one cbq-quantize call (FP once, then each method), resumable: a finished run's log
# is kept and not redone. A summary table goes to OUT_DIR/summary.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/results/smollm2}" && cd "${1:-$root/results/smollm2}" && pwd)
samples=${SAMPLES:-32} seq_len=${SEQ_LEN:-2048} epochs=${EPOCHS:-1} threads=${THREADS:-2}
seeds=${SEEDS:-"0 1"} methods=${METHODS:-rtn,gptq,cbq} gguf=${GGUF:-1}
settings=${SETTINGS:-"w4g128 w4pc w3g128 w2g64 w4a8 w4a4"}
[ "$settings" = none ] && settings=""  # SETTINGS=none: only the GGUF exports
quantize="$root/${BUILD:-build}/examples/cbq-quantize"
[ -x "$quantize" ] || { echo "smollm2-results: $quantize not built" >&2; exit 1; }

model=$("$root/scripts/fetch-models.sh" --quiet | grep SmolLM2)
wikitext="${CBQ_EXTRA_DATA_DIR:-$root/../shared/data}/text/wikitext2_test.txt"
[ -f "$wikitext" ] || { echo "smollm2-results: $wikitext is missing (set CBQ_EXTRA_DATA_DIR)" >&2; exit 1; }

# The split, by bytes, at a line break.
calib="$out/calib.txt" eval="$out/eval.txt"
python3 - "$wikitext" "$calib" "$eval" "${EVAL_BYTES:-0}" << 'EOF'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
cut = text.index("\n", int(len(text) * 0.4)) + 1
ev = text[cut:]
limit = int(sys.argv[4])
if limit > 0 and len(ev) > limit:
    ev = ev[: ev.index("\n", limit) + 1]
open(sys.argv[2], "w", encoding="utf-8").write(text[:cut])
open(sys.argv[3], "w", encoding="utf-8").write(ev)
print(f"split: calibration {cut} characters, evaluation {len(ev)} characters", file=sys.stderr)
EOF

setting_args() {
  case $1 in
    w4g128) echo "--wbits 4 --group 128" ;;
    w4pc) echo "--wbits 4 --group 0" ;;
    w3g128) echo "--wbits 3 --group 128" ;;
    w2g64) echo "--wbits 2 --group 64" ;;
    w4a8) echo "--wbits 4 --group 128 --abits 8" ;;
    w4a4) echo "--wbits 4 --group 128 --abits 4" ;;
    q4_0) echo "--wbits 4 --group 32 --sym" ;;
    q4_1) echo "--wbits 4 --group 32" ;;
    *) echo "smollm2-results: unknown setting $1" >&2; exit 1 ;;
  esac
}

run() {  # NAME ARGS...
  local name=$1; shift
  local log="$out/$name.log"
  if [ -f "$log" ] && grep -q '^| ' "$log"; then echo "smollm2-results: $name done ($log)"; return; fi
  [ "${REPORT:-0}" = 1 ] && set -- "$@" --report "$out/$name.report"
  echo "smollm2-results: $name: cbq-quantize $*"
  /usr/bin/time -v "$quantize" "$model" --calib "$calib" --eval "$eval" --ctx 2048 \
    --seq-len "$seq_len" --samples "$samples" --epochs "$epochs" --threads "$threads" "$@" \
    > "$log.tmp" 2>&1 || { echo "smollm2-results: $name failed, see $log.tmp" >&2; return 1; }
  mv "$log.tmp" "$log"
}

rotation_args() {
  case $1 in
    none) echo "" ;;
    r12) echo "--rotate r1,r2 --rotate-seed $2" ;;
    r124) echo "--rotate r1,r2,r4 --rotate-seed $2" ;;
    *) echo "smollm2-results: unknown rotation $1" >&2; exit 1 ;;
  esac
}

for seed in $seeds; do
  for s in $settings; do
    for r in ${ROTATIONS:-none}; do
      suffix=$([ "$r" = none ] && echo "" || echo "-$r")
      # shellcheck disable=SC2046
      run "$s-seed$seed$suffix" --method "$methods" --seed "$seed" $(setting_args "$s") \
        $(rotation_args "$r" "$seed")
    done
  done
done

if [ "$gguf" = 1 ]; then
  bin=$("$root/scripts/llama-cpp.sh")
  seed=${seeds%% *}
  for t in ${GGUF_TYPES:-q4_0}; do
    for r in ${GGUF_ROTATIONS:-none}; do
      suffix=$([ "$r" = none ] && echo "" || echo "-$r")
      # shellcheck disable=SC2046
      run "$t-seed$seed$suffix" --method "$methods" --seed "$seed" $(setting_args "$t") \
        $(rotation_args "$r" "$seed") --export gguf "$out/smollm2-$t$suffix.gguf"
    done
  done
  [ -f "$out/llama-quantize-q4_0.gguf" ] ||
    "$bin/llama-quantize" --allow-requantize "$model" "$out/llama-quantize-q4_0.gguf" Q4_0 \
      > "$out/llama-quantize.log" 2>&1
  for f in "$out"/smollm2-q4_*.gguf "$out/llama-quantize-q4_0.gguf" "$model"; do
    name=$(basename "$f" .gguf)
    [ -f "$out/lcpp-$name.log" ] && grep -q "Final estimate" "$out/lcpp-$name.log" && continue
    "$bin/llama-perplexity" -m "$f" -f "$eval" -c 2048 -t "$threads" > "$out/lcpp-$name.log" 2>&1
  done
fi

{
  echo "| run | method | configuration | perplexity | vs FP | time | peak RSS |"
  echo "|---|---|---|---|---|---|---|"
  for log in "$out"/*.log; do
    case $(basename "$log") in lcpp-* | llama-quantize.log) continue ;; esac
    grep '^| [a-z]' "$log" | grep -v '^| method' | sed "s/^/| $(basename "$log" .log) /" || true
  done
  echo
  echo "| GGUF scored by llama-perplexity -c 2048 | perplexity |"
  echo "|---|---|"
  for log in "$out"/lcpp-*.log; do
    [ -f "$log" ] || continue
    echo "| $(basename "$log" .log | sed 's/^lcpp-//') | $(grep -o 'Final estimate: PPL = [0-9.]* +/- [0-9.]*' "$log" | sed 's/Final estimate: PPL = //') |"
  done
} > "$out/summary.md"
cat "$out/summary.md"
