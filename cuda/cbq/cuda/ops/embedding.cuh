#pragma once
// embedding (ops/embedding.hpp): a gather forward; a deterministic scatter-add backward. The
// host groups the tokens by id (CSR index, tokens in order within a group); one thread owns
// each (id, column) element of d table and adds that id's tokens in token order, so there are
// no atomics and the additions are the CPU's, in the CPU's order (bitwise equal). A very
// frequent id serialises its tokens on one thread per column (fine for calibration batches).
#include <cbq/ops/embedding.hpp>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

// ----------------------------------------------------------------------------
// kernels

// out (tokens, d) = table[ids[t], :]; table (V, d), ids (tokens,)
template <class T>
__global__ void embedding_forward_kernel(T* out, const T* table, const int32_t* ids, int64_t tokens,
                                         int64_t d) {
  const int64_t n = tokens * d;
  for (int64_t e = detail::global_index(); e < n; e += detail::grid_stride()) {
    const int64_t t = e / d, j = e % d;
    out[e] = table[static_cast<int64_t>(ids[t]) * d + j];
  }
}

// dtable[unique[u], j] += Σ_{k ∈ [offsets[u], offsets[u+1])} g[positions[k], j]
// index = [unique (U) | offsets (U + 1) | positions (tokens)], g (tokens, d), dtable (V, d)
template <class T>
__global__ void embedding_backward_kernel(T* dtable, const T* g, const int32_t* index,
                                          int64_t num_unique, int64_t d) {
  const int32_t* unique = index;
  const int32_t* offsets = index + num_unique;
  const int32_t* positions = offsets + num_unique + 1;
  const int64_t n = num_unique * d;
  for (int64_t e = detail::global_index(); e < n; e += detail::grid_stride()) {
    const int64_t u = e / d, j = e % d;
    T* dst = dtable + static_cast<int64_t>(unique[u]) * d + j;
    T acc = *dst;
    for (int32_t k = offsets[u]; k < offsets[u + 1]; ++k)
      acc += g[static_cast<int64_t>(positions[k]) * d + j];
    *dst = acc;
  }
}

// ----------------------------------------------------------------------------
// launchers

template <class T>
void embedding_forward(T* out, const T* table, const int32_t* ids, int64_t tokens, int64_t d) {
  const int64_t n = tokens * d;
  if (n <= 0) return;
  embedding_forward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                             detail::current_stream()>>>(out, table, ids, tokens, d);
  CBQ_CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

template <class T>
void embedding_backward(T* dtable, const T* g, const int32_t* index, int64_t num_unique,
                        int64_t tokens, int64_t d) {
  const int64_t n = num_unique * d;
  if (n <= 0 || tokens <= 0) return;
  embedding_backward_kernel<<<detail::grid_size(n), detail::kBlockSize, 0,
                              detail::current_stream()>>>(dtable, g, index, num_unique, d);
  CBQ_CUDA_CHECK_LAUNCH("embedding_backward_kernel");
}

namespace detail {
inline const bool embedding_registered = [] {
  ops::CudaEmbedding<float>::forward = &embedding_forward<float>;
  ops::CudaEmbedding<float>::backward = &embedding_backward<float>;
  ops::CudaEmbedding<double>::forward = &embedding_forward<double>;
  ops::CudaEmbedding<double>::backward = &embedding_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
