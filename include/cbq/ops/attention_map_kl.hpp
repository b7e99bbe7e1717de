#pragma once
// attention_map_kl: mean over (query row, query head) of the KL divergence between a target's
// and a model's attention probability maps, with the heads and the causal mask of ops::attention:
//   q*, q (T, Hq·hd), k*, k (T, Hkv·hd), heads side by side in each row; query head h reads kv
//   head g = h / (Hq/Hkv).
//   S*_h = scale · Q*_h K*_gᵀ,  S_h = scale · Q_h K_gᵀ  (key j > query i excluded when causal),
//   P* = softmax_rows(S*) (the target),  P = softmax_rows(S) (the model),
//   L = (1/R) Σ_{h,i} KL(P*_{h,i} ‖ P_{h,i}) = (1/R) Σ_{h,i} Σ_j P*_ij (log P*_ij − log P_ij),
// with R = T·Hq rows; scale defaults to 1/sqrt(hd). Convention: mean over rows and heads, sum
// over the keys, as kl_softmax. Purpose: ACBQ's attention-unit objective, λ · KL between the
// full-precision (target) and the quantized (model) attention maps of a block.
// Derivative, with g = d L (the seed), c = g / R, d_ij = log P*_ij − log P_ij, KL_i = Σ_j P*_ij
// d_ij:
//   dS_ij = c · (P_ij − P*_ij),   dS*_ij = c · P*_ij (d_ij − KL_i)
//   dQ_h += scale · dS_h K_g,     dK_g += scale · Σ_{h in group g} dS_hᵀ Q_h   (and the same for
//   Q*, K* with dS*). Any of the four inputs may be a constant (usually the targets are).
// Identical inputs give exactly zero loss and zero gradients (the two sides' scores, shifts and
// log-probabilities are then the same bits). Numerics: every score is a dot product in double
// (in lanes, fixed order), each row's log-sum-exp is max + log Σ exp(s − max) in double, and
// log P = s − lse is formed directly (no log of an underflowed probability); the gradient sums
// are in double too, rounded to T once.
// Saved for backward, per (i, h): the two log-sum-exps, each as a pair hi + lo of T (hi = T(lse),
// lo = T(lse − hi)), so that float keeps ~48 bits of them (a float lse alone would scale every
// recomputed P of a row by 1 + O(|lse| · 6e-8), a bias in dS = c (P − P*) where P ≈ P*), and
// KL_i: (T, Hq, 5), O(T·Hq). No (T, T) matrix is ever stored; P is recomputed from the scores.
// CPU: forward in parallel over (head, row) items, cut into runs of equal cost (a causal row i
// reads i + 1 keys), each row's scores in a per-thread buffer of T doubles; the mean is a serial
// sum of the saved KL_i in a fixed order. Backward in two passes, so that no two threads write
// the same element: pass 1 over (h, i) writes the dQ and dQ* rows of (i, h); pass 2 over
// (kv head g, key row j) writes dK_j and dK*_j, iterating over the queries i (i ≥ j when causal)
// and the heads of the group in a fixed order, recomputing P_ij = exp(s_ij − lse_i). Each element
// is computed by one work item whatever the cut, so results do not depend on the thread count.
// The loops are attention_map_kl_kernels.inc, compiled per ISA (ops/vectorize.hpp): dot
// products and accumulations over hd in double lanes, four rows at a time (float widened as it
// loads: 4 lanes with AVX2, 8 with AVX-512; double always runs the generic copy), the exps of a
// row of scores in lanes too (DPack::exp: within 2 ulp; below e^−708 ≈ 3e−308 it clamps there,
// harmless next to the probabilities that matter). Measured at T 512, 9 query heads on 3,
// hd 64, float, one thread (AVX2): forward 42 ms, backward 145 ms (targets constant), about 5x
// and 7x ops::attention's float GEMMs on the same shapes: the price of double scores.
// CUDA (cuda/cbq/cuda/ops/attention_map_kl.cuh): the same double formulas; forward one block per
// (i, h) (scores recomputed per pass: max, sum, KL), the mean a fixed-order reduction in double;
// backward one block per (i, h) for dQ, dQ* and one per (j, g) for dK, dK*. No atomics.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "cbq/ops/attention.hpp"

namespace cbq::ops {

template <class T>
struct CudaAttentionMapKl {
  // saved (T, Hq, 5) = lse*_hi, lse*_lo, lse_hi, lse_lo, KL_i (rounded to T),
  // out[0] = T(Σ KL_i / (T·Hq)) (double sums); q_target, q (T, Hq·hd), k_target, k (T, Hkv·hd)
  static inline void (*forward)(T* out, T* saved, const T* q_target, const T* k_target, const T* q,
                                const T* k, int64_t seq_len, int64_t n_heads, int64_t n_kv_heads,
                                int64_t head_dim, bool causal, double scale) = nullptr;
  // dq_target, dq (T, Hq·hd), dk_target, dk (T, Hkv·hd) += the derivatives above with g = g[0]
  // (on the device); any of the four may be null
  static inline void (*backward)(T* dq_target, T* dk_target, T* dq, T* dk, const T* g,
                                 const T* q_target, const T* k_target, const T* q, const T* k,
                                 const T* saved, int64_t seq_len, int64_t n_heads,
                                 int64_t n_kv_heads, int64_t head_dim, bool causal,
                                 double scale) = nullptr;
};

namespace detail {

// Values saved per (row, head): lse* (hi, lo), lse (hi, lo), KL.
inline constexpr int64_t kAttentionMapKlSaved = 5;

// x as hi + lo in T (exact to ~2·digits of T), and back.
template <class T>
inline void map_kl_store_pair(T* dst, double x) {
  dst[0] = static_cast<T>(x);
  dst[1] = static_cast<T>(x - static_cast<double>(dst[0]));
}
template <class T>
inline double map_kl_load_pair(const T* src) {
  return static_cast<double>(src[0]) + static_cast<double>(src[1]);
}

// Runs of about equal cost over `items` work items, one per thread (at most).
template <class Cost>
std::vector<int64_t> map_kl_runs(int64_t items, Cost&& cost) {
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>(num_threads(), items));
  return balanced_cuts(items, runs, std::forward<Cost>(cost));
}

// Tags of the per-thread buffers (thread_buffer).
struct AttentionMapKlRows;
struct AttentionMapKlAcc;

}  // namespace detail

}  // namespace cbq::ops

// The per-ISA kernels: map_kl_forward_items, map_kl_dq_items, map_kl_dk_items.
#define CBQ_SIMD_KERNELS "cbq/ops/attention_map_kl_kernels.inc"
#include "cbq/ops/simd_kernels.inc"

namespace cbq::ops {

template <class T>
struct CpuAttentionMapKl {
  // Work items w = h·T + i, each with a row of T doubles of scores per side.
  static void forward(T* out, T* saved, const T* q_target, const T* k_target, const T* q,
                      const T* k, int64_t seq_len, int64_t n_heads, int64_t n_kv_heads,
                      int64_t head_dim, bool causal, double scale) {
    const detail::AttentionDims a{seq_len, n_heads, n_kv_heads, head_dim, causal, scale};
    const int64_t n = seq_len, rows = n * n_heads;
    const std::vector<int64_t> cuts =
        detail::map_kl_runs(rows, [&](int64_t w) { return causal ? w % n + 1 : n; });
    parallel_for(static_cast<int64_t>(cuts.size()) - 1, 1, [&](int64_t r0, int64_t r1) {
      double* st = thread_buffer<double, detail::AttentionMapKlRows>(2 * n);
      CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                        map_kl_forward_items<T>(saved, st, st + n, q_target, k_target, q, k, a,
                                                cuts[static_cast<std::size_t>(r0)],
                                                cuts[static_cast<std::size_t>(r1)]));
    });
    double total = 0;  // serial over (i, h): deterministic
    for (int64_t r = 0; r < rows; ++r)
      total += static_cast<double>(saved[detail::kAttentionMapKlSaved * r + 4]);
    out[0] = static_cast<T>(total / static_cast<double>(rows));
  }

  static void backward(T* dq_target, T* dk_target, T* dq, T* dk, const T* g, const T* q_target,
                       const T* k_target, const T* q, const T* k, const T* saved, int64_t seq_len,
                       int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool causal,
                       double scale) {
    const detail::AttentionDims a{seq_len, n_heads, n_kv_heads, head_dim, causal, scale};
    const int64_t n = seq_len, hd = head_dim;
    const double coef = static_cast<double>(g[0]) / static_cast<double>(n * n_heads);

    // Pass 1, items w = h·T + i: the dQ and dQ* rows of (i, h).
    if (dq || dq_target) {
      const std::vector<int64_t> cuts =
          detail::map_kl_runs(n * n_heads, [&](int64_t w) { return causal ? w % n + 1 : n; });
      parallel_for(static_cast<int64_t>(cuts.size()) - 1, 1, [&](int64_t r0, int64_t r1) {
        double* ds = thread_buffer<double, detail::AttentionMapKlRows>(2 * n);
        double* acc = thread_buffer<double, detail::AttentionMapKlAcc>(2 * hd);
        CBQ_SIMD_DISPATCH(
            simd::isa_for<T>(),
            map_kl_dq_items<T>(dq_target, dq, ds, ds + n, acc, acc + hd, q_target, k_target, q, k,
                               saved, a, coef, cuts[static_cast<std::size_t>(r0)],
                               cuts[static_cast<std::size_t>(r1)]));
      });
    }

    // Pass 2, items w = g·T + j: dK_j and dK*_j of kv head g, over the queries i (i ≥ j when
    // causal), and within each the heads of the group in order.
    if (dk || dk_target) {
      const std::vector<int64_t> cuts =
          detail::map_kl_runs(n * n_kv_heads, [&](int64_t w) { return causal ? n - w % n : n; });
      parallel_for(static_cast<int64_t>(cuts.size()) - 1, 1, [&](int64_t r0, int64_t r1) {
        double* acc = thread_buffer<double, detail::AttentionMapKlAcc>(2 * hd);
        CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                          map_kl_dk_items<T>(dk_target, dk, acc, acc + hd, q_target, k_target, q, k,
                                             saved, a, coef, cuts[static_cast<std::size_t>(r0)],
                                             cuts[static_cast<std::size_t>(r1)]));
      });
    }
  }
};

template <class T>
class AttentionMapKlNode;

// Mean over (query row, query head) of KL(P* ‖ P) between the causal (or full) attention maps of
// the target (q_target, k_target) and of the model (q, k). `scale` defaults to 1/sqrt(head_dim).
template <class T>
Var<T> attention_map_kl(Var<T> q_target, Var<T> k_target, Var<T> q, Var<T> k, int64_t n_heads,
                        int64_t n_kv_heads, int64_t head_dim, bool causal = true,
                        std::optional<double> scale = std::nullopt) {
  const Tensor<T> Qt = q_target.value();
  const Tensor<T> Kt = k_target.value();
  const Tensor<T> Q = q.value();
  const Tensor<T> K = k.value();
  CBQ_CHECK(n_heads > 0 && n_kv_heads > 0 && head_dim > 0,
            "attention_map_kl: n_heads {}, n_kv_heads {} and head_dim {} must be positive", n_heads,
            n_kv_heads, head_dim);
  CBQ_CHECK(n_heads % n_kv_heads == 0,
            "attention_map_kl: n_heads {} is not divisible by n_kv_heads {}", n_heads, n_kv_heads);
  CBQ_CHECK(Qt.ndim() == 2 && Qt.size(1) == n_heads * head_dim,
            "attention_map_kl: q_target {} does not match {} heads of dimension {} (expected "
            "(T, {}))",
            Qt.shape(), n_heads, head_dim, n_heads * head_dim);
  const int64_t n = Qt.size(0);
  CBQ_CHECK(n > 0, "attention_map_kl: q_target {} has no rows", Qt.shape());
  CBQ_CHECK(Q.shape() == Qt.shape(), "attention_map_kl: q {} and q_target {} differ", Q.shape(),
            Qt.shape());
  const Shape kv_shape{n, n_kv_heads * head_dim};
  CBQ_CHECK(Kt.shape() == kv_shape,
            "attention_map_kl: k_target {} does not match q_target {} with {} kv heads of "
            "dimension {} (expected {})",
            Kt.shape(), Qt.shape(), n_kv_heads, head_dim, kv_shape);
  CBQ_CHECK(K.shape() == Kt.shape(), "attention_map_kl: k {} and k_target {} differ", K.shape(),
            Kt.shape());
  const double scale_value = scale.value_or(1.0 / std::sqrt(double(head_dim)));
  CBQ_CHECK(std::isfinite(scale_value), "attention_map_kl: scale must be finite, got {}",
            scale_value);
  for (const Tensor<T>* t : {&Qt, &Kt, &Q, &K}) {
    check_contiguous("attention_map_kl", "q_target, k_target, q and k", *t);
    check_same_device("attention_map_kl", Qt, *t);
  }
  const detail::AttentionDims a{n, n_heads, n_kv_heads, head_dim, causal, scale_value};
  Tape<T>& tape = q.tape();
  const bool rg = tape.any_requires_grad({q_target, k_target, q, k});
  Tensor<T> saved = tape.scratch(Shape{n, n_heads, detail::kAttentionMapKlSaved});
  check_same_device("attention_map_kl", saved, Qt);  // the tape allocates on its own device
  Var<T> out = tape.output(Shape{1}, rg);
  Tensor<T> out_value = out.value();  // shares the output's storage
  kernel_for(Qt.device(), &CpuAttentionMapKl<T>::forward, CudaAttentionMapKl<T>::forward,
             "attention_map_kl")(out_value.data(), saved.data(), Qt.data(), Kt.data(), Q.data(),
                                 K.data(), n, n_heads, n_kv_heads, head_dim, causal, scale_value);
  if (rg)
    tape.template record<AttentionMapKlNode<T>>(out, q_target, k_target, q, k, std::move(saved), a);
  return out;
}

template <class T>
class AttentionMapKlNode final : public Node<T> {
 public:
  AttentionMapKlNode(Var<T> q_target, Var<T> k_target, Var<T> q, Var<T> k, Tensor<T> saved,
                     detail::AttentionDims dims)
      : q_target_(q_target),
        k_target_(k_target),
        q_(q),
        k_(k),
        saved_(std::move(saved)),
        dims_(dims) {}
  const char* name() const override { return "attention_map_kl"; }

  void backward(Tape<T>& tape) override {
    const detail::AttentionDims& a = dims_;
    // Gradient buffers are fetched before the kernel (tape.grad allocates).
    T* dqt = q_target_.requires_grad() ? q_target_.grad().data() : nullptr;
    T* dkt = k_target_.requires_grad() ? k_target_.grad().data() : nullptr;
    T* dq = q_.requires_grad() ? q_.grad().data() : nullptr;
    T* dk = k_.requires_grad() ? k_.grad().data() : nullptr;
    if (!dqt && !dkt && !dq && !dk) return;
    const Tensor<T>& grad = tape.grad(this->output);
    kernel_for(grad.device(), &CpuAttentionMapKl<T>::backward, CudaAttentionMapKl<T>::backward,
               "attention_map_kl")(dqt, dkt, dq, dk, grad.data(), q_target_.value().data(),
                                   k_target_.value().data(), q_.value().data(), k_.value().data(),
                                   saved_.data(), a.seq_len, a.n_heads, a.n_kv_heads, a.head_dim,
                                   a.causal, a.scale);
  }

 private:
  Var<T> q_target_, k_target_, q_, k_;
  Tensor<T> saved_;  // (T, Hq, 5): lse*_hi, lse*_lo, lse_hi, lse_lo, KL_i
  detail::AttentionDims dims_;
};

}  // namespace cbq::ops
