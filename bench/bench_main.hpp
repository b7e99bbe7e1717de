#pragma once
// The main() of cbq's Google Benchmark programs: corrects a generic OpenBLAS kernel choice
// before anything runs (core/openblas_core.hpp) and records the BLAS core, the CPU kernels' ISA
// and the thread count in the report's context, so every result says what it ran on.
#include <benchmark/benchmark.h>

#include <cbq/core/blas.hpp>
#include <cbq/ops/vectorize.hpp>
#include <string>

namespace cbq::bench {
inline const char* simd_name() {
  switch (simd::cpu_isa()) {
    case simd::Isa::avx512:
      return "avx512";
    case simd::Isa::avx2:
      return "avx2";
    default:
      return "generic";
  }
}
}  // namespace cbq::bench

#define CBQ_BENCHMARK_MAIN()                                                                \
  int main(int argc, char** argv) {                                                         \
    cbq::blas::use_best_blas_kernels(argc, argv);                                           \
    benchmark::AddCustomContext("blas", cbq::blas::blas_core_summary());                    \
    benchmark::AddCustomContext("cbq_simd", cbq::bench::simd_name());                       \
    benchmark::AddCustomContext("cbq_default_threads", std::to_string(cbq::num_threads())); \
    benchmark::Initialize(&argc, argv);                                                     \
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;                       \
    benchmark::RunSpecifiedBenchmarks();                                                    \
    benchmark::Shutdown();                                                                  \
    return 0;                                                                               \
  }
