#pragma once
// Shared helpers for op implementations: argument checks and the gradient accumulation that
// every backward uses.
//
// Every op's file has one layout (docs/ARCHITECTURE.md, "One layout for every op"):
//   1. CudaOp<T>: the CUDA hooks, function pointers that the CUDA backend (cuda/cbq/cuda/ops/,
//      compiled by nvcc) assigns at static-init time; host headers never include CUDA headers.
//   2. CpuOp<T>: the CPU kernels, one static function per hook with exactly its signature,
//      forward first, then backward.
//   3. op(...): the forward (checks, output, kernel, record), then OpNode<T>: the backward.
// Both pass through one dispatch, kernel_for(device, &CpuOp<T>::forward, CudaOp<T>::forward,
// "op"), which deduces both kernels as one type (a drifting signature does not compile) and
// gives a clear error when a CUDA tensor meets a program built without the backend.
#include <algorithm>
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
inline constexpr int64_t kElementwiseGrain = 1 << 12;

namespace detail {
// Rows per parallel chunk, so that a chunk covers about `grain` elements of rows `cols` wide.
inline int64_t row_grain(int64_t cols, int64_t grain = kElementwiseGrain) {
  return std::max<int64_t>(1, grain / std::max<int64_t>(cols, 1));
}
}  // namespace detail

template <class T>
struct CpuCommon {
  static void axpy(T* y, const T* x, T alpha, int64_t n) {
    parallel_for(n, kElementwiseGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) y[i] += alpha * x[i];
    });
  }
};

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
  kernel_for(dst.device(), &CpuCommon<T>::axpy, CudaCommon<T>::axpy, "accumulate (axpy)")(
      dst.data(), src.data(), alpha, dst.numel());
}

}  // namespace cbq::ops
