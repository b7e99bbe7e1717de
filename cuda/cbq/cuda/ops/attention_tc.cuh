#pragma once
// Causal / full grouped-query attention on the tensor cores (WMMA), for float tensors with head
// dimension 64 or 128: the same flash algorithm, layout and results' meaning as the FP32 scalar
// kernels of attention.cuh (which stay the reference), with the four matrix products of every
// tile (QKᵀ, PV and in backward dOVᵀ, PᵀdO, dSᵀQ, dSK) in TF32 (m16n16k8) or BF16 (m16n16k16)
// with FP32 accumulation. Softmax, the running max and sum, exp and the output scaling stay FP32.
//
// Work split. A block has 4 warps; a warp owns 16 rows of the block's 64-row tile (query rows in
// forward and dQ, key rows in dK/dV) and computes its 16-row strips of every product, so the only
// block-wide barriers are around the K/V (or Q/dO) tiles all warps read.
//   forward  grid (query tiles, Hq): per 64-key tile, S = QKᵀ (a 16 × 64 strip per warp, through
//            shared memory to the softmax lanes), online softmax in FP32 (lanes 2r and 2r + 1 own
//            row r), O rescaled where the running max moved, O += PV in accumulator fragments.
//   dQ       grid (query tiles, Hq): per key tile, P = exp(S − L), dP = dO Vᵀ,
//            dS = P ⊙ (dP − D), dQ += dS K.
//   dK, dV   grid (key tiles, Hkv): per query tile of every head of the group, Pᵀ, dPᵀ = V dOᵀ,
//            dSᵀ, dV += Pᵀ dO, dK += dSᵀ Q.
// D = rowsum(dO ⊙ O) comes from attention.cuh's row kernel. Every gradient element is owned by
// one warp and summed in a fixed order (no atomics): deterministic.
//
// Rounding. Operands are rounded once, when a tile is copied to shared memory (TF32: cvt.rna,
// nearest with ties away; BF16: nearest even); P and dS are rounded when written for the next
// product. Accuracy is that of the inputs' format: see docs/CUDA.md for the tolerance derivation.
// Accumulator fragments go through shared memory (wmma's register layout is unspecified) for the
// per-row scaling: 16 × 16 at a time, in the owning warp's strip of the score buffer.
#include <cuda_bf16.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>

#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/launch.cuh"

namespace cbq::cuda {

namespace attention_tc {

namespace wmma = nvcuda::wmma;

inline constexpr int kWarps = 4;
inline constexpr int kThreads = kWarps * 32;
inline constexpr int kRows = 16 * kWarps;   // rows of the block's own tile (queries or keys)
inline constexpr int kCols = 64;            // rows of the streamed tile (keys or queries)
inline constexpr int kScoreLd = kCols + 4;  // float score rows, padded by 16 bytes

// Operand formats. Elem: how operands sit in shared memory; K: the WMMA k; Frag: WMMA's type.
struct Tf32 {
  using Elem = float;
  using Frag = wmma::precision::tf32;
  static constexpr int K = 8;
  static constexpr int kPad = 4;  // 16 bytes: rows shift banks, fragments stay 32-byte aligned
  static constexpr const char* name = "tf32";
  __device__ static Elem convert(float x) { return wmma::__float_to_tf32(x); }
};
struct Bf16 {
  using Elem = __nv_bfloat16;
  using Frag = __nv_bfloat16;
  static constexpr int K = 16;
  static constexpr int kPad = 8;
  static constexpr const char* name = "bf16";
  __device__ static Elem convert(float x) { return __float2bfloat16_rn(x); }
};

template <class F, int HD>
struct Layout {
  using Elem = typename F::Elem;
  static constexpr int kLd = HD + F::kPad;      // operand tile rows
  static constexpr int kPLd = kCols + F::kPad;  // P / dS rows
  static constexpr std::size_t tile_bytes = std::size_t(kRows) * kLd * sizeof(Elem);
  static constexpr std::size_t score_bytes = std::size_t(kRows) * kScoreLd * sizeof(float);
  static constexpr std::size_t p_bytes = std::size_t(kRows) * kPLd * sizeof(Elem);
  // forward: Q, K, V tiles, S, P
  static constexpr std::size_t forward_bytes = 3 * tile_bytes + score_bytes + p_bytes;
  // dQ: Q, dO, K, V tiles, P (float), dP (float), dS; dK/dV: K, V, Q, dO tiles, P (float),
  // dP (float), Pᵀ, dSᵀ, and the query tile's L and D.
  static constexpr std::size_t dq_bytes = 4 * tile_bytes + 2 * score_bytes + p_bytes;
  static constexpr std::size_t dkdv_bytes =
      4 * tile_bytes + 2 * score_bytes + 2 * p_bytes + 2 * kCols * sizeof(float);
  static_assert(tile_bytes % 128 == 0 && score_bytes % 128 == 0 && p_bytes % 128 == 0,
                "shared-memory arrays start 128-byte aligned");
};

// Shape of the problem (as attention.cuh's Dims, without the tile).
struct Dims {
  int64_t seq_len;
  int n_heads, group;
  bool causal;
  __device__ int64_t q_stride(int hd) const { return int64_t(n_heads) * hd; }
  __device__ int64_t kv_stride(int hd) const { return int64_t(n_heads / group) * hd; }
  __device__ bool visible(int64_t i, int64_t j) const {
    return i < seq_len && j < seq_len && (!causal || j <= i);
  }
};

// Rows [row0, row0 + rows) of the HD columns at `col` of a row-major (seq_len, ld) matrix into a
// shared tile (row stride Layout::kLd), converted to F's format; rows ≥ seq_len become 0.
template <class F, int HD>
__device__ inline void load_tile(typename F::Elem* tile, const float* src, int64_t row0, int rows,
                                 int64_t ld, int64_t col, int64_t seq_len) {
  constexpr int ldt = Layout<F, HD>::kLd;
  for (int idx = threadIdx.x; idx < rows * HD; idx += blockDim.x) {
    const int r = idx / HD, c = idx % HD;
    const int64_t row = row0 + r;
    tile[r * ldt + c] = F::convert(row < seq_len ? src[row * ld + col + c] : 0.0f);
  }
}

// acc (16 × 64, one warp) = A (16 × HD, row-major, lda) · Bᵀ where B (64 × HD) is row-major
// with ldb, i.e. Bᵀ is column-major: the strip of S = Q Kᵀ (or Sᵀ = K Qᵀ, dP = dO Vᵀ, ...).
template <class F, int HD>
__device__ inline void strip_abt(
    wmma::fragment<wmma::accumulator, 16, 16, F::K, float> (&acc)[kCols / 16],
    const typename F::Elem* a, int lda, const typename F::Elem* b, int ldb) {
#pragma unroll
  for (int t = 0; t < kCols / 16; ++t) wmma::fill_fragment(acc[t], 0.0f);
#pragma unroll 2
  for (int kk = 0; kk < HD; kk += F::K) {
    wmma::fragment<wmma::matrix_a, 16, 16, F::K, typename F::Frag, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk, lda);
#pragma unroll
    for (int t = 0; t < kCols / 16; ++t) {
      wmma::fragment<wmma::matrix_b, 16, 16, F::K, typename F::Frag, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, b + t * 16 * ldb + kk, ldb);
      wmma::mma_sync(acc[t], fa, fb, acc[t]);
    }
  }
}

// acc (16 × HD) += A (16 × 64, row-major, lda) · B (64 × HD, row-major, ldb): O += P V,
// dQ += dS K, dV += Pᵀ dO, dK += dSᵀ Q.
template <class F, int HD>
__device__ inline void strip_ab(
    wmma::fragment<wmma::accumulator, 16, 16, F::K, float> (&acc)[HD / 16],
    const typename F::Elem* a, int lda, const typename F::Elem* b, int ldb) {
#pragma unroll 2
  for (int kk = 0; kk < kCols; kk += F::K) {
    wmma::fragment<wmma::matrix_a, 16, 16, F::K, typename F::Frag, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk, lda);
#pragma unroll
    for (int t = 0; t < HD / 16; ++t) {
      wmma::fragment<wmma::matrix_b, 16, 16, F::K, typename F::Frag, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + kk * ldb + t * 16, ldb);
      wmma::mma_sync(acc[t], fa, fb, acc[t]);
    }
  }
}

// Stores the 16 × 64 strip to the warp's float rows (stride kScoreLd).
template <class F>
__device__ inline void store_strip(
    float* strip, wmma::fragment<wmma::accumulator, 16, 16, F::K, float> (&acc)[kCols / 16]) {
#pragma unroll
  for (int t = 0; t < kCols / 16; ++t)
    wmma::store_matrix_sync(strip + t * 16, acc[t], kScoreLd, wmma::mem_row_major);
}

// Multiplies row r of every accumulator fragment by factor (lanes 2r and 2r + 1 hold row r's
// factor), through the 16 × 16 scratch at `scratch` (floats, row-major, stride 16).
template <class F, int N>
__device__ inline void scale_rows(wmma::fragment<wmma::accumulator, 16, 16, F::K, float> (&acc)[N],
                                  float* scratch, float factor) {
  const int lane = threadIdx.x % 32, r = lane / 2, c0 = (lane % 2) * 8;
#pragma unroll
  for (int t = 0; t < N; ++t) {
    wmma::store_matrix_sync(scratch, acc[t], 16, wmma::mem_row_major);
    __syncwarp();
#pragma unroll
    for (int c = c0; c < c0 + 8; ++c) scratch[r * 16 + c] *= factor;
    __syncwarp();
    wmma::load_matrix_sync(acc[t], scratch, 16, wmma::mem_row_major);
    __syncwarp();
  }
}

// dst[row r of the warp's 16, column t·16 + c] (+)= factor · acc, for rows < seq_len; row
// `row0 + r` of a row-major matrix with stride ld, starting at column col.
template <class F, int N>
__device__ inline void write_rows(float* dst, int64_t row0, int64_t ld, int64_t col,
                                  int64_t seq_len,
                                  wmma::fragment<wmma::accumulator, 16, 16, F::K, float> (&acc)[N],
                                  float* scratch, float factor, bool accumulate) {
  const int lane = threadIdx.x % 32, r = lane / 2, c0 = (lane % 2) * 8;
  const int64_t row = row0 + r;
#pragma unroll
  for (int t = 0; t < N; ++t) {
    wmma::store_matrix_sync(scratch, acc[t], 16, wmma::mem_row_major);
    __syncwarp();
    if (row < seq_len) {
      float* out = dst + row * ld + col + t * 16;
#pragma unroll
      for (int c = c0; c < c0 + 8; ++c) {
        const float v = factor * scratch[r * 16 + c];
        out[c] = accumulate ? out[c] + v : v;
      }
    }
    __syncwarp();
  }
}

__device__ inline float pair_max(float x) { return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1)); }
__device__ inline float pair_sum(float x) { return x + __shfl_xor_sync(0xffffffffu, x, 1); }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ----------------------------------------------------------------------------
// kernels

extern __shared__ __align__(128) unsigned char attention_tc_shared[];

// o (T, Hq·HD), lse (T, Hq) from q (T, Hq·HD), k, v (T, Hkv·HD). grid (query tiles, Hq).
template <class F, int HD>
__global__ void __launch_bounds__(kThreads)
    attention_tc_forward_kernel(float* o, float* lse, const float* q, const float* k,
                                const float* v, Dims d, float scale) {
  using L = Layout<F, HD>;
  using Elem = typename F::Elem;
  Elem* sQ = reinterpret_cast<Elem*>(attention_tc_shared);
  Elem* sK = reinterpret_cast<Elem*>(attention_tc_shared + L::tile_bytes);
  Elem* sV = reinterpret_cast<Elem*>(attention_tc_shared + 2 * L::tile_bytes);
  float* sS = reinterpret_cast<float*>(attention_tc_shared + 3 * L::tile_bytes);
  Elem* sP = reinterpret_cast<Elem*>(attention_tc_shared + 3 * L::tile_bytes + L::score_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;  // this lane's row of the warp's 16, column half
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int h = blockIdx.y, g = h / d.group;
  const int64_t ldq = d.q_stride(HD), ldk = d.kv_stride(HD);
  const int64_t row = i0 + warp * 16 + r;  // this lane's query row
  float* strip = sS + warp * 16 * kScoreLd;
  Elem* pstrip = sP + warp * 16 * L::kPLd;
  const float scale2 = scale * kLog2e;  // scores in log2 units: exp(x) = 2^(x·log2 e)

  load_tile<F, HD>(sQ, q, i0, kRows, ldq, int64_t(h) * HD, d.seq_len);
  wmma::fragment<wmma::accumulator, 16, 16, F::K, float> acc_o[HD / 16];
#pragma unroll
  for (int t = 0; t < HD / 16; ++t) wmma::fill_fragment(acc_o[t], 0.0f);
  float m = -INFINITY, l = 0.0f;  // running max (log2 units) and sum of row `row`
  bool any_tile = false;
  const int64_t kv_end = d.causal ? (d.seq_len < i0 + kRows ? d.seq_len : i0 + kRows) : d.seq_len;
  for (int64_t j0 = 0; j0 < kv_end; j0 += kCols) {
    __syncthreads();  // every warp is done with the previous K and V tiles
    load_tile<F, HD>(sK, k, j0, kCols, ldk, int64_t(g) * HD, d.seq_len);
    load_tile<F, HD>(sV, v, j0, kCols, ldk, int64_t(g) * HD, d.seq_len);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, F::K, float> acc_s[kCols / 16];
    strip_abt<F, HD>(acc_s, sQ + warp * 16 * L::kLd, L::kLd, sK, L::kLd);
    store_strip<F>(strip, acc_s);
    __syncwarp();
    // Online softmax of row `row` over this tile's 64 keys, 32 per lane.
    float s[32];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = half * 32 + c;
      s[c] = d.visible(row, j0 + col) ? strip[r * kScoreLd + col] * scale2 : -INFINITY;
      tile_max = fmaxf(tile_max, s[c]);
    }
    const float m_new = fmaxf(m, pair_max(tile_max));
    // Masked keys (−∞) give p = 0; a row with no visible key so far keeps m = −∞ and p = 0.
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const float p = exp2f(s[c] - base);
      sum += p;
      pstrip[r * L::kPLd + half * 32 + c] = F::convert(p);
    }
    const float corr = exp2f(m - base);  // 0 before the first visible key, 1 if m unchanged
    l = l * corr + pair_sum(sum);
    m = m_new;
    __syncwarp();
    // O *= corr row by row where some row's max moved (fragments through the score strip).
    if (any_tile && __any_sync(0xffffffffu, corr != 1.0f)) scale_rows<F>(acc_o, strip, corr);
    any_tile = true;
    strip_ab<F, HD>(acc_o, pstrip, L::kPLd, sV, L::kLd);
  }
  __syncwarp();
  // O / l (write_rows' factor is per lane, and a lane writes only its own row) and
  // L = ln Σ exp = m·ln 2 + ln l, for the rows < seq_len.
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  write_rows<F>(o, i0 + warp * 16, ldq, int64_t(h) * HD, d.seq_len, acc_o, strip, inv, false);
  if (row < d.seq_len && half == 0) lse[row * d.n_heads + h] = m * kLn2 + logf(l);
}

// dq (T, Hq·HD) += the gradient of one query tile of one head. grid (query tiles, Hq).
template <class F, int HD>
__global__ void __launch_bounds__(kThreads)
    attention_tc_dq_kernel(float* dq, const float* q, const float* k, const float* v,
                           const float* dout, const float* lse, const float* row_dot, Dims d,
                           float scale) {
  using L = Layout<F, HD>;
  using Elem = typename F::Elem;
  unsigned char* base = attention_tc_shared;
  Elem* sQ = reinterpret_cast<Elem*>(base);
  Elem* sdO = reinterpret_cast<Elem*>(base + L::tile_bytes);
  Elem* sK = reinterpret_cast<Elem*>(base + 2 * L::tile_bytes);
  Elem* sV = reinterpret_cast<Elem*>(base + 3 * L::tile_bytes);
  float* sP = reinterpret_cast<float*>(base + 4 * L::tile_bytes);
  float* sdP = reinterpret_cast<float*>(base + 4 * L::tile_bytes + L::score_bytes);
  Elem* sdS = reinterpret_cast<Elem*>(base + 4 * L::tile_bytes + 2 * L::score_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int h = blockIdx.y, g = h / d.group;
  const int64_t ldq = d.q_stride(HD), ldk = d.kv_stride(HD);
  const int64_t row = i0 + warp * 16 + r;
  float* pstrip = sP + warp * 16 * kScoreLd;
  float* dpstrip = sdP + warp * 16 * kScoreLd;
  Elem* dsstrip = sdS + warp * 16 * L::kPLd;
  const float scale2 = scale * kLog2e;
  const float lse2 = row < d.seq_len ? lse[row * d.n_heads + h] * kLog2e : 0.0f;
  const float dot = row < d.seq_len ? row_dot[row * d.n_heads + h] : 0.0f;

  load_tile<F, HD>(sQ, q, i0, kRows, ldq, int64_t(h) * HD, d.seq_len);
  load_tile<F, HD>(sdO, dout, i0, kRows, ldq, int64_t(h) * HD, d.seq_len);
  wmma::fragment<wmma::accumulator, 16, 16, F::K, float> acc_dq[HD / 16];
#pragma unroll
  for (int t = 0; t < HD / 16; ++t) wmma::fill_fragment(acc_dq[t], 0.0f);
  const int64_t kv_end = d.causal ? (d.seq_len < i0 + kRows ? d.seq_len : i0 + kRows) : d.seq_len;
  for (int64_t j0 = 0; j0 < kv_end; j0 += kCols) {
    __syncthreads();
    load_tile<F, HD>(sK, k, j0, kCols, ldk, int64_t(g) * HD, d.seq_len);
    load_tile<F, HD>(sV, v, j0, kCols, ldk, int64_t(g) * HD, d.seq_len);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, F::K, float> acc[kCols / 16];
    strip_abt<F, HD>(acc, sQ + warp * 16 * L::kLd, L::kLd, sK, L::kLd);  // S
    store_strip<F>(pstrip, acc);
    strip_abt<F, HD>(acc, sdO + warp * 16 * L::kLd, L::kLd, sV, L::kLd);  // dP = dO Vᵀ
    store_strip<F>(dpstrip, acc);
    __syncwarp();
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      float ds = 0.0f;
      if (d.visible(row, j0 + c)) {
        const float p = exp2f(pstrip[r * kScoreLd + c] * scale2 - lse2);
        ds = p * (dpstrip[r * kScoreLd + c] - dot);
      }
      dsstrip[r * L::kPLd + c] = F::convert(ds);
    }
    __syncwarp();
    strip_ab<F, HD>(acc_dq, dsstrip, L::kPLd, sK, L::kLd);  // dQ += dS K
  }
  __syncwarp();
  write_rows<F>(dq, i0 + warp * 16, ldq, int64_t(h) * HD, d.seq_len, acc_dq, pstrip, scale, true);
}

// dk, dv (T, Hkv·HD) += the gradients of one key tile of one kv head (either may be null).
// grid (key tiles, Hkv).
template <class F, int HD>
__global__ void __launch_bounds__(kThreads)
    attention_tc_dkdv_kernel(float* dk, float* dv, const float* q, const float* k, const float* v,
                             const float* dout, const float* lse, const float* row_dot, Dims d,
                             float scale) {
  using L = Layout<F, HD>;
  using Elem = typename F::Elem;
  unsigned char* base = attention_tc_shared;
  Elem* sK = reinterpret_cast<Elem*>(base);
  Elem* sV = reinterpret_cast<Elem*>(base + L::tile_bytes);
  Elem* sQ = reinterpret_cast<Elem*>(base + 2 * L::tile_bytes);
  Elem* sdO = reinterpret_cast<Elem*>(base + 3 * L::tile_bytes);
  float* sP = reinterpret_cast<float*>(base + 4 * L::tile_bytes);
  float* sdP = reinterpret_cast<float*>(base + 4 * L::tile_bytes + L::score_bytes);
  Elem* sPt = reinterpret_cast<Elem*>(base + 4 * L::tile_bytes + 2 * L::score_bytes);
  Elem* sdSt = reinterpret_cast<Elem*>(base + 4 * L::tile_bytes + 2 * L::score_bytes + L::p_bytes);
  float* sL =
      reinterpret_cast<float*>(base + 4 * L::tile_bytes + 2 * L::score_bytes + 2 * L::p_bytes);
  float* sD = sL + kCols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;  // this lane's key row of the warp's 16
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int g = blockIdx.y;
  const int64_t ldq = d.q_stride(HD), ldk = d.kv_stride(HD);
  const int64_t key = j0 + warp * 16 + r;
  float* pstrip = sP + warp * 16 * kScoreLd;
  float* dpstrip = sdP + warp * 16 * kScoreLd;
  Elem* ptstrip = sPt + warp * 16 * L::kPLd;
  Elem* dststrip = sdSt + warp * 16 * L::kPLd;
  const float scale2 = scale * kLog2e;

  load_tile<F, HD>(sK, k, j0, kRows, ldk, int64_t(g) * HD, d.seq_len);
  load_tile<F, HD>(sV, v, j0, kRows, ldk, int64_t(g) * HD, d.seq_len);
  wmma::fragment<wmma::accumulator, 16, 16, F::K, float> acc_dk[HD / 16], acc_dv[HD / 16];
#pragma unroll
  for (int t = 0; t < HD / 16; ++t) {
    wmma::fill_fragment(acc_dk[t], 0.0f);
    wmma::fill_fragment(acc_dv[t], 0.0f);
  }
  // Under the causal mask query rows before j0 see none of these keys.
  const int64_t i_begin = d.causal ? j0 : 0;
  for (int t = 0; t < d.group; ++t) {
    const int h = g * d.group + t;
    for (int64_t i0 = i_begin; i0 < d.seq_len; i0 += kCols) {
      __syncthreads();  // every warp is done with the previous query tile
      load_tile<F, HD>(sQ, q, i0, kCols, ldq, int64_t(h) * HD, d.seq_len);
      load_tile<F, HD>(sdO, dout, i0, kCols, ldq, int64_t(h) * HD, d.seq_len);
      for (int c = threadIdx.x; c < kCols; c += blockDim.x) {
        const int64_t i = i0 + c;
        sL[c] = i < d.seq_len ? lse[i * d.n_heads + h] * kLog2e : 0.0f;
        sD[c] = i < d.seq_len ? row_dot[i * d.n_heads + h] : 0.0f;
      }
      __syncthreads();
      wmma::fragment<wmma::accumulator, 16, 16, F::K, float> acc[kCols / 16];
      strip_abt<F, HD>(acc, sK + warp * 16 * L::kLd, L::kLd, sQ, L::kLd);  // Sᵀ = K Qᵀ
      store_strip<F>(pstrip, acc);
      strip_abt<F, HD>(acc, sV + warp * 16 * L::kLd, L::kLd, sdO, L::kLd);  // dPᵀ = V dOᵀ
      store_strip<F>(dpstrip, acc);
      __syncwarp();
      // Pᵀ[key, query] = exp(scale·s − L_query), dSᵀ = Pᵀ ⊙ (dPᵀ − D_query); 0 where masked.
      for (int c = half * 32; c < half * 32 + 32; ++c) {
        float p = 0.0f, ds = 0.0f;
        if (d.visible(i0 + c, key)) {
          p = exp2f(pstrip[r * kScoreLd + c] * scale2 - sL[c]);
          ds = p * (dpstrip[r * kScoreLd + c] - sD[c]);
        }
        ptstrip[r * L::kPLd + c] = F::convert(p);
        dststrip[r * L::kPLd + c] = F::convert(ds);
      }
      __syncwarp();
      strip_ab<F, HD>(acc_dv, ptstrip, L::kPLd, sdO, L::kLd);  // dV += Pᵀ dO
      strip_ab<F, HD>(acc_dk, dststrip, L::kPLd, sQ, L::kLd);  // dK += dSᵀ Q
    }
  }
  __syncwarp();
  const int64_t col = int64_t(g) * HD;
  if (dk) write_rows<F>(dk, j0 + warp * 16, ldk, col, d.seq_len, acc_dk, pstrip, scale, true);
  if (dv) write_rows<F>(dv, j0 + warp * 16, ldk, col, d.seq_len, acc_dv, pstrip, 1.0f, true);
}

// ----------------------------------------------------------------------------
// launchers

using detail::allow_shared;

inline unsigned tiles(int64_t n) { return static_cast<unsigned>((n + kRows - 1) / kRows); }

template <class F, int HD>
void forward(float* o, float* lse, const float* q, const float* k, const float* v, Dims d,
             float scale, cudaStream_t stream) {
  constexpr std::size_t bytes = Layout<F, HD>::forward_bytes;
  allow_shared(attention_tc_forward_kernel<F, HD>, bytes);
  const dim3 grid(tiles(d.seq_len), static_cast<unsigned>(d.n_heads));
  attention_tc_forward_kernel<F, HD><<<grid, kThreads, bytes, stream>>>(o, lse, q, k, v, d, scale);
  CBQ_CUDA_CHECK_LAUNCH("attention_tc_forward_kernel");
}

template <class F, int HD>
void backward(float* dq, float* dk, float* dv, const float* row_dot, const float* q, const float* k,
              const float* v, const float* dout, const float* lse, Dims d, int64_t n_kv_heads,
              float scale, cudaStream_t stream) {
  if (dk || dv) {
    constexpr std::size_t bytes = Layout<F, HD>::dkdv_bytes;
    allow_shared(attention_tc_dkdv_kernel<F, HD>, bytes);
    const dim3 grid(tiles(d.seq_len), static_cast<unsigned>(n_kv_heads));
    attention_tc_dkdv_kernel<F, HD>
        <<<grid, kThreads, bytes, stream>>>(dk, dv, q, k, v, dout, lse, row_dot, d, scale);
    CBQ_CUDA_CHECK_LAUNCH("attention_tc_dkdv_kernel");
  }
  if (dq) {
    constexpr std::size_t bytes = Layout<F, HD>::dq_bytes;
    allow_shared(attention_tc_dq_kernel<F, HD>, bytes);
    const dim3 grid(tiles(d.seq_len), static_cast<unsigned>(d.n_heads));
    attention_tc_dq_kernel<F, HD>
        <<<grid, kThreads, bytes, stream>>>(dq, q, k, v, dout, lse, row_dot, d, scale);
    CBQ_CUDA_CHECK_LAUNCH("attention_tc_dq_kernel");
  }
}

// Head dimensions with tensor-core kernels.
inline bool supported_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

}  // namespace attention_tc

}  // namespace cbq::cuda
