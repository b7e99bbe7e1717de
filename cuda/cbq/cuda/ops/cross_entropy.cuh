#pragma once
// cross_entropy and token_nll (ops/cross_entropy.hpp). One block per row computes
// nll_r = lse(x_r) − x_r[t_r] with the row maximum and a double sum of exp(x_j − max), the
// CPU's formula; the mean over rows is the deterministic two-pass sum_all in double. Backward is
// elementwise: softmax_j = exp(x_j − x_t − nll_r) in double, as the CPU.
#include <cbq/ops/cross_entropy.hpp>
#include <cstdint>

#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace detail {
// term(i) = nll[i] in double
template <class T>
struct NllTerm {
  const T* nll;
  __device__ double operator()(int64_t i) const { return static_cast<double>(nll[i]); }
};
}  // namespace detail

// ----------------------------------------------------------------------------
// kernels

// nll (rows,) = O(lse(x_r) − x_r[t_r]); x (rows, n), targets (rows,)
template <class T, class O>
__global__ void cross_entropy_rows_kernel(O* nll, const T* x, const int32_t* targets, int64_t rows,
                                          int64_t n) {
  __shared__ T max_scratch[32];
  __shared__ double sum_scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    T m = detail::device_lowest<T>();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = detail::device_max(m, xr[j]);
    const double row_max = static_cast<double>(detail::block_max(m, max_scratch));
    double s = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      s += detail::device_exp(static_cast<double>(xr[j]) - row_max);
    const double shift = detail::device_log(detail::block_sum(s, sum_scratch));
    if (threadIdx.x == 0)
      nll[row] = static_cast<O>(-((static_cast<double>(xr[targets[row]]) - row_max) - shift));
  }
}

// dx (rows, n) += (g[0] / rows) · (exp(x_j − x_t − nll_r) − [j = t_r])
template <class T>
__global__ void cross_entropy_backward_kernel(T* dx, const T* g, const T* x, const int32_t* targets,
                                              const T* nll, int64_t rows, int64_t n) {
  const T scale = g[0] / static_cast<T>(rows);  // rounded in T, as the CPU
  const int64_t total = rows * n;
  for (int64_t e = detail::global_index(); e < total; e += detail::grid_stride()) {
    const int64_t r = e / n, j = e % n;
    const int64_t t = targets[r];
    const double p =
        detail::device_exp(static_cast<double>(x[e]) - static_cast<double>(x[r * n + t]) -
                           static_cast<double>(nll[r]));
    T v = dx[e] + scale * static_cast<T>(p);
    if (j == t) v -= scale;  // the CPU's second update of the target element
    dx[e] = v;
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void cross_entropy_forward(T* out, T* nll, const T* logits, const int32_t* targets, int64_t rows,
                           int64_t n) {
  if (rows <= 0) return;
  cross_entropy_rows_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                              detail::current_stream()>>>(nll, logits, targets, rows, n);
  CBQ_CUDA_CHECK_LAUNCH("cross_entropy_rows_kernel");
  detail::sum_all(out, detail::NllTerm<T>{nll}, rows, static_cast<double>(rows));
}

template <class T>
void cross_entropy_backward(T* dx, const T* g, const T* logits, const int32_t* targets,
                            const T* nll, int64_t rows, int64_t n) {
  const int64_t total = rows * n;
  if (total <= 0) return;
  cross_entropy_backward_kernel<<<detail::grid_size(total), detail::kBlockSize, 0,
                                  detail::current_stream()>>>(dx, g, logits, targets, nll, rows, n);
  CBQ_CUDA_CHECK_LAUNCH("cross_entropy_backward_kernel");
}

// nll_host (rows,) in double; targets_host on the host. Synchronizes (the result is on the host).
template <class T>
void token_nll(double* nll_host, const T* logits, const int32_t* targets_host, int64_t rows,
               int64_t n) {
  if (rows <= 0) return;
  Tensor<int32_t> targets = Tensor<int32_t>::empty(Shape{rows}, Device::cuda);
  copy_bytes(targets.data(), Device::cuda, targets_host, Device::cpu,
             sizeof(int32_t) * static_cast<std::size_t>(rows));
  Tensor<double> nll = Tensor<double>::empty(Shape{rows}, Device::cuda);
  cross_entropy_rows_kernel<<<detail::row_grid_size(rows), detail::kRowBlockSize, 0,
                              detail::current_stream()>>>(nll.data(), logits, targets.data(), rows,
                                                          n);
  CBQ_CUDA_CHECK_LAUNCH("cross_entropy_rows_kernel (token_nll)");
  copy_bytes(nll_host, Device::cpu, nll.data(), Device::cuda,
             sizeof(double) * static_cast<std::size_t>(rows));
}

namespace detail {
inline const bool cross_entropy_registered = [] {
  ops::CudaCrossEntropy<float>::forward = &cross_entropy_forward<float>;
  ops::CudaCrossEntropy<float>::backward = &cross_entropy_backward<float>;
  ops::CudaCrossEntropy<float>::token_nll = &token_nll<float>;
  ops::CudaCrossEntropy<double>::forward = &cross_entropy_forward<double>;
  ops::CudaCrossEntropy<double>::backward = &cross_entropy_backward<double>;
  ops::CudaCrossEntropy<double>::token_nll = &token_nll<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
