#pragma once
// scale: out = alpha · x (ops/scale.hpp). The backward pass is an axpy (common.cuh).
#include <cbq/ops/scale.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// out[i] = alpha · x[i]; out, x (n)
template <class T>
__global__ void scale_forward_kernel(T* out, const T* x, T alpha, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) out[i] = alpha * x[i];
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void scale_forward(T* out, const T* x, T alpha, int64_t n) {
  if (n <= 0) return;
  scale_forward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      out, x, alpha, n);
  CBQ_CUDA_CHECK_LAUNCH("scale_forward_kernel");
}

namespace detail {
inline const bool scale_registered = [] {
  ops::CudaScale<float>::forward = &scale_forward<float>;
  ops::CudaScale<double>::forward = &scale_forward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
