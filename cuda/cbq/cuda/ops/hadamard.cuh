#pragma once
// hadamard (ops/hadamard.hpp): y = x·M per n-element chunk, M = D·(H_P ⊗ K). One thread block
// per chunk (grid-stride over chunks), the chunk in n values of dynamic shared memory:
//   1. z = (x ⊙ d)·(I_P ⊗ K) read from global memory (the whole chunk is read before any write,
//      so out may equal in);
//   2. log2 P butterfly stages over z with stride m, a barrier between stages;
//   3. out = z / √P (⊙ d for the transpose), assigned or accumulated.
// The same arithmetic as CpuHadamard in the same order per element, so the results differ from
// the CPU's only by the ordering of fused multiply-adds (tests/gpu/test_hadamard.cu).
// Shared memory: n·sizeof(T) (SmolLM2's 1536: 6 KiB in float; LLaMA-2-7B's 11008: 43 KiB, 86 KiB
// in double, above the default 48 KiB: the kernel is allowed more when the device has it).
#include <cbq/ops/hadamard.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace hadamard_detail {
inline constexpr int kThreads = 256;
inline constexpr int64_t kMaxBlocks = 65535;
}  // namespace hadamard_detail

// ----------------------------------------------------------------------------
// kernels

template <class T>
__global__ void hadamard_kernel(const T* in, T* out, int64_t rows, int64_t n, int64_t m,
                                const T* kernel, const T* signs, bool transpose, bool accumulate,
                                T norm) {
  extern __shared__ __align__(16) unsigned char hadamard_shared[];
  T* z = reinterpret_cast<T*>(hadamard_shared);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x = in + row * n;
    // 1. z = t·(I_P ⊗ K) (or Kᵀ), t = x ⊙ d before the transform (forward) or x (transpose)
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (m == 1) {
        z[i] = (signs && !transpose) ? x[i] * signs[i] : x[i];
        continue;
      }
      const int64_t a = i / m, e = i % m;
      const T* t = x + a * m;
      T s = 0;
      for (int64_t b = 0; b < m; ++b) {
        const T tb = (signs && !transpose) ? t[b] * signs[a * m + b] : t[b];
        s += tb * (transpose ? kernel[e * m + b] : kernel[b * m + e]);
      }
      z[i] = s;
    }
    __syncthreads();
    // 2. butterflies on (i, i + h), h = m, 2m, ..., n/2
    for (int64_t h = m; h < n; h *= 2) {
      for (int64_t p = threadIdx.x; p < n / 2; p += blockDim.x) {
        const int64_t i = (p / h) * 2 * h + p % h;
        const T u = z[i], v = z[i + h];
        z[i] = u + v;
        z[i + h] = u - v;
      }
      __syncthreads();
    }
    // 3. normalise, signs after the transpose, write
    T* y = out + row * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      T v = z[i] * norm;
      if (signs && transpose) v *= signs[i];
      y[i] = accumulate ? y[i] + v : v;
    }
    __syncthreads();  // z is reused by the next row
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void hadamard_apply(const T* in, T* out, int64_t rows, int64_t n, int64_t m, const T* kernel,
                    const T* signs, bool transpose, bool accumulate) {
  if (rows <= 0 || n <= 0) return;
  CBQ_CHECK(m >= 1 && n % m == 0, "hadamard (cuda): kernel order {} does not divide size {}", m, n);
  const std::size_t shared = static_cast<std::size_t>(n) * sizeof(T);
  if (shared > 48 * 1024) {  // above the default: within the device's opt-in limit
    const auto limit = static_cast<std::size_t>(detail::max_shared_bytes());
    CBQ_CHECK(shared <= limit,
              "hadamard (cuda): a chunk of {} values needs {} bytes of shared memory, the device "
              "allows {}",
              n, shared, limit);
    detail::allow_shared(hadamard_kernel<T>, shared);
  }
  const T norm = static_cast<T>(1.0 / std::sqrt(static_cast<double>(n / m)));
  const auto blocks = static_cast<unsigned>(std::min(rows, hadamard_detail::kMaxBlocks));
  hadamard_kernel<T><<<blocks, hadamard_detail::kThreads, shared, detail::current_stream()>>>(
      in, out, rows, n, m, kernel, signs, transpose, accumulate, norm);
  CBQ_CUDA_CHECK_LAUNCH("hadamard_kernel");
}

namespace detail {
inline const bool hadamard_registered = [] {
  ops::CudaHadamard<float>::apply = &hadamard_apply<float>;
  ops::CudaHadamard<double>::apply = &hadamard_apply<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
