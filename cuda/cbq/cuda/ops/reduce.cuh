#pragma once
// sum, mean (ops/reduce.hpp): out[0] = T(Σ_i x[i] / divisor) through the deterministic
// two-pass sum_all (block_reduce.cuh), accumulated in double as the CPU's blocked_sum; backward
// d[i] += g[0] · coefficient with g read on the device.
#include <cbq/ops/reduce.hpp>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace detail {
// term(i) = x[i] in double
template <class T>
struct ValueTerm {
  const T* x;
  __device__ double operator()(int64_t i) const { return static_cast<double>(x[i]); }
};
}  // namespace detail

// ----------------------------------------------------------------------------
// kernels

// d[i] += g[0] · coefficient; d (n), g (1,)
template <class T>
__global__ void sum_backward_kernel(T* d, const T* g, T coefficient, int64_t n) {
  const T step = g[0] * coefficient;  // rounded as the CPU: once, in T
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) d[i] += step;
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void sum_forward(T* out, const T* x, int64_t n, double divisor) {
  detail::sum_all(out, detail::ValueTerm<T>{x}, n, divisor);
}

template <class T>
void sum_backward(T* d, const T* g, T coefficient, int64_t n) {
  if (n <= 0) return;
  sum_backward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      d, g, coefficient, n);
  CBQ_CUDA_CHECK_LAUNCH("sum_backward_kernel");
}

namespace detail {
inline const bool reduce_registered = [] {
  ops::CudaReduce<float>::sum = &sum_forward<float>;
  ops::CudaReduce<float>::sum_backward = &sum_backward<float>;
  ops::CudaReduce<double>::sum = &sum_forward<double>;
  ops::CudaReduce<double>::sum_backward = &sum_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
