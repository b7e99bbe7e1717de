#pragma once
// main() and helpers for the CUDA-vs-CPU test programs. Each tests/gpu/test_*.cu is its own
// executable and includes this header once. Without a usable GPU, main() prints why and exits
// with 77, which ctest reports as "skipped" (SKIP_RETURN_CODE 77 in tests/CMakeLists.txt).
//
// Tolerance policy (see docs/CUDA.md): results are compared with the CPU reference by the
// normwise relative error  max_i |gpu_i - cpu_i| / max_i |cpu_i|:
//   double             1e-12
//   float, fp32 GEMMs  1e-5
//   float, TF32 GEMMs  5e-3   (inputs rounded to a 10-bit mantissa: ~1e-3 per product)
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cbq/cuda.cuh>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

namespace cbq::gpu_testing {

template <class T>
Tensor<T> randn(const Shape& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  Tensor<T> t = Tensor<T>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(dist(rng));
  return t;
}

// max |a - b| / max |reference| (0 when both are all zero); a may live on any device.
template <class T>
double rel_error(const Tensor<T>& a, const Tensor<T>& reference) {
  REQUIRE(a.shape() == reference.shape());
  const Tensor<T> x = a.to(Device::cpu);
  const Tensor<T> r = reference.to(Device::cpu);
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < r.numel(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(x[i]) - static_cast<double>(r[i])));
    scale = std::max(scale, std::abs(static_cast<double>(r[i])));
  }
  if (std::isnan(diff)) return diff;
  return scale > 0 ? diff / scale : diff;
}

// Tolerance of rel_error for a result of type T (see the table at the top).
template <class T>
double tolerance(cuda::MathMode mode = cuda::MathMode::fp32) {
  if constexpr (std::is_same_v<T, double>) {
    return 1e-12;
  } else {
    return mode == cuda::MathMode::tf32 ? 5e-3 : 1e-5;
  }
}

// The message of the cbq::Error that f() throws ("" and a failed check if none).
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL_CHECK("expected a cbq::Error");
  return {};
}

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

}  // namespace cbq::gpu_testing

int main(int argc, char** argv) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    std::fprintf(stderr, "%s: skipped, no CUDA device (%s)\n", argv[0],
                 status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
    return 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
    std::fprintf(stderr, "%s: running on %s (sm_%d%d)\n", argv[0], prop.name, prop.major,
                 prop.minor);
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  return context.run();
}
