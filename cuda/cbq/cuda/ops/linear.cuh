#pragma once
// linear: y = x · Wᵀ + b (ops/linear.hpp). The two GEMMs go through cuBLASLt (gemm.cuh); the
// bias kernels live here.
//   forward:  y[r, j] += b[j]
//   backward: db[j]   += Σ_r dy[r, j]
#include <cbq/ops/linear.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace detail {
// bias_backward: a block covers 32 columns (threadIdx.x, so a warp reads 32 consecutive
// elements of a row) and kBiasRowsPerBlock row phases (threadIdx.y).
inline constexpr int kBiasCols = 32;
inline constexpr int kBiasRowsPerBlock = 16;
}  // namespace detail

// ----------------------------------------------------------------------------
// kernels

// y (rows, cols) += b (cols) broadcast over rows
template <class T>
__global__ void bias_forward_kernel(T* y, const T* b, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) y[i] += b[i % cols];
}

// db (cols) += Σ_r dy (rows, cols). Thread (x, y) of a block sums rows y, y + 16, ... of column
// blockIdx.x * 32 + x; the 16 partial sums are then added in a fixed order, so the result is
// deterministic (no atomics).
template <class T>
__global__ void bias_backward_kernel(T* db, const T* dy, int64_t rows, int64_t cols) {
  __shared__ T partial[detail::kBiasRowsPerBlock][detail::kBiasCols];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * detail::kBiasCols + threadIdx.x;
  T sum = T(0);
  if (j < cols)
    for (int64_t r = threadIdx.y; r < rows; r += detail::kBiasRowsPerBlock) sum += dy[r * cols + j];
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    T total = partial[0][threadIdx.x];
    for (int y = 1; y < detail::kBiasRowsPerBlock; ++y) total += partial[y][threadIdx.x];
    db[j] += total;
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void bias_forward(T* y, const T* b, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  bias_forward_kernel<<<detail::grid_size(rows * cols), detail::kBlockSize, 0,
                        detail::current_stream()>>>(y, b, rows, cols);
  CBQ_CUDA_CHECK_LAUNCH("bias_forward_kernel");
}

template <class T>
void bias_backward(T* db, const T* dy, int64_t rows, int64_t cols) {
  if (cols <= 0) return;
  const dim3 block(detail::kBiasCols, detail::kBiasRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((cols + detail::kBiasCols - 1) / detail::kBiasCols));
  bias_backward_kernel<<<grid, block, 0, detail::current_stream()>>>(db, dy, rows, cols);
  CBQ_CUDA_CHECK_LAUNCH("bias_backward_kernel");
}

namespace detail {
inline const bool linear_registered = [] {
  ops::CudaLinear<float>::bias_forward = &bias_forward<float>;
  ops::CudaLinear<float>::bias_backward = &bias_backward<float>;
  ops::CudaLinear<double>::bias_forward = &bias_forward<double>;
  ops::CudaLinear<double>::bias_backward = &bias_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
