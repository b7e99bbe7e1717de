#pragma once
// What the CBQ pass needs beyond the tape's ops to run on a GPU: a clamp of the learned steps to
// their floors after every optimiser step, a scan for non-finite values with the min and max of a
// tensor (NaN checks, static activation ranges), and scalar reads and writes of one-element
// parameters. The kernels are hooks filled by cuda/cbq/cuda/pass/pass.cuh; on CPU tensors every
// helper here is a plain loop.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "cbq/core/device.hpp"
#include "cbq/core/error.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq {

// CUDA kernels of the pass (registered by the CUDA backend).
template <class T>
struct CudaPassKernels {
  // x[i] = max(x[i], floor ? floor[i] : floor_value), i < n (device pointers)
  static inline void (*clamp_min)(T* x, const T* floor, T floor_value, int64_t n) = nullptr;
  // The index of the first non-finite element of x (n, device), −1 if none; *lo and *hi (host)
  // receive the min and max of x (meaningful when every element is finite).
  static inline int64_t (*scan)(const T* x, int64_t n, T* lo, T* hi) = nullptr;
};

template <class T>
struct CpuPassKernels {
  static void clamp_min(T* x, const T* floor, T floor_value, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = std::max(x[i], floor ? floor[i] : floor_value);
  }
  // Stops at the first non-finite element; *lo and *hi then hold the range before it.
  static int64_t scan(const T* x, int64_t n, T* lo, T* hi) {
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(static_cast<double>(x[i]))) return i;
      *lo = std::min(*lo, x[i]);
      *hi = std::max(*hi, x[i]);
    }
    return -1;
  }
};

namespace detail {

// The first non-finite element of a contiguous tensor on any device and the tensor's range.
template <class T>
struct ValueScan {
  int64_t first_non_finite = -1;
  T min = std::numeric_limits<T>::infinity();
  T max = -std::numeric_limits<T>::infinity();
};

template <class T>
ValueScan<T> scan_values(const Tensor<T>& t, const char* what) {
  CBQ_CHECK(t.is_contiguous(), "{}: tensor of shape {} is not contiguous", what, t.shape());
  ValueScan<T> s;
  const int64_t n = t.numel();
  if (n == 0) return s;
  s.first_non_finite = kernel_for(t.device(), &CpuPassKernels<T>::scan, CudaPassKernels<T>::scan,
                                  what)(t.data(), n, &s.min, &s.max);
  return s;
}

// Element i of a contiguous tensor on any device (one small copy for a device tensor).
template <class T>
T element_at(const Tensor<T>& t, int64_t i) {
  if (t.device() == Device::cpu) return t.data()[i];
  T value{};
  copy_bytes(&value, Device::cpu, t.data() + i, t.device(), sizeof(T));
  return value;
}

// Writes element i of a contiguous tensor on any device.
template <class T>
void set_element(Tensor<T>& t, int64_t i, T value) {
  if (t.device() == Device::cpu) {
    t.data()[i] = value;
    return;
  }
  copy_bytes(t.data() + i, t.device(), &value, Device::cpu, sizeof(T));
}

// x = max(x, floor) elementwise (floor undefined: max(x, floor_value)); x and floor contiguous
// on one device.
template <class T>
void clamp_min(Tensor<T>& x, const Tensor<T>& floor, T floor_value, const char* what) {
  const int64_t n = x.numel();
  if (n == 0) return;
  if (floor.defined())
    CBQ_CHECK(floor.numel() == n && floor.device() == x.device(),
              "{}: floor of shape {} on {} does not match the tensor {} on {}", what, floor.shape(),
              device_name(floor.device()), x.shape(), device_name(x.device()));
  kernel_for(x.device(), &CpuPassKernels<T>::clamp_min, CudaPassKernels<T>::clamp_min, what)(
      x.data(), floor.defined() ? floor.data() : nullptr, floor_value, n);
}

// Free and total memory of the CUDA device (free counts the backend's cached blocks); false
// when the backend does not report it.
inline bool device_memory(std::size_t& free_bytes, std::size_t& total_bytes) {
  if (!cuda_available() || !cuda_hooks().memory_info) return false;
  cuda_hooks().memory_info(&free_bytes, &total_bytes);
  return true;
}

}  // namespace detail
}  // namespace cbq
