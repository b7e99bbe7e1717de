#pragma once
// LoRA-Rounding (CBQ §3.3): AdaRound's soft rounding (quant/adaround.hpp) with a low-rank rounding
// logit V = A1·A2 (+ V0), as autodiff ops, fused on the CPU: Ŵ and the rounding regulariser
// straight from (W, s, z, A1, A2); the factors' parameters, their initialisation and harden().
// Full-matrix rounding (V = V0 + ΔV, ΔV a full matrix: full_soft_weight[_tracked][_and_reg],
// full_round_reg[_tracked], harden_full) runs through the same row kernels.
//
// A1 and A2 get their gradients as through ops::matmul: dA1 += dV·A2ᵀ, dA2 += A1ᵀ·dV, with dV
// as in adaround.hpp.
//
// CUDA (CudaLoraRounding, cuda/cbq/cuda/quant/lora_rounding.cuh): the composed form — A1·A2 through
// the GEMM hook (ops::matmul), then adaround.hpp's soft_round_weight and rounding_reg kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cbq/ops/add.hpp"
#include "cbq/ops/matmul.hpp"
#include "cbq/ops/vectorize.hpp"
#include "cbq/quant/adaround.hpp"
#include "cbq/quant/fake_quant.hpp"

namespace cbq::quant {

// V = A1·A2 (+ V0): A1 (rows, r), A2 (r, cols), V0 an optional frozen (rows, cols) offset.
template <class T>
Var<T> lora_v(Var<T> A1, Var<T> A2, const Tensor<T>* V0 = nullptr) {
  Var<T> v = ops::matmul(A1, A2);
  if (V0 && V0->defined()) {
    CBQ_CHECK(V0->shape() == v.shape(), "quant::lora_v: V0 {} does not match A1·A2 {}", V0->shape(),
              v.shape());
    v = ops::add(v, A1.tape().constant(*V0));
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Fused LoRA-Rounding (CPU): Ŵ and the regulariser straight from (W, s, z, A1, A2), one pass
// over the weight each way.
//
// The composed form (V = matmul(A1, A2), add V0, soft_round_weight; V0 recomputed with a log
// per element before every forward when it tracks the step) makes five passes over (rows, cols)
// tensors forward and five backward, with two libm calls per element. Here one row kernel
// computes Δ = A1[r]·A2 in registers, V and σ(V), Ŵ and the saved factors; backward computes
// dV = G·s·h'(V) per row and contracts it at once into dA1 (per row), dA2 (per block of rows,
// summed in block order: the result does not depend on the thread count) and the step
// gradient. Elementwise math runs in vectors (ops/vectorize.hpp).
//
// V0 tracking the step: V0 = h⁻¹(frac(W/s)) = logit(p) with p = clamp((frac − γ)/(ζ − γ),
// 10⁻⁶, 1 − 10⁻⁶) (rect_sigmoid_inverse). Then σ(V0 + Δ) = p·e^Δ / (p·e^Δ + 1 − p), formed with
// e = e^−|Δ| as p / (p + (1 − p)·e) for Δ ≥ 0 and p·e / (p·e + 1 − p) below: one exp, no log,
// no overflow. Without V0 or with a frozen one, σ(V) = 1/(1 + e) or e/(1 + e) with e = e^−|V|,
// detail::sigmoid's two forms. The same kernel gives harden()'s codes, so the hard forward and
// the hardened weight agree bit for bit. V0 is a constant in either case (no gradient to s
// through it), as in the composed form.
// Bits: Δ is summed in rank order (the composed form's GEMM may order or fuse it differently)
// and exp is ops/vectorize.hpp's (within 1 ulp, like glibc's): values agree with the composed
// form to float rounding. In double the kernel runs scalar with the C library's exp and log.

namespace detail {

// Where V0 comes from in V = V0 + A1·A2.
enum class V0Source { none, tensor, tracks_step };

// Rows per block of the dA2 partial sums (fixed, so results do not depend on the thread count).
inline constexpr int64_t kLoraRowBlock = 32;
// Elements per thread below which the row sweeps (forward, regulariser, export) stay on one thread:
// smaller than the elementwise ops' grain, each element costing a sigmoid and a rounding.
inline constexpr int64_t kLoraRowGrain = 1 << 10;
// Rank entries kept in registers at once by the backward contraction.
inline constexpr int64_t kLoraRankChunk = 8;

// Per-thread row buffers (steps and zero-points expanded to one per column, products), grown once.
template <class T>
struct LoraRowBuffers {
  std::vector<T> s, z, prod;
  void reserve(int64_t cols) {
    if (static_cast<int64_t>(s.size()) >= cols) return;
    s.resize(static_cast<size_t>(cols));
    z.resize(static_cast<size_t>(cols));
    prod.resize(static_cast<size_t>(cols));
  }
};
template <class T>
LoraRowBuffers<T>& lora_row_buffers(int64_t cols) {
  thread_local LoraRowBuffers<T> b;
  b.reserve(cols);
  return b;
}

template <class T>
void expand_row_params(const GridSpec& spec, int64_t rows, int64_t cols, int64_t r, const T* S,
                       const T* Z, T* s, T* z) {
  for_each_group(spec, rows, cols, r, [&](int64_t, int64_t c0, int64_t c1, int64_t p) {
    const T sp = S[p], zp = Z ? Z[p] : T(0);
    for (int64_t c = c0; c < c1; ++c) {
      s[c] = sp;
      z[c] = zp;
    }
  });
}

// What the row kernels read: the weight, the LoRA factors, V0 and the grid.
template <class T>
struct LoraInputs {
  const T* w = nullptr;      // (rows, cols); null: not read (regulariser, V0 not tracked)
  const T* a1 = nullptr;     // (rows, rank)
  const T* a2 = nullptr;     // (rank, cols)
  const T* dv = nullptr;     // (rows, cols): full-matrix ΔV in place of A1·A2 (rank 0)
  const T* v0 = nullptr;     // (rows, cols) when source == tensor
  const T* scale = nullptr;  // spec.param_shape(rows, cols); with w
  const T* zero = nullptr;   // may be null (all 0)
  V0Source source = V0Source::none;
  int64_t rows = 0, cols = 0, rank = 0;
  GridSpec spec;
};

}  // namespace detail
}  // namespace cbq::quant

#define CBQ_SIMD_KERNELS "cbq/quant/lora_kernels.inc"
#include "cbq/ops/simd_kernels.inc"

namespace cbq::quant {
namespace detail {

// Backward shared by the weight and the regulariser: contracts dV = G·fac (or g·fac), plus
// g2·fac2 when given (both at once), into the gradients of A1 and A2 (or adds it to a full ΔV's,
// ddv), and (weight) the per-group partial sums Σ G·coef into ds.
template <class T>
void lora_backward(const LoraInputs<T>& in, const T* G, T g, const T* fac, const T* fac2, T g2,
                   const T* coef, T* ddv, T* da1, T* da2, T* da2_blocks, T* part) {
  const int64_t rows = in.rows, cols = in.cols, rank = in.rank;
  const int64_t blocks = (rows + kLoraRowBlock - 1) / kLoraRowBlock;
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    LoraRowBuffers<T>& buf = lora_row_buffers<T>(cols);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kLoraRowBlock, r1 = std::min(rows, r0 + kLoraRowBlock);
      T* block = da2 ? da2_blocks + b * rank * cols : nullptr;
      CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                        lora_backward_rows<T>(in, r0, r1, G, g, fac, fac2, g2, coef, ddv, da1,
                                              block, part, buf.prod.data()));
    }
  });
  if (!da2) return;
  // dA2 += Σ_blocks partial, in block order, split over columns.
  parallel_for(rank * cols, ops::kElementwiseGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* src = da2_blocks + b * rank * cols;
      for (int64_t i = i0; i < i1; ++i) da2[i] += src[i];
    }
  });
}

// The trained variables of the rounding logit V = V0 + Δ: the LoRA factors (Δ = A1·A2) or a
// full-matrix ΔV; the others are invalid Vars.
template <class T>
struct LogitVars {
  Var<T> a1, a2, dv;
  Tape<T>& tape() const { return dv.valid() ? dv.tape() : a1.tape(); }
};

// v's gradient buffer, or null when v is invalid or needs none. Fetched before a parallel region
// (tape.grad allocates).
template <class T>
T* grad_or_null(Var<T>& v) {
  return v.valid() && v.requires_grad() ? v.grad().data() : nullptr;
}

// What the weight's node leaves for the regulariser computed in the same kernel (fused_weight
// asked for both). The regulariser's node is recorded before the weight's, so it runs
// after it in backward: when the regulariser has a gradient, the weight's node leaves its G here
// and the regulariser's node contracts both parts of dV in one pass.
template <class T>
struct LoraFusedReg {
  int reg_output = -1;
  const T* G = nullptr;  // set by the weight's node when it defers to the regulariser's
};

template <class T>
class LoraWeightNode final : public Node<T> {
 public:
  LoraWeightNode(LoraInputs<T> in, Var<T> scale, LogitVars<T> vars, Tensor<T> dvfac, Tensor<T> coef,
                 Tensor<T> partial, Tensor<T> da2_blocks, bool lsq,
                 std::shared_ptr<LoraFusedReg<T>> fused)
      : in_(in),
        scale_(scale),
        vars_(vars),
        dvfac_(std::move(dvfac)),
        coef_(std::move(coef)),
        partial_(std::move(partial)),
        da2_blocks_(std::move(da2_blocks)),
        lsq_(lsq),
        fused_(std::move(fused)) {}
  const char* name() const override {
    return vars_.dv.valid() ? "quant::full_soft_weight" : "quant::lora_soft_weight";
  }
  void backward(Tape<T>& tape) override {
    const T* G = tape.grad(this->output).data();
    if (fused_ && tape.has_grad(fused_->reg_output)) {
      fused_->G = G;  // the regulariser's node, next, contracts both
      return;
    }
    run(G, nullptr, T(0));
  }
  // dV = G·dvfac (+ g2·fac2) into dΔV or dA1, dA2, and ds.
  void run(const T* G, const T* fac2, T g2) {
    T* ddv = grad_or_null(vars_.dv);
    T* da1 = grad_or_null(vars_.a1);
    T* da2 = grad_or_null(vars_.a2);
    const bool ds = scale_.requires_grad();
    T* part = ds ? partial_.data() : nullptr;
    lora_backward(in_, G, T(0), dvfac_.data(), fac2, g2, ds ? coef_.data() : nullptr, ddv, da1, da2,
                  da2_blocks_.data(), part);
    if (ds)
      scatter_step_partials(in_.spec, in_.rows, in_.cols, part, scale_.grad().data(), lsq_,
                            int64_t{0});
  }

 private:
  LoraInputs<T> in_;
  Var<T> scale_;
  LogitVars<T> vars_;
  Tensor<T> dvfac_, coef_, partial_, da2_blocks_;
  bool lsq_;
  std::shared_ptr<LoraFusedReg<T>> fused_;
};

// The regulariser's node: contracts g·local into dA1, dA2 (or dΔV); when it came from the
// weight's kernel and the weight's node deferred (LoraFusedReg), contracts G·fac + g·local
// through that node.
template <class T>
class LoraRegNode final : public Node<T> {
 public:
  LoraRegNode(LoraInputs<T> in, LogitVars<T> vars, Tensor<T> local, Tensor<T> da2_blocks, T k,
              std::shared_ptr<LoraFusedReg<T>> fused = nullptr)
      : in_(in),
        vars_(vars),
        local_(std::move(local)),
        da2_blocks_(std::move(da2_blocks)),
        k_(k),
        fused_(std::move(fused)) {}
  const char* name() const override {
    return vars_.dv.valid() ? "quant::full_round_reg" : "quant::lora_round_reg";
  }
  void backward(Tape<T>& tape) override {
    const T g = tape.grad(this->output).data()[0] * k_;
    if (fused_ && fused_->G) {  // the weight's node deferred to this one
      weight_->run(fused_->G, local_.data(), g);
      return;
    }
    T* ddv = grad_or_null(vars_.dv);
    T* da1 = grad_or_null(vars_.a1);
    T* da2 = grad_or_null(vars_.a2);
    lora_backward(in_, static_cast<const T*>(nullptr), g, local_.data(),
                  static_cast<const T*>(nullptr), T(0), static_cast<const T*>(nullptr), ddv, da1,
                  da2, da2_blocks_.data(), static_cast<T*>(nullptr));
  }
  LoraWeightNode<T>* weight_ = nullptr;  // with fused_: set when the weight's node is recorded

 private:
  LoraInputs<T> in_;
  LogitVars<T> vars_;
  Tensor<T> local_, da2_blocks_;
  T k_;
  std::shared_ptr<LoraFusedReg<T>> fused_;
};

// The factors' part of the kernel inputs: A1 (rows, r), A2 (r, cols), V0 (rows, cols) when
// source == tensor.
// The V0 source of the kernel inputs, and V0 (rows, cols) itself when source == tensor.
template <class T>
void set_v0_input(const char* op, LoraInputs<T>& in, const Tensor<T>* V0, V0Source source) {
  in.source = source;
  if (source != V0Source::tensor) return;
  CBQ_CHECK(V0 && V0->defined() && V0->shape() == Shape({in.rows, in.cols}),
            "{}: V0 {} does not match the rounding logits ({}, {})", op, V0 ? V0->shape() : Shape{},
            in.rows, in.cols);
  ops::check_contiguous(op, "V0", *V0);
  ops::check_cpu(op, *V0);
  in.v0 = V0->data();
}

template <class T>
LoraInputs<T> lora_factor_inputs(const char* op, const Tensor<T>& A1, const Tensor<T>& A2,
                                 const Tensor<T>* V0, V0Source source) {
  CBQ_CHECK(A1.ndim() == 2 && A2.ndim() == 2 && A1.size(1) == A2.size(0),
            "{}: LoRA factors A1 {} and A2 {} do not chain (expected (rows, r) and (r, cols))", op,
            A1.shape(), A2.shape());
  ops::check_contiguous(op, "A1", A1);
  ops::check_contiguous(op, "A2", A2);
  ops::check_cpu(op, A1);
  ops::check_cpu(op, A2);
  LoraInputs<T> in;
  in.a1 = A1.data();
  in.a2 = A2.data();
  in.rows = A1.size(0);
  in.cols = A2.size(1);
  in.rank = A1.size(1);
  set_v0_input(op, in, V0, source);
  return in;
}

// Adds the weight and its grid (scale, zero) to the inputs.
template <class T>
void lora_weight_inputs(const char* op, LoraInputs<T>& in, const Tensor<T>& W,
                        const Tensor<T>& scale, const Tensor<T>& zero, const GridSpec& spec) {
  spec.validate(op);
  CBQ_CHECK(W.ndim() == 2 && W.size(0) == in.rows && W.size(1) == in.cols,
            "{}: weight {} does not match the rounding logits ({}, {})", op, W.shape(), in.rows,
            in.cols);
  ops::check_contiguous(op, "weight", W);
  ops::check_cpu(op, W);
  ops::check_cpu(op, scale);
  check_params(op, scale, zero, spec.param_shape(in.rows, in.cols), spec);
  in.w = W.data();
  in.scale = scale.data();
  in.zero = zero.defined() ? zero.data() : nullptr;
  in.spec = spec;
}

template <class T>
V0Source v0_source(const Tensor<T>* V0, bool tracks) {
  if (tracks) return V0Source::tracks_step;
  return V0 && V0->defined() ? V0Source::tensor : V0Source::none;
}

// k · Σ row sums, rows in order: deterministic whatever the thread count.
template <class T>
T reg_total(const T* sums, int64_t rows, T k) {
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) total += static_cast<double>(sums[r]);
  return static_cast<T>(static_cast<double>(k) * total);
}

template <class T>
void check_reg_beta(T beta) {
  CBQ_CHECK(std::isfinite(beta) && beta >= T(1),
            "quant::rounding_reg: beta = {} must be at least 1 (the term is not differentiable at "
            "h = 1/2 below)",
            static_cast<double>(beta));
}

template <class T>
Var<T> lora_reg(const Tensor<T>& W, const Tensor<T>& scale, Var<T> A1, Var<T> A2,
                const Tensor<T>* V0, V0Source source, const GridSpec& spec, T beta,
                Normalisation norm);

// The CPU body shared by LoRA and full-matrix rounding: Ŵ from the row kernel over `in` (its
// weight, grid and logit inputs set), and with `reg` the regulariser of the same σ.
template <class T>
SoftWeight<T> fused_weight(const LoraInputs<T>& in, const Tensor<T>& W, Var<T> scale,
                           LogitVars<T> vars, const GridSpec& spec, RoundingMode mode,
                           bool lsq_grad_scale, std::optional<RegularizerSpec<T>> reg) {
  Tape<T>& tape = vars.tape();
  const bool rg = tape.any_requires_grad({scale, vars.a1, vars.a2, vars.dv});
  Var<T> out = tape.output(W.shape(), rg);
  Tensor<T> dvfac, coef;
  if (rg) {
    dvfac = tape.scratch(W.shape());
    coef = tape.scratch(W.shape());
  }
  Tensor<T> yv = out.value();  // shares the output's storage
  T* y = yv.data();
  T* fac = rg ? dvfac.data() : nullptr;
  T* cf = rg ? coef.data() : nullptr;
  const bool hard = mode != RoundingMode::soft, v_grad = mode != RoundingMode::hard;
  const int64_t rows = in.rows, cols = in.cols;
  // The regulariser from the same σ: its row sums and (when it trains) its dV factor.
  const bool reg_rg = reg && tape.any_requires_grad({vars.a1, vars.a2, vars.dv});
  Tensor<T> reg_sums, reg_local;
  if (reg) reg_sums = tape.scratch(Shape{rows});
  if (reg_rg) reg_local = tape.scratch(W.shape());
  T* sums = reg ? reg_sums.data() : nullptr;
  T* local = reg_rg ? reg_local.data() : nullptr;
  const T reg_beta = reg ? reg->beta : T(0);
  parallel_for(rows, ops::detail::row_grain(cols, kLoraRowGrain), [&](int64_t r0, int64_t r1) {
    LoraRowBuffers<T>& buf = lora_row_buffers<T>(cols);
    CBQ_SIMD_DISPATCH(
        simd::isa_for<T>(),
        lora_forward_rows<T>(in, r0, r1, hard, v_grad, y, fac, cf, static_cast<uint8_t*>(nullptr),
                             buf.s.data(), buf.z.data(), reg_beta, local, sums));
  });
  const int64_t blocks = (rows + kLoraRowBlock - 1) / kLoraRowBlock;
  Tensor<T> da2_blocks;  // LoRA only: dA2's partial sums per block of rows
  if ((rg || reg_rg) && in.rank > 0) da2_blocks = tape.scratch(Shape{blocks * in.rank, cols});
  std::shared_ptr<LoraFusedReg<T>> fused;
  LoraRegNode<T>* reg_node = nullptr;
  Var<T> regularizer;
  if (reg) {
    const T k = reg->norm == Normalisation::mean ? T(1) / static_cast<T>(rows * cols) : T(1);
    regularizer = tape.output(Shape{1}, reg_rg);
    Tensor<T> rv = regularizer.value();
    rv.data()[0] = reg_total(sums, rows, k);
    if (reg_rg) {  // recorded before the weight's node, so that it runs after it (LoraFusedReg)
      fused = std::make_shared<LoraFusedReg<T>>();
      fused->reg_output = regularizer.id();
      reg_node = &tape.template record<LoraRegNode<T>>(regularizer, in, vars, reg_local, da2_blocks,
                                                       k, fused);
    }
  }
  if (rg) {
    Tensor<T> partial = tape.scratch(Shape{rows, spec.groups_per_row(cols)});
    LoraWeightNode<T>& node = tape.template record<LoraWeightNode<T>>(
        out, in, scale, vars, dvfac, coef, partial, da2_blocks, lsq_grad_scale, fused);
    if (reg_node) reg_node->weight_ = &node;
  }
  return {out, regularizer};
}

// The CPU body of the regulariser alone: L_round over the logits of `in` (weight and grid set
// only when V0 tracks the step).
template <class T>
Var<T> fused_reg(const LoraInputs<T>& in, LogitVars<T> vars, T beta, Normalisation norm) {
  const char* op = vars.dv.valid() ? "quant::full_round_reg" : "quant::lora_round_reg";
  Tape<T>& tape = vars.tape();
  const int64_t rows = in.rows, cols = in.cols;
  const int64_t n = rows * cols;
  CBQ_CHECK(n > 0, "{}: V is empty", op);
  const T k = norm == Normalisation::mean ? T(1) / static_cast<T>(n) : T(1);
  const bool rg = tape.any_requires_grad({vars.a1, vars.a2, vars.dv});
  Var<T> out = tape.output(Shape{1}, rg);
  Tensor<T> local = rg ? tape.scratch(Shape{rows, cols}) : Tensor<T>();
  T* lp = rg ? local.data() : nullptr;
  Tensor<T> row_sums = tape.scratch(Shape{rows});
  T* sums = row_sums.data();
  parallel_for(rows, ops::detail::row_grain(cols, kLoraRowGrain), [&](int64_t r0, int64_t r1) {
    LoraRowBuffers<T>& buf = lora_row_buffers<T>(cols);
    CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                      lora_reg_rows<T>(in, r0, r1, beta, lp, sums, buf.s.data(), buf.z.data()));
  });
  Tensor<T> yv = out.value();
  yv.data()[0] = reg_total(sums, rows, k);
  if (rg) {
    const int64_t blocks = (rows + kLoraRowBlock - 1) / kLoraRowBlock;
    Tensor<T> da2_blocks;
    if (in.rank > 0) da2_blocks = tape.scratch(Shape{blocks * in.rank, cols});
    tape.template record<LoraRegNode<T>>(out, in, vars, local, da2_blocks, k);
  }
  return out;
}

// Ŵ (see above); the composed ops on CUDA. With `reg`, also the rounding regulariser of the same
// V (on the CPU from the same kernel; see SoftWeight).
template <class T>
SoftWeight<T> lora_weight(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero, Var<T> A1,
                          Var<T> A2, const Tensor<T>* V0, V0Source source, const GridSpec& spec,
                          RoundingMode mode, bool lsq_grad_scale,
                          std::optional<RegularizerSpec<T>> reg) {
  constexpr const char* op = "quant::lora_soft_weight";
  Tape<T>& tape = A1.tape();
  if (reg) check_reg_beta(reg->beta);
  if (W.device() == Device::cuda) {
    SoftWeight<T> result;
    if (reg)
      result.regularizer =
          lora_reg(W, scale.value(), A1, A2, V0, source, spec, reg->beta, reg->norm);
    Tensor<T> tracked;
    if (source == V0Source::tracks_step) {
      tracked = tape.scratch(W.shape());
      adaround_offset(W, scale.value(), spec, tracked);
      V0 = &tracked;
    }
    result.weight =
        soft_round_weight(W, scale, zero, lora_v(A1, A2, source == V0Source::none ? nullptr : V0),
                          spec, mode, lsq_grad_scale);
    return result;
  }
  LoraInputs<T> in = lora_factor_inputs(op, A1.value(), A2.value(), V0, source);
  lora_weight_inputs(op, in, W, scale.value(), zero, spec);
  return fused_weight(in, W, scale, LogitVars<T>{A1, A2, Var<T>{}}, spec, mode, lsq_grad_scale,
                      reg);
}

// L_round over V = V0 + A1·A2 (see above); the composed ops on CUDA.
template <class T>
Var<T> lora_reg(const Tensor<T>& W, const Tensor<T>& scale, Var<T> A1, Var<T> A2,
                const Tensor<T>* V0, V0Source source, const GridSpec& spec, T beta,
                Normalisation norm) {
  constexpr const char* op = "quant::lora_round_reg";
  check_reg_beta(beta);
  Tape<T>& tape = A1.tape();
  if (A1.value().device() == Device::cuda) {
    Tensor<T> tracked;
    if (source == V0Source::tracks_step) {
      tracked = tape.scratch(W.shape());
      adaround_offset(W, scale, spec, tracked);
      V0 = &tracked;
    }
    return rounding_reg(lora_v(A1, A2, source == V0Source::none ? nullptr : V0), beta, norm);
  }
  LoraInputs<T> in = lora_factor_inputs(op, A1.value(), A2.value(), V0, source);
  if (source == V0Source::tracks_step) lora_weight_inputs(op, in, W, scale, Tensor<T>(), spec);
  return fused_reg(in, LogitVars<T>{A1, A2, Var<T>{}}, beta, norm);
}

// ---------------------------------------------------------------------------------------------
// Full-matrix rounding (AdaRound's V, the pass's default): the same row kernels with Δ read
// from a full (rows, cols) ΔV instead of A1·A2, so V0 tracking the step, Ŵ, the regulariser and
// their gradients are one pass over the weight each way, as for LoRA. (The composed form —
// adaround_offset with a log per weight before every forward, ops::add, soft_round_weight's
// scalar loop, rounding_reg's serial sum with a pow per weight, twice for V0 + ΔV — made about
// eight passes.) dΔV = dV is written per element. CUDA: the composed ops.

// The logit part of the kernel inputs: ΔV (rows, cols), V0 (rows, cols) when source == tensor.
template <class T>
LoraInputs<T> full_logit_inputs(const char* op, const Tensor<T>& dV, const Tensor<T>* V0,
                                V0Source source) {
  CBQ_CHECK(dV.ndim() == 2, "{}: rounding logits ΔV must be 2-D (out, in), got {}", op, dV.shape());
  ops::check_contiguous(op, "ΔV", dV);
  ops::check_cpu(op, dV);
  LoraInputs<T> in;
  in.dv = dV.data();
  in.rows = dV.size(0);
  in.cols = dV.size(1);
  set_v0_input(op, in, V0, source);
  return in;
}

// V = V0 + ΔV as composed ops (CUDA), V0 recomputed from the current steps when it tracks them.
template <class T>
Var<T> full_composed_logits(const Tensor<T>& W, const Tensor<T>& scale, Var<T> dV,
                            const Tensor<T>* V0, V0Source source, const GridSpec& spec) {
  Tape<T>& tape = dV.tape();
  if (source == V0Source::none) return dV;
  Tensor<T> tracked;
  if (source == V0Source::tracks_step) {
    tracked = tape.scratch(W.shape());
    adaround_offset(W, scale, spec, tracked);
    V0 = &tracked;
  }
  return ops::add(tape.constant(*V0), dV);
}

template <class T>
SoftWeight<T> full_weight(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero, Var<T> dV,
                          const Tensor<T>* V0, V0Source source, const GridSpec& spec,
                          RoundingMode mode, bool lsq_grad_scale,
                          std::optional<RegularizerSpec<T>> reg) {
  constexpr const char* op = "quant::full_soft_weight";
  if (reg) check_reg_beta(reg->beta);
  if (W.device() == Device::cuda) {
    Var<T> v = full_composed_logits(W, scale.value(), dV, V0, source, spec);
    SoftWeight<T> result;
    result.weight = soft_round_weight(W, scale, zero, v, spec, mode, lsq_grad_scale);
    if (reg) result.regularizer = rounding_reg(v, reg->beta, reg->norm);
    return result;
  }
  LoraInputs<T> in = full_logit_inputs(op, dV.value(), V0, source);
  lora_weight_inputs(op, in, W, scale.value(), zero, spec);
  return fused_weight(in, W, scale, LogitVars<T>{Var<T>{}, Var<T>{}, dV}, spec, mode,
                      lsq_grad_scale, reg);
}

template <class T>
Var<T> full_reg(const Tensor<T>& W, const Tensor<T>& scale, Var<T> dV, const Tensor<T>* V0,
                V0Source source, const GridSpec& spec, T beta, Normalisation norm) {
  constexpr const char* op = "quant::full_round_reg";
  check_reg_beta(beta);
  if (dV.value().device() == Device::cuda)
    return rounding_reg(full_composed_logits(W, scale, dV, V0, source, spec), beta, norm);
  LoraInputs<T> in = full_logit_inputs(op, dV.value(), V0, source);
  if (source == V0Source::tracks_step) lora_weight_inputs(op, in, W, scale, Tensor<T>(), spec);
  return fused_reg(in, LogitVars<T>{Var<T>{}, Var<T>{}, dV}, beta, norm);
}

// The codes from the row kernel over `in` (weight, grid and logits set): harden()'s for LoRA and
// full-matrix rounding, bit for bit the hard forward's.
template <class T>
QuantizedWeight harden_rows(const LoraInputs<T>& in, const Tensor<T>& scale, const Tensor<T>& zero,
                            const GridSpec& spec) {
  QuantizedWeight qw;
  qw.spec = spec;
  qw.codes = Tensor<uint8_t>::empty(Shape{in.rows, in.cols});
  qw.scale = scale.template cast<float>();
  qw.zero = zero.defined() ? zero.template cast<float>() : Tensor<float>(scale.shape());
  uint8_t* codes = qw.codes.data();
  const int64_t rows = in.rows, cols = in.cols;
  parallel_for(rows, ops::detail::row_grain(cols, kLoraRowGrain), [&](int64_t r0, int64_t r1) {
    LoraRowBuffers<T>& buf = lora_row_buffers<T>(cols);
    CBQ_SIMD_DISPATCH(simd::isa_for<T>(),
                      lora_forward_rows<T>(in, r0, r1, true, false, static_cast<T*>(nullptr),
                                           static_cast<T*>(nullptr), static_cast<T*>(nullptr),
                                           codes, buf.s.data(), buf.z.data(), T(0),
                                           static_cast<T*>(nullptr), static_cast<T*>(nullptr)));
  });
  return qw;
}

}  // namespace detail

// Ŵ with V = A1·A2 (+ V0, a frozen offset): soft_round_weight of lora_v(A1, A2, V0), fused on
// the CPU (see above).
template <class T>
Var<T> lora_soft_weight(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero, Var<T> A1,
                        Var<T> A2, const Tensor<T>* V0, const GridSpec& spec,
                        RoundingMode mode = RoundingMode::soft, bool lsq_grad_scale = true) {
  return detail::lora_weight(W, scale, zero, A1, A2, V0, detail::v0_source(V0, false), spec, mode,
                             lsq_grad_scale, std::optional<RegularizerSpec<T>>{})
      .weight;
}
// lora_soft_weight and the rounding regulariser `reg` of the same V (see SoftWeight).
template <class T>
SoftWeight<T> lora_soft_weight_and_reg(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero,
                                       Var<T> A1, Var<T> A2, const Tensor<T>* V0,
                                       const GridSpec& spec, RegularizerSpec<T> reg,
                                       RoundingMode mode = RoundingMode::soft,
                                       bool lsq_grad_scale = true) {
  return detail::lora_weight(W, scale, zero, A1, A2, V0, detail::v0_source(V0, false), spec, mode,
                             lsq_grad_scale, std::optional<RegularizerSpec<T>>(reg));
}

// Ŵ with V = V0 + A1·A2 where V0 = h⁻¹(W/s − floor(W/s)) follows the current steps s (as if
// adaround_offset ran before every forward; no gradient flows to s through V0).
template <class T>
Var<T> lora_soft_weight_tracked(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero, Var<T> A1,
                                Var<T> A2, const GridSpec& spec,
                                RoundingMode mode = RoundingMode::soft,
                                bool lsq_grad_scale = true) {
  return detail::lora_weight(W, scale, zero, A1, A2, static_cast<const Tensor<T>*>(nullptr),
                             detail::V0Source::tracks_step, spec, mode, lsq_grad_scale,
                             std::optional<RegularizerSpec<T>>{})
      .weight;
}
// lora_soft_weight_tracked and the rounding regulariser `reg` of the same V (see SoftWeight).
template <class T>
SoftWeight<T> lora_soft_weight_tracked_and_reg(const Tensor<T>& W, Var<T> scale,
                                               const Tensor<T>& zero, Var<T> A1, Var<T> A2,
                                               const GridSpec& spec, RegularizerSpec<T> reg,
                                               RoundingMode mode = RoundingMode::soft,
                                               bool lsq_grad_scale = true) {
  return detail::lora_weight(W, scale, zero, A1, A2, static_cast<const Tensor<T>*>(nullptr),
                             detail::V0Source::tracks_step, spec, mode, lsq_grad_scale,
                             std::optional<RegularizerSpec<T>>(reg));
}

// rounding_reg of V = A1·A2 (+ V0), fused on the CPU.
template <class T>
Var<T> lora_round_reg(Var<T> A1, Var<T> A2, const Tensor<T>* V0, T beta,
                      Normalisation norm = Normalisation::mean) {
  return detail::lora_reg(Tensor<T>(), Tensor<T>(), A1, A2, V0, detail::v0_source(V0, false),
                          GridSpec{}, beta, norm);
}

// rounding_reg of V = V0 + A1·A2 with V0 following the steps `scale` of W's grid (see
// lora_soft_weight_tracked).
template <class T>
Var<T> lora_round_reg_tracked(const Tensor<T>& W, const Tensor<T>& scale, const GridSpec& spec,
                              Var<T> A1, Var<T> A2, T beta,
                              Normalisation norm = Normalisation::mean) {
  return detail::lora_reg(W, scale, A1, A2, static_cast<const Tensor<T>*>(nullptr),
                          detail::V0Source::tracks_step, spec, beta, norm);
}

// Full-matrix rounding (see "Full-matrix rounding" above): Ŵ with V = ΔV (+ V0, a frozen
// offset), soft_round_weight of ops::add(V0, ΔV), fused on the CPU.
template <class T>
Var<T> full_soft_weight(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero, Var<T> dV,
                        const Tensor<T>* V0, const GridSpec& spec,
                        RoundingMode mode = RoundingMode::soft, bool lsq_grad_scale = true) {
  return detail::full_weight(W, scale, zero, dV, V0, detail::v0_source(V0, false), spec, mode,
                             lsq_grad_scale, std::optional<RegularizerSpec<T>>{})
      .weight;
}
// full_soft_weight and the rounding regulariser `reg` of the same V (see SoftWeight).
template <class T>
SoftWeight<T> full_soft_weight_and_reg(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero,
                                       Var<T> dV, const Tensor<T>* V0, const GridSpec& spec,
                                       RegularizerSpec<T> reg,
                                       RoundingMode mode = RoundingMode::soft,
                                       bool lsq_grad_scale = true) {
  return detail::full_weight(W, scale, zero, dV, V0, detail::v0_source(V0, false), spec, mode,
                             lsq_grad_scale, std::optional<RegularizerSpec<T>>(reg));
}
// Ŵ with V = V0 + ΔV where V0 = h⁻¹(W/s − floor(W/s)) follows the current steps s (no gradient
// flows to s through V0), as lora_soft_weight_tracked.
template <class T>
Var<T> full_soft_weight_tracked(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero, Var<T> dV,
                                const GridSpec& spec, RoundingMode mode = RoundingMode::soft,
                                bool lsq_grad_scale = true) {
  return detail::full_weight(W, scale, zero, dV, static_cast<const Tensor<T>*>(nullptr),
                             detail::V0Source::tracks_step, spec, mode, lsq_grad_scale,
                             std::optional<RegularizerSpec<T>>{})
      .weight;
}
// full_soft_weight_tracked and the rounding regulariser `reg` of the same V (see SoftWeight).
template <class T>
SoftWeight<T> full_soft_weight_tracked_and_reg(const Tensor<T>& W, Var<T> scale,
                                               const Tensor<T>& zero, Var<T> dV,
                                               const GridSpec& spec, RegularizerSpec<T> reg,
                                               RoundingMode mode = RoundingMode::soft,
                                               bool lsq_grad_scale = true) {
  return detail::full_weight(W, scale, zero, dV, static_cast<const Tensor<T>*>(nullptr),
                             detail::V0Source::tracks_step, spec, mode, lsq_grad_scale,
                             std::optional<RegularizerSpec<T>>(reg));
}
// rounding_reg of V = ΔV (+ V0), fused on the CPU.
template <class T>
Var<T> full_round_reg(Var<T> dV, const Tensor<T>* V0, T beta,
                      Normalisation norm = Normalisation::mean) {
  return detail::full_reg(Tensor<T>(), Tensor<T>(), dV, V0, detail::v0_source(V0, false),
                          GridSpec{}, beta, norm);
}
// rounding_reg of V = V0 + ΔV with V0 following the steps `scale` of W's grid.
template <class T>
Var<T> full_round_reg_tracked(const Tensor<T>& W, const Tensor<T>& scale, const GridSpec& spec,
                              Var<T> dV, T beta, Normalisation norm = Normalisation::mean) {
  return detail::full_reg(W, scale, dV, static_cast<const Tensor<T>*>(nullptr),
                          detail::V0Source::tracks_step, spec, beta, norm);
}

// ---------------------------------------------------------------------------------------------
// Parameters and initialisation

enum class LoraStart {
  half,     // V = A1·A2 = 0: h = ½ everywhere (the paper's)
  adaround  // V = V0 + A1·A2 with frozen V0 = h⁻¹(W/s − floor(W/s)): Ŵ starts at W
};

struct LoraInit {
  LoraStart start = LoraStart::half;
  // Standard deviation of A1's Gaussian entries; 0 means 1/sqrt(rank), which makes V = A1·A2
  // move at the rate of a full-rank V under Adam (each A2 entry steps by ~lr, V sums r of them
  // weighted by ~1/sqrt(r)). A1 = 0 as well as A2 = 0 would be a saddle that never trains.
  double a1_std = 0.0;
  uint64_t seed = 0;
};

template <class T>
struct LoraRoundingParams {
  Parameter<T> A1;  // (rows, rank), Gaussian
  Parameter<T> A2;  // (rank, cols), zero
  Tensor<T> V0;     // (rows, cols) frozen offset, or undefined (LoraStart::half)
  int64_t rank = 0;
  const Tensor<T>* v0() const { return V0.defined() ? &V0 : nullptr; }
};

inline void check_lora_rank(const std::string& layer, int64_t rank, int64_t rows, int64_t cols) {
  CBQ_CHECK(rank >= 1, "LoraRounding: rank {} must be at least 1 (layer '{}')", rank, layer);
  CBQ_CHECK(rank <= std::min(rows, cols),
            "LoraRounding: rank {} exceeds min(rows, cols) = {} of layer '{}' with shape ({}, {})",
            rank, std::min(rows, cols), layer, rows, cols);
}

template <class T>
LoraRoundingParams<T> init_lora_rounding(const std::string& layer, const Tensor<T>& W,
                                         const Tensor<T>& scale, const Tensor<T>& zero,
                                         const GridSpec& spec, int64_t rank,
                                         const LoraInit& init = {}) {
  const std::string op = "LoraRounding init of '" + layer + "'";
  CBQ_CHECK(W.ndim() == 2, "{}: weight must be 2-D (out, in), got {}", op, W.shape());
  const int64_t rows = W.size(0), cols = W.size(1);
  check_lora_rank(layer, rank, rows, cols);
  spec.validate(op.c_str());
  detail::check_params(op.c_str(), scale, zero, spec.param_shape(rows, cols), spec);
  CBQ_CHECK(init.a1_std >= 0.0, "{}: a1_std = {} is negative", op, init.a1_std);
  LoraRoundingParams<T> p;
  p.rank = rank;
  const double sd = init.a1_std > 0.0 ? init.a1_std : 1.0 / std::sqrt(static_cast<double>(rank));
  Tensor<T> a1 = Tensor<T>::empty(Shape{rows, rank});
  std::mt19937_64 rng(init.seed);
  std::normal_distribution<double> dist(0.0, sd);
  for (int64_t i = 0; i < a1.numel(); ++i) a1[i] = static_cast<T>(dist(rng));
  p.A1 = Parameter<T>(layer + ".lora_a1", a1.to(W.device()));
  p.A2 = Parameter<T>(layer + ".lora_a2", Tensor<T>(Shape{rank, cols}, W.device()));
  if (init.start == LoraStart::adaround) {
    p.V0 = Tensor<T>::empty(W.shape(), W.device());
    adaround_offset(W, scale, spec, p.V0);
  }
  return p;
}

// V = A1·A2 (+ V0) as a plain tensor (no tape).
template <class T>
Tensor<T> lora_v_value(const LoraRoundingParams<T>& p) {
  const Tensor<T>& A1 = p.A1.value;
  const Tensor<T>& A2 = p.A2.value;
  const int64_t rows = A1.size(0), r = A1.size(1), cols = A2.size(1);
  Tensor<T> v = p.V0.defined() ? p.V0.clone() : Tensor<T>(Shape{rows, cols}, A1.device());
  ops::gemm<T>(A1.device(), false, false, rows, cols, r, T(1), A1.data(), r, A2.data(), cols, T(1),
               v.data(), cols);
  return v;
}

// The codes of LoRA-Rounding: the same row kernel as lora_soft_weight (or, with
// v0_tracks_step, lora_soft_weight_tracked, ignoring p.V0), so dequantize() equals their hard
// forward bit for bit.
template <class T>
QuantizedWeight harden(const Tensor<T>& W, const Tensor<T>& scale, const Tensor<T>& zero,
                       const LoraRoundingParams<T>& p, const GridSpec& spec,
                       bool v0_tracks_step = false) {
  constexpr const char* op = "quant::harden";
  auto host = [](const Tensor<T>& t) { return t.defined() && !t.is_cpu() ? t.to(Device::cpu) : t; };
  if (!W.is_cpu() || !scale.is_cpu() || !p.A1.value.is_cpu()) {  // the codes live on the host
    LoraRoundingParams<T> hp;
    hp.A1 = Parameter<T>(p.A1.name, host(p.A1.value), false);
    hp.A2 = Parameter<T>(p.A2.name, host(p.A2.value), false);
    hp.V0 = host(p.V0);
    hp.rank = p.rank;
    return harden(host(W), host(scale), host(zero), hp, spec, v0_tracks_step);
  }
  detail::LoraInputs<T> in = detail::lora_factor_inputs(op, p.A1.value, p.A2.value, p.v0(),
                                                        detail::v0_source(p.v0(), v0_tracks_step));
  detail::lora_weight_inputs(op, in, W, scale, zero, spec);
  return detail::harden_rows(in, scale, zero, spec);
}

// The codes of full-matrix rounding with V = V0 + ΔV (V0 following the steps when
// v0_tracks_step, else the frozen *V0 or none): the row kernel of full_soft_weight[_tracked], so
// dequantize() equals their hard forward bit for bit.
template <class T>
QuantizedWeight harden_full(const Tensor<T>& W, const Tensor<T>& scale, const Tensor<T>& zero,
                            const Tensor<T>& dV, const Tensor<T>* V0, const GridSpec& spec,
                            bool v0_tracks_step = false) {
  constexpr const char* op = "quant::harden_full";
  auto host = [](const Tensor<T>& t) { return t.defined() && !t.is_cpu() ? t.to(Device::cpu) : t; };
  if (!W.is_cpu() || !scale.is_cpu() || !dV.is_cpu() ||
      (V0 && V0->defined() && !V0->is_cpu())) {  // the codes live on the host
    const Tensor<T> v0 = V0 ? host(*V0) : Tensor<T>();
    return harden_full(host(W), host(scale), host(zero), host(dV), V0 ? &v0 : nullptr, spec,
                       v0_tracks_step);
  }
  detail::LoraInputs<T> in =
      detail::full_logit_inputs(op, dV, V0, detail::v0_source(V0, v0_tracks_step));
  detail::lora_weight_inputs(op, in, W, scale, zero, spec);
  return detail::harden_rows(in, scale, zero, spec);
}

}  // namespace cbq::quant
