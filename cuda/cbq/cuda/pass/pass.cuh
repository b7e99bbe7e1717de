#pragma once
// The CBQ pass's own kernels (pass/device_support.hpp), registered as CudaPassKernels, and the
// device memory query of cuda_hooks().memory_info:
//   clamp_min: the learned steps' floor after every optimiser step (QuantLinear::project_steps);
//   scan:      the first non-finite element and the min / max of a tensor (the pass's NaN
//              checks, static activation ranges), a two-stage reduction with exact results:
//              min, max and the smallest bad index do not depend on the order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cbq/core/device.hpp>
#include <cbq/pass/device_support.hpp>
#include <cstdint>

#include "cbq/cuda/core/allocator.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/context.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace pass_detail {

inline constexpr int kScanBlockSize = 256;
inline constexpr int kScanMaxBlocks = 256;

// One block's (or the whole tensor's) scan result.
template <class T>
struct ScanPartial {
  long long first_bad;  // smallest non-finite index, or kNoBad
  T lo, hi;             // min, max of the finite elements seen
};

inline constexpr long long kNoBad = 0x7fffffffffffffffLL;

template <class T>
__device__ inline bool is_finite_value(T v) {
  return isfinite(v);
}

template <class T>
__device__ inline void merge(ScanPartial<T>& a, long long bad, T lo, T hi) {
  a.first_bad = bad < a.first_bad ? bad : a.first_bad;
  a.lo = lo < a.lo ? lo : a.lo;
  a.hi = hi > a.hi ? hi : a.hi;
}

// Reduces the calling thread's partial over the block; thread 0 gets the result.
template <class T>
__device__ inline ScanPartial<T> block_merge(ScanPartial<T> p) {
  __shared__ long long bad_scratch[32];
  __shared__ T lo_scratch[32], hi_scratch[32];
  for (int offset = 16; offset > 0; offset >>= 1)
    merge(p, __shfl_xor_sync(0xffffffffu, p.first_bad, offset),
          __shfl_xor_sync(0xffffffffu, p.lo, offset), __shfl_xor_sync(0xffffffffu, p.hi, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    bad_scratch[warp] = p.first_bad;
    lo_scratch[warp] = p.lo;
    hi_scratch[warp] = p.hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    for (int w = 1; w < warps; ++w) merge(p, bad_scratch[w], lo_scratch[w], hi_scratch[w]);
  }
  return p;
}

}  // namespace pass_detail

// ----------------------------------------------------------------------------
// kernels

// x[i] = max(x[i], floor ? floor[i] : floor_value), with std::max's rule (x kept unless x < f)
template <class T>
__global__ void clamp_min_kernel(T* x, const T* floor, T floor_value, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T f = floor ? floor[i] : floor_value;
    if (x[i] < f) x[i] = f;
  }
}

// partial[blockIdx.x] = the scan of this block's grid-stride share of x (n)
template <class T>
__global__ void scan_partial_kernel(pass_detail::ScanPartial<T>* partial, const T* x, int64_t n) {
  pass_detail::ScanPartial<T> p{pass_detail::kNoBad, INFINITY, -INFINITY};
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T v = x[i];
    if (!pass_detail::is_finite_value(v)) {
      if (static_cast<long long>(i) < p.first_bad) p.first_bad = static_cast<long long>(i);
      continue;
    }
    if (v < p.lo) p.lo = v;
    if (v > p.hi) p.hi = v;
  }
  p = pass_detail::block_merge(p);
  if (threadIdx.x == 0) partial[blockIdx.x] = p;
}

// partial[count] = the merge of partial[0 .. count); one block
template <class T>
__global__ void scan_finish_kernel(pass_detail::ScanPartial<T>* partial, int count) {
  pass_detail::ScanPartial<T> p{pass_detail::kNoBad, INFINITY, -INFINITY};
  for (int i = threadIdx.x; i < count; i += blockDim.x)
    pass_detail::merge(p, partial[i].first_bad, partial[i].lo, partial[i].hi);
  p = pass_detail::block_merge(p);
  if (threadIdx.x == 0) partial[count] = p;
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void clamp_min(T* x, const T* floor, T floor_value, int64_t n) {
  if (n <= 0) return;
  clamp_min_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(
      x, floor, floor_value, n);
  CBQ_CUDA_CHECK_LAUNCH("clamp_min_kernel");
}

template <class T>
int64_t scan_values(const T* x, int64_t n, T* lo, T* hi) {
  using Partial = pass_detail::ScanPartial<T>;
  if (n <= 0) return -1;
  const int blocks = static_cast<int>(std::clamp<int64_t>(
      (n + 4 * pass_detail::kScanBlockSize - 1) / (4 * pass_detail::kScanBlockSize), 1,
      pass_detail::kScanMaxBlocks));
  // blocks partials and the result after them; freed at return (stream-ordered reuse)
  Tensor<uint8_t> work = Tensor<uint8_t>::empty(
      Shape{static_cast<int64_t>(sizeof(Partial)) * (blocks + 1)}, Device::cuda);
  Partial* partial = reinterpret_cast<Partial*>(work.data());
  cudaStream_t stream = detail::current_stream();
  scan_partial_kernel<<<blocks, pass_detail::kScanBlockSize, 0, stream>>>(partial, x, n);
  CBQ_CUDA_CHECK_LAUNCH("scan_partial_kernel");
  scan_finish_kernel<<<1, pass_detail::kScanBlockSize, 0, stream>>>(partial, blocks);
  CBQ_CUDA_CHECK_LAUNCH("scan_finish_kernel");
  Partial result{};
  CBQ_CUDA_CHECK(
      cudaMemcpyAsync(&result, partial + blocks, sizeof(Partial), cudaMemcpyDeviceToHost, stream));
  CBQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  *lo = result.lo;
  *hi = result.hi;
  return result.first_bad == pass_detail::kNoBad ? -1 : static_cast<int64_t>(result.first_bad);
}

// Free memory for new tensors: the driver's free memory plus the allocator's cached blocks.
inline void memory_info(std::size_t* free_bytes, std::size_t* total_bytes) {
  default_context();  // the device the backend uses is current
  std::size_t free_now = 0, total = 0;
  CBQ_CUDA_CHECK(cudaMemGetInfo(&free_now, &total));
  *free_bytes = free_now + allocator().stats().bytes_cached;
  *total_bytes = total;
}

namespace detail {
inline const bool pass_kernels_registered = [] {
  CudaPassKernels<float>::clamp_min = &clamp_min<float>;
  CudaPassKernels<double>::clamp_min = &clamp_min<double>;
  CudaPassKernels<float>::scan = &scan_values<float>;
  CudaPassKernels<double>::scan = &scan_values<double>;
  cuda_hooks().memory_info = &memory_info;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
