#!/usr/bin/env bash
# Builds every libFuzzer target in fuzz/ (clang, -fsanitize=fuzzer,address,undefined) and runs
# each one in turn for SECONDS, starting from the committed seeds in fuzz/corpus/<target>/.
# Exits non-zero if any target finds a crash, sanitizer report, leak, timeout or out-of-memory;
# the input that triggered it is saved under BUILD_DIR/artifacts/<target>/.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]     (default 600 s per target, all targets;
#        TARGET is a name such as llama2c or hf_tokenizer)
# Environment: FUZZ_BUILD_DIR (default build-fuzz), RSS_LIMIT_MB (2048), TIMEOUT_S (10: one
# input may take at most this long), CXX_FUZZ (clang++).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds=${1:-600}
shift || true
build=${FUZZ_BUILD_DIR:-build-fuzz}
rss_limit=${RSS_LIMIT_MB:-2048}
timeout_s=${TIMEOUT_S:-10}
cxx=${CXX_FUZZ:-clang++}
mkdir -p "$build"

# ---- toolchain: the project's packages, then clang with the libFuzzer runtime ----
scripts/install-deps.sh
probe() {
  echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
    "$cxx" -x c++ - -fsanitize=fuzzer,address,undefined -o "$build/.probe" >/dev/null 2>&1
}
if ! command -v "$cxx" >/dev/null || ! probe; then
  # Debian 12: the clang package only recommends the compiler-rt runtimes; libclang-rt-dev
  # (libclang-rt-14-dev) holds libclang_rt.fuzzer and the sanitizer runtimes.
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    clang libclang-rt-dev
  probe || { echo "fuzz.sh: $cxx cannot build -fsanitize=fuzzer programs"; exit 1; }
fi

# ---- build ----
all_targets=()
for src in fuzz/fuzz_*.cpp; do
  name=$(basename "$src" .cpp)
  all_targets+=("${name#fuzz_}")
done
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")
# shellcheck disable=SC2054  # the commas belong to -fsanitize=
flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=all -Iinclude -DCBQ_SOURCE_DIR="\"$root\"")
build_start=$SECONDS
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_$t.cpp" ] || { echo "fuzz.sh: no target fuzz/fuzz_$t.cpp"; exit 2; }
  echo "== building fuzz_$t"
  "$cxx" "${flags[@]}" "fuzz/fuzz_$t.cpp" -o "$build/fuzz_$t" -lfmt -lpthread
done
echo "== built ${#targets[@]} targets in $((SECONDS - build_start)) s"

# ---- run, one target at a time ----
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
summary="$build/summary.txt"
printf "%-20s %8s %12s %14s %s\n" target seconds executions corpus result | tee "$summary"
failed=0
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t"  # grows across runs; the committed seeds are read alongside
  artifacts="$build/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  seeds=()
  [ -d "fuzz/corpus/$t" ] && seeds=("fuzz/corpus/$t")
  dict=()
  [ -f "fuzz/$t.dict" ] && dict=(-dict="fuzz/$t.dict")
  case $t in safetensors*|hf_*) dict=(-dict=fuzz/json.dict) ;; esac
  log="$build/fuzz_$t.log"
  start=$SECONDS
  status=0
  "$build/fuzz_$t" -max_total_time="$seconds" -rss_limit_mb="$rss_limit" -timeout="$timeout_s" \
    -print_final_stats=1 -artifact_prefix="$artifacts" "${dict[@]}" "$corpus" "${seeds[@]}" \
    >"$log" 2>&1 || status=$?
  elapsed=$((SECONDS - start))
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}' | tail -1)
  files=$(find "$corpus" -type f | wc -l)
  bytes=$(du -sb "$corpus" | cut -f1)
  result=ok
  if [ "$status" -ne 0 ]; then
    result="FAILED (exit $status, see $log)"
    failed=1
    grep -E "^(==[0-9]+==ERROR|SUMMARY|.*runtime error:|FUZZ_CHECK|.*Test unit written)" "$log" |
      head -5 || true
  fi
  printf "%-20s %8s %12s %14s %s\n" "$t" "$elapsed" "${execs:-?}" "$files/${bytes}B" "$result" |
    tee -a "$summary"
done
exit "$failed"
