#pragma once
// Device helpers shared by the kernels of quant/, ops/attention.cuh and optim/adam.cuh (attention,
// quantizers, LoRA-Rounding, grid statistics, CFP, Adam): arithmetic that repeats the CPU's
// rounding, warp and block reductions in a fixed order, the parameter layout of a quantization
// grid, and a temporary device buffer.
//
// Exact arithmetic: nvcc contracts a·b + c into one FMA by default, which rounds once where the
// CPU (x86-64 SSE, no -ffp-contract) rounds twice. The quantizers must reproduce the CPU's codes
// bit for bit, so they evaluate with the _rn intrinsics below, which are never contracted: the
// same expression in the same order then gives the same bits on both devices.
#include <cuda_runtime.h>

#include <algorithm>
#include <cbq/quant/grid.hpp>
#include <cstddef>
#include <cstdint>

#include "cbq/cuda/core/allocator.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda::qmath {

inline constexpr unsigned kFullMask = 0xffffffffu;
inline constexpr int kWarpSize = 32;
inline constexpr int kWarpsPerBlock = detail::kBlockSize / kWarpSize;

// ----------------------------------------------------------------------------
// IEEE round-to-nearest operations (never fused) and the math functions per type

__device__ inline float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ inline double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ inline float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ inline float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ inline double sqrt_rn(double a) { return __dsqrt_rn(a); }
// Half to even, as std::nearbyint in the default rounding mode (grid.hpp's round_even).
__device__ inline float round_even(float x) { return rintf(x); }
__device__ inline double round_even(double x) { return rint(x); }
__device__ inline float floor_of(float x) { return floorf(x); }
__device__ inline double floor_of(double x) { return floor(x); }
__device__ inline float exp_of(float x) { return expf(x); }
__device__ inline double exp_of(double x) { return exp(x); }
__device__ inline float log_of(float x) { return logf(x); }
__device__ inline double log_of(double x) { return log(x); }
__device__ inline float pow_of(float x, float y) { return powf(x, y); }
__device__ inline double pow_of(double x, double y) { return pow(x, y); }
__device__ inline float abs_of(float x) { return fabsf(x); }
__device__ inline double abs_of(double x) { return fabs(x); }

// std::min / std::max / std::clamp with their exact tie and NaN behaviour.
template <class T>
__device__ inline T std_min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
__device__ inline T std_max(T a, T b) {
  return a < b ? b : a;
}
template <class T>
__device__ inline T std_clamp(T x, T lo, T hi) {
  return x < lo ? lo : (hi < x ? hi : x);
}

// +∞ (std::numeric_limits is host-only without --expt-relaxed-constexpr).
template <class T>
__device__ inline T infinity() {
  return static_cast<T>(__int_as_float(0x7f800000));
}

// grid.hpp's min_step<T>(): the step of a constant group.
template <class T>
__device__ inline T min_step() {
  return static_cast<T>(1e-8);
}

// act_quant.hpp's detail::sigmoid, branch for branch.
template <class T>
__device__ inline T sigmoid(T x) {
  if (x >= T(0)) return div(T(1), add(T(1), exp_of(-x)));
  const T e = exp_of(x);
  return div(e, add(T(1), e));
}

// ----------------------------------------------------------------------------
// reductions (fixed order: the same inputs give the same bits on every run)

// Butterfly sum over the 32 lanes; every lane ends with the same value (each step adds the same
// two numbers on both partners, and addition is commutative).
template <class T>
__device__ inline T warp_sum(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x = x + __shfl_xor_sync(kFullMask, x, offset);
  return x;
}
template <class T>
__device__ inline T warp_max(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x = std_max(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}
template <class T>
__device__ inline T warp_min(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x = std_min(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// Sum of one value per thread of a block of detail::kBlockSize threads; valid in thread 0.
// Every thread of the block must call it.
template <class T>
__device__ inline T block_sum(T x) {
  __shared__ T warp_totals[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  x = warp_sum(x);
  if (lane == 0) warp_totals[warp] = x;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < kWarpsPerBlock ? warp_totals[lane] : T(0);
    total = warp_sum(total);
  }
  __syncthreads();  // warp_totals may be reused by the next call
  return total;
}

// Warp index in a grid-stride loop over warps (blocks of detail::kBlockSize threads), and the
// stride.
__device__ inline int64_t global_warp() { return detail::global_index() / kWarpSize; }
__device__ inline int64_t warp_stride() { return detail::grid_stride() / kWarpSize; }

// Blocks for a loop with one warp per item.
inline unsigned warp_grid_size(int64_t items) { return detail::grid_size(items * kWarpSize); }

// ----------------------------------------------------------------------------
// kernels

// out[0] = factor · Σ values[0, n)  (accumulate: out[0] += ...). One block of
// detail::kBlockSize threads; thread t sums t, t + 256, ... and the block adds the 256 partial
// sums in a fixed tree, so the result does not change from run to run.
template <class T>
__global__ void qmath_sum_kernel(T* out, const T* values, int64_t n, T factor, bool accumulate) {
  T acc = T(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += values[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = accumulate ? add(out[0], mul(factor, acc)) : mul(factor, acc);
}

// ----------------------------------------------------------------------------
// host helpers

// The (s, z) index of element (r, c) of a (rows, cols) weight under a GridSpec, as
// quant::param_index: per-tensor 0, per-channel r, per-group r·groups_per_row + c / group_cols.
struct GroupLayout {
  int64_t cols = 0;            // row length
  int64_t group_cols = 1;      // columns per (s, z) pair (≥ 1)
  int64_t groups_per_row = 1;  // pairs per row
  bool per_tensor = false;

  __host__ __device__ int64_t param(int64_t r, int64_t c) const {
    return per_tensor ? 0 : r * groups_per_row + c / group_cols;
  }
  // Elements of row-group k (the last group of a row may be short).
  __host__ __device__ int64_t group_elements(int64_t k) const {
    const int64_t end = (k + 1) * group_cols < cols ? (k + 1) * group_cols : cols;
    return end - k * group_cols;
  }
};

inline GroupLayout group_layout(const quant::GridSpec& spec, int64_t cols) {
  GroupLayout g;
  g.cols = cols;
  g.group_cols = std::max<int64_t>(spec.group_cols(cols), 1);
  g.groups_per_row = spec.groups_per_row(cols);
  g.per_tensor = spec.granularity == quant::Granularity::per_tensor;
  return g;
}

// out[0] = factor · Σ values (n), or += when accumulate; deterministic (one block).
template <class T>
void deterministic_sum(T* out, const T* values, int64_t n, T factor, bool accumulate) {
  qmath_sum_kernel<<<1, detail::kBlockSize, 0, detail::current_stream()>>>(out, values, n, factor,
                                                                           accumulate);
  CBQ_CUDA_CHECK_LAUNCH("qmath_sum_kernel");
}

// A temporary device buffer from the caching allocator. Released when it goes out of scope,
// which is safe right after the launches that use it: all cbq work is ordered on one stream, so
// a later user of the block runs after them (see allocator.cuh).
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t count)
      : ptr_(static_cast<T*>(allocator().allocate(sizeof(T) * static_cast<std::size_t>(count)))) {}
  ~DeviceBuffer() { allocator().deallocate(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_;
};

// Copies one value from the device and waits for it.
template <class T>
T read_back(const T* device_ptr) {
  T value{};
  cudaStream_t stream = detail::current_stream();
  CBQ_CUDA_CHECK(cudaMemcpyAsync(&value, device_ptr, sizeof(T), cudaMemcpyDeviceToHost, stream));
  CBQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  return value;
}

}  // namespace cbq::cuda::qmath
