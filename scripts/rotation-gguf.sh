#!/usr/bin/env bash
# Rotated + quantized stories260K in llama.cpp (issue 21): RTN, GPTQ and CBQ at W4 g32, each
# exported as GGUF Q4_0 (symmetric) and Q4_1 (asymmetric) without rotation and with R1 + R2
# (`cbq-quantize --rotate r1,r2`, folded into the weights: the file needs nothing at run time),
# then scored by llama-perplexity on the same text. R4 is an online op no GGUF can hold, so it is
# not part of this table (cbq-quantize refuses to export it). Not a ctest: it needs llama.cpp
# (scripts/llama-cpp.sh builds it) and takes about 2–3 minutes per cbq-quantize call.
#
# usage: scripts/rotation-gguf.sh [OUT]            (default results/rotation-gguf)
# env:   SEEDS ("0 1": calibration and rotation seed)  TYPES ("q4_0 q4_1")  METHODS (rtn,gptq,cbq)
#        TEXT_BYTES (60000: the first N bytes of tinystories_valid_200k.txt, cut at a line break)
#        THREADS (1)  BUILD (build)
# Every run's log is kept and not redone; OUT/summary.md has the table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/results/rotation-gguf}" && cd "${1:-$root/results/rotation-gguf}" && pwd)
seeds=${SEEDS:-"0 1"} types=${TYPES:-"q4_0 q4_1"} methods=${METHODS:-rtn,gptq,cbq}
threads=${THREADS:-1} bytes=${TEXT_BYTES:-60000}
quantize="$root/${BUILD:-build}/examples/cbq-quantize"
# cbq-quantize names its exports NAME-METHOD.gguf when it runs several methods, NAME.gguf for one.
file_of() { [ "${methods//,/}" = "$methods" ] && echo "$1.gguf" || echo "$1-$2.gguf"; }
[ -x "$quantize" ] || { echo "rotation-gguf: $quantize not built" >&2; exit 1; }
bin=$("$root/scripts/llama-cpp.sh")

text="$out/eval.txt"
src="$root/data/text/tinystories_valid_200k.txt"
{ head -c "$bytes" "$src"; tail -c +"$((bytes + 1))" "$src" | sed -n 1p; } > "$text"

type_args() { [ "$1" = q4_0 ] && echo "--wbits 4 --group 32 --sym" || echo "--wbits 4 --group 32"; }

for type in $types; do
  for seed in $seeds; do
    for rot in none r12; do
      name="$type-seed$seed-$rot"
      log="$out/$name.log"
      rargs=$([ "$rot" = none ] && echo "" || echo "--rotate r1,r2 --rotate-seed $seed")
      if ! { [ -f "$log" ] && grep -q '^| ' "$log"; }; then
        echo "rotation-gguf: $name"
        # shellcheck disable=SC2046,SC2086
        "$quantize" --method "$methods" --seed "$seed" $(type_args "$type") $rargs \
          --eval "$text" --ctx 512 --threads "$threads" --quiet --export gguf "$out/$name.gguf" \
          > "$log.tmp" 2>&1 || { echo "rotation-gguf: $name failed, see $log.tmp" >&2; exit 1; }
        mv "$log.tmp" "$log"
      fi
      for m in ${methods//,/ }; do
        f="$out/$(file_of "$name" "$m")"
        l="$out/lcpp-$name-$m.log"
        [ -f "$l" ] && grep -q "Final estimate" "$l" && continue
        "$bin/llama-perplexity" -m "$f" -f "$text" -c 512 -b 512 -t "$threads" \
          -ctk f32 -ctv f32 > "$l" 2>&1 || { echo "rotation-gguf: llama-perplexity failed on $f, see $l" >&2; exit 1; }
      done
    done
  done
done

{
  echo "| type | seed | rotation | method | cbq (file read back, ctx 512) | llama-perplexity -c 512 |"
  echo "|---|---|---|---|---|---|"
  for type in $types; do
    for seed in $seeds; do
      for rot in none r12; do
        name="$type-seed$seed-$rot"
        for m in ${methods//,/ }; do
          f=$(file_of "$name" "$m")
          cbq=$(grep -o "perplexity of [^ ]*$f read back [0-9.]*" "$out/$name.log" | awk '{print $NF}')
          lcpp=$(grep -o 'Final estimate: PPL = [0-9.]* +/- [0-9.]*' "$out/lcpp-$name-$m.log" | sed 's/Final estimate: PPL = //')
          echo "| $type | $seed | $([ "$rot" = none ] && echo none || echo R1+R2) | $m | ${cbq:-–} | ${lcpp:-–} |"
        done
      done
    done
  done
} > "$out/summary.md"
cat "$out/summary.md"
