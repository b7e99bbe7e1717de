#!/usr/bin/env bash
# cbq's KL divergence statistics against llama.cpp's own (`llama-perplexity --kl-divergence`) on
# two GGUF files of stories260K (docs/MODELS.md, "KL divergence against llama.cpp"): its FP32
# weights (tests/reference/fp_gguf.cpp) as the base, and RTN W4 g32 exported as Q4_1 by
# cbq-quantize, converted to F32 by llama-quantize so that llama.cpp computes with the very float
# weights cbq does (its Q4_1 products quantize activations to 8 bits). Both llama.cpp runs use an
# F32 KV cache. Fails unless the mean KL, median and 99 % agree to REL_TOL (relative) and same top
# p and RMS dp to 0.05 percentage points. Not a ctest: minutes per run, and it needs llama.cpp.
#
# usage: scripts/kl-vs-llamacpp.sh [BUILD_DIR] [TEXT_BYTES]
#   BUILD_DIR   holds examples/cbq-quantize and examples/cbq-eval (default: build)
#   TEXT_BYTES  evaluate the first N bytes of tinystories_valid_200k.txt (default: all of it,
#               195 chunks of 512; 30000 bytes give 29 chunks and take a minute)
# env: REL_TOL (default 1e-3; the 8-bit activations of llama.cpp's Q4_1 products
#      alone move the mean KL by 0.4 %), THREADS (llama.cpp threads, default 1), KEEP=1 keeps the work folder
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(cd "${1:-$here/build}" && pwd)"
bytes="${2:-0}"
tol="${REL_TOL:-1e-3}"
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

echo "== the two GGUF files" >&2
g++ -O2 -std=c++20 -I"$here/include" "$here/tests/reference/fp_gguf.cpp" -o "$work/fp_gguf" \
  -lfmt -lopenblas
"$work/fp_gguf" "$data/models/stories260K.bin" "$data/models/tok512.bin" "$work/fp32.gguf"
"$build/examples/cbq-quantize" --method rtn --wbits 4 --group 32 --samples 1 --no-kl-eval \
  --eval "$text" --export gguf "$work/q4_1.gguf" --quiet > "$work/quantize.log"
"$bin/llama-quantize" --allow-requantize "$work/q4_1.gguf" "$work/q-f32.gguf" F32 \
  > "$work/requantize.log" 2>&1

echo "== llama.cpp (F32 weights, F32 KV cache, $threads thread(s))" >&2
common=(-f "$text" -c 512 -b 512 -t "$threads" -ctk f32 -ctv f32 --kl-divergence-base "$work/base.kld")
"$bin/llama-perplexity" -m "$work/fp32.gguf" "${common[@]}" > "$work/lcpp-base.log" 2>&1
"$bin/llama-perplexity" -m "$work/q-f32.gguf" "${common[@]}" --kl-divergence > "$work/lcpp.log" 2>&1

echo "== cbq-eval" >&2
"$build/examples/cbq-eval" "$work/q4_1.gguf" --kl-base "$work/fp32.gguf" --text "$text" --ctx 512 \
  > "$work/cbq.log"

# llama.cpp: "Mean    KLD:   0.090300 ±   0.000654", "RMS Δp    : 10.865 ± 0.078 %"
lc() { grep -m1 "^$1" "$work/lcpp.log" | sed -E 's/^[^:]*:[[:space:]]*([-0-9.]+).*/\1/'; }
# cbq: "Mean KLD 0.090299 ± ...  Maximum ... 99.0% 0.652899 ... Median 0.051041 ..."
cb() { grep -m1 -oE "$1 [-0-9.]+" "$work/cbq.log" | awk '{print $NF}'; }
printf '%-12s %12s %12s\n' statistic llama.cpp cbq
status=0
check() {  # name, llama.cpp value, cbq value, tolerance kind (rel|pp)
  printf '%-12s %12s %12s\n' "$1" "$2" "$3"
  awk -v a="$2" -v b="$3" -v kind="$4" -v tol="$tol" 'BEGIN {
    d = a - b; if (d < 0) d = -d
    ok = (kind == "rel") ? (d <= tol * (a < 0 ? -a : a) + 1e-6) : (d <= 0.05)
    exit !(ok && a == a && b == b) }' || { echo "  differs: $1" >&2; status=1; }
}
check "mean KLD" "$(lc 'Mean    KLD')" "$(cb 'Mean KLD')" rel
check "median KLD" "$(lc 'Median  KLD')" "$(cb 'Median')" rel
check "99% KLD" "$(lc '99.0%   KLD')" "$(cb '99.0%')" rel
check "same top p" "$(lc 'Same top p')" "$(cb 'Same top p')" pp
check "RMS dp" "$(lc 'RMS Δp')" "$(cb 'RMS dp')" pp
if [[ $status == 0 ]]; then
  echo "cbq's KL statistics agree with llama.cpp's ($(grep -m1 -oE '[0-9]+ positions' "$work/cbq.log"), relative tolerance $tol)"
else
  echo "cbq's KL statistics differ from llama.cpp's; logs in $work" >&2
  trap - EXIT
fi
exit $status
