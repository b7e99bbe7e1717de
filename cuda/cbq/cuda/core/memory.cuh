#pragma once
// The device hooks of cbq::cuda_hooks() (core/device.hpp): allocation through the caching
// allocator, copies and fills on the default context's stream. Registered at static
// initialisation in every program that includes <cbq/cuda.cuh>; no CUDA call happens until a
// CUDA tensor is first used.
//
// Ordering: device work is asynchronous on the stream. A copy with a host side waits for the
// stream to finish (the host may read the data, or free or modify its buffer, as soon as the
// call returns); device-to-device copies and fills do not wait.
#include <cuda_runtime.h>

#include <cbq/core/device.hpp>
#include <cstddef>

#include "cbq/cuda/core/allocator.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/context.cuh"

namespace cbq::cuda {

inline void* device_alloc(std::size_t bytes) { return allocator().allocate(bytes); }

inline void device_free(void* ptr) { allocator().deallocate(ptr); }

inline void device_copy(void* dst, Device dst_device, const void* src, Device src_device,
                        std::size_t bytes) {
  if (bytes == 0) return;
  cudaStream_t stream = default_context().stream();
  // cudaMemcpyDefault: unified addressing tells the driver which side each pointer is on.
  CBQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
  if (dst_device == Device::cpu || src_device == Device::cpu)
    CBQ_CUDA_CHECK(cudaStreamSynchronize(stream));
}

inline void device_memset_zero(void* ptr, std::size_t bytes) {
  if (bytes == 0) return;
  CBQ_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, default_context().stream()));
}

inline void device_synchronize() { default_context().synchronize(); }

// Waits for all cbq work on the default stream (the same as cbq::cuda_hooks().synchronize()).
inline void synchronize() { device_synchronize(); }

namespace detail {

inline const bool device_hooks_registered = [] {
  DeviceHooks& hooks = cuda_hooks();
  hooks.alloc = &device_alloc;
  hooks.free = &device_free;
  hooks.copy = &device_copy;
  hooks.memset_zero = &device_memset_zero;
  hooks.synchronize = &device_synchronize;
  return true;
}();

}  // namespace detail
}  // namespace cbq::cuda
