#pragma once
// main() and helpers for the CUDA-vs-CPU test programs. Each tests/gpu/test_*.cu is its own
// executable and includes this header once. Without a usable GPU, main() prints why and exits
// with 77, which ctest reports as "skipped" (SKIP_RETURN_CODE 77 in tests/CMakeLists.txt) —
// unless CBQ_REQUIRE_GPU=1, where a missing device or a failing cudaGetDeviceCount (a driver
// older than the runtime, say) exits with 1: on the GPU machine a skip must not look green.
// CBQ_GPU_TEST_EXCLUDE=pattern adds doctest's --test-case-exclude (scripts/gpu-check.sh runs
// the stories260K case as its own step).
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
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "gpu/compare.hpp"

namespace cbq::gpu_testing {

template <class T>
Tensor<T> randn(const Shape& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  Tensor<T> t = Tensor<T>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(dist(rng));
  return t;
}

// max |a - b| / max |reference| (0 when both are all zero; NaN when either holds a NaN or an
// infinity, so that `rel_error(...) <= tol` fails); a may live on any device.
template <class T>
double rel_error(const Tensor<T>& a, const Tensor<T>& reference) {
  REQUIRE(a.shape() == reference.shape());
  const Tensor<T> x = a.to(Device::cpu).contiguous();
  const Tensor<T> r = reference.to(Device::cpu).contiguous();
  return max_rel_error(x.data(), r.data(), r.numel());
}

// ‖a − reference‖₂ / ‖reference‖₂ (NaN-aware, see compare.hpp); a may live on any device.
template <class A, class B>
double norm_error(const Tensor<A>& a, const Tensor<B>& reference) {
  REQUIRE(a.shape() == reference.shape());
  const Tensor<A> x = a.to(Device::cpu).contiguous();
  const Tensor<B> r = reference.to(Device::cpu).contiguous();
  return norm_rel_error(x.data(), r.data(), r.numel());
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

// Same values, bit for bit (a tensor may live on either device).
template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  const std::vector<T> x = a.to_vector(), y = b.to_vector();
  if (x.size() != y.size()) return false;
  for (std::size_t i = 0; i < x.size(); ++i)
    if (!(x[i] == y[i] && std::signbit(x[i]) == std::signbit(y[i]))) return false;
  return true;
}

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

}  // namespace cbq::gpu_testing

namespace cbq::gpu_testing {
// CBQ_REQUIRE_GPU set to anything but "" or "0".
inline bool gpu_required() {
  const char* v = std::getenv("CBQ_REQUIRE_GPU");
  return v && *v && std::strcmp(v, "0") != 0;
}
}  // namespace cbq::gpu_testing

int main(int argc, char** argv) {
  int count = 0, driver = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  (void)cudaDriverGetVersion(&driver);
  if (status != cudaSuccess || count == 0) {
    const char* why = status != cudaSuccess ? cudaGetErrorString(status) : "0 devices";
    if (cbq::gpu_testing::gpu_required()) {
      std::fprintf(stderr,
                   "%s: FAILED: no usable CUDA device (%s; driver supports CUDA %d.%d, runtime "
                   "%d.%d) and CBQ_REQUIRE_GPU is set\n",
                   argv[0], why, driver / 1000, driver % 1000 / 10, CUDART_VERSION / 1000,
                   CUDART_VERSION % 1000 / 10);
      return 1;
    }
    std::fprintf(stderr, "%s: skipped, no CUDA device (%s)\n", argv[0], why);
    return 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
    std::fprintf(stderr, "%s: running on %s (sm_%d%d, driver CUDA %d.%d, runtime %d.%d)\n", argv[0],
                 prop.name, prop.major, prop.minor, driver / 1000, driver % 1000 / 10,
                 CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
  doctest::Context context;
  if (const char* exclude = std::getenv("CBQ_GPU_TEST_EXCLUDE"); exclude && *exclude)
    context.addFilter("test-case-exclude", exclude);
  context.applyCommandLine(argc, argv);
  return context.run();
}
