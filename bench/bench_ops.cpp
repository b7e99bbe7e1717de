// CPU op benchmarks at stories15M-like shapes (d = 288, T = 256, 6 heads), forward + backward,
// with the machine's measured SGEMM rate in the same binary for comparison.
// Run: OMP_WAIT_POLICY=PASSIVE build/bench/bench_ops --benchmark_repetitions=5
//      --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <cbq/cbq.hpp>

#include "bench_main.hpp"
#include "bench_tools.hpp"

using namespace cbq;

namespace {
constexpr int64_t kT = 256, kD = 288, kHeads = 6, kHeadDim = kD / kHeads;

using bench::random_normal;

void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// The machine's single-precision GEMM rate: square SGEMM, C = A·B.
void BM_SgemmPeak(benchmark::State& state) {
  const int64_t n = state.range(0);
  auto a = random_normal({n, n}, 1), b = random_normal({n, n}, 2);
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
  Parameter<float> w("w", random_normal({kD, kD}, 3));
  Tensor<float> x = random_normal({kT, kD}, 4), seed = random_normal({kT, kD}, 5);
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
  Tensor<float> q = random_normal({kT, kD}, 6), k = random_normal({kT, kD}, 7),
                v = random_normal({kT, kD}, 8);
  Tensor<float> seed = random_normal({kT, kD}, 9);
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

// Causal attention at real models' shapes: args T, query heads, kv heads, head dim, backward
// (0: forward only, as evaluation; 1: forward + backward, as a CBQ step), path (0: chosen by
// head dimension; 1: the GEMM tiles; 2: the row kernels, hd ≤ 16). The FLOPs as above.
void BM_AttentionShapes(benchmark::State& state) {
  const int64_t T = state.range(0), hq = state.range(1), hkv = state.range(2), hd = state.range(3);
  const bool backward = state.range(4) != 0;
  const ops::detail::AttentionPath paths[] = {ops::detail::AttentionPath::automatic,
                                              ops::detail::AttentionPath::tiles,
                                              ops::detail::AttentionPath::rows};
  ops::detail::attention_path = paths[state.range(5)];
  Tensor<float> q = random_normal({T, hq * hd}, 6), k = random_normal({T, hkv * hd}, 7),
                v = random_normal({T, hkv * hd}, 8);
  Tensor<float> seed = random_normal({T, hq * hd}, 9);
  Tape<float> tape;
  for (auto _ : state) {
    const auto call = bench::attention_call(tape, q, k, v, seed, hq, hkv, hd, backward);
    benchmark::DoNotOptimize(call.o.value().data());
  }
  ops::detail::attention_path = ops::detail::AttentionPath::automatic;
  set_flops(state, (backward ? 7.0 : 2.0) * static_cast<double>(T * T * hq * hd));
}
BENCHMARK(BM_AttentionShapes)
    ->ArgNames({"T", "hq", "hkv", "hd", "bwd", "path"})
    ->ArgsProduct({{512, 2048}, {9}, {3}, {64}, {0, 1}, {0}})  // SmolLM2-135M
    ->ArgsProduct({{512}, {8}, {4}, {8}, {0, 1}, {1, 2}})      // stories260K, both paths
    ->ArgsProduct({{512}, {8}, {4}, {16}, {0, 1}, {1, 2}})     // the row path's widest
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

// RMSNorm is memory-bound: forward reads x and writes y; backward reads x, dy and writes dx.
void BM_RmsNormForwardBackward(benchmark::State& state) {
  Parameter<float> w("w", random_normal({kD}, 10));
  Tensor<float> x = random_normal({kT, kD}, 11), seed = random_normal({kT, kD}, 12);
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

// A linear layer's backward GEMMs at the LLaMA window step's shapes (T = 256; in × out = 288 ×
// 288, 288 × 768, 768 × 288): dx = G·W and dW = Gᵀ·x, either one after the other, each split over
// the pool (batched = 0), or side by side as one blas::gemm_batch (1). Arguments: in, out, threads.
void BM_LinearBackwardGemms(benchmark::State& state) {
  const int64_t in = state.range(0), out = state.range(1);
  const bool batched = state.range(2) != 0;
  const int saved = num_threads();
  set_num_threads(static_cast<int>(state.range(3)));
  Tensor<float> x = random_normal({kT, in}, 13), w = random_normal({out, in}, 14),
                g = random_normal({kT, out}, 15);
  Tensor<float> dx(Shape{kT, in}), dw(Shape{out, in});
  const blas::GemmArgs<float> gemms[2] = {blas::gemm_args(false, false, kT, in, out, 1.f, g.data(),
                                                          out, w.data(), in, 0.f, dx.data(), in),
                                          blas::gemm_args(true, false, out, in, kT, 1.f, g.data(),
                                                          out, x.data(), in, 0.f, dw.data(), in)};
  for (auto _ : state) {
    if (batched) {
      blas::gemm_batch(gemms, 2);
    } else {
      for (const auto& a : gemms) blas::gemm(a);
    }
    benchmark::DoNotOptimize(dw.data());
  }
  set_flops(state, 2 * 2.0 * kT * in * out);
  set_num_threads(saved);
}
BENCHMARK(BM_LinearBackwardGemms)
    ->ArgNames({"in", "out", "batched", "threads"})
    ->ArgsProduct({{288, 768}, {288, 768}, {0, 1}, {1, 2}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// The fused LoRA-Rounding weight kernel alone, at the LLaMA window step's size (2 M weights as
// one 2048 × 1024 matrix): W4 g32, rank 5, V0 tracking the step, hard_ste forward; forward only
// (Ŵ and the saved gradient factors) or forward + backward (dA1, dA2, ds). Arguments: backward,
// threads.
void BM_LoraWeightKernels(benchmark::State& state) {
  const bool backward = state.range(0) != 0;
  const int saved = num_threads();
  set_num_threads(static_cast<int>(state.range(1)));
  const int64_t rows = 2048, cols = 1024, rank = 5;
  const quant::GridSpec spec{4, false, quant::Granularity::per_group, 32};
  Tensor<float> W = random_normal({rows, cols}, 16);
  for (int64_t i = 0; i < W.numel(); ++i) W[i] *= 0.05f;
  Tensor<float> s, z;
  quant::init_minmax(W, spec, s, z);
  Parameter<float> ps("s", s), a1("a1", random_normal({rows, rank}, 17)),
      a2("a2", random_normal({rank, cols}, 18));
  for (int64_t i = 0; i < a2.value.numel(); ++i) a2.value[i] *= 0.1f;
  Tensor<float> seed = random_normal({rows, cols}, 19);
  Tape<float> tape;
  for (auto _ : state) {
    tape.clear();
    Var<float> y = quant::lora_soft_weight_tracked(
        W, tape.param(ps), z, tape.param(a1), tape.param(a2), spec, quant::RoundingMode::hard_ste);
    if (backward) {
      y.grad().copy_from(seed);
      tape.backward_from_seeded();
    }
    benchmark::DoNotOptimize(y.value().data());
  }
  state.counters["ns/weight"] = benchmark::Counter(
      static_cast<double>(rows * cols) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  set_num_threads(saved);
}
BENCHMARK(BM_LoraWeightKernels)
    ->ArgNames({"backward", "threads"})
    ->ArgsProduct({{0, 1}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

CBQ_BENCHMARK_MAIN()
