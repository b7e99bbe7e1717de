// CPU op benchmarks at stories15M-like shapes (d = 288, T = 256, 6 heads), forward + backward,
// with the machine's measured SGEMM rate in the same binary for comparison.
// Run: OMP_WAIT_POLICY=PASSIVE build/bench/bench_ops --benchmark_repetitions=5
//      --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <cbq/cbq.hpp>
#include <random>

using namespace cbq;

namespace {
constexpr int64_t kT = 256, kD = 288, kHeads = 6, kHeadDim = kD / kHeads;

Tensor<float> random(const Shape& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  Tensor<float> t = Tensor<float>::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = n(rng);
  return t;
}

void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// The machine's single-precision GEMM rate: square SGEMM, C = A·B.
void BM_SgemmPeak(benchmark::State& state) {
  const int64_t n = state.range(0);
  auto a = random({n, n}, 1), b = random({n, n}, 2);
  Tensor<float> c(Shape{n, n});
  for (auto _ : state) {
    blas::gemm<float>(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
  }
  set_flops(state, 2.0 * n * n * n);
}
BENCHMARK(BM_SgemmPeak)->Arg(288)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();

// linear (T, d) × (d, d)ᵀ forward + backward (dx and dW): 3 GEMMs of 2·T·d² each.
void BM_LinearForwardBackward(benchmark::State& state) {
  Parameter<float> w("w", random({kD, kD}, 3));
  Tensor<float> x = random({kT, kD}, 4), seed = random({kT, kD}, 5);
  Tape<float> tape;
  for (auto _ : state) {
    tape.clear();
    auto xv = tape.input(x);
    auto y = ops::linear(xv, tape.param(w));
    y.grad().copy_from(seed);
    tape.backward_from_seeded();
    benchmark::DoNotOptimize(w.grad.data());
  }
  set_flops(state, 3 * 2.0 * kT * kD * kD);
}
BENCHMARK(BM_LinearForwardBackward)->Unit(benchmark::kMillisecond)->UseRealTime();

// Causal attention forward (QKᵀ and PV over the causal half: 2·T²·d) + backward (recompute S,
// dV, dP, dQ, dK: 5·T²·d), counted on the causal half.
void BM_AttentionForwardBackward(benchmark::State& state) {
  Tensor<float> q = random({kT, kD}, 6), k = random({kT, kD}, 7), v = random({kT, kD}, 8);
  Tensor<float> seed = random({kT, kD}, 9);
  Tape<float> tape;
  for (auto _ : state) {
    tape.clear();
    auto qv = tape.input(q), kv = tape.input(k), vv = tape.input(v);
    auto o = ops::attention(qv, kv, vv, kHeads, kHeads, kHeadDim, true);
    o.grad().copy_from(seed);
    tape.backward_from_seeded();
    benchmark::DoNotOptimize(qv.grad().data());
  }
  set_flops(state, 7.0 * kT * kT * kD);
}
BENCHMARK(BM_AttentionForwardBackward)->Unit(benchmark::kMillisecond)->UseRealTime();

// RMSNorm is memory-bound: forward reads x and writes y; backward reads x, dy and writes dx.
void BM_RmsNormForwardBackward(benchmark::State& state) {
  Parameter<float> w("w", random({kD}, 10));
  Tensor<float> x = random({kT, kD}, 11), seed = random({kT, kD}, 12);
  Tape<float> tape;
  for (auto _ : state) {
    tape.clear();
    auto xv = tape.input(x);
    auto y = ops::rmsnorm(xv, tape.param(w), 1e-5);
    y.grad().copy_from(seed);
    tape.backward_from_seeded();
    benchmark::DoNotOptimize(xv.grad().data());
  }
  state.counters["GB/s"] = benchmark::Counter(5.0 * kT * kD * sizeof(float) / 1e9,
                                              benchmark::Counter::kIsIterationInvariantRate);
  set_flops(state, 10.0 * kT * kD);
}
BENCHMARK(BM_RmsNormForwardBackward)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
