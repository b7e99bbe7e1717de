#pragma once
// Devices and raw storage. Host headers never include CUDA headers: the CUDA backend
// (cuda/*.cuh, compiled by nvcc) fills in DeviceHooks at static-initialisation time, and the
// host code only calls through these function pointers.
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <string_view>

#include "cbq/core/error.hpp"

namespace cbq {

enum class Device { cpu, cuda };

inline const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

// Copies between any two devices; `kind` tells the backend which side each pointer is on.
struct DeviceHooks {
  void* (*alloc)(std::size_t bytes) = nullptr;
  void (*free)(void* ptr) = nullptr;
  void (*copy)(void* dst, Device dst_device, const void* src, Device src_device,
               std::size_t bytes) = nullptr;
  void (*memset_zero)(void* ptr, std::size_t bytes) = nullptr;
  void (*synchronize)() = nullptr;
  // Bytes the device can still hand out (the driver's free memory plus what the backend holds
  // cached for reuse) and its total memory.
  void (*memory_info)(std::size_t* free_bytes, std::size_t* total_bytes) = nullptr;
};

// One instance per program (an inline function's static is shared by all translation units).
inline DeviceHooks& cuda_hooks() {
  static DeviceHooks hooks;
  return hooks;
}

inline bool cuda_available() { return cuda_hooks().alloc != nullptr; }

inline void require_cuda(std::string_view what) {
  CBQ_CHECK(cuda_available(),
            "{}: a CUDA tensor was used but the CUDA backend is not compiled in (include "
            "<cbq/cuda.cuh> in a .cu file and build with CBQ_ENABLE_CUDA)",
            what);
}

// The CUDA kernel behind a host op's hook (the backend fills the hooks when a .cu file of the
// program includes <cbq/cuda.cuh>): `hook` itself, or a cbq::Error naming `op`. Every op
// dispatches through it: `cuda_kernel(CudaRmsNorm<T>::forward, "rmsnorm")(y, r, x, w, ...)`.
template <class Hook>
Hook cuda_kernel(Hook hook, std::string_view op) {
  CBQ_CHECK(hook != nullptr,
            "{}: CUDA kernel not registered (include <cbq/cuda.cuh> in a .cu file of the "
            "program)",
            op);
  return hook;
}

// The kernel of one op for `device`: its CPU kernel, or its CUDA hook through cuda_kernel. Both
// are deduced as one type, so a CPU kernel whose signature drifts from its CUDA hook's does not
// compile. Every op dispatches through it:
//   kernel_for(x.device(), &CpuRmsNorm<T>::forward, CudaRmsNorm<T>::forward, "rmsnorm")(y, ...);
template <class Kernel>
Kernel kernel_for(Device device, Kernel cpu, Kernel cuda, std::string_view op) {
  if (device == Device::cpu) return cpu;
  require_cuda(op);
  return cuda_kernel(cuda, op);
}

// A block of memory on one device; owned by shared_ptr so that views share it.
class Storage {
 public:
  Storage(std::size_t bytes, Device device) : bytes_(bytes), device_(device) {
    if (bytes == 0) return;
    if (device == Device::cpu) {
      // 64-byte alignment for vector loads; aligned_alloc needs a multiple of the alignment.
      std::size_t rounded = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, rounded);
      if (!data_)
        fail("out of memory: cannot allocate {} bytes ({:.1f} MiB) of host memory", bytes,
             static_cast<double>(bytes) / (1 << 20));
    } else {
      require_cuda("Storage");
      data_ = cuda_hooks().alloc(bytes);
    }
  }
  // Memory owned elsewhere (e.g. a file mapping); `release` runs when the last tensor viewing it
  // goes away.
  Storage(void* data, std::size_t bytes, Device device, std::function<void()> release)
      : data_(data), bytes_(bytes), device_(device), release_(std::move(release)) {}
  ~Storage() {
    if (release_) {
      release_();
      return;
    }
    if (!data_) return;
    if (device_ == Device::cpu) {
      std::free(data_);
    } else if (cuda_hooks().free) {
      cuda_hooks().free(data_);
    }
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Device device_ = Device::cpu;
  std::function<void()> release_;
};

inline void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device,
                       std::size_t bytes) {
  if (bytes == 0) return;
  if (dst_device == Device::cpu && src_device == Device::cpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
  require_cuda("copy");
  cuda_hooks().copy(dst, dst_device, src, src_device, bytes);
}

inline void zero_bytes(void* ptr, Device device, std::size_t bytes) {
  if (bytes == 0) return;
  if (device == Device::cpu) {
    std::memset(ptr, 0, bytes);
    return;
  }
  require_cuda("zero");
  cuda_hooks().memset_zero(ptr, bytes);
}

}  // namespace cbq
