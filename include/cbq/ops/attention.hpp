#pragma once
// attention: multi-head scaled dot-product attention with grouped-query heads and an optional
// causal mask, in the memory-efficient (flash-attention) form.
//   q (T, Hq·hd), k (T, Hkv·hd), v (T, Hkv·hd) → o (T, Hq·hd); heads side by side in each row.
//   Query head h reads kv head g = h / (Hq/Hkv).
//   S = scale · Q_h K_gᵀ (masked: key j > query i gets −∞ when causal),  P = softmax_rows(S),
//   O_h = P V_g.
// Memory stays O(T): forward streams over key tiles with an online softmax per (row, head),
// keeping a running max m and sum l, and saves only the output and the log-sum-exp
//   L_i = m_i + log l_i   (shape (T, Hq)).
// Backward recomputes P = exp(S − L) tile by tile. With dO the output gradient:
//   D_i = Σ_c dO_ic · O_ic
//   dV_g += Pᵀ dO,   dP = dO V_gᵀ,   dS = P ⊙ (dP − D)
//   dQ_h += scale · dS K_g,   dK_g += scale · dSᵀ Q_h
// Two CPU paths compute this. Small heads (hd ≤ 8, the llama2.c 260K models' hd 8) take the
// row path: one query row at a time against keys and values transposed once per call, its
// scores, exps and P·V in vector registers (attention_rows_kernels.inc); work items are (head,
// 32 rows) in the forward and (head, part) in the backward as below, dK/dV through per-item
// shares. Wider heads take the tiled path: tiles of kBlock × kBlock scores go through GEMM. Forward
// work items are (query head, query tile), dealt to the threads in contiguous runs of equal cost (a
// causal tile's cost grows with its index). Backward work items are (query head, part): each head's
// query tiles cut into kAttentionBackwardParts runs of equal cost (so 9 heads on 2 threads do not
// split 5 : 4), each writing dQ of its own rows and its dK/dV contributions into a share of its
// own; the shares are summed in a fixed order. The parts depend on the shapes only, so results do
// not depend on the thread count.
//
// CUDA (CudaAttention, cuda/cbq/cuda/ops/attention.cuh): the same algorithm as flash-attention
// kernels in shared memory — forward: one block per (query tile, head) streaming key tiles with
// the online softmax, saving L; backward: D = rowsum(dO ⊙ O), then one block per (key tile,
// kv head) accumulating dK, dV over the query tiles of every head of its group, and one block per
// (query tile, head) accumulating dQ; P is recomputed from L. No atomics: deterministic.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cbq/ops/cpu_kernels.hpp"
#include "cbq/ops/matmul.hpp"

namespace cbq::ops {

template <class T>
struct CudaAttention {
  // o (T, Hq·hd), lse (T, Hq) from q (T, Hq·hd), k, v (T, Hkv·hd).
  static inline void (*forward)(T* o, T* lse, const T* q, const T* k, const T* v, int64_t seq_len,
                                int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool causal,
                                T scale) = nullptr;
  // dq (T, Hq·hd), dk, dv (T, Hkv·hd) += the gradients (each may be null); row_dot (T, Hq) is
  // scratch for D = rowsum(dO ⊙ O).
  static inline void (*backward)(T* dq, T* dk, T* dv, T* row_dot, const T* q, const T* k,
                                 const T* v, const T* o, const T* dout, const T* lse,
                                 int64_t seq_len, int64_t n_heads, int64_t n_kv_heads,
                                 int64_t head_dim, bool causal, T scale) = nullptr;
};

namespace detail {

// Query and key rows per tile: a 64 × 64 score tile with hd ≤ 64 stays below OpenBLAS's
// threading threshold, so the GEMMs inside our own parallel_for run single-threaded.
inline constexpr int64_t kAttentionBlock = 64;
// Runs of query tiles per head in the backward (at most; fewer when there are fewer tiles).
inline constexpr int64_t kAttentionBackwardParts = 2;
// Head dimensions up to this one take the row path (attention_rows_kernels.inc), faster than the
// GEMM tiles there (docs/PERFORMANCE.md); it holds several vectors per head-dimension index in
// registers, so wider heads take the tiles.
inline constexpr int64_t kAttentionRowsMaxHeadDim = 8;
// The widest head the row kernels take when forced (tests, benchmarks): at hd 16 their forward
// is still faster than the tiles', their backward 1.8× slower (register spills).
inline constexpr int64_t kAttentionRowsWidest = 16;
// Query rows per work item of the row path.
inline constexpr int64_t kAttentionRowsChunk = 32;
// Which CPU path CpuAttention takes: by head dimension, or forced (tests and benchmarks compare
// the two on the same inputs; set it only while no attention runs).
enum class AttentionPath { automatic, tiles, rows };
inline AttentionPath attention_path = AttentionPath::automatic;
inline bool attention_uses_rows(int64_t head_dim) {
  if (attention_path != AttentionPath::automatic) return attention_path == AttentionPath::rows;
  return head_dim <= kAttentionRowsMaxHeadDim;
}
// The row kernels' padded head dimension (4, 8 or 16; the row path takes hd ≤ 16 only).
inline int attention_rows_width(int64_t head_dim) {
  return head_dim <= 4 ? 4 : head_dim <= 8 ? 8 : 16;
}

// Work of a query tile: the key tiles it reads (all of them without the causal mask).
inline int64_t attention_tile_cost(int64_t tile, int64_t n_tiles, bool causal) {
  return causal ? tile + 1 : n_tiles;
}

// Boundaries cuts[0] = 0 ≤ … ≤ cuts[parts] = n cutting items 0..n−1 of cost(i) into `parts`
// contiguous runs of about equal cost: each inner cut at the item boundary nearest to its share
// of the total.
template <class Cost>
std::vector<int64_t> balanced_cuts(int64_t n, int64_t parts, Cost&& cost) {
  std::vector<double> prefix(static_cast<std::size_t>(n + 1), 0.0);
  for (int64_t i = 0; i < n; ++i)
    prefix[static_cast<std::size_t>(i + 1)] =
        prefix[static_cast<std::size_t>(i)] + static_cast<double>(cost(i));
  std::vector<int64_t> cuts(static_cast<std::size_t>(parts + 1), n);
  cuts[0] = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const double target = prefix.back() * static_cast<double>(p) / static_cast<double>(parts);
    int64_t i = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    if (i > 0 && target - prefix[static_cast<std::size_t>(i - 1)] <
                     prefix[static_cast<std::size_t>(i)] - target)
      --i;
    cuts[static_cast<std::size_t>(p)] =
        std::clamp<int64_t>(i, cuts[static_cast<std::size_t>(p - 1)], n);
  }
  return cuts;
}

struct AttentionDims {
  int64_t seq_len, n_heads, n_kv_heads, head_dim;
  bool causal;
  double scale;
  int64_t group() const { return n_heads / n_kv_heads; }
  int64_t q_stride() const { return n_heads * head_dim; }      // row stride of q, o
  int64_t kv_stride() const { return n_kv_heads * head_dim; }  // row stride of k, v
  // Keys a query row i may see inside the key tile starting at j0 with nk keys.
  int64_t visible_keys(int64_t i, int64_t j0, int64_t nk) const {
    return causal ? std::clamp<int64_t>(i - j0 + 1, 0, nk) : nk;
  }
};

// Tags of the attention's per-thread buffers (thread_buffer): each worker's score tiles, and the
// backward's dK/dV shares on the calling thread.
struct AttentionTiles;
struct AttentionShares;
// The row path's transposed keys and values, its row of scores per thread, its dK/dV shares.
struct AttentionTransposed;
struct AttentionRowScores;
struct AttentionRowShares;

}  // namespace detail

}  // namespace cbq::ops

// The per-ISA row kernels: attention_rows_forward, attention_rows_backward.
#define CBQ_SIMD_KERNELS "cbq/ops/attention_rows_kernels.inc"
#include "cbq/ops/simd_kernels.inc"

namespace cbq::ops {

template <class T>
struct CpuAttention {
  // o (T, Hq·hd) and, when lse is not null (the evaluation path of model/inference.hpp passes
  // null), the log-sum-exp (T, Hq). One work item per (query head, query tile), each computed by
  // one thread (the result does not depend on the thread count); the items, head by head, are cut
  // into one contiguous run of equal cost per thread. (Stacking the query heads of a kv head into
  // one tile and using 256- or 512-key blocks, tried at SmolLM2's shapes, was no faster in
  // interleaved runs: with hd = 64 the GEMMs' inner dimension stays 64 either way.)
  static void forward(T* o, T* lse, const T* q, const T* k, const T* v, int64_t seq_len,
                      int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool causal, T scale) {
    if (detail::attention_uses_rows(head_dim))
      forward_rows(o, lse, q, k, v, seq_len, n_heads, n_kv_heads, head_dim, causal, scale);
    else
      forward_tiles(o, lse, q, k, v, seq_len, n_heads, n_kv_heads, head_dim, causal, scale);
  }

  // row_dot_all (T, Hq) receives D = rowsum(dO ⊙ O).
  static void backward(T* dq, T* dk, T* dv, T* row_dot_all, const T* q, const T* k, const T* v,
                       const T* o, const T* dout, const T* lse, int64_t seq_len, int64_t n_heads,
                       int64_t n_kv_heads, int64_t head_dim, bool causal, T scale) {
    if (detail::attention_uses_rows(head_dim))
      backward_rows(dq, dk, dv, row_dot_all, q, k, v, o, dout, lse, seq_len, n_heads, n_kv_heads,
                    head_dim, causal, scale);
    else
      backward_tiles(dq, dk, dv, row_dot_all, q, k, v, o, dout, lse, seq_len, n_heads, n_kv_heads,
                     head_dim, causal, scale);
  }

  // The row path (hd ≤ 8 by default, ≤ 16 when forced). Work items are (query head, chunk of
  // kAttentionRowsChunk rows), dealt to the threads in contiguous runs of equal cost; keys and
  // values are transposed once per call.
  static void forward_rows(T* o, T* lse, const T* q, const T* k, const T* v, int64_t seq_len,
                           int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool causal,
                           T scale) {
    const RowLayout r(seq_len, n_heads, n_kv_heads, head_dim, causal);
    const T* kt = r.transpose(k, 0);
    const T* vt = r.transpose(v, 1);
    const int64_t items = n_heads * r.chunks;
    const int64_t runs = std::min<int64_t>(num_threads(), items);
    const std::vector<int64_t> cuts =
        detail::balanced_cuts(items, runs, [&](int64_t w) { return r.chunk_cost(w % r.chunks); });
    parallel_for(runs, 1, [&](int64_t r0, int64_t r1) {
      T* scores = thread_buffer<T, detail::AttentionRowScores>(2 * r.ldt);  // two rows at a time
      for (int64_t w = cuts[static_cast<std::size_t>(r0)]; w < cuts[static_cast<std::size_t>(r1)];
           ++w) {
        const int64_t h = w / r.chunks, g = h / r.group;
        const int64_t i0 = (w % r.chunks) * detail::kAttentionRowsChunk;
        const int64_t i1 = std::min(seq_len, i0 + detail::kAttentionRowsChunk);
        T* oh = o + h * head_dim;
        T* lh = lse ? lse + h : nullptr;
        const T* qh = q + h * head_dim;
        const T* kg = kt + g * r.stride;  // (T/16, HD, 16) per kv head
        const T* vg = vt + g * r.stride;
#define CBQ_ATTENTION_ROWS_FORWARD(HD)                                                         \
  CBQ_SIMD_DISPATCH(simd::isa_for<T>(),                                                        \
                    attention_rows_forward<T, HD>(oh, lh, n_heads, qh, r.ldq, kg, vg, seq_len, \
                                                  head_dim, causal, scale, i0, i1, scores))
        switch (r.width) {
          case 4:
            CBQ_ATTENTION_ROWS_FORWARD(4);
            break;
          case 8:
            CBQ_ATTENTION_ROWS_FORWARD(8);
            break;
          default:
            CBQ_ATTENTION_ROWS_FORWARD(16);
            break;
        }
#undef CBQ_ATTENTION_ROWS_FORWARD
      }
    });
  }

  // Work items (query head h, part p): each head's row chunks cut into kAttentionBackwardParts
  // runs of equal cost. An item writes dQ and D of its own rows, and its dK/dV contributions into
  // shares of its own (blocked and transposed like the keys), summed into dK/dV below in a fixed
  // order: the result does not depend on the thread count.
  static void backward_rows(T* dq, T* dk, T* dv, T* row_dot_all, const T* q, const T* k, const T* v,
                            const T* o, const T* dout, const T* lse, int64_t seq_len,
                            int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool causal,
                            T scale) {
    const RowLayout r(seq_len, n_heads, n_kv_heads, head_dim, causal);
    const T* kt = r.transpose(k, 0);
    const T* vt = r.transpose(v, 1);
    const int64_t parts = std::min(detail::kAttentionBackwardParts, r.chunks);
    const std::vector<int64_t> chunk_cuts =
        detail::balanced_cuts(r.chunks, parts, [&](int64_t c) { return r.chunk_cost(c); });
    const int64_t items = n_heads * parts, share = r.stride;
    T* shares = thread_buffer<T, detail::AttentionRowShares>(2 * items * share);
    auto rows_of = [&](int64_t p, bool end) {
      return std::min(seq_len, chunk_cuts[static_cast<std::size_t>(p + (end ? 1 : 0))] *
                                   detail::kAttentionRowsChunk);
    };
    // Keys a part reaches: those of its last row (all of them without the mask).
    auto keys_of = [&](int64_t p) { return causal ? rows_of(p, true) : seq_len; };
    parallel_for(items, 1, [&](int64_t w0, int64_t w1) {
      T* ds = thread_buffer<T, detail::AttentionRowScores>(4 * r.ldt);  // dS and P, two rows
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t h = w / parts, p = w % parts, g = h / r.group;
        T* dkt = dk ? shares + w * share : nullptr;
        T* dvt = dv ? shares + (items + w) * share : nullptr;
        for (T* sh : {dkt, dvt})
          if (sh) std::fill_n(sh, share, T(0));
        const int64_t i0 = rows_of(p, false), i1 = rows_of(p, true);
        T* dqh = dq ? dq + h * head_dim : nullptr;
        const int64_t off = h * head_dim;
        const T* kg = kt + g * r.stride;
        const T* vg = vt + g * r.stride;
#define CBQ_ATTENTION_ROWS_BACKWARD(HD)                                                      \
  CBQ_SIMD_DISPATCH(simd::isa_for<T>(),                                                      \
                    attention_rows_backward<T, HD>(                                          \
                        dqh, dkt, dvt, row_dot_all + h, q + off, o + off, dout + off, r.ldq, \
                        lse + h, n_heads, kg, vg, seq_len, head_dim, causal, scale, i0, i1, ds))
        switch (r.width) {
          case 4:
            CBQ_ATTENTION_ROWS_BACKWARD(4);
            break;
          case 8:
            CBQ_ATTENTION_ROWS_BACKWARD(8);
            break;
          default:
            CBQ_ATTENTION_ROWS_BACKWARD(16);
            break;
        }
#undef CBQ_ATTENTION_ROWS_BACKWARD
      }
    });
    // dK_g[j] += Σ over the query heads of group g and their parts, in order, of the shares.
    auto reduce = [&](T* dst, const T* first_share) {
      parallel_for(seq_len, detail::row_grain(items), [&](int64_t j0, int64_t j1) {
        for (int64_t w = 0; w < items; ++w) {
          const int64_t h = w / parts, p = w % parts, g = h / r.group;
          const T* sh = first_share + w * share;
          const int64_t j_end = std::min(j1, keys_of(p));
          for (int64_t j = j0; j < j_end; ++j)
            for (int64_t d = 0; d < head_dim; ++d)
              dst[j * r.ldk + g * head_dim + d] += sh[r.blocked(j, d)];
        }
      });
    };
    if (dk) reduce(dk, shares);
    if (dv) reduce(dv, shares + items * share);
  }

  // The tiled path (hd > 8).
  static void forward_tiles(T* o, T* lse, const T* q, const T* k, const T* v, int64_t seq_len,
                            int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool causal,
                            T scale) {
    const detail::AttentionDims a{seq_len,  n_heads, n_kv_heads,
                                  head_dim, causal,  static_cast<double>(scale)};
    const int64_t n = a.seq_len, hd = a.head_dim, group = a.group();
    const int64_t ldq = a.q_stride(), ldk = a.kv_stride();
    constexpr int64_t B = detail::kAttentionBlock;
    const int64_t n_tiles = (n + B - 1) / B;
    // One work item per (query head, query tile); one run of items of equal cost per thread.
    const int64_t items = n_heads * n_tiles;
    const int64_t runs = std::min<int64_t>(num_threads(), items);
    const std::vector<int64_t> cuts = detail::balanced_cuts(items, runs, [&](int64_t w) {
      return detail::attention_tile_cost(w % n_tiles, n_tiles, causal);
    });
    parallel_for(runs, 1, [&](int64_t r0, int64_t r1) {
      T* scores =
          thread_buffer<T, detail::AttentionTiles>(B * B + 2 * B);  // per thread, allocated once
      T* running_max = scores + B * B;
      T* running_sum = running_max + B;
      for (int64_t w = cuts[static_cast<std::size_t>(r0)]; w < cuts[static_cast<std::size_t>(r1)];
           ++w) {
        const int64_t h = w / n_tiles, g = h / group;
        const int64_t i0 = (w % n_tiles) * B, i1 = std::min(n, i0 + B), nq = i1 - i0;
        const T* Q = q + i0 * ldq + h * hd;  // (nq, hd), row stride ldq
        T* O = o + i0 * ldq + h * hd;        // (nq, hd): unnormalised Σ exp(S − m) V, then O
        for (int64_t r = 0; r < nq; ++r) std::fill(O + r * ldq, O + r * ldq + hd, T(0));
        std::fill(running_max, running_max + B, -std::numeric_limits<T>::infinity());
        std::fill(running_sum, running_sum + B, T(0));
        const int64_t kv_end = causal ? i1 : n;
        for (int64_t j0 = 0; j0 < kv_end; j0 += B) {
          const int64_t nk = std::min(kv_end, j0 + B) - j0;
          // S (nq, nk) = scale · Q Kᵀ
          blas::gemm<T>(false, true, nq, nk, hd, scale, Q, ldq, k + j0 * ldk + g * hd, ldk, T(0),
                        scores, B);
          int64_t visible[B];
          for (int64_t r = 0; r < nq; ++r) visible[r] = a.visible_keys(i0 + r, j0, nk);
          CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                            attention_softmax_tile<T>(scores, B, nq, nk, visible, running_max,
                                                      running_sum, O, ldq, hd));
          // O (nq, hd) += exp(S − m) (nq, nk) · V (nk, hd)
          blas::gemm<T>(false, false, nq, hd, nk, T(1), scores, B, v + j0 * ldk + g * hd, ldk, T(1),
                        O, ldq);
        }
        for (int64_t r = 0; r < nq; ++r) {
          const T inv = T(1) / running_sum[r];
          for (int64_t c = 0; c < hd; ++c) O[r * ldq + c] *= inv;
          if (lse) lse[(i0 + r) * a.n_heads + h] = running_max[r] + std::log(running_sum[r]);
        }
      }
    });
  }

  static void backward_tiles(T* dq, T* dk, T* dv, T* row_dot_all, const T* q, const T* k,
                             const T* v, const T* o, const T* dout, const T* lse, int64_t seq_len,
                             int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool causal,
                             T scale) {
    const detail::AttentionDims a{seq_len,  n_heads, n_kv_heads,
                                  head_dim, causal,  static_cast<double>(scale)};
    const int64_t n = a.seq_len, hd = a.head_dim, group = a.group();
    const int64_t ldq = a.q_stride(), ldk = a.kv_stride();
    constexpr int64_t B = detail::kAttentionBlock;
    // Work items (query head h, part p): part p of a head holds its query tiles
    // [tile_cuts[p], tile_cuts[p + 1]), the parts of equal cost. An item writes dQ of its own
    // rows; its dK/dV contributions go to a share of its own, slot h·parts + p of a
    // (T, Hq·parts·hd) buffer, covering key rows [0, key_end[p]) (zeroed by the item itself),
    // and the shares are summed into dK/dV below in a fixed order. With one part per head and
    // no grouping each item owns its kv head's columns and accumulates straight into dK/dV.
    const int64_t n_tiles = (n + B - 1) / B;
    const int64_t parts = std::min(detail::kAttentionBackwardParts, n_tiles);
    const std::vector<int64_t> tile_cuts = detail::balanced_cuts(n_tiles, parts, [&](int64_t t) {
      return detail::attention_tile_cost(t, n_tiles, a.causal);
    });
    std::vector<int64_t> key_end(static_cast<std::size_t>(parts));
    for (int64_t p = 0; p < parts; ++p)
      key_end[static_cast<std::size_t>(p)] =
          a.causal ? std::min(n, tile_cuts[static_cast<std::size_t>(p + 1)] * B) : n;
    const bool shared = group > 1 || parts > 1;
    const int64_t slots = a.n_heads * parts, ld_share = shared ? slots * hd : ldk;
    // The shares live in the calling thread's buffer, grown once (no allocation per step).
    T* shares = shared ? thread_buffer<T, detail::AttentionShares>(2 * n * ld_share) : nullptr;
    T* dk_share = dk && shared ? shares : dk;
    T* dv_share = dv && shared ? shares + n * ld_share : dv;

    const int64_t items = a.n_heads * parts;
    parallel_for(items, 1, [&](int64_t w0, int64_t w1) {
      T* probs = thread_buffer<T, detail::AttentionTiles>(2 * B * B);  // per thread, allocated once
      T* dscores = probs + B * B;
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t h = w / parts, p = w % parts, g = h / group;
        const int64_t share_col = (shared ? w : g) * hd;
        if (shared)  // this item's share: its key rows, its columns
          for (T* share : {dk_share, dv_share})
            if (share)
              for (int64_t r = 0; r < key_end[static_cast<std::size_t>(p)]; ++r)
                std::fill_n(share + r * ld_share + share_col, hd, T(0));
        const int64_t i_begin = tile_cuts[static_cast<std::size_t>(p)] * B;
        const int64_t i_end = std::min(n, tile_cuts[static_cast<std::size_t>(p + 1)] * B);
        for (int64_t i0 = i_begin; i0 < i_end; i0 += B) {
          const int64_t i1 = std::min(n, i0 + B), nq = i1 - i0;
          const T* Q = q + i0 * ldq + h * hd;             // (nq, hd), row stride ldq
          const T* dO = dout + i0 * ldq + h * hd;         // (nq, hd)
          const T* O = o + i0 * ldq + h * hd;             // (nq, hd)
          T* row_dot = row_dot_all + i0 * a.n_heads + h;  // D of rows i0.., stride Hq
          for (int64_t r = 0; r < nq; ++r) {              // D_i = Σ dO_i · O_i
            T s = 0;
            for (int64_t c = 0; c < hd; ++c) s += dO[r * ldq + c] * O[r * ldq + c];
            row_dot[r * a.n_heads] = s;
          }
          const int64_t kv_end = a.causal ? i1 : n;
          for (int64_t j0 = 0; j0 < kv_end; j0 += B) {
            const int64_t nk = std::min(kv_end, j0 + B) - j0;
            const T* K = k + j0 * ldk + g * hd;  // (nk, hd), row stride ldk
            const T* V = v + j0 * ldk + g * hd;  // (nk, hd)
            // P (nq, nk) = exp(scale · Q Kᵀ − L), 0 where masked
            blas::gemm<T>(false, true, nq, nk, hd, scale, Q, ldq, K, ldk, T(0), probs, B);
            int64_t visible[B];
            for (int64_t r = 0; r < nq; ++r) visible[r] = a.visible_keys(i0 + r, j0, nk);
            CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                              attention_probs_tile<T>(probs, B, nq, nk, visible,
                                                      lse + i0 * a.n_heads + h, a.n_heads));
            if (dv_share)  // dV (nk, hd) += Pᵀ (nk, nq) · dO (nq, hd)
              blas::gemm<T>(true, false, nk, hd, nq, T(1), probs, B, dO, ldq, T(1),
                            dv_share + j0 * ld_share + share_col, ld_share);
            if (!dq && !dk_share) continue;
            // dP (nq, nk) = dO (nq, hd) · Vᵀ (hd, nk);  dS = P ⊙ (dP − D)
            blas::gemm<T>(false, true, nq, nk, hd, T(1), dO, ldq, V, ldk, T(0), dscores, B);
            for (int64_t r = 0; r < nq; ++r) {
              const T* pr = probs + r * B;
              T* ds = dscores + r * B;
              for (int64_t c = 0; c < nk; ++c) ds[c] = pr[c] * (ds[c] - row_dot[r * a.n_heads]);
            }
            if (dq)  // dQ (nq, hd) += scale · dS (nq, nk) · K (nk, hd)
              blas::gemm<T>(false, false, nq, hd, nk, scale, dscores, B, K, ldk, T(1),
                            dq + i0 * ldq + h * hd, ldq);
            if (dk_share)  // dK (nk, hd) += scale · dSᵀ (nk, nq) · Q (nq, hd)
              blas::gemm<T>(true, false, nk, hd, nq, scale, dscores, B, Q, ldq, T(1),
                            dk_share + j0 * ld_share + share_col, ld_share);
          }
        }
      }
    });

    if (!shared) return;
    // dK_g += Σ over the query heads h of group g, and over their parts p in order, of the
    // shares (rows a part did not reach hold no share).
    auto reduce = [&](T* dst, const T* share) {
      parallel_for(n, detail::row_grain(ld_share), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t w = 0; w < items; ++w) {
            if (t >= key_end[static_cast<std::size_t>(w % parts)]) continue;
            const T* src = share + t * ld_share + w * hd;
            T* out = dst + t * ldk + (w / parts / group) * hd;
            for (int64_t c = 0; c < hd; ++c) out[c] += src[c];
          }
      });
    };
    if (dk) reduce(dk, dk_share);
    if (dv) reduce(dv, dv_share);
  }

 private:
  // The row path's shapes, and its keys and values transposed in blocks of 16 keys, (T/16, HD, 16)
  // per kv head (zero past hd and past T), in the calling thread's buffer: slot 0 keys, 1 values.
  struct RowLayout {
    // Regions read or written side by side (kv heads, keys and values, shares) start kPad values
    // apart beyond their size: at T 512, hd 8 a region is 16 KiB, and loads and stores 4 KiB apart
    // stall on each other (4K aliasing).
    static constexpr int64_t kPad = 48;
    int64_t n, n_kv_heads, hd, group, ldq, ldk, width, ldt, stride, chunks;
    bool causal;
    RowLayout(int64_t seq_len, int64_t n_heads, int64_t kv_heads, int64_t head_dim, bool mask)
        : n(seq_len),
          n_kv_heads(kv_heads),
          hd(head_dim),
          group(n_heads / kv_heads),
          ldq(n_heads * head_dim),
          ldk(kv_heads * head_dim),
          width(detail::attention_rows_width(head_dim)),
          ldt((seq_len + 15) / 16 * 16),
          stride(width * ldt + kPad),
          chunks((seq_len + detail::kAttentionRowsChunk - 1) / detail::kAttentionRowsChunk),
          causal(mask) {
      CBQ_CHECK(head_dim <= detail::kAttentionRowsWidest,
                "attention: the row kernels take head_dim <= {}, got {}",
                detail::kAttentionRowsWidest, head_dim);
    }
    int64_t chunk_cost(int64_t c) const { return causal ? c + 1 : 1; }
    // Key j, index d in the (T/16, HD, 16) blocked transpose of one kv head.
    int64_t blocked(int64_t j, int64_t d) const { return (j / 16) * 16 * width + 16 * d + j % 16; }
    const T* transpose(const T* x, int slot) const {
      const int64_t size = n_kv_heads * stride + kPad;
      T* out = thread_buffer<T, detail::AttentionTransposed>(2 * size) + slot * size;
      std::fill_n(out, size, T(0));
      for (int64_t j = 0; j < n; ++j)
        for (int64_t g = 0; g < n_kv_heads; ++g)
          for (int64_t d = 0; d < hd; ++d)
            out[g * stride + blocked(j, d)] = x[j * ldk + g * hd + d];
      return out;
    }
  };
};

template <class T>
class AttentionNode;

// `scale` defaults to 1/sqrt(head_dim).
template <class T>
Var<T> attention(Var<T> q, Var<T> k, Var<T> v, int64_t n_heads, int64_t n_kv_heads,
                 int64_t head_dim, bool causal = true, std::optional<double> scale = std::nullopt) {
  const Tensor<T> Qt = q.value();
  const Tensor<T> Kt = k.value();
  const Tensor<T> Vt = v.value();
  CBQ_CHECK(n_heads > 0 && n_kv_heads > 0 && head_dim > 0,
            "attention: n_heads {}, n_kv_heads {} and head_dim {} must be positive", n_heads,
            n_kv_heads, head_dim);
  CBQ_CHECK(n_heads % n_kv_heads == 0, "attention: n_heads {} is not divisible by n_kv_heads {}",
            n_heads, n_kv_heads);
  CBQ_CHECK(Qt.ndim() == 2 && Qt.size(1) == n_heads * head_dim,
            "attention: q {} does not match {} heads of dimension {} (expected (T, {}))",
            Qt.shape(), n_heads, head_dim, n_heads * head_dim);
  const int64_t n = Qt.size(0);
  CBQ_CHECK(Kt.shape() == Shape({n, n_kv_heads * head_dim}),
            "attention: k {} does not match q {} with {} kv heads of dimension {} (expected {})",
            Kt.shape(), Qt.shape(), n_kv_heads, head_dim, Shape({n, n_kv_heads * head_dim}));
  CBQ_CHECK(Vt.shape() == Kt.shape(), "attention: v {} and k {} differ", Vt.shape(), Kt.shape());
  const double scale_value = scale.value_or(1.0 / std::sqrt(double(head_dim)));
  CBQ_CHECK(std::isfinite(scale_value), "attention: scale must be finite, got {}", scale_value);
  for (const Tensor<T>* t : {&Qt, &Kt, &Vt}) {
    check_contiguous("attention", "q, k and v", *t);
    check_same_device("attention", Qt, *t);
  }
  const detail::AttentionDims a{n, n_heads, n_kv_heads, head_dim, causal, scale_value};
  Tape<T>& tape = q.tape();
  const bool rg = tape.any_requires_grad({q, k, v});
  Var<T> out = tape.output(Qt.shape(), rg);
  Tensor<T> lse = tape.scratch(Shape{n, n_heads});  // (T, Hq)
  Tensor<T> O_all = out.value();                    // shares the output's storage
  kernel_for(Qt.device(), &CpuAttention<T>::forward, CudaAttention<T>::forward, "attention")(
      O_all.data(), lse.data(), Qt.data(), Kt.data(), Vt.data(), n, n_heads, n_kv_heads, head_dim,
      causal, static_cast<T>(scale_value));
  if (rg) tape.template record<AttentionNode<T>>(out, q, k, v, lse, a);
  return out;
}

template <class T>
class AttentionNode final : public Node<T> {
 public:
  AttentionNode(Var<T> q, Var<T> k, Var<T> v, Tensor<T> lse, detail::AttentionDims dims)
      : q_(q), k_(k), v_(v), lse_(std::move(lse)), dims_(dims) {}
  const char* name() const override { return "attention"; }

  void backward(Tape<T>& tape) override {
    const detail::AttentionDims& a = dims_;
    // Gradient buffers are fetched before the kernel (tape.grad allocates).
    T* dq = q_.requires_grad() ? q_.grad().data() : nullptr;
    T* dk = k_.requires_grad() ? k_.grad().data() : nullptr;
    T* dv = v_.requires_grad() ? v_.grad().data() : nullptr;
    Tensor<T> row_dot = tape.scratch(Shape{a.seq_len, a.n_heads});  // (T, Hq)
    kernel_for(q_.value().device(), &CpuAttention<T>::backward, CudaAttention<T>::backward,
               "attention")(dq, dk, dv, row_dot.data(), q_.value().data(), k_.value().data(),
                            v_.value().data(), tape.value(this->output).data(),
                            tape.grad(this->output).data(), lse_.data(), a.seq_len, a.n_heads,
                            a.n_kv_heads, a.head_dim, a.causal, static_cast<T>(a.scale));
  }

 private:
  Var<T> q_, k_, v_;
  Tensor<T> lse_;  // (T, Hq)
  detail::AttentionDims dims_;
};

}  // namespace cbq::ops
