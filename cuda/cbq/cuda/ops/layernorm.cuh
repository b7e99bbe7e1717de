#pragma once
// layernorm (ops/layernorm.hpp): one block per row for the forward pass (two-pass mean and
// variance in double, as the CPU) and dx (row sums in double); dw = Σ_rows dy ⊙ x̂ and
// db = Σ_rows dy by the deterministic column sum (terms rounded in T as the CPU, summed in
// double; the CPU sums in T).
#include <cbq/ops/layernorm.hpp>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace detail {
// term(r, j) = dy[r, j] · (x[r, j] − μ_r) · r_r, rounded in T
template <class T>
struct LayerNormWeightTerm {
  const T* dy;
  const T* x;
  const T* mean;
  const T* inv_std;
  int64_t d;
  __device__ double operator()(int64_t r, int64_t j) const {
    return static_cast<double>(dy[r * d + j] * (x[r * d + j] - mean[r]) * inv_std[r]);
  }
};

// term(r, j) = dy[r, j]
template <class T>
struct LayerNormBiasTerm {
  const T* dy;
  int64_t d;
  __device__ double operator()(int64_t r, int64_t j) const {
    return static_cast<double>(dy[r * d + j]);
  }
};
}  // namespace detail

// ----------------------------------------------------------------------------
// kernels

// y (rows, d) = (x − μ) · r ⊙ w (+ b); mean μ, inv_std r (rows,); x (rows, d), w, b (d,)
template <class T>
__global__ void layernorm_forward_kernel(T* y, T* mean, T* inv_std, const T* x, const T* w,
                                         const T* b, int64_t rows, int64_t d, double eps) {
  __shared__ double scratch[32];
  const double count = double(d > 0 ? d : 1);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * d;
    double sum = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) sum += static_cast<double>(xr[j]);
    const double m = detail::block_sum(sum, scratch) / count;
    double var = 0;  // two-pass: no cancellation for rows with a large mean
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const double centered = static_cast<double>(xr[j]) - m;
      var += centered * centered;
    }
    var = detail::block_sum(var, scratch) / count;
    const T mu = static_cast<T>(m);
    const T r = static_cast<T>(1.0 / detail::device_sqrt(var + eps));
    if (threadIdx.x == 0) {
      mean[row] = mu;
      inv_std[row] = r;
    }
    T* yr = y + row * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const T xhat = (xr[j] - mu) * r;
      yr[j] = b ? xhat * w[j] + b[j] : xhat * w[j];
    }
  }
}

// dx (rows, d) += r · (g ⊙ w − mean(g ⊙ w) − x̂ · mean(g ⊙ w ⊙ x̂)), g = dy; means in double
template <class T>
__global__ void layernorm_backward_x_kernel(T* dx, const T* dy, const T* x, const T* w,
                                            const T* mean, const T* inv_std, int64_t rows,
                                            int64_t d) {
  __shared__ double scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * d;
    const T* gr = dy + row * d;
    const T mu = mean[row], r = inv_std[row];
    double sum_g = 0, sum_gx = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const double g = static_cast<double>(gr[j]) * static_cast<double>(w[j]);
      sum_g += g;
      sum_gx += g * (static_cast<double>(xr[j]) - static_cast<double>(mu)) * static_cast<double>(r);
    }
    sum_g = detail::block_sum(sum_g, scratch);
    sum_gx = detail::block_sum(sum_gx, scratch);
    const T mean_g = static_cast<T>(sum_g / double(d));
    const T mean_gx = static_cast<T>(sum_gx / double(d));
    T* dxr = dx + row * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const T xhat = (xr[j] - mu) * r;
      dxr[j] += r * (gr[j] * w[j] - mean_g - xhat * mean_gx);
    }
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void layernorm_forward(T* y, T* mean, T* inv_std, const T* x, const T* w, const T* b, int64_t rows,
                       int64_t d, double eps) {
  if (rows <= 0) return;
  layernorm_forward_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                             detail::current_stream()>>>(y, mean, inv_std, x, w, b, rows, d, eps);
  CBQ_CUDA_CHECK_LAUNCH("layernorm_forward_kernel");
}

template <class T>
void layernorm_backward_x(T* dx, const T* dy, const T* x, const T* w, const T* mean,
                          const T* inv_std, int64_t rows, int64_t d) {
  if (rows <= 0 || d <= 0) return;
  layernorm_backward_x_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                                detail::current_stream()>>>(dx, dy, x, w, mean, inv_std, rows, d);
  CBQ_CUDA_CHECK_LAUNCH("layernorm_backward_x_kernel");
}

template <class T>
void layernorm_backward_wb(T* dw, T* db, const T* dy, const T* x, const T* mean, const T* inv_std,
                           int64_t rows, int64_t d) {
  if (dw)
    detail::column_sum(dw, detail::LayerNormWeightTerm<T>{dy, x, mean, inv_std, d}, rows, d,
                       "layernorm dw (column_sum_kernel)");
  if (db)
    detail::column_sum(db, detail::LayerNormBiasTerm<T>{dy, d}, rows, d,
                       "layernorm db (column_sum_kernel)");
}

namespace detail {
inline const bool layernorm_registered = [] {
  ops::CudaLayerNorm<float>::forward = &layernorm_forward<float>;
  ops::CudaLayerNorm<float>::backward_x = &layernorm_backward_x<float>;
  ops::CudaLayerNorm<float>::backward_wb = &layernorm_backward_wb<float>;
  ops::CudaLayerNorm<double>::forward = &layernorm_forward<double>;
  ops::CudaLayerNorm<double>::backward_x = &layernorm_backward_x<double>;
  ops::CudaLayerNorm<double>::backward_wb = &layernorm_backward_wb<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
