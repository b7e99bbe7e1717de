#pragma once
// mul: out = a ⊙ b (ops/mul.hpp); backward d += g ⊙ other, once per operand.
#include <cbq/ops/mul.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// out[i] = a[i] · b[i]; out, a, b (n)
template <class T>
__global__ void mul_forward_kernel(T* out, const T* a, const T* b, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) out[i] = a[i] * b[i];
}

// d[i] += g[i] · other[i]; d, g, other (n)
template <class T>
__global__ void mul_backward_kernel(T* d, const T* g, const T* other, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride())
    d[i] += g[i] * other[i];
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void mul_forward(T* out, const T* a, const T* b, int64_t n) {
  if (n <= 0) return;
  mul_forward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      out, a, b, n);
  CBQ_CUDA_CHECK_LAUNCH("mul_forward_kernel");
}

template <class T>
void mul_backward(T* d, const T* g, const T* other, int64_t n) {
  if (n <= 0) return;
  mul_backward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      d, g, other, n);
  CBQ_CUDA_CHECK_LAUNCH("mul_backward_kernel");
}

namespace detail {
inline const bool mul_registered = [] {
  ops::CudaMul<float>::forward = &mul_forward<float>;
  ops::CudaMul<float>::backward = &mul_backward<float>;
  ops::CudaMul<double>::forward = &mul_forward<double>;
  ops::CudaMul<double>::backward = &mul_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
