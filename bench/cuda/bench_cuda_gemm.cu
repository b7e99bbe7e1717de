// cuBLASLt GEMM throughput at the LLaMA-7B linear-layer shapes for 2048 tokens, float in fp32
// and TF32 mode and double, timed with CUDA events on the context's stream (manual time: the
// reported time is GPU time per GEMM). Counters: TFLOP/s (2·m·n·k per GEMM) and the GEMM's
// size in GFLOP. Without a GPU the program says so and exits with 0.
//
// Shapes (M = tokens, hidden 4096, MLP 11008), named like ops::linear's three GEMMs:
//   forward  y  = x · Wᵀ  : NT, (M, out, in)
//   backward dx = dy · W  : NN, (M, in, out)
//   backward dW = dyᵀ · x : TN, (out, in, M)
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cbq/cuda.cuh>
#include <cstdint>
#include <cstdio>
#include <string>

#include "common.cuh"

namespace {

using cbq::Device;
using cbq::Shape;
using cbq::Tensor;
using cbq::cuda::MathMode;

using cbq_bench::random_device_tensor;

template <class T>
void BM_gemm(benchmark::State& state, MathMode mode, bool trans_a, bool trans_b) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  cbq::cuda::Context& ctx = cbq::cuda::default_context();
  cbq::cuda::MathModeGuard math(mode);
  try {
    const Tensor<T> a = random_device_tensor<T>(trans_a ? Shape{k, m} : Shape{m, k}, 1);
    const Tensor<T> b = random_device_tensor<T>(trans_b ? Shape{n, k} : Shape{k, n}, 2);
    Tensor<T> c = Tensor<T>::empty(Shape{m, n}, Device::cuda);
    const int64_t lda = trans_a ? m : k, ldb = trans_b ? k : n;
    auto run = [&] {
      cbq::cuda::gemm<T>(ctx, trans_a, trans_b, m, n, k, T(1), a.data(), lda, b.data(), ldb, T(0),
                         c.data(), n);
    };
    run();  // builds and caches the plan, warms the clocks
    ctx.synchronize();

    cudaEvent_t start, stop;
    CBQ_CUDA_CHECK(cudaEventCreate(&start));
    CBQ_CUDA_CHECK(cudaEventCreate(&stop));
    double seconds = 0;
    for (auto _ : state) {
      CBQ_CUDA_CHECK(cudaEventRecord(start, ctx.stream()));
      run();
      CBQ_CUDA_CHECK(cudaEventRecord(stop, ctx.stream()));
      CBQ_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      CBQ_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      state.SetIterationTime(ms * 1e-3);
      seconds += ms * 1e-3;
    }
    CBQ_CUDA_CHECK(cudaEventDestroy(start));
    CBQ_CUDA_CHECK(cudaEventDestroy(stop));

    const double flop =
        2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
    state.counters["TFLOP/s"] = flop * static_cast<double>(state.iterations()) / seconds * 1e-12;
    state.counters["GFLOP"] = flop * 1e-9;
    state.SetLabel(std::string(sizeof(T) == 8 ? "fp64" : cbq::cuda::math_mode_name(mode)) + " " +
                   (trans_a ? "T" : "N") + (trans_b ? "T" : "N"));
  } catch (const cbq::Error& e) {
    state.SkipWithError(e.what());
  }
}

void BM_sgemm(benchmark::State& state, MathMode mode, bool trans_a, bool trans_b) {
  BM_gemm<float>(state, mode, trans_a, trans_b);
}
void BM_dgemm(benchmark::State& state, bool trans_a, bool trans_b) {
  BM_gemm<double>(state, MathMode::fp32, trans_a, trans_b);
}

// (M, N, K) for 2048 tokens of LLaMA-7B.
void forward_shapes(benchmark::internal::Benchmark* b) {
  b->Args({2048, 4096, 4096});   // q, k, v, o projections
  b->Args({2048, 11008, 4096});  // gate, up
  b->Args({2048, 4096, 11008});  // down
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}
void backward_dx_shapes(benchmark::internal::Benchmark* b) {
  b->Args({2048, 4096, 4096});
  b->Args({2048, 4096, 11008});  // dx of gate/up
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}
void backward_dw_shapes(benchmark::internal::Benchmark* b) {
  b->Args({4096, 4096, 2048});
  b->Args({11008, 4096, 2048});  // dW of gate/up
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK_CAPTURE(BM_sgemm, fp32_forward_NT, MathMode::fp32, false, true)->Apply(forward_shapes);
BENCHMARK_CAPTURE(BM_sgemm, tf32_forward_NT, MathMode::tf32, false, true)->Apply(forward_shapes);
BENCHMARK_CAPTURE(BM_sgemm, fp32_dx_NN, MathMode::fp32, false, false)->Apply(backward_dx_shapes);
BENCHMARK_CAPTURE(BM_sgemm, tf32_dx_NN, MathMode::tf32, false, false)->Apply(backward_dx_shapes);
BENCHMARK_CAPTURE(BM_sgemm, fp32_dW_TN, MathMode::fp32, true, false)->Apply(backward_dw_shapes);
BENCHMARK_CAPTURE(BM_sgemm, tf32_dW_TN, MathMode::tf32, true, false)->Apply(backward_dw_shapes);
BENCHMARK_CAPTURE(BM_dgemm, fp64_forward_NT, false, true)
    ->Args({2048, 4096, 4096})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) { return cbq_bench::run_benchmarks(argc, argv); }
