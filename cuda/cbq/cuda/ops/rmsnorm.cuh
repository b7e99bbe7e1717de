#pragma once
// rmsnorm (ops/rmsnorm.hpp): one block per row for the forward pass and dx, the row sums in
// double with the fixed-order block reduction; dw = Σ_rows dy ⊙ x · r by the deterministic
// column sum (per-row terms rounded in T as the CPU, summed in double: the CPU sums in T, so
// float dw differs from it by the CPU's own rounding, ~rows · 6e-8 relative at worst).
#include <cbq/ops/rmsnorm.hpp>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace detail {
// term(r, j) = dy[r, j] · x[r, j] · inv_rms[r], rounded in T
template <class T>
struct RmsNormWeightTerm {
  const T* dy;
  const T* x;
  const T* inv_rms;
  int64_t d;
  __device__ double operator()(int64_t r, int64_t j) const {
    return static_cast<double>(dy[r * d + j] * x[r * d + j] * inv_rms[r]);
  }
};
}  // namespace detail

// ----------------------------------------------------------------------------
// kernels

// y (rows, d) = x · r ⊙ w, inv_rms r (rows,) = 1 / sqrt(mean(x²) + eps); x (rows, d), w (d,)
template <class T>
__global__ void rmsnorm_forward_kernel(T* y, T* inv_rms, const T* x, const T* w, int64_t rows,
                                       int64_t d, double eps) {
  __shared__ double scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * d;
    double ss = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      ss += static_cast<double>(xr[j]) * static_cast<double>(xr[j]);
    ss = detail::block_sum(ss, scratch);
    const T inv = static_cast<T>(1.0 / detail::device_sqrt(ss / double(d > 0 ? d : 1) + eps));
    if (threadIdx.x == 0) inv_rms[row] = inv;
    T* yr = y + row * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] * inv * w[j];
  }
}

// dx (rows, d) += a·g_j·w_j − b·x_j with a = r, b = r³·(Σ_k g_k·w_k·x_k)/d, g = dy
template <class T>
__global__ void rmsnorm_backward_x_kernel(T* dx, const T* dy, const T* x, const T* w,
                                          const T* inv_rms, int64_t rows, int64_t d) {
  __shared__ double scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * d;
    const T* gr = dy + row * d;
    double gx = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      gx += static_cast<double>(gr[j]) * static_cast<double>(w[j]) * static_cast<double>(xr[j]);
    gx = detail::block_sum(gx, scratch);
    const double inv = static_cast<double>(inv_rms[row]);
    const T a = static_cast<T>(inv);
    const T b = static_cast<T>(inv * inv * inv * gx / double(d));
    T* dxr = dx + row * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dxr[j] += a * gr[j] * w[j] - b * xr[j];
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void rmsnorm_forward(T* y, T* inv_rms, const T* x, const T* w, int64_t rows, int64_t d,
                     double eps) {
  if (rows <= 0) return;
  rmsnorm_forward_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                           detail::current_stream()>>>(y, inv_rms, x, w, rows, d, eps);
  CBQ_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

template <class T>
void rmsnorm_backward_x(T* dx, const T* dy, const T* x, const T* w, const T* inv_rms, int64_t rows,
                        int64_t d) {
  if (rows <= 0 || d <= 0) return;
  rmsnorm_backward_x_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                              detail::current_stream()>>>(dx, dy, x, w, inv_rms, rows, d);
  CBQ_CUDA_CHECK_LAUNCH("rmsnorm_backward_x_kernel");
}

template <class T>
void rmsnorm_backward_w(T* dw, const T* dy, const T* x, const T* inv_rms, int64_t rows, int64_t d) {
  detail::column_sum(dw, detail::RmsNormWeightTerm<T>{dy, x, inv_rms, d}, rows, d,
                     "rmsnorm_backward_w (column_sum_kernel)");
}

namespace detail {
inline const bool rmsnorm_registered = [] {
  ops::CudaRmsNorm<float>::forward = &rmsnorm_forward<float>;
  ops::CudaRmsNorm<float>::backward_x = &rmsnorm_backward_x<float>;
  ops::CudaRmsNorm<float>::backward_w = &rmsnorm_backward_w<float>;
  ops::CudaRmsNorm<double>::forward = &rmsnorm_forward<double>;
  ops::CudaRmsNorm<double>::backward_x = &rmsnorm_backward_x<double>;
  ops::CudaRmsNorm<double>::backward_w = &rmsnorm_backward_w<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
