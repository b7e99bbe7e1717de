#!/usr/bin/env bash
# The first-GPU-run check of cbq's CUDA backend, as one command on a fresh H100/H200 machine:
#
#   scripts/gpu-check.sh                 # on the GPU machine: everything, about 8 minutes
#   scripts/gpu-check.sh --build-only    # anywhere with nvcc (alias --dry-run): the build alone
#   scripts/gpu-check.sh --fetch-deps    # here (Debian, registry reachable): .gpu-deps/ to carry
#   scripts/gpu-check.sh --skip-driver   # every step without the driver check: tests the flow
#
# Steps (each logged, timed and bounded by its own timeout inside a global deadline):
#   driver      nvidia-smi, then a probe compiled with nvcc: cudaDriverGetVersion against the
#               runtime, the device count, name, compute capability (9.x for the sm_90 build),
#               SMs, memory, shared memory per block. Stops the script when it fails.
#   configure   CMake (Ninja when present) for -DCMAKE_CUDA_ARCHITECTURES=90, Release, no
#               examples, no install; the CPU doctest suite is configured but not built.
#   build       only the GPU test programs (tests/gpu/test_*.cu) and the CUDA benchmarks
#               (bench/cuda/bench_*.cu), on every core.
#   tests       ctest -L gpu with CBQ_REQUIRE_GPU=1 (a skip is a failure), the stories260K case
#               excluded (its own step below).
#   sanitize-*  compute-sanitizer memcheck, racecheck and initcheck on the small attention and
#               LoRA cases ("for compute-sanitizer" test cases), CBQ_CUDA_NO_CACHE=1 so that
#               memcheck sees each tensor's own bounds. Run beside the tests.
#   stories260K the real-model check: CBQ pass W4A16 g32 on the GPU against the CPU, 4 seeds
#               (tests/gpu/test_pass_gpu.cu). Run beside the tests.
#   bench-*     bench_cuda_gemm (short), bench_cuda_window (W4 g128 in TF32: the projected
#               LLaMA-7B pass time), attention in fp32/TF32/BF16 (bench_cuda_kernels), then if
#               time is left the window in fp32 and the other kernels: alone on the GPU, after the
#               steps above.
# Output: one folder, $OUT when set (the device tool's), else gpu-check-out/ (--out DIR to
# choose): summary.txt (pass/fail, seconds, key numbers per step), the logs that matter most as
# files, and every log in logs.tar.gz — at most 8 files, as the device tool brings back.
# Exit status: 0 when every step passed, 1 when one failed, 2 when the driver check stopped it.
#
# Dependencies: CMake ≥ 3.24, nvcc (CUDA 13), g++, and fmt, nlohmann_json, OpenBLAS, doctest,
# Google Benchmark. A GPU machine without them (and without a package registry) gets them from
# .gpu-deps/debs/*.deb, made here by --fetch-deps and carried along (carry: [".gpu-deps/debs"]):
# the packages are unpacked into .gpu-deps/root and handed to CMake, nothing is installed.
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here" || exit 1

mode=full
skip_driver=0
out_dir=${OUT:-$here/gpu-check-out}
build_dir=$here/build-gpu-check
# The GPU tests build as one program per core (CBQ_GPU_TEST_PROGRAMS, tests/CMakeLists.txt), so
# that with the 3 benchmarks every compile unit (a few minutes of one core each: each holds the
# whole backend) starts at once, however many test files there are.
cores=$(nproc 2>/dev/null || echo 2)
jobs=$((cores + 3))
budget=  # seconds for everything (default 540: the device tool allows 10 minutes, one kept)
while [ $# -gt 0 ]; do
  case "$1" in
    --build-only | --dry-run) mode=build ;;
    --fetch-deps) mode=fetch ;;
    --out) out_dir=$2; shift ;;
    --build-dir) build_dir=$2; shift ;;
    --jobs) jobs=$2; shift ;;
    --budget) budget=$2; shift ;;
    --skip-driver) skip_driver=1 ;;  # tests this script's flow on a machine without a GPU
    -h | --help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

# The GPU machine's budget bounds every step; a build-only run (2 slow cores, say) gets hours.
if [ -z "$budget" ]; then
  [ "$mode" = build ] && budget=14400 || budget=540
fi
build_cap=330
[ "$mode" = build ] && build_cap=$budget

deps_dir=$here/.gpu-deps
deb_packages=(libfmt-dev libfmt9 nlohmann-json3-dev doctest-dev libbenchmark-dev
  libbenchmark1debian libopenblas-dev libopenblas-pthread-dev libopenblas0 libopenblas0-pthread
  libgfortran5 libquadmath0)

if [ "$mode" = fetch ]; then
  # Here, on Debian with the registry reachable: the .debs the GPU machine may lack.
  mkdir -p "$deps_dir/debs" && cd "$deps_dir/debs" || exit 1
  rm -f ./*.deb
  rm -rf "$deps_dir/root"  # unpacked by a build; only debs/ travels (carry .gpu-deps/debs)
  apt-get download "${deb_packages[@]}" || { echo "gpu-check: apt-get download failed" >&2; exit 1; }
  du -sh "$deps_dir/debs"
  echo "gpu-check: carry .gpu-deps/debs with the device run (.gitignore keeps it out of git)"
  exit 0
fi

mkdir -p "$out_dir" || exit 1
out_dir=$(cd "$out_dir" && pwd)
logs=$build_dir/gpu-check-logs
rm -rf "$logs"
mkdir -p "$logs" || exit 1
summary=$logs/summary.txt
start_time=$(date +%s)
deadline=$((start_time + budget))
failed=0

now() { date +%s; }
left() { echo $((deadline - $(now))); }
note() { echo "$*" | tee -a "$summary"; }
# row STEP STATUS SECONDS NOTE: one line of the summary table
row() { printf '%-22s %-8s %6s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$summary"; }

# Copies the summary and the main logs to the output folder (at most 8 files) and packs all logs.
finish() {
  local code=$1
  note ""
  note "total $(( $(now) - start_time )) s of a ${budget} s budget; exit ${code}"
  cp "$summary" "$out_dir/summary.txt"
  for f in driver.log build.log tests.log sanitize.log bench.log stories.log; do
    [ -f "$logs/$f" ] && cp "$logs/$f" "$out_dir/$f"
  done
  tar -czf "$out_dir/logs.tar.gz" -C "$build_dir" gpu-check-logs 2>/dev/null
  exit "$code"
}

# run_step NAME TIMEOUT LOG CMD...: runs CMD in its own process group with stdout and stderr to
# LOG; on timeout the whole group is killed (children too: ctest's tests, a hung kernel's host
# thread). Sets step_rc (124 on timeout) and step_seconds.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0
  t0=$(now)
  if [ "$limit" -le 5 ]; then
    echo "[gpu-check] $name: not started, no time left in the budget" >>"$log"
    step_rc=125
    step_seconds=0
    return
  fi
  echo "[gpu-check] $name: $* (timeout ${limit} s)" >>"$log"
  setsid "$@" >>"$log" 2>&1 &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ $(( $(now) - t0 )) -ge "$limit" ]; then
      echo "[gpu-check] $name: TIMEOUT after ${limit} s, killing process group $pid" >>"$log"
      kill -TERM -- "-$pid" 2>/dev/null
      sleep 3
      kill -KILL -- "-$pid" 2>/dev/null
      waited=1
      break
    fi
    sleep 1
  done
  wait "$pid" 2>/dev/null
  step_rc=$?
  [ "$waited" = 1 ] && step_rc=124
  step_seconds=$(( $(now) - t0 ))
}

# The smaller of a step's own limit and what the budget leaves (keeping `reserve` seconds).
limit() {
  local want=$1 reserve=${2:-15} l
  l=$(( $(left) - reserve ))
  [ "$l" -lt "$want" ] && echo "$l" || echo "$want"
}

status_of() {
  case "$1" in
    0) echo PASS ;;
    124) echo TIMEOUT ;;
    125) echo SKIPPED ;;
    *) echo FAIL ;;
  esac
}

commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo "unknown (no git)")
dirty=$(git -C "$here" status --porcelain 2>/dev/null | grep -v '^??' | head -1)
note "cbq gpu-check ($mode) $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${commit}${dirty:+ + local changes}"
note "host $(hostname), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), -j ${jobs}"
note ""
printf '%-22s %-8s %6s  %s\n' step status seconds notes | tee -a "$summary"

# ---- toolchain and dependencies ----
nvcc_bin=$(command -v nvcc || true)
[ -z "$nvcc_bin" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc_bin=/usr/local/cuda/bin/nvcc
if [ -z "$nvcc_bin" ]; then
  row toolchain FAIL 0 "nvcc not found (PATH, /usr/local/cuda/bin)"
  finish 1
fi
PATH=$(dirname "$nvcc_bin"):$PATH
export PATH
cmake_flags=()
if [ -d "$deps_dir/debs" ] && ls "$deps_dir"/debs/*.deb >/dev/null 2>&1; then
  # Unpack the carried packages (no install: dpkg -x into a private root).
  mkdir -p "$deps_dir/root"
  for deb in "$deps_dir"/debs/*.deb; do
    if command -v dpkg >/dev/null; then
      dpkg -x "$deb" "$deps_dir/root"
    else
      (cd "$deps_dir/root" && ar p "$deb" data.tar.xz | tar -xJ) # dpkg-less fallback
    fi
  done
  root=$deps_dir/root/usr
  arch_lib=$root/lib/x86_64-linux-gnu
  cmake_flags+=("-DCMAKE_PREFIX_PATH=$root;$arch_lib/cmake;$root/lib/cmake;$root/share/cmake"
    "-DCMAKE_LIBRARY_PATH=$arch_lib/openblas-pthread;$arch_lib"
    "-DCMAKE_CXX_FLAGS=-isystem $root/include -isystem $root/include/x86_64-linux-gnu/openblas-pthread"
    "-DCMAKE_CUDA_FLAGS=-isystem $root/include -isystem $root/include/x86_64-linux-gnu/openblas-pthread"
    "-DCMAKE_BUILD_RPATH=$arch_lib/openblas-pthread;$arch_lib")
  export LD_LIBRARY_PATH=$arch_lib/openblas-pthread:$arch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  note "dependencies: the carried .gpu-deps packages ($(ls "$deps_dir"/debs/*.deb | wc -l) .debs)"
fi

# ---- driver ----
probe_src=$logs/cuda_probe.cu
cat >"$probe_src" <<'EOF'
// What the driver and device say; exit 0 only for a usable device of compute capability 9.x.
#include <cuda_runtime.h>
#include <cstdio>
int main() {
  int driver = 0, runtime = 0, count = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::printf("driver supports CUDA %d.%d, runtime %d.%d\n", driver / 1000, driver % 1000 / 10,
              runtime / 1000, runtime % 1000 / 10);
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    std::printf("cudaGetDeviceCount failed: %s (%s)%s\n", cudaGetErrorString(status),
                cudaGetErrorName(status),
                driver < runtime ? ": the driver is older than the runtime" : "");
    return 3;
  }
  if (driver < runtime) std::printf("warning: the driver is older than the runtime\n");
  if (count == 0) { std::printf("no CUDA device\n"); return 3; }
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return 3;
  int smem = 0;
  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  std::printf("device 0 of %d: %s, sm_%d%d, %d SMs, %.1f GiB, %d KiB shared memory per block\n",
              count, p.name, p.major, p.minor, p.multiProcessorCount,
              static_cast<double>(p.totalGlobalMem) / (1 << 30), smem / 1024);
  void* x = nullptr;  // a real allocation: the device answers, not only the driver
  if (cudaMalloc(&x, 1 << 20) != cudaSuccess || cudaFree(x) != cudaSuccess) {
    std::printf("cudaMalloc of 1 MiB failed\n");
    return 3;
  }
  if (p.major != 9) {
    std::printf("compute capability %d.%d: the build is for sm_90 (H100/H200)\n", p.major, p.minor);
    return 4;
  }
  return 0;
}
EOF
driver_log=$logs/driver.log
if [ "$mode" = build ] || [ "$skip_driver" = 1 ]; then
  row driver SKIPPED 0 "--build-only or --skip-driver: no driver check"
else
  t0=$(now)
  if ! command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi: not found" >>"$driver_log"
    row driver FAIL $(( $(now) - t0 )) "no NVIDIA driver here (nvidia-smi not found): this step needs the GPU machine; --build-only builds without it"
    finish 2
  fi
  run_step nvidia-smi 30 "$driver_log" nvidia-smi \
    --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv
  smi_rc=$step_rc
  run_step probe-build 60 "$driver_log" "$nvcc_bin" -O1 -o "$logs/cuda_probe" "$probe_src"
  probe_rc=1
  [ "$step_rc" = 0 ] && { run_step probe 30 "$driver_log" "$logs/cuda_probe"; probe_rc=$step_rc; }
  info=$(grep -E '^(driver|device|warning|cudaGetDeviceCount|no CUDA|compute capability|cudaMalloc)' \
    "$driver_log" | tr '\n' ';' | sed 's/;$//')
  if [ "$smi_rc" != 0 ] || [ "$probe_rc" != 0 ]; then
    row driver FAIL $(( $(now) - t0 )) "nvidia-smi rc ${smi_rc}, probe rc ${probe_rc}: ${info:-see driver.log}"
    finish 2
  fi
  row driver PASS $(( $(now) - t0 )) "$info"
fi

# ---- configure and build ----
build_log=$logs/build.log
t0=$(now)
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
run_step configure "$(limit 90)" "$build_log" cmake -S "$here" -B "$build_dir" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DCBQ_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_CUDA_COMPILER="$nvcc_bin" -DCBQ_BUILD_TESTS=ON -DCBQ_BUILD_BENCHMARKS=ON \
  -DCBQ_BUILD_EXAMPLES=OFF -DCBQ_INSTALL=OFF -DCBQ_GPU_TEST_PROGRAMS="$cores" "${cmake_flags[@]}"
row configure "$(status_of $step_rc)" "$step_seconds" "$(cmake --version | head -1), ${generator[*]:-make}"
[ "$step_rc" != 0 ] && finish 1

# Which program holds a GPU test file's cases (written by the configure step).
program_map=$build_dir/tests/gpu_test_programs.txt
program_of() { awk -v t="gpu_$1" '$1 == t { print $2 }' "$program_map"; }
targets=($(awk '{ print $2 }' "$program_map" | sort -u))
for f in bench/cuda/bench_*.cu; do targets+=("$(basename "${f%.cu}")"); done
# A compile unit includes the whole backend (2-4 minutes of one core each), so the wall time is
# about the slowest unit when there are as many cores as targets.
run_step build "$(limit "$build_cap" 150)" "$build_log" cmake --build "$build_dir" -j "$jobs" --target "${targets[@]}"
build_rc=$step_rc
row build "$(status_of $build_rc)" "$step_seconds" "${#targets[@]} targets (${targets[*]}), -j ${jobs}"
if [ -f "$build_dir/.ninja_log" ]; then
  # Compile units of this build (ninja's log: start and end in ms): the slowest and the sum, which
  # say what another core count would take (about max(slowest, sum / cores)).
  # (the log appends: the last line of each output is its latest build)
  awk '!/^#/ && $4 ~ /\.cu\.o$/ { d[$4] = ($2 - $1) / 1000 }
    END { for (o in d) { s += d[o]; n++; if (d[o] > m) { m = d[o]; name = o } }
          if (n) printf "    %d compile units: slowest %.0f s (%s), sum %.0f s\n", n, m, name, s }' \
    "$build_dir/.ninja_log" | tee -a "$summary"
fi
if [ "$build_rc" != 0 ]; then
  grep -E 'error|Error' "$build_log" | head -20 | sed 's/^/    /' | tee -a "$summary"
  finish 1
fi
if [ "$mode" = build ]; then
  note ""
  note "build-only: the binaries are in $build_dir (tests/, bench/); run without --build-only on the GPU machine"
  finish 0
fi

# ---- tests, sanitizers and stories260K, side by side ----
export CBQ_REQUIRE_GPU=1
tests_log=$logs/tests.log
sanitize_log=$logs/sanitize.log
stories_log=$logs/stories.log
bin=$build_dir/tests

(
  export CBQ_GPU_TEST_EXCLUDE='*stories260K*'
  run_step tests "$(limit 240 150)" "$tests_log" ctest --test-dir "$build_dir" -L gpu -j 4 \
    --timeout 200 --output-on-failure
  echo "$step_rc $step_seconds" >"$logs/tests.rc"
) &
tests_job=$!

sanitizer=$(command -v compute-sanitizer || true)
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$sanitizer" ] && [ -x "$c" ] && sanitizer=$c
done
sanitize_jobs=()
if [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck initcheck; do
    for case in "attention:test_attention" "lora:test_lora_rounding"; do
      name=${case%%:*}
      file=${case#*:}
      (
        export CBQ_CUDA_NO_CACHE=1
        log=$logs/sanitize-$tool-$name.log
        run_step "sanitize-$tool-$name" "$(limit 200 140)" "$log" "$sanitizer" --tool "$tool" \
          --error-exitcode 99 --print-limit 30 "$bin/$(program_of "$file")" \
          "--source-file=*/gpu/$file.cu" '-tc=*for compute-sanitizer*'
        echo "$step_rc $step_seconds" >"$logs/sanitize-$tool-$name.rc"
      ) &
      sanitize_jobs+=($!)
    done
  done
fi

(
  run_step stories260K "$(limit 240 140)" "$stories_log" "$bin/$(program_of test_pass_gpu)" \
    '--source-file=*/gpu/test_pass_gpu.cu' '-tc=*stories260K*'
  echo "$step_rc $step_seconds" >"$logs/stories.rc"
) &
stories_job=$!

wait "$tests_job"
read -r rc secs <"$logs/tests.rc"
passed=$(grep -Eo '[0-9]+% tests passed, [0-9]+ tests failed out of [0-9]+' "$tests_log" | tail -1)
row tests "$(status_of "$rc")" "$secs" "${passed:-no ctest summary (see tests.log)}"
[ "$rc" != 0 ] && failed=1
grep -E '^ *[0-9]+/[0-9]+ Test +#' "$tests_log" | sed 's/^/    /' | tee -a "$summary" >/dev/null
# The numbers the parity tests print at LLaMA-7B shapes (doctest MESSAGE lines).
last_test_log=$build_dir/Testing/Temporary/LastTest.log
[ -f "$last_test_log" ] && cp "$last_test_log" "$logs/LastTest.log" &&
  grep -E 'MESSAGE: .*(e_gpu|e\(out\)|e_cpu|fell back|codes differ|greedy)' "$last_test_log" |
  sed 's/^.*MESSAGE: /    /' | tee -a "$summary" >/dev/null

for j in "${sanitize_jobs[@]}"; do wait "$j"; done
if [ -z "$sanitizer" ]; then
  row sanitize FAIL 0 "compute-sanitizer not found (PATH, /usr/local/cuda)"
  failed=1
else
  for tool in memcheck racecheck initcheck; do
    for name in attention lora; do
      f=$logs/sanitize-$tool-$name
      read -r rc secs <"$f.rc"
      summary_line=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|Target application returned' "$f.log" |
        tail -1 | sed 's/^========= //')
      row "sanitize-$tool-$name" "$(status_of "$rc")" "$secs" "${summary_line:-see sanitize.log}"
      [ "$rc" != 0 ] && failed=1
      cat "$f.log" >>"$sanitize_log"
    done
  done
fi

wait "$stories_job"
read -r rc secs <"$logs/stories.rc"
row stories260K "$(status_of "$rc")" "$secs" "$(grep -E 'mean CBQ ppl' "$stories_log" | sed 's/^.*MESSAGE: //' | tail -1)"
grep -E 'MESSAGE: stories260K' "$stories_log" | sed 's/^.*MESSAGE: /    /' | tee -a "$summary" >/dev/null
[ "$rc" != 0 ] && failed=1

# ---- benchmarks, alone on the GPU ----
bench_log=$logs/bench.log
bench_dir=$build_dir/bench
bench() {  # bench NAME TIMEOUT PROGRAM ARGS...
  local name=$1 want=$2
  shift 2
  run_step "$name" "$(limit "$want" 15)" "$logs/$name.log" "$@"
  row "$name" "$(status_of $step_rc)" "$step_seconds" ""
  grep -E 'TFLOP/s|GB/s|ms/step|window step' "$logs/$name.log" | grep -v '^\[gpu-check\]' |
    sed 's/^/    /' | tee -a "$summary" >/dev/null
  cat "$logs/$name.log" >>"$bench_log"
  [ "$step_rc" != 0 ] && [ "$step_rc" != 125 ] && failed=1
}
# The window step first after the GEMMs: it gives the projected LLaMA-7B pass time.
bench bench-gemm 50 "$bench_dir/bench_cuda_gemm" --benchmark_min_time=0.05 \
  --benchmark_out="$logs/bench_gemm.json" --benchmark_out_format=json
bench bench-window-tf32 120 "$bench_dir/bench_cuda_window" '--benchmark_filter=/128/1/' \
  --benchmark_out="$logs/bench_window_tf32.json" --benchmark_out_format=json
bench bench-attention 40 "$bench_dir/bench_cuda_kernels" '--benchmark_filter=BM_attention' \
  --benchmark_min_time=0.05 --benchmark_out="$logs/bench_attention.json" \
  --benchmark_out_format=json
if [ "$(left)" -gt 100 ]; then
  bench bench-window-fp32 90 "$bench_dir/bench_cuda_window" '--benchmark_filter=/128/0/' \
    --benchmark_out="$logs/bench_window_fp32.json" --benchmark_out_format=json
else
  row bench-window-fp32 SKIPPED 0 "$(left) s left in the budget"
fi
if [ "$(left)" -gt 60 ]; then
  bench bench-kernels 45 "$bench_dir/bench_cuda_kernels" '--benchmark_filter=-BM_attention' \
    --benchmark_min_time=0.05 --benchmark_out="$logs/bench_kernels.json" \
    --benchmark_out_format=json
else
  row bench-kernels SKIPPED 0 "$(left) s left in the budget"
fi

finish "$failed"
