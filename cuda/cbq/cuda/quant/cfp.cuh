#pragma once
// Statistics of the CFP outlier detector (quant/cfp.hpp), registered as quant::CudaCfp:
//   the input check (first non-finite or negative value), order statistics by radix select,
//   the count and maximum of the values at or below the coarse threshold, the selection of the
//   candidates / outliers, |w|, the truncation, and the per-channel maxima max_t |X_tj| of
//   ChannelMaxObserver.
// Radix select: a non-negative float's bits, read as an unsigned integer, order like the value.
// The rank-k key is found digit by digit (8 bits per pass, most significant first) from a
// 256-bin histogram of the keys that share the digits chosen so far. Counts are integers and
// maxima are exact, so every statistic equals the CPU's whatever the order of the atomics.
//
// No CUB or Thrust here on purpose: every CCCL header declares namespace ::cuda, which makes
// `using namespace cbq; cuda::...` ambiguous in code that includes <cbq/cuda.cuh>.
#include <cbq/quant/cfp.hpp>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"
#include "cbq/cuda/quant/quant_math.cuh"

namespace cbq::cuda {

namespace cfp_detail {

// No index found (larger than every index, so atomicMin keeps the smallest real one).
inline constexpr unsigned long long kNoIndex = ~0ull;

// Column maxima: a block covers 32 columns (threadIdx.x) and 8 row phases (threadIdx.y).
inline constexpr int kColumns = 32;
inline constexpr int kRowPhases = 8;

// Radix select: 8-bit digits, 256 bins.
inline constexpr int kDigitBits = 8;
inline constexpr int kBins = 1 << kDigitBits;

// The unsigned integer whose order is the order of non-negative values of T (−0 maps to +0).
template <class T>
using Key = std::conditional_t<sizeof(T) == 4, unsigned int, unsigned long long>;

__device__ inline unsigned int to_key(float v) { return v == 0.0f ? 0u : __float_as_uint(v); }
__device__ inline unsigned long long to_key(double v) {
  return v == 0.0 ? 0ull : static_cast<unsigned long long>(__double_as_longlong(v));
}
inline float from_key(unsigned int key) {
  float v;
  std::memcpy(&v, &key, sizeof v);
  return v;
}
inline double from_key(unsigned long long key) {
  double v;
  std::memcpy(&v, &key, sizeof v);
  return v;
}

template <class T>
__device__ inline bool is_finite(T v) {
  return isfinite(v);
}

// Reads a device index written by an atomicMin kernel: −1 when none was found.
inline int64_t index_or_none(const unsigned long long* device_index) {
  const unsigned long long found = qmath::read_back(device_index);
  return found == kNoIndex ? -1 : static_cast<int64_t>(found);
}

}  // namespace cfp_detail

// ----------------------------------------------------------------------------
// kernels

// *first = min { i : x[i] not finite or x[i] < 0 }; x (n)
template <class T>
__global__ void cfp_first_invalid_kernel(unsigned long long* first, const T* x, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T v = x[i];
    if (!cfp_detail::is_finite(v) || v < T(0)) {
      atomicMin(first, static_cast<unsigned long long>(i));
      return;  // later indices of this thread are larger
    }
  }
}

// One radix-select pass for two ranks at once: hist[s·256 + digit] counts the keys of x (n) with
// (key & mask) == prefix_s whose digit at `shift` is `digit`, s = 0, 1.
template <class T>
__global__ void cfp_radix_histogram_kernel(unsigned long long* hist, const T* x, int64_t n,
                                           cfp_detail::Key<T> prefix_a, cfp_detail::Key<T> prefix_b,
                                           cfp_detail::Key<T> mask, int shift) {
  __shared__ unsigned int local[2 * cfp_detail::kBins];
  for (int b = threadIdx.x; b < 2 * cfp_detail::kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const cfp_detail::Key<T> key = cfp_detail::to_key(x[i]);
    const auto digit = static_cast<int>((key >> shift) & (cfp_detail::kBins - 1));
    if ((key & mask) == prefix_a) atomicAdd(&local[digit], 1u);
    if ((key & mask) == prefix_b) atomicAdd(&local[cfp_detail::kBins + digit], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 2 * cfp_detail::kBins; b += blockDim.x)
    if (local[b] != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
}

// count[0] = #{i : double(x[i]) ≤ threshold}, max_key[0] = the largest key among them (0 if
// none); x (n), non-negative.
template <class T>
__global__ void cfp_count_at_most_kernel(unsigned long long* count, cfp_detail::Key<T>* max_key,
                                         const T* x, int64_t n, double threshold) {
  unsigned long long c = 0;
  cfp_detail::Key<T> m = 0;
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T v = x[i];
    if (static_cast<double>(v) <= threshold) {
      ++c;
      m = qmath::std_max(m, cfp_detail::to_key(v));
    }
  }
  c = qmath::warp_sum(c);
  m = qmath::warp_max(m);
  if (threadIdx.x % qmath::kWarpSize == 0) {
    if (c != 0) atomicAdd(count, c);
    atomicMax(max_key, m);
  }
}

// The elements with double(x[i]) > threshold: their values into `values` and indices into
// `index` (either may be null) at the slots an atomic counter hands out (at most capacity);
// *count = how many.
template <class T>
__global__ void cfp_select_greater_kernel(T* values, int64_t* index, unsigned long long* count,
                                          int64_t capacity, const T* x, int64_t n,
                                          double threshold) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T v = x[i];
    if (!(static_cast<double>(v) > threshold)) continue;
    const unsigned long long slot = atomicAdd(count, 1ull);
    if (slot >= static_cast<unsigned long long>(capacity)) continue;
    if (values) values[slot] = v;
    if (index) index[slot] = i;
  }
}

// out[i] = |x[i]|; out, x (n)
template <class T>
__global__ void cfp_abs_kernel(T* out, const T* x, int64_t n) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride())
    out[i] = qmath::abs_of(x[i]);
}

// w[i] = copysign(limit, w[i]) where double(|w[i]|) > threshold; w (n)
template <class T>
__global__ void cfp_clamp_greater_kernel(T* w, int64_t n, double threshold, T limit) {
  for (int64_t i = detail::global_index(); i < n; i += detail::grid_stride()) {
    const T v = w[i];
    if (static_cast<double>(qmath::abs_of(v)) > threshold) w[i] = copysign(limit, v);
  }
}

// out (cols) = max(0, max_t |x[t, j]|) over x (rows, cols); *first_bad = the smallest
// row-major index of a non-finite element.
template <class T>
__global__ void cfp_column_abs_max_kernel(T* out, unsigned long long* first_bad, const T* x,
                                          int64_t rows, int64_t cols) {
  __shared__ T partial[cfp_detail::kRowPhases][cfp_detail::kColumns];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * cfp_detail::kColumns + threadIdx.x;
  T m = T(0);
  if (j < cols)
    for (int64_t t = threadIdx.y; t < rows; t += cfp_detail::kRowPhases) {
      const T v = x[t * cols + j];
      if (!cfp_detail::is_finite(v)) {
        atomicMin(first_bad, static_cast<unsigned long long>(t * cols + j));
        break;  // later rows of this thread are larger indices
      }
      m = qmath::std_max(m, qmath::abs_of(v));
    }
  partial[threadIdx.y][threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    for (int y = 1; y < cfp_detail::kRowPhases; ++y) m = qmath::std_max(m, partial[y][threadIdx.x]);
    out[j] = m;
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
int64_t cfp_first_invalid(const T* x, int64_t n) {
  if (n <= 0) return -1;
  cudaStream_t stream = detail::current_stream();
  qmath::DeviceBuffer<unsigned long long> first(1);
  CBQ_CUDA_CHECK(cudaMemsetAsync(first.get(), 0xff, sizeof(unsigned long long), stream));
  cfp_first_invalid_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, stream>>>(first.get(), x,
                                                                                    n);
  CBQ_CUDA_CHECK_LAUNCH("cfp_first_invalid_kernel");
  return cfp_detail::index_or_none(first.get());
}

template <class T>
void cfp_order_statistics(const T* x, int64_t n, int64_t rank_a, int64_t rank_b, T* value_a,
                          T* value_b) {
  using Key = cfp_detail::Key<T>;
  CBQ_CHECK(n > 0 && rank_a >= 0 && rank_a < n && rank_b >= 0 && rank_b < n,
            "cfp (cuda): ranks {} and {} out of range for {} values", rank_a, rank_b, n);
  cudaStream_t stream = detail::current_stream();
  constexpr int kBins = cfp_detail::kBins;
  qmath::DeviceBuffer<unsigned long long> hist(2 * kBins);
  std::vector<unsigned long long> counts(2 * kBins);
  Key prefix[2] = {0, 0};
  int64_t rank[2] = {rank_a, rank_b};  // rank among the keys that share the prefix
  Key mask = 0;
  for (int shift = static_cast<int>(sizeof(Key)) * 8 - cfp_detail::kDigitBits; shift >= 0;
       shift -= cfp_detail::kDigitBits) {
    CBQ_CUDA_CHECK(cudaMemsetAsync(hist.get(), 0, sizeof(unsigned long long) * 2 * kBins, stream));
    cfp_radix_histogram_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, stream>>>(
        hist.get(), x, n, prefix[0], prefix[1], mask, shift);
    CBQ_CUDA_CHECK_LAUNCH("cfp_radix_histogram_kernel");
    CBQ_CUDA_CHECK(cudaMemcpyAsync(counts.data(), hist.get(),
                                   sizeof(unsigned long long) * 2 * kBins, cudaMemcpyDeviceToHost,
                                   stream));
    CBQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (int s = 0; s < 2; ++s) {
      int64_t below = 0;  // keys with a smaller digit
      int digit = 0;
      for (; digit < kBins; ++digit) {
        const auto c = static_cast<int64_t>(counts[static_cast<std::size_t>(s * kBins + digit)]);
        if (rank[s] < below + c) break;
        below += c;
      }
      CBQ_CHECK(digit < kBins, "cfp (cuda): radix select lost rank {} (internal error)", rank[s]);
      rank[s] -= below;
      prefix[s] |= static_cast<Key>(digit) << shift;
    }
    mask |= static_cast<Key>(kBins - 1) << shift;
  }
  *value_a = cfp_detail::from_key(prefix[0]);
  *value_b = cfp_detail::from_key(prefix[1]);
}

template <class T>
int64_t cfp_count_at_most(const T* x, int64_t n, double threshold, T* max_at_most) {
  using Key = cfp_detail::Key<T>;
  *max_at_most = T(0);
  if (n <= 0) return 0;
  cudaStream_t stream = detail::current_stream();
  qmath::DeviceBuffer<unsigned long long> count(1);
  qmath::DeviceBuffer<Key> max_key(1);
  CBQ_CUDA_CHECK(cudaMemsetAsync(count.get(), 0, sizeof(unsigned long long), stream));
  CBQ_CUDA_CHECK(cudaMemsetAsync(max_key.get(), 0, sizeof(Key), stream));
  cfp_count_at_most_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, stream>>>(
      count.get(), max_key.get(), x, n, threshold);
  CBQ_CUDA_CHECK_LAUNCH("cfp_count_at_most_kernel");
  *max_at_most = cfp_detail::from_key(qmath::read_back(max_key.get()));
  return static_cast<int64_t>(qmath::read_back(count.get()));
}

template <class T>
int64_t cfp_select_greater(T* values, int64_t* index, int64_t capacity, const T* x, int64_t n,
                           double threshold) {
  if (n <= 0) return 0;
  cudaStream_t stream = detail::current_stream();
  qmath::DeviceBuffer<unsigned long long> count(1);
  CBQ_CUDA_CHECK(cudaMemsetAsync(count.get(), 0, sizeof(unsigned long long), stream));
  cfp_select_greater_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, stream>>>(
      values, index, count.get(), capacity, x, n, threshold);
  CBQ_CUDA_CHECK_LAUNCH("cfp_select_greater_kernel");
  return static_cast<int64_t>(qmath::read_back(count.get()));
}

template <class T>
void cfp_abs(T* out, const T* x, int64_t n) {
  if (n <= 0) return;
  cfp_abs_kernel<<<detail::grid_size(n), detail::kBlockSize, 0, detail::current_stream()>>>(out, x,
                                                                                            n);
  CBQ_CUDA_CHECK_LAUNCH("cfp_abs_kernel");
}

template <class T>
void cfp_clamp_greater(T* w, int64_t n, double threshold, T limit) {
  if (n <= 0) return;
  cfp_clamp_greater_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                             detail::current_stream()>>>(w, n, threshold, limit);
  CBQ_CUDA_CHECK_LAUNCH("cfp_clamp_greater_kernel");
}

template <class T>
int64_t cfp_column_abs_max(T* out, const T* x, int64_t rows, int64_t cols) {
  if (cols <= 0) return -1;
  cudaStream_t stream = detail::current_stream();
  qmath::DeviceBuffer<unsigned long long> first_bad(1);
  CBQ_CUDA_CHECK(cudaMemsetAsync(first_bad.get(), 0xff, sizeof(unsigned long long), stream));
  const dim3 block(cfp_detail::kColumns, cfp_detail::kRowPhases);
  const dim3 grid(static_cast<unsigned>((cols + cfp_detail::kColumns - 1) / cfp_detail::kColumns));
  cfp_column_abs_max_kernel<<<grid, block, 0, stream>>>(out, first_bad.get(), x, rows, cols);
  CBQ_CUDA_CHECK_LAUNCH("cfp_column_abs_max_kernel");
  return cfp_detail::index_or_none(first_bad.get());
}

namespace detail {
template <class T>
void register_cfp() {
  quant::CudaCfp<T>::first_invalid = &cfp_first_invalid<T>;
  quant::CudaCfp<T>::order_statistics = &cfp_order_statistics<T>;
  quant::CudaCfp<T>::count_at_most = &cfp_count_at_most<T>;
  quant::CudaCfp<T>::select_greater = &cfp_select_greater<T>;
  quant::CudaCfp<T>::abs = &cfp_abs<T>;
  quant::CudaCfp<T>::clamp_greater = &cfp_clamp_greater<T>;
  quant::CudaCfp<T>::column_abs_max = &cfp_column_abs_max<T>;
}
inline const bool cfp_registered = [] {
  register_cfp<float>();
  register_cfp<double>();
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
