#pragma once
// RTN grid initialisation (quant/grid.hpp, init_minmax), registered as quant::CudaGrid: the min
// and max of every group, then minmax_params.
//   per-channel / per-group: one warp per (row, group), lane-strided then a butterfly;
//   per-tensor: blocks reduce grid-stride shares, one block reduces the block results.
// Min and max are exact whatever the order, and minmax_params is evaluated with the CPU's IEEE
// operations (_rn), so scale and zero equal the CPU's bit for bit.
#include <cbq/quant/grid.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"
#include "cbq/cuda/quant/quant_math.cuh"

namespace cbq::cuda {

namespace grid_detail {

// quant::minmax_params, operation for operation.
template <class T>
__device__ inline void minmax_params(T lo, T hi, bool symmetric, T qmax, T& scale, T& zero) {
  using namespace qmath;
  lo = std_min(lo, T(0));  // the grid always contains 0
  hi = std_max(hi, T(0));
  if (symmetric) {
    const T amax = std_max(-lo, hi);
    scale = std_max(div(amax, qmax), min_step<T>());
    zero = T(0);
  } else {
    scale = std_max(div(sub(hi, lo), qmax), min_step<T>());
    zero = std_clamp(round_even(div(-lo, scale)), T(0), qmax);
  }
}

// Blocks of the per-tensor first stage.
inline constexpr int64_t kTensorBlocks = 256;

}  // namespace grid_detail

// ----------------------------------------------------------------------------
// kernels

// scale, zero (rows, groups_per_row) from the min / max of each group of w (rows, cols); one warp
// per group.
template <class T>
__global__ void grid_group_minmax_kernel(T* scale, T* zero, const T* w, int64_t rows,
                                         qmath::GroupLayout layout, bool symmetric, T qmax) {
  const int lane = threadIdx.x % qmath::kWarpSize;
  const int64_t groups = rows * layout.groups_per_row;
  for (int64_t item = qmath::global_warp(); item < groups; item += qmath::warp_stride()) {
    const int64_t r = item / layout.groups_per_row, k = item % layout.groups_per_row;
    const int64_t c0 = k * layout.group_cols, c1 = c0 + layout.group_elements(k);
    const T* wr = w + r * layout.cols;
    T lo = qmath::infinity<T>(), hi = -qmath::infinity<T>();
    for (int64_t c = c0 + lane; c < c1; c += qmath::kWarpSize) {
      lo = qmath::std_min(lo, wr[c]);
      hi = qmath::std_max(hi, wr[c]);
    }
    lo = qmath::warp_min(lo);
    hi = qmath::warp_max(hi);
    if (lane == 0) grid_detail::minmax_params(lo, hi, symmetric, qmax, scale[item], zero[item]);
  }
}

// lo_hi[2·b], lo_hi[2·b + 1] = min, max of block b's grid-stride share of w (n).
template <class T>
__global__ void grid_tensor_minmax_partial_kernel(T* lo_hi, const T* w, int64_t n) {
  __shared__ T warp_lo[qmath::kWarpsPerBlock], warp_hi[qmath::kWarpsPerBlock];
  T lo = qmath::infinity<T>(), hi = -qmath::infinity<T>();
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    lo = qmath::std_min(lo, w[i]);
    hi = qmath::std_max(hi, w[i]);
  }
  lo = qmath::warp_min(lo);
  hi = qmath::warp_max(hi);
  const int lane = threadIdx.x % qmath::kWarpSize, warp = threadIdx.x / qmath::kWarpSize;
  if (lane == 0) {
    warp_lo[warp] = lo;
    warp_hi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < qmath::kWarpsPerBlock; ++i) {
      lo = qmath::std_min(lo, warp_lo[i]);
      hi = qmath::std_max(hi, warp_hi[i]);
    }
    lo_hi[2 * blockIdx.x] = lo;
    lo_hi[2 * blockIdx.x + 1] = hi;
  }
}

// scale[0], zero[0] from the min / max over `blocks` partial pairs; one thread.
template <class T>
__global__ void grid_tensor_params_kernel(T* scale, T* zero, const T* lo_hi, int64_t blocks,
                                          bool symmetric, T qmax) {
  T lo = lo_hi[0], hi = lo_hi[1];
  for (int64_t b = 1; b < blocks; ++b) {
    lo = qmath::std_min(lo, lo_hi[2 * b]);
    hi = qmath::std_max(hi, lo_hi[2 * b + 1]);
  }
  grid_detail::minmax_params(lo, hi, symmetric, qmax, scale[0], zero[0]);
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void grid_init_minmax(T* scale, T* zero, const T* w, int64_t rows, int64_t cols,
                      const quant::GridSpec& spec) {
  if (rows <= 0 || cols <= 0) return;
  const qmath::GroupLayout layout = qmath::group_layout(spec, cols);
  const T qmax = static_cast<T>(spec.qmax());
  cudaStream_t stream = detail::current_stream();
  if (!layout.per_tensor) {
    const int64_t groups = rows * layout.groups_per_row;
    grid_group_minmax_kernel<<<qmath::warp_grid_size(groups), detail::kBlockSize, 0, stream>>>(
        scale, zero, w, rows, layout, spec.symmetric, qmax);
    CBQ_CUDA_CHECK_LAUNCH("grid_group_minmax_kernel");
    return;
  }
  const int64_t n = rows * cols;
  const int64_t blocks = std::min<int64_t>(grid_detail::kTensorBlocks,
                                           (n + detail::kBlockSize - 1) / detail::kBlockSize);
  qmath::DeviceBuffer<T> lo_hi(2 * blocks);
  grid_tensor_minmax_partial_kernel<<<static_cast<unsigned>(blocks), detail::kBlockSize, 0,
                                      stream>>>(lo_hi.get(), w, n);
  CBQ_CUDA_CHECK_LAUNCH("grid_tensor_minmax_partial_kernel");
  grid_tensor_params_kernel<<<1, 1, 0, stream>>>(scale, zero, lo_hi.get(), blocks, spec.symmetric,
                                                 qmax);
  CBQ_CUDA_CHECK_LAUNCH("grid_tensor_params_kernel");
}

namespace detail {
inline const bool grid_stats_registered = [] {
  quant::CudaGrid<float>::init_minmax = &grid_init_minmax<float>;
  quant::CudaGrid<double>::init_minmax = &grid_init_minmax<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
