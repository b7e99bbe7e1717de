#!/usr/bin/env bash
# The offline rotations (model/rotation.hpp: RMSNorms folded, R1, R2) need nothing at run time:
# llama.cpp runs the rotated model's plain GGUF unchanged (docs/ROTATION.md). This script writes
# stories260K's FP32 GGUF unrotated and rotated (tests/reference/rotated_gguf.cpp, one seed per
# argument), quantizes each with llama-quantize (round-to-nearest Q4_0 and Q4_1, F32 kept as is)
# and scores every file with llama-perplexity (F32 KV cache). Not a ctest: it needs llama.cpp.
# The token embedding and the output matrix are Q8_0 in every quantized file: the rotation unties
# stories260K's head, and llama-quantize's defaults would otherwise keep the tied matrix at Q8_0
# (as the output) but put the untied embedding at Q4_0, which is not the same recipe.
#
# usage: scripts/rotation-llamacpp.sh [TEXT_BYTES] [SEED...]
#   TEXT_BYTES  the first N bytes of data/text/tinystories_valid_200k.txt (default 60000; 0: all)
#   SEED        rotation seeds (default 0 1)
# env: THREADS (llama.cpp threads, default 1), KEEP=1 keeps the work folder
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bytes="${1:-60000}"
shift || true
seeds=("$@")
[[ $# -eq 0 ]] && seeds=(0 1)
threads="${THREADS:-1}"
data="$here/data"
bin="$("$here/scripts/llama-cpp.sh")"
work=$(mktemp -d)
[[ "${KEEP:-0}" == 1 ]] && echo "work folder: $work" || trap 'rm -rf "$work"' EXIT

text="$data/text/tinystories_valid_200k.txt"
if [[ "$bytes" -gt 0 ]]; then
  head -c "$bytes" "$text" > "$work/text.txt"
  text="$work/text.txt"
fi

g++ -O2 -std=c++20 -I"$here/include" "$here/tests/reference/rotated_gguf.cpp" \
  -o "$work/rotated_gguf" -lfmt -lopenblas
variants=(none "${seeds[@]}")
for v in "${variants[@]}"; do
  "$work/rotated_gguf" "$data/models/stories260K.bin" "$data/models/tok512.bin" \
    "$work/$v-F32.gguf" "$v" >&2
  for q in Q4_0 Q4_1; do
    "$bin/llama-quantize" --token-embedding-type q8_0 --output-tensor-type q8_0 \
      "$work/$v-F32.gguf" "$work/$v-$q.gguf" "$q" > "$work/$v-$q.log" 2>&1
  done
done

printf '%-10s %-6s %s\n' rotation type "llama-perplexity PPL"
for v in "${variants[@]}"; do
  for q in F32 Q4_0 Q4_1; do
    "$bin/llama-perplexity" -m "$work/$v-$q.gguf" -f "$text" -c 512 -b 512 -t "$threads" \
      -ctk f32 -ctv f32 > "$work/ppl-$v-$q.log" 2>&1
    ppl=$(grep -m1 -oE 'Final estimate: PPL = [0-9.]+ \+/- [0-9.]+' "$work/ppl-$v-$q.log" |
      sed 's/Final estimate: PPL = //')
    label=$([[ $v == none ]] && echo none || echo "seed $v")
    printf '%-10s %-6s %s\n' "$label" "$q" "${ppl:-FAILED (see $work/ppl-$v-$q.log)}"
  done
done
