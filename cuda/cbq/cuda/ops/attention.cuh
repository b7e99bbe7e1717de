#pragma once
// Causal / full grouped-query attention (ops/attention.hpp), registered as ops::CudaAttention:
// flash-attention kernels whose memory does not grow as T². Layout: q, o (T, Hq·hd), k, v
// (T, Hkv·hd), lse (T, Hq); query head h reads kv head h / (Hq/Hkv).
//
// forward   one block per (query tile of B rows, head). The Q tile, an O accumulator and one
//           K and V tile at a time live in shared memory; the key tiles stream past with the
//           online softmax (running max m, running sum l per row); O = acc / l and
//           L = m + log l are written at the end.
// backward  D = rowsum(dO ⊙ O) per (row, head) (one warp each), then
//           dK/dV: one block per (key tile, kv head) loops over the query tiles of every query
//                  head of its group, recomputes P = exp(scale·QKᵀ − L), and accumulates
//                  dV += Pᵀ dO, dK += scale · dSᵀ Q with dS = P ⊙ (dO Vᵀ − D) in shared memory;
//           dQ:    one block per (query tile, head) loops over the key tiles and accumulates
//                  dQ += scale · dS K.
//           Each gradient element is owned by one block and summed in a fixed order (no
//           atomics), so results are deterministic; the price is computing P and dS twice.
// Arithmetic is in T (fp32 for float). Tiles are B × B with B = 32, or 16 / 8 when the tiles of
// a large head dimension would not fit the device's shared memory; rows of a tile beyond T, and
// keys after the query under the causal mask, are masked, so T need not be a multiple of B.
//
// These scalar kernels are the reference. Float attention with head dimension 64 or 128 runs the
// tensor-core kernels of attention_tc.cuh instead when the context's AttentionMode asks for them
// (tf32, bf16, or automatic under MathMode::tf32); the hook and the saved L are the same.
#include <cbq/ops/attention.hpp>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/context.cuh"
#include "cbq/cuda/core/launch.cuh"
#include "cbq/cuda/ops/attention_tc.cuh"
#include "cbq/cuda/quant/quant_math.cuh"

namespace cbq::cuda {

namespace attention_detail {

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;
// Tile sizes tried in order; the softmax gives a row to a warp, one key per lane, so B ≤ 32.
inline constexpr int kTileSizes[] = {32, 16, 8};

// Shared-memory rows of head_dim values are padded by one element, so that the threads of a warp
// walking down a column (one key each) hit different banks.
__host__ __device__ inline int padded(int head_dim) { return head_dim + 1; }

// Problem shape, passed by value to every kernel.
struct Dims {
  int64_t seq_len;
  int n_heads, group, head_dim, tile;
  bool causal;
  __host__ __device__ int64_t q_stride() const { return int64_t(n_heads) * head_dim; }
  __host__ __device__ int64_t kv_stride() const { return int64_t(n_heads / group) * head_dim; }
  // Query row i may attend to key j.
  __device__ bool visible(int64_t i, int64_t j) const {
    return i < seq_len && j < seq_len && (!causal || j <= i);
  }
};

// Shared memory of each kernel, in elements of T (see the kernels for the pieces).
inline std::size_t forward_elements(int tile, int head_dim) {
  return std::size_t(4) * tile * padded(head_dim) + std::size_t(tile) * tile + 3 * tile;
}
inline std::size_t dkdv_elements(int tile, int head_dim) {
  return std::size_t(6) * tile * padded(head_dim) + std::size_t(2) * tile * tile + 2 * tile;
}
inline std::size_t dq_elements(int tile, int head_dim) {
  return std::size_t(5) * tile * padded(head_dim) + std::size_t(tile) * tile + 2 * tile;
}

// Loads rows [row0, row0 + tile) of the head_dim columns at `col` of a row-major matrix with
// row stride `ld` into shared memory (row stride padded(head_dim)); rows ≥ seq_len become 0.
template <class T>
__device__ inline void load_tile(T* tile_smem, const T* src, int64_t row0, int64_t ld, int64_t col,
                                 const Dims& d) {
  const int hd = d.head_dim, hdp = padded(hd);
  for (int idx = threadIdx.x; idx < d.tile * hd; idx += blockDim.x) {
    const int r = idx / hd, c = idx % hd;
    const int64_t row = row0 + r;
    tile_smem[r * hdp + c] = row < d.seq_len ? src[row * ld + col + c] : T(0);
  }
}

template <class T>
__device__ inline void zero_tile(T* tile_smem, const Dims& d) {
  const int hd = d.head_dim, hdp = padded(hd);
  for (int idx = threadIdx.x; idx < d.tile * hd; idx += blockDim.x)
    tile_smem[(idx / hd) * hdp + idx % hd] = T(0);
}

// Σ_c a[c] · b[c] over head_dim values (two padded shared-memory rows).
template <class T>
__device__ inline T dot_row(const T* a, const T* b, int head_dim) {
  T acc = T(0);
  for (int c = 0; c < head_dim; ++c) acc += a[c] * b[c];
  return acc;
}

}  // namespace attention_detail

// ----------------------------------------------------------------------------
// kernels

// Dynamic shared memory of every attention kernel (one declaration for all instantiations).
extern __shared__ __align__(16) unsigned char attention_shared[];

// o (T, Hq·hd), lse (T, Hq) from q (T, Hq·hd), k, v (T, Hkv·hd).
// grid (query tiles, Hq), block kThreads.
// Shared memory: Q, O accumulator, K, V tiles (B × (hd + 1) each), scores / probabilities (B × B),
// and per row the running max, running sum and the last rescaling factor (B each).
template <class T>
__global__ void attention_forward_kernel(T* o, T* lse, const T* q, const T* k, const T* v,
                                         attention_detail::Dims d, T scale) {
  using namespace attention_detail;
  const int B = d.tile, hd = d.head_dim, hdp = padded(hd);
  T* sQ = reinterpret_cast<T*>(attention_shared);
  T* sO = sQ + B * hdp;
  T* sK = sO + B * hdp;
  T* sV = sK + B * hdp;
  T* sS = sV + B * hdp;  // (B, B)
  T* sMax = sS + B * B;
  T* sSum = sMax + B;
  T* sCorr = sSum + B;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * B;
  const int h = blockIdx.y, g = h / d.group;
  const int64_t ldq = d.q_stride(), ldk = d.kv_stride();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  load_tile(sQ, q, i0, ldq, int64_t(h) * hd, d);
  zero_tile(sO, d);
  for (int r = threadIdx.x; r < B; r += blockDim.x) {
    sMax[r] = -qmath::infinity<T>();
    sSum[r] = T(0);
  }
  const int64_t kv_end = d.causal ? qmath::std_min<int64_t>(d.seq_len, i0 + B) : d.seq_len;
  for (int64_t j0 = 0; j0 < kv_end; j0 += B) {
    __syncthreads();  // the previous tile's K, V, P are no longer read
    load_tile(sK, k, j0, ldk, int64_t(g) * hd, d);
    load_tile(sV, v, j0, ldk, int64_t(g) * hd, d);
    __syncthreads();
    // S = scale · Q Kᵀ, −∞ where masked. A warp takes one row r and consecutive keys c.
    for (int idx = threadIdx.x; idx < B * B; idx += blockDim.x) {
      const int r = idx / B, c = idx % B;
      sS[idx] = d.visible(i0 + r, j0 + c) ? scale * dot_row(sQ + r * hdp, sK + c * hdp, hd)
                                          : -qmath::infinity<T>();
    }
    __syncthreads();
    // Online softmax: a warp per row, a lane per key.
    for (int r = warp; r < B; r += kWarps) {
      const T s = lane < B ? sS[r * B + lane] : -qmath::infinity<T>();
      const T m_old = sMax[r];
      const T m_new = qmath::std_max(m_old, qmath::warp_max(s));
      T p = T(0), corr = T(1);
      if (m_new != -qmath::infinity<T>()) {   // some key of the row seen so far
        p = qmath::exp_of(s - m_new);         // exp(−∞) = 0 for masked keys
        corr = qmath::exp_of(m_old - m_new);  // 0 before the first key
      }
      const T sum = qmath::warp_sum(p);
      if (lane < B) sS[r * B + lane] = p;
      __syncwarp();
      if (lane == 0) {
        sSum[r] = sSum[r] * corr + sum;
        sMax[r] = m_new;
        sCorr[r] = corr;
      }
    }
    __syncthreads();
    // O = O · corr + P V
    const int nk = static_cast<int>(qmath::std_min<int64_t>(B, d.seq_len - j0));
    for (int idx = threadIdx.x; idx < B * hd; idx += blockDim.x) {
      const int r = idx / hd, c = idx % hd;
      T acc = T(0);
      for (int j = 0; j < nk; ++j) acc += sS[r * B + j] * sV[j * hdp + c];
      sO[r * hdp + c] = sO[r * hdp + c] * sCorr[r] + acc;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < B * hd; idx += blockDim.x) {
    const int r = idx / hd, c = idx % hd;
    const int64_t i = i0 + r;
    if (i < d.seq_len) o[i * ldq + int64_t(h) * hd + c] = sO[r * hdp + c] * (T(1) / sSum[r]);
  }
  for (int r = threadIdx.x; r < B; r += blockDim.x) {
    const int64_t i = i0 + r;
    if (i < d.seq_len) lse[i * d.n_heads + h] = sMax[r] + qmath::log_of(sSum[r]);
  }
}

// row_dot[i, h] = Σ_c dout[i, h·hd + c] · o[i, h·hd + c]; one warp per (row, head).
template <class T>
__global__ void attention_row_dot_kernel(T* row_dot, const T* dout, const T* o,
                                         attention_detail::Dims d) {
  const int lane = threadIdx.x % 32;
  const int64_t items = d.seq_len * d.n_heads, ldq = d.q_stride();
  for (int64_t item = qmath::global_warp(); item < items; item += qmath::warp_stride()) {
    const int64_t i = item / d.n_heads, h = item % d.n_heads;
    const T* a = dout + i * ldq + h * d.head_dim;
    const T* b = o + i * ldq + h * d.head_dim;
    T acc = T(0);
    for (int c = lane; c < d.head_dim; c += 32) acc += a[c] * b[c];
    acc = qmath::warp_sum(acc);
    if (lane == 0) row_dot[item] = acc;
  }
}

// dk, dv (T, Hkv·hd) += the gradients of one key tile of one kv head (either may be null).
// grid (key tiles, Hkv), block kThreads.
// Shared memory: K, V, dK, dV, Q, dO tiles (B × (hd + 1) each), P and dS (B × B), and the query
// rows' L and D (B each).
template <class T>
__global__ void attention_backward_dkdv_kernel(T* dk, T* dv, const T* q, const T* k, const T* v,
                                               const T* dout, const T* lse, const T* row_dot,
                                               attention_detail::Dims d, T scale) {
  using namespace attention_detail;
  const int B = d.tile, hd = d.head_dim, hdp = padded(hd);
  T* sK = reinterpret_cast<T*>(attention_shared);
  T* sV = sK + B * hdp;
  T* sdK = sV + B * hdp;
  T* sdV = sdK + B * hdp;
  T* sQ = sdV + B * hdp;
  T* sdO = sQ + B * hdp;
  T* sP = sdO + B * hdp;  // (B queries, B keys)
  T* sdS = sP + B * B;    // (B queries, B keys)
  T* sL = sdS + B * B;
  T* sD = sL + B;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * B;
  const int g = blockIdx.y;
  const int64_t ldq = d.q_stride(), ldk = d.kv_stride();

  load_tile(sK, k, j0, ldk, int64_t(g) * hd, d);
  load_tile(sV, v, j0, ldk, int64_t(g) * hd, d);
  zero_tile(sdK, d);
  zero_tile(sdV, d);
  // Under the causal mask query rows before j0 see none of these keys; tiles are aligned to B.
  const int64_t i_begin = d.causal ? j0 : 0;
  for (int t = 0; t < d.group; ++t) {
    const int h = g * d.group + t;
    for (int64_t i0 = i_begin; i0 < d.seq_len; i0 += B) {
      __syncthreads();  // the previous query tile is no longer read
      load_tile(sQ, q, i0, ldq, int64_t(h) * hd, d);
      load_tile(sdO, dout, i0, ldq, int64_t(h) * hd, d);
      for (int r = threadIdx.x; r < B; r += blockDim.x) {
        const int64_t i = i0 + r;
        sL[r] = i < d.seq_len ? lse[i * d.n_heads + h] : T(0);
        sD[r] = i < d.seq_len ? row_dot[i * d.n_heads + h] : T(0);
      }
      __syncthreads();
      // P = exp(scale · Q Kᵀ − L), dS = P ⊙ (dO Vᵀ − D); 0 where masked.
      for (int idx = threadIdx.x; idx < B * B; idx += blockDim.x) {
        const int r = idx / B, c = idx % B;
        T p = T(0), ds = T(0);
        if (d.visible(i0 + r, j0 + c)) {
          p = qmath::exp_of(scale * dot_row(sQ + r * hdp, sK + c * hdp, hd) - sL[r]);
          ds = p * (dot_row(sdO + r * hdp, sV + c * hdp, hd) - sD[r]);
        }
        sP[idx] = p;
        sdS[idx] = ds;
      }
      __syncthreads();
      // dV += Pᵀ dO, dK += scale · dSᵀ Q; a thread owns key c, column e.
      const int nq = static_cast<int>(qmath::std_min<int64_t>(B, d.seq_len - i0));
      for (int idx = threadIdx.x; idx < B * hd; idx += blockDim.x) {
        const int c = idx / hd, e = idx % hd;
        T acc_v = T(0), acc_k = T(0);
        for (int r = 0; r < nq; ++r) {
          acc_v += sP[r * B + c] * sdO[r * hdp + e];
          acc_k += sdS[r * B + c] * sQ[r * hdp + e];
        }
        sdV[c * hdp + e] += acc_v;
        sdK[c * hdp + e] += scale * acc_k;
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < B * hd; idx += blockDim.x) {
    const int c = idx / hd, e = idx % hd;
    const int64_t j = j0 + c;
    if (j >= d.seq_len) continue;
    const int64_t at = j * ldk + int64_t(g) * hd + e;
    if (dk) dk[at] += sdK[c * hdp + e];
    if (dv) dv[at] += sdV[c * hdp + e];
  }
}

// dq (T, Hq·hd) += the gradient of one query tile of one head. grid (query tiles, Hq).
// Shared memory: Q, dO, dQ, K, V tiles (B × (hd + 1) each), dS (B × B), L and D (B each).
template <class T>
__global__ void attention_backward_dq_kernel(T* dq, const T* q, const T* k, const T* v,
                                             const T* dout, const T* lse, const T* row_dot,
                                             attention_detail::Dims d, T scale) {
  using namespace attention_detail;
  const int B = d.tile, hd = d.head_dim, hdp = padded(hd);
  T* sQ = reinterpret_cast<T*>(attention_shared);
  T* sdO = sQ + B * hdp;
  T* sdQ = sdO + B * hdp;
  T* sK = sdQ + B * hdp;
  T* sV = sK + B * hdp;
  T* sdS = sV + B * hdp;  // (B queries, B keys)
  T* sL = sdS + B * B;
  T* sD = sL + B;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * B;
  const int h = blockIdx.y, g = h / d.group;
  const int64_t ldq = d.q_stride(), ldk = d.kv_stride();

  load_tile(sQ, q, i0, ldq, int64_t(h) * hd, d);
  load_tile(sdO, dout, i0, ldq, int64_t(h) * hd, d);
  zero_tile(sdQ, d);
  for (int r = threadIdx.x; r < B; r += blockDim.x) {
    const int64_t i = i0 + r;
    sL[r] = i < d.seq_len ? lse[i * d.n_heads + h] : T(0);
    sD[r] = i < d.seq_len ? row_dot[i * d.n_heads + h] : T(0);
  }
  const int64_t kv_end = d.causal ? qmath::std_min<int64_t>(d.seq_len, i0 + B) : d.seq_len;
  for (int64_t j0 = 0; j0 < kv_end; j0 += B) {
    __syncthreads();  // the previous key tile and dS are no longer read
    load_tile(sK, k, j0, ldk, int64_t(g) * hd, d);
    load_tile(sV, v, j0, ldk, int64_t(g) * hd, d);
    __syncthreads();
    for (int idx = threadIdx.x; idx < B * B; idx += blockDim.x) {
      const int r = idx / B, c = idx % B;
      T ds = T(0);
      if (d.visible(i0 + r, j0 + c)) {
        const T p = qmath::exp_of(scale * dot_row(sQ + r * hdp, sK + c * hdp, hd) - sL[r]);
        ds = p * (dot_row(sdO + r * hdp, sV + c * hdp, hd) - sD[r]);
      }
      sdS[idx] = ds;
    }
    __syncthreads();
    // dQ += scale · dS K; a thread owns query r, column e.
    const int nk = static_cast<int>(qmath::std_min<int64_t>(B, d.seq_len - j0));
    for (int idx = threadIdx.x; idx < B * hd; idx += blockDim.x) {
      const int r = idx / hd, e = idx % hd;
      T acc = T(0);
      for (int c = 0; c < nk; ++c) acc += sdS[r * B + c] * sK[c * hdp + e];
      sdQ[r * hdp + e] += scale * acc;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < B * hd; idx += blockDim.x) {
    const int r = idx / hd, e = idx % hd;
    const int64_t i = i0 + r;
    if (i < d.seq_len) dq[i * ldq + int64_t(h) * hd + e] += sdQ[r * hdp + e];
  }
}

// ----------------------------------------------------------------------------
// launchers

namespace attention_detail {

using detail::allow_shared;
using detail::max_shared_bytes;

// The largest tile whose shared memory (elements(tile, head_dim) values of T) fits the device.
template <class T, class Elements>
int choose_tile(const char* kernel, int head_dim, Elements elements) {
  const std::size_t limit = static_cast<std::size_t>(max_shared_bytes());
  for (int tile : kTileSizes)
    if (sizeof(T) * elements(tile, head_dim) <= limit) return tile;
  fail(
      "attention ({}): head_dim {} needs {} bytes of shared memory even with {}-row tiles, the "
      "device allows {}",
      kernel, head_dim, sizeof(T) * elements(kTileSizes[2], head_dim), kTileSizes[2], limit);
}

inline Dims make_dims(int64_t seq_len, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                      bool causal) {
  CBQ_CHECK(n_heads <= 65535 && n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim > 0 &&
                head_dim <= (1 << 20),
            "attention (cuda): unsupported heads {} / kv heads {} / head_dim {}", n_heads,
            n_kv_heads, head_dim);
  Dims d{};
  d.seq_len = seq_len;
  d.n_heads = static_cast<int>(n_heads);
  d.group = static_cast<int>(n_heads / n_kv_heads);
  d.head_dim = static_cast<int>(head_dim);
  d.causal = causal;
  return d;
}

inline unsigned tiles(int64_t seq_len, int tile) {
  const int64_t n = (seq_len + tile - 1) / tile;
  CBQ_CHECK(n <= 0x7fffffff, "attention (cuda): {} rows is too long", seq_len);
  return static_cast<unsigned>(n);
}

}  // namespace attention_detail

namespace attention_detail {

// The kernels float attention runs for this head dimension under the context's modes.
inline AttentionMode resolved_mode(int64_t head_dim) {
  Context& ctx = default_context();
  AttentionMode mode = ctx.attention_mode();
  if (mode == AttentionMode::automatic)
    mode = ctx.math_mode() == MathMode::tf32 ? AttentionMode::tf32 : AttentionMode::fp32;
  if (mode == AttentionMode::fp32 || !attention_tc::supported_head_dim(head_dim))
    return AttentionMode::fp32;
  // The largest of the three kernels' shared memory must fit the device (H100/H200: 227 KiB).
  using namespace attention_tc;
  const std::size_t need =
      mode == AttentionMode::tf32
          ? (head_dim == 64 ? Layout<Tf32, 64>::dkdv_bytes : Layout<Tf32, 128>::dkdv_bytes)
          : (head_dim == 64 ? Layout<Bf16, 64>::dkdv_bytes : Layout<Bf16, 128>::dkdv_bytes);
  if (need > static_cast<std::size_t>(max_shared_bytes())) return AttentionMode::fp32;
  return mode;
}

inline attention_tc::Dims tc_dims(const Dims& d) {
  return attention_tc::Dims{d.seq_len, d.n_heads, d.group, d.causal};
}

// Calls f.template operator()<Format, HD>() for the tensor-core format and head dimension.
template <class F>
void dispatch_tc(AttentionMode mode, int64_t head_dim, F&& f) {
  using namespace attention_tc;
  if (mode == AttentionMode::tf32) {
    if (head_dim == 64) return f.template operator()<Tf32, 64>();
    return f.template operator()<Tf32, 128>();
  }
  if (head_dim == 64) return f.template operator()<Bf16, 64>();
  return f.template operator()<Bf16, 128>();
}

}  // namespace attention_detail

template <class T>
void attention_forward(T* o, T* lse, const T* q, const T* k, const T* v, int64_t seq_len,
                       int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool causal,
                       T scale) {
  using namespace attention_detail;
  if (seq_len <= 0) return;
  Dims d = make_dims(seq_len, n_heads, n_kv_heads, head_dim, causal);
  if constexpr (std::is_same_v<T, float>) {
    (void)tiles(seq_len, attention_tc::kRows);  // the grid-size check
    if (const AttentionMode mode = resolved_mode(head_dim); mode != AttentionMode::fp32) {
      dispatch_tc(mode, head_dim, [&]<class F, int HD>() {
        attention_tc::forward<F, HD>(o, lse, q, k, v, tc_dims(d), scale, detail::current_stream());
      });
      return;
    }
  }
  d.tile = choose_tile<T>("forward", d.head_dim, forward_elements);
  const std::size_t bytes = sizeof(T) * forward_elements(d.tile, d.head_dim);
  allow_shared(attention_forward_kernel<T>, bytes);
  const dim3 grid(tiles(seq_len, d.tile), static_cast<unsigned>(d.n_heads));
  attention_forward_kernel<T>
      <<<grid, kThreads, bytes, detail::current_stream()>>>(o, lse, q, k, v, d, scale);
  CBQ_CUDA_CHECK_LAUNCH("attention_forward_kernel");
}

template <class T>
void attention_backward(T* dq, T* dk, T* dv, T* row_dot, const T* q, const T* k, const T* v,
                        const T* o, const T* dout, const T* lse, int64_t seq_len, int64_t n_heads,
                        int64_t n_kv_heads, int64_t head_dim, bool causal, T scale) {
  using namespace attention_detail;
  if (seq_len <= 0 || (!dq && !dk && !dv)) return;
  const Dims base = make_dims(seq_len, n_heads, n_kv_heads, head_dim, causal);
  cudaStream_t stream = detail::current_stream();
  attention_row_dot_kernel<T>
      <<<qmath::warp_grid_size(seq_len * n_heads), detail::kBlockSize, 0, stream>>>(row_dot, dout,
                                                                                    o, base);
  CBQ_CUDA_CHECK_LAUNCH("attention_row_dot_kernel");
  if constexpr (std::is_same_v<T, float>) {
    if (const AttentionMode mode = resolved_mode(head_dim); mode != AttentionMode::fp32) {
      dispatch_tc(mode, head_dim, [&]<class F, int HD>() {
        attention_tc::backward<F, HD>(dq, dk, dv, row_dot, q, k, v, dout, lse, tc_dims(base),
                                      n_kv_heads, scale, stream);
      });
      return;
    }
  }
  if (dk || dv) {
    Dims d = base;
    d.tile = choose_tile<T>("backward dK/dV", d.head_dim, dkdv_elements);
    const std::size_t bytes = sizeof(T) * dkdv_elements(d.tile, d.head_dim);
    allow_shared(attention_backward_dkdv_kernel<T>, bytes);
    const dim3 grid(tiles(seq_len, d.tile), static_cast<unsigned>(n_kv_heads));
    attention_backward_dkdv_kernel<T>
        <<<grid, kThreads, bytes, stream>>>(dk, dv, q, k, v, dout, lse, row_dot, d, scale);
    CBQ_CUDA_CHECK_LAUNCH("attention_backward_dkdv_kernel");
  }
  if (dq) {
    Dims d = base;
    d.tile = choose_tile<T>("backward dQ", d.head_dim, dq_elements);
    const std::size_t bytes = sizeof(T) * dq_elements(d.tile, d.head_dim);
    allow_shared(attention_backward_dq_kernel<T>, bytes);
    const dim3 grid(tiles(seq_len, d.tile), static_cast<unsigned>(d.n_heads));
    attention_backward_dq_kernel<T>
        <<<grid, kThreads, bytes, stream>>>(dq, q, k, v, dout, lse, row_dot, d, scale);
    CBQ_CUDA_CHECK_LAUNCH("attention_backward_dq_kernel");
  }
}

namespace detail {
inline const bool attention_registered = [] {
  ops::CudaAttention<float>::forward = &attention_forward<float>;
  ops::CudaAttention<float>::backward = &attention_backward<float>;
  ops::CudaAttention<double>::forward = &attention_forward<double>;
  ops::CudaAttention<double>::backward = &attention_backward<double>;
  return true;
}();
}  // namespace detail

}  // namespace cbq::cuda
