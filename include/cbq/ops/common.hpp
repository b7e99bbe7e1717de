#pragma once
// Shared helpers for op implementations: argument checks and the gradient accumulation that
// every backward uses.
//
// CUDA dispatch: an op that has a CUDA kernel declares a hook struct next to its CPU code, e.g.
//   template <class T> struct CudaAdd { static inline void (*forward)(...) = nullptr; };
// The CUDA backend (cuda/*.cuh, compiled by nvcc) assigns the pointers at static-init time; the
// host code calls through them when a tensor lives on Device::cuda and throws a clear error when
// the backend was not compiled in. Host headers never include CUDA headers.
#include <cstdint>

#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"
#include "cbq/core/tape.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq::ops {

template <class T>
struct CudaCommon {
  // y[i] += alpha * x[i], i < n
  static inline void (*axpy)(T* y, const T* x, T alpha, int64_t n) = nullptr;
};

// Elements per thread below which elementwise loops stay single-threaded.
inline constexpr int64_t kElementwiseGrain = 1 << 15;

template <class T>
void check_contiguous(const char* op, const char* what, const Tensor<T>& t) {
  CBQ_CHECK(t.is_contiguous(), "{}: {} of shape {} must be contiguous", op, what, t.shape());
}

template <class T>
void check_same_device(const char* op, const Tensor<T>& a, const Tensor<T>& b) {
  CBQ_CHECK(a.device() == b.device(), "{}: operands on different devices ({} and {})", op,
            device_name(a.device()), device_name(b.device()));
}

template <class T>
void check_cpu(const char* op, const Tensor<T>& t) {
  CBQ_CHECK(t.device() == Device::cpu,
            "{}: no CUDA kernel for this op yet (tensor of shape {} is on cuda)", op, t.shape());
}

// dst += alpha * src (same number of elements, both contiguous).
template <class T>
void accumulate(Tensor<T>& dst, const Tensor<T>& src, T alpha = T(1)) {
  CBQ_CHECK(dst.numel() == src.numel(), "accumulate: gradient of shape {} into {}", src.shape(),
            dst.shape());
  check_same_device("accumulate", dst, src);
  if (dst.device() == Device::cuda) {
    require_cuda("accumulate");
    cuda_kernel(CudaCommon<T>::axpy, "accumulate (axpy)")(dst.data(), src.data(), alpha,
                                                          dst.numel());
    return;
  }
  T* y = dst.data();
  const T* x = src.data();
  parallel_for(dst.numel(), kElementwiseGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] += alpha * x[i];
  });
}

}  // namespace cbq::ops
