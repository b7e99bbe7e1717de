#pragma once
// Building blocks of the row kernels (norms, softmax, losses) and the full reductions (sum,
// mean, mse): device math overloads for float and double, warp and block reductions, and two
// deterministic reductions built on them:
//   sum_all:     out[0] = T(Σ_i term(i) / divisor), two passes (per-block partials, then one
//                block adds them), accumulated in double.
//   column_sum:  out[j] += T(Σ_r term(r, j)), 16 row phases per column, accumulated in double.
// Determinism: every sum has a fixed order for a given size (fixed launch shape, butterfly
// shuffles, partials combined in index order, no atomics), so repeated runs give identical bits.
#include <cuda_runtime.h>

#include <algorithm>
#include <cbq/core/shape.hpp>
#include <cbq/core/tensor.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda::detail {

// ----------------------------------------------------------------------------
// device math: one name for float and double (the float versions are the single-precision
// CUDA functions, as the CPU reference's std:: overloads for float)

__device__ inline float device_exp(float x) { return expf(x); }
__device__ inline double device_exp(double x) { return exp(x); }
__device__ inline float device_log(float x) { return logf(x); }
__device__ inline double device_log(double x) { return log(x); }
__device__ inline float device_erf(float x) { return erff(x); }
__device__ inline double device_erf(double x) { return erf(x); }
__device__ inline double device_sqrt(double x) { return sqrt(x); }
__device__ inline float device_max(float a, float b) { return fmaxf(a, b); }
__device__ inline double device_max(double a, double b) { return fmax(a, b); }

template <class T>
__device__ inline T device_lowest();
template <>
__device__ inline float device_lowest<float>() {
  return -INFINITY;
}
template <>
__device__ inline double device_lowest<double>() {
  return -static_cast<double>(INFINITY);
}

// ----------------------------------------------------------------------------
// warp and block reductions. Butterfly (xor) shuffles: IEEE addition is commutative, so every
// lane ends with the same bits. Blocks must have a multiple of 32 threads (at most 1024).

inline constexpr int kRowBlockSize = 256;  // threads per row in the row kernels
inline constexpr int64_t kMaxRowBlocks = int64_t(1) << 20;

inline unsigned row_grid_size(int64_t rows) {
  return static_cast<unsigned>(std::clamp<int64_t>(rows, 1, kMaxRowBlocks));
}

template <class A>
__device__ inline A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <class A>
__device__ inline A warp_max(A v) {
  for (int offset = 16; offset > 0; offset >>= 1)
    v = device_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum of v over the block, returned to every thread. `scratch` is a __shared__ A[32]; the
// leading barrier makes it safe to call again with the same scratch.
template <class A>
__device__ inline A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : A(0));
}

// Maximum of v over the block, returned to every thread (scratch as block_sum).
template <class A>
__device__ inline A block_max(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : device_lowest<A>());
}

// ----------------------------------------------------------------------------
// sum_all: two-pass deterministic reduction

inline constexpr int kSumBlockSize = 256;
inline constexpr int kSumMaxBlocks = 1024;

// partial[b] = Σ_{i ≡ thread (mod grid)} term(i), summed over the block; partial (gridDim.x)
template <class F>
__global__ void sum_partials_kernel(double* partial, F term, int64_t n) {
  __shared__ double scratch[32];
  double s = 0;
  for (int64_t i = global_index(); i < n; i += grid_stride()) s += term(i);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] = T(Σ_b partial[b] / divisor); one block
template <class T>
__global__ void sum_finish_kernel(T* out, const double* partial, int count, double divisor) {
  __shared__ double scratch[32];
  double s = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[0] = static_cast<T>(s / divisor);
}

// out[0] = T(Σ_{i<n} term(i) / divisor), term(i) a double. The grid depends only on n.
template <class T, class F>
void sum_all(T* out, F term, int64_t n, double divisor) {
  const int blocks = static_cast<int>(
      std::clamp<int64_t>((n + 4 * kSumBlockSize - 1) / (4 * kSumBlockSize), 1, kSumMaxBlocks));
  // Freed at return: the caching allocator hands the block out again only to work queued later
  // on the same stream.
  Tensor<double> partial = Tensor<double>::empty(Shape{blocks}, Device::cuda);
  cudaStream_t stream = current_stream();
  sum_partials_kernel<<<blocks, kSumBlockSize, 0, stream>>>(partial.data(), term, n);
  CBQ_CUDA_CHECK_LAUNCH("sum_partials_kernel");
  sum_finish_kernel<<<1, kSumBlockSize, 0, stream>>>(out, partial.data(), blocks, divisor);
  CBQ_CUDA_CHECK_LAUNCH("sum_finish_kernel");
}

// ----------------------------------------------------------------------------
// column_sum: out[j] += T(Σ_r term(r, j)) over a (rows, cols) matrix

inline constexpr int kColumnSumCols = 32;  // threadIdx.x: a warp reads 32 consecutive columns
inline constexpr int kColumnSumRowPhases = 16;

// Thread (x, y) sums rows y, y + 16, ... of column blockIdx.x · 32 + x in double; the 16
// partial sums are then added in a fixed order.
template <class T, class F>
__global__ void column_sum_kernel(T* out, F term, int64_t rows, int64_t cols) {
  __shared__ double partial[kColumnSumRowPhases][kColumnSumCols];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnSumCols + threadIdx.x;
  double s = 0;
  if (j < cols)
    for (int64_t r = threadIdx.y; r < rows; r += kColumnSumRowPhases) s += term(r, j);
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    double total = partial[0][threadIdx.x];
    for (int y = 1; y < kColumnSumRowPhases; ++y) total += partial[y][threadIdx.x];
    out[j] += static_cast<T>(total);
  }
}

template <class T, class F>
void column_sum(T* out, F term, int64_t rows, int64_t cols, const char* what) {
  if (cols <= 0) return;
  const dim3 block(kColumnSumCols, kColumnSumRowPhases);
  const dim3 grid(static_cast<unsigned>((cols + kColumnSumCols - 1) / kColumnSumCols));
  column_sum_kernel<<<grid, block, 0, current_stream()>>>(out, term, rows, cols);
  CBQ_CUDA_CHECK_LAUNCH(what);
}

}  // namespace cbq::cuda::detail
