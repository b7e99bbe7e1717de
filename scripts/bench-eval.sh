#!/usr/bin/env bash
# Perplexity throughput of cbq against llama.cpp's llama-perplexity, side by side: the same model
# as an F32 GGUF file, the same token ids (llama-tokenize's, so both engines score the same
# tokens), the same context, chunks and thread count, runs alternating cbq / llama.cpp, medians.
#
#   SmolLM2-135M-Instruct at context 2048 on the start of WikiText-2 test (llama.cpp protocol)
#   stories260K           at context 512  on TinyStories validation text
# plus cbq-eval's own tokens/s lines (both protocols, cbq's tokenizer).
#
# usage: scripts/bench-eval.sh
# env:   BUILD          cbq build folder (default: build; eval_throughput and cbq-eval are built)
#        THREADS        threads for both engines (default 2)
#        ROUNDS         alternating rounds per model (default 3; medians are printed)
#        SMOL_CHUNKS    2048-token chunks of SmolLM2 per run (default 4)
#        TINY_CHUNKS    512-token chunks of stories260K per run (default 40)
# Needs: scripts/llama-cpp.sh (native llama.cpp build), scripts/fetch-models.sh (SmolLM2 GGUF),
#        the text ../shared/data/text/wikitext2_test.txt (CBQ_EXTRA_DATA_DIR; TinyStories otherwise).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD:-$root/build}"
threads="${THREADS:-2}"
rounds="${ROUNDS:-3}"
smol_chunks="${SMOL_CHUNKS:-4}"
tiny_chunks="${TINY_CHUNKS:-40}"
extra="${CBQ_EXTRA_DATA_DIR:-$root/../shared/data}"
cache="${CBQ_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cbq/models}"
work="$(mktemp -d "${TMPDIR:-/tmp}/cbq-bench-eval.XXXXXX")"
trap 'rm -rf "$work"' EXIT

say() { echo "bench-eval: $*" >&2; }

cmake --build "$build" --target eval_throughput cbq-eval -j2 >&2
llama_bin="$("$root/scripts/llama-cpp.sh")"
cbq_bench="$build/bench/eval_throughput"

# ---- models and token ids ----
smol_q41="$("$root/scripts/fetch-models.sh" --quiet | grep SmolLM2)"
smol_f32="$cache/SmolLM2-135M-Instruct.F32.gguf"
if [[ ! -f "$smol_f32" ]]; then
  say "converting $smol_q41 to F32 with llama-quantize (the weights dequantized once)"
  "$llama_bin/llama-quantize" --allow-requantize "$smol_q41" "$smol_f32.tmp" F32 >"$work/quantize.log" 2>&1
  mv "$smol_f32.tmp" "$smol_f32"
fi
tiny_f32="$work/stories260K-f32.gguf"
"$cbq_bench" "$root/data/models/stories260K.bin" --tokenizer "$root/data/models/tok512.bin" \
  --export-gguf "$tiny_f32" >&2

if [[ -f "$extra/text/wikitext2_test.txt" ]]; then
  head -c 120000 "$extra/text/wikitext2_test.txt" >"$work/smol.txt"
  smol_text_name="the first 120,000 characters of WikiText-2 test"
else
  head -c 120000 "$root/data/text/tinystories_valid_200k.txt" >"$work/smol.txt"
  smol_text_name="the first 120,000 characters of TinyStories validation (WikiText-2 not found)"
fi
head -c 100000 "$root/data/text/tinystories_valid_200k.txt" >"$work/tiny.txt"
tokenize() {  # model text out
  "$llama_bin/llama-tokenize" -m "$1" -f "$2" --ids --log-disable >"$3" 2>/dev/null
}
tokenize "$smol_f32" "$work/smol.txt" "$work/smol.ids"
tokenize "$tiny_f32" "$work/tiny.txt" "$work/tiny.ids"

# ---- one run of each engine ----
# llama.cpp replaces each chunk's first token by BOS only when the GGUF says add_bos_token; cbq is
# told the same (--bos ID, or nothing to keep the first token).
llama_run() {  # model text ctx chunks -> "tokens_per_second perplexity"
  "$llama_bin/llama-perplexity" -m "$1" -f "$2" -c "$3" --chunks "$4" -t "$threads" \
    >"$work/llama.log" 2>&1 || { cat "$work/llama.log" >&2; exit 1; }
  local tps ppl
  tps=$(grep "prompt eval time" "$work/llama.log" | sed -E 's/.*, *([0-9.]+) tokens per second.*/\1/')
  ppl=$(grep "Final estimate" "$work/llama.log" | sed -E 's/.*PPL = ([0-9.]+).*/\1/')
  echo "$tps $ppl"
}
cbq_run() {  # model ids ctx chunks bos-args... -> "tokens_per_second perplexity"
  local model="$1" ids="$2" ctx="$3" chunks="$4"
  shift 4
  "$cbq_bench" "$model" --ids "$ids" --ctx "$ctx" --chunks "$chunks" --threads "$threads" "$@" \
    >"$work/cbq.log" 2>&1 || { cat "$work/cbq.log" >&2; exit 1; }
  sed -nE 's/^tokens_per_second=([0-9.]+) perplexity=([0-9.]+)$/\1 \2/p' "$work/cbq.log"
}
median() { sort -g | awk '{v[NR]=$1} END{print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

compare() {  # name model text ids ctx chunks bos-args...
  local name="$1" model="$2" text="$3" ids="$4" ctx="$5" chunks="$6"
  shift 6
  local cbq_tps=() llama_tps=() cbq_ppl="" llama_ppl="" r out
  for ((r = 1; r <= rounds; r++)); do
    out=$(cbq_run "$model" "$ids" "$ctx" "$chunks" "$@")
    cbq_tps+=("${out% *}")
    cbq_ppl="${out#* }"
    out=$(llama_run "$model" "$text" "$ctx" "$chunks")
    llama_tps+=("${out% *}")
    llama_ppl="${out#* }"
    say "$name round $r: cbq ${cbq_tps[-1]} tokens/s, llama.cpp ${llama_tps[-1]} tokens/s"
  done
  local c l
  c=$(printf '%s\n' "${cbq_tps[@]}" | median)
  l=$(printf '%s\n' "${llama_tps[@]}" | median)
  printf '| %s | %s × %s | %.1f | %.1f | %.2f | %.4f | %s |\n' "$name" "$chunks" "$ctx" "$c" "$l" \
    "$(echo "$c / $l" | bc -l)" "$cbq_ppl" "$llama_ppl"
  echo "  (cbq runs: ${cbq_tps[*]}; llama.cpp runs: ${llama_tps[*]})"
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "## cbq vs llama.cpp perplexity throughput (F32, $threads threads)"
echo
echo "| model | chunks × context | cbq tokens/s | llama.cpp tokens/s | cbq / llama.cpp | cbq PPL | llama.cpp PPL |"
echo "|---|---|---|---|---|---|---|"
compare "SmolLM2-135M-Instruct" "$smol_f32" "$work/smol.txt" "$work/smol.ids" 2048 "$smol_chunks"
compare "stories260K" "$tiny_f32" "$work/tiny.txt" "$work/tiny.ids" 512 "$tiny_chunks" --bos 1
echo
echo "cbq-eval (cbq's tokenizer, both protocols, $threads threads is the tool's default on this machine):"
"$build/examples/cbq-eval" 2>&1 | grep -E "perplexity|text:" | sed 's/^/  stories260K: /'
if "$build/examples/cbq-eval" "$smol_q41" --text "$work/smol.txt" --ctx 2048 >"$work/eval.log" 2>&1 &&
  grep -q "perplexity (" "$work/eval.log"; then
  grep -E "perplexity|text:" "$work/eval.log" | sed 's/^/  SmolLM2: /'
else
  echo "  SmolLM2: $(grep -m1 -E 'tokenizer|error' "$work/eval.log" || echo 'cbq-eval failed')"
fi
echo
echo "Conditions:"
echo "  text: SmolLM2 on $smol_text_name; stories260K on the first 100,000 characters of TinyStories validation"
echo "  CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ') model $(grep -m1 '^model' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), $(nproc) CPUs"
echo "  cbq: $(grep -m1 '^threads' "$work/cbq.log"); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "  llama.cpp: $(grep -m1 'system_info' "$work/llama.log" | sed 's/.*system_info: //')"
echo "  llama.cpp build: $llama_bin (scripts/llama-cpp.sh: GGML_NATIVE=ON, Release, OpenMP)"
echo "  load average before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)"
