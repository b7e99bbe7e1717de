#pragma once
// Helpers shared by the CUDA benchmarks (bench/cuda/bench_*.cu): device-side random tensors,
// CUDA-event timing on the cbq stream, and the main() that skips cleanly without a GPU (and
// fails under CBQ_REQUIRE_GPU=1).
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cbq/cuda.cuh>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace cbq_bench {

// x[i] = offset + scale · (uniform in [-1, 1) from a hash of (i, seed)): no host work.
template <class T>
__global__ void fill_uniform_kernel(T* x, int64_t n, uint64_t seed, double scale, double offset) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t h = (static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    x[i] = static_cast<T>(offset + scale * (static_cast<double>(h >> 11) * 0x1.0p-52 - 1.0));
  }
}

template <class T>
void fill_uniform(cbq::Tensor<T>& t, uint64_t seed, double scale = 1.0, double offset = 0.0) {
  fill_uniform_kernel<<<1024, 256, 0, cbq::cuda::default_context().stream()>>>(t.data(), t.numel(),
                                                                               seed, scale, offset);
  CBQ_CUDA_CHECK_LAUNCH("fill_uniform_kernel");
}

template <class T>
cbq::Tensor<T> random_device_tensor(const cbq::Shape& shape, uint64_t seed, double scale = 1.0,
                                    double offset = 0.0) {
  cbq::Tensor<T> t = cbq::Tensor<T>::empty(shape, cbq::Device::cuda);
  fill_uniform(t, seed, scale, offset);
  return t;
}

// Events recorded on the cbq stream: mark(i) after the work of phase i, seconds(i) the GPU time
// between mark i − 1 (or start()) and mark i.
class PhaseTimer {
 public:
  explicit PhaseTimer(int phases) : events_(static_cast<size_t>(phases) + 1) {
    for (auto& e : events_) CBQ_CUDA_CHECK(cudaEventCreate(&e));
  }
  ~PhaseTimer() {
    for (auto& e : events_) (void)cudaEventDestroy(e);
  }
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

  void start() { record(0); }
  void mark(int phase) { record(phase + 1); }
  // Waits for the last event; the GPU seconds of phase i.
  double seconds(int phase) {
    CBQ_CUDA_CHECK(cudaEventSynchronize(events_.back()));
    float ms = 0;
    CBQ_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[static_cast<size_t>(phase)],
                                        events_[static_cast<size_t>(phase) + 1]));
    return ms * 1e-3;
  }
  double total() {
    double s = 0;
    for (size_t i = 0; i + 1 < events_.size(); ++i) s += seconds(static_cast<int>(i));
    return s;
  }

 private:
  void record(int i) {
    CBQ_CUDA_CHECK(
        cudaEventRecord(events_[static_cast<size_t>(i)], cbq::cuda::default_context().stream()));
  }
  std::vector<cudaEvent_t> events_;
};

// The best throughput (TFLOP/s) of the cuBLASLt GEMM C (m, n) = A (m, k) · B (n, k)ᵀ in the
// current math mode: the forward GEMM of a linear layer, the reference the other numbers are
// compared with.
inline double gemm_peak_tflops(int64_t m, int64_t n, int64_t k, int repetitions = 10) {
  cbq::cuda::Context& ctx = cbq::cuda::default_context();
  const cbq::Tensor<float> a = random_device_tensor<float>(cbq::Shape{m, k}, 11);
  const cbq::Tensor<float> b = random_device_tensor<float>(cbq::Shape{n, k}, 12);
  cbq::Tensor<float> c = cbq::Tensor<float>::empty(cbq::Shape{m, n}, cbq::Device::cuda);
  auto run = [&] {
    cbq::cuda::gemm<float>(ctx, false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f,
                           c.data(), n);
  };
  run();  // plan and clocks
  double best = 1e30;
  for (int r = 0; r < repetitions; ++r) {
    PhaseTimer t(1);
    t.start();
    run();
    t.mark(0);
    best = std::min(best, t.seconds(0));
  }
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) / best *
         1e-12;
}

// main(): runs the registered benchmarks, or says why not and exits with 0 without a GPU —
// with 1 when CBQ_REQUIRE_GPU is set (anything but "" or "0"): a driver older than the runtime
// makes cudaGetDeviceCount fail, which must not pass for "nothing to measure" on the GPU machine.
inline int run_benchmarks(int argc, char** argv) {
  int count = 0, driver = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  (void)cudaDriverGetVersion(&driver);
  if (status != cudaSuccess || count == 0) {
    const char* required = std::getenv("CBQ_REQUIRE_GPU");
    const bool must = required && *required && std::string(required) != "0";
    std::fprintf(stderr,
                 "%s: %sno usable CUDA device (%s; driver supports CUDA %d.%d, runtime %d.%d)%s\n",
                 argv[0], must ? "FAILED: " : "",
                 status != cudaSuccess ? cudaGetErrorString(status) : "0 devices", driver / 1000,
                 driver % 1000 / 10, CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10,
                 must ? " and CBQ_REQUIRE_GPU is set" : "; nothing to measure");
    return must ? 1 : 0;
  }
  cudaDeviceProp prop{};
  CBQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  benchmark::AddCustomContext("gpu", prop.name);
  benchmark::AddCustomContext("gpu_memory_GiB",
                              std::to_string(static_cast<double>(prop.totalGlobalMem) / (1 << 30)));
  benchmark::AddCustomContext("cuda_runtime", std::to_string(CUDART_VERSION));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace cbq_bench
