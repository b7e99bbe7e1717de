#pragma once
// Launch helpers shared by the kernels: one-dimensional grid-stride loops over int64 indices, so
// any n works with a bounded grid; the device's shared-memory limit and the opt-in above 48 KiB.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
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

// The most dynamic shared memory one block of the current device may opt into.
inline int max_shared_bytes() {
  int device = 0, bytes = 0;
  CBQ_CUDA_CHECK(cudaGetDevice(&device));
  CBQ_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// Allows `kernel` more than the default 48 KiB of dynamic shared memory when it needs it.
template <class Kernel>
void allow_shared(Kernel kernel, std::size_t bytes) {
  if (bytes > 48 * 1024)
    CBQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

}  // namespace cbq::cuda::detail
