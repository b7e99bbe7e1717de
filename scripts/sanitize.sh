#!/usr/bin/env bash
# Builds the doctest suite with AddressSanitizer + UndefinedBehaviorSanitizer (g++) in its own
# build folder and runs it through ctest. Any sanitizer report (memory error, leak, undefined
# behaviour) aborts the test that triggered it, so the script exits non-zero.
# Usage: scripts/sanitize.sh [BUILD_DIR]   (default build-asan; JOBS=N for build/ctest parallelism)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-asan}
jobs=${JOBS:-2}

scripts/install-deps.sh  # nothing beyond the normal build's packages: g++ ships both sanitizers

flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
# Debug keeps assertions (nlohmann::json's included) on; -O1 keeps the suite's runtime sane;
# -g1 (line tables only) keeps file:line in reports and costs less to compile than -g.
cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCBQ_ENABLE_CUDA=OFF -DCBQ_BUILD_EXAMPLES=OFF -DCBQ_BUILD_BENCHMARKS=OFF -DCBQ_INSTALL=OFF
cmake --build "$build" -j"$jobs"

# Leak checking is on by default with ASan on Linux; halt on the first report of any kind.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export OMP_WAIT_POLICY=PASSIVE
# The few long real-model tests (SmolLM2 greedy/perplexity, whole-text perplexities, a 7B-sized
# sum) run the same code as smaller tests do; under ASan at -O1 they took most of CI's time.
# They run in the normal suite. CBQ_SANITIZE_EXCLUDE="" runs everything.
exclude=${CBQ_SANITIZE_EXCLUDE-"SmolLM2 vs llama.cpp|perplexity on TinyStories valid|round-trips exactly, perplexity included|keeps counting past 2.24 terms"}
log="$build/sanitize-ctest.log"
status=0
ctest --test-dir "$build" --output-on-failure -j"$jobs" ${exclude:+-E "$exclude"} 2>&1 | tee "$log" || status=$?
# A report that a test swallowed (e.g. printed by a child process) still counts.
if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:" "$log"; then
  echo "sanitize.sh: sanitizer report found in $log"
  exit 1
fi
exit "$status"
