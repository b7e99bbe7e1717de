#pragma once
// mse, row_sq_error (ops/mse.hpp): out[0] = T(Σ_i (a_i − b_i)² / divisor) through the
// deterministic two-pass sum_all (difference and square in double, as the CPU); backward
// d[i] += sign · (2c · g[0]) · (a[i] − b[i]) with g read on the device.
#include <cbq/ops/mse.hpp>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace detail {
// term(i) = (a[i] − b[i])² in double
template <class T>
struct SquaredDifferenceTerm {
  const T* a;
  const T* b;
  __device__ double operator()(int64_t i) const {
    const double diff = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    return diff * diff;
  }
};
}  // namespace detail

// ----------------------------------------------------------------------------
// kernels

// d[i] += sign · (2 · coefficient · g[0]) · (a[i] − b[i]); d, a, b (n), g (1,)
template <class T>
__global__ void squared_error_backward_kernel(T* d, const T* g, const T* a, const T* b,
                                              T coefficient, T sign, int64_t n) {
  const T k = T(2) * coefficient * g[0];  // rounded in T, in the CPU's order
  const T ks = sign * k;
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride())
    d[i] += ks * (a[i] - b[i]);
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void squared_error_forward(T* out, const T* a, const T* b, int64_t n, double divisor) {
  detail::sum_all(out, detail::SquaredDifferenceTerm<T>{a, b}, n, divisor);
}

template <class T>
void squared_error_backward(T* d, const T* g, const T* a, const T* b, T coefficient, T sign,
                            int64_t n) {
  if (n <= 0) return;
  squared_error_backward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                                  detail::current_stream()>>>(d, g, a, b, coefficient, sign, n);
  CBQ_CUDA_CHECK_LAUNCH("squared_error_backward_kernel");
}

namespace detail {
inline const bool mse_registered = [] {
  ops::CudaSquaredError<float>::forward = &squared_error_forward<float>;
  ops::CudaSquaredError<float>::backward = &squared_error_backward<float>;
  ops::CudaSquaredError<double>::forward = &squared_error_forward<double>;
  ops::CudaSquaredError<double>::backward = &squared_error_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
