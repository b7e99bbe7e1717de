#pragma once
// Launch helpers shared by the elementwise kernels: one-dimensional grid-stride loops over
// int64 indices, so any n works with a bounded grid.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cbq/cuda/core/context.cuh"

namespace cbq::cuda::detail {

inline constexpr int kBlockSize = 256;
// Enough blocks to fill an H100 (132 SMs x 2048 threads) several times; larger n loops.
inline constexpr int64_t kMaxGridSize = 8192;

inline unsigned grid_size(int64_t n, int block = kBlockSize) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + block - 1) / block, 1, kMaxGridSize));
}

// Index of this thread in a grid-stride loop, and the stride.
__device__ inline int64_t global_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

inline cudaStream_t current_stream() { return default_context().stream(); }

}  // namespace cbq::cuda::detail
