#pragma once
// AdaRound's soft rounding of a frozen weight W with rounding logits V (a full matrix, or
// LoRA-Rounding's low-rank V, quant/lora_rounding.hpp), as autodiff ops:
//
//   v = W/s_p,  h = h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1
//   q = floor(v) + h + z_p,  Ŵ = s_p·(clamp(q, qmin, qmax) − z_p)
// Symmetric grids use z = 0 and the signed range [−2^(b−1), 2^(b−1) − 1].
//
// Derivative (G = dŴ):
//   inside  (qmin ≤ q ≤ qmax):  dV += G·s·h'(V),   ds_p += g_p·G·((floor(v) + h) − v)
//   outside (q clamped to B):   dV += 0,           ds_p += g_p·G·(B − z_p)
//   h'(V) = (ζ − γ)·σ(V)(1 − σ(V)) where 0 < σ(V)(ζ − γ) + γ < 1, else 0 (rectified flat).
// (inside Ŵ = s·(floor(W/s) + h); with floor treated as the identity — the STE LSQ applies to
//  round — d/ds = floor(v) + h + s·(−W/s²) = (floor(v) + h) − v.)
// g_p is LSQ's 1/sqrt(N_p·qmax) when lsq_grad_scale (see fake_quant.hpp).
//
// Rounding regulariser: L_round = k·Σ (1 − |2h − 1|^β), k = 1/N (mean, the default) or 1 (sum).
//   dL/dV = −k·2β·|2h − 1|^(β−1)·sign(2h − 1)·h'(V)      (β ≥ 1 so that it is finite at h = ½)
// The mean keeps L_round O(1) whatever the layer size, so γ_r = 0.01 weighs it against a
// per-token-mean reconstruction loss as intended (summed over 10^5 weights it dominated by
// 10^3–10^4 in the prototype; DESIGN §2 "Known traps").
//
// CUDA (CudaLoraRounding, cuda/cbq/cuda/quant/lora_rounding.cuh): the soft weight, the regulariser
// and the AdaRound offset run as kernels; the backward through the shared step-quantizer kernels.
// W/s, floor and the clamp are exact; h(V) uses the device's exp, so values differ from the CPU
// by a few ulps of h (and a hard code can differ only where h(V) lies within those ulps of ½).
// The regulariser's sum is a deterministic two-stage reduction in double (as the CPU's: serial
// in double in rounding_reg, float row sums added in double in the fused lora_round_reg).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cbq/quant/act_quant.hpp"  // detail::sigmoid
#include "cbq/quant/fake_quant.hpp"

namespace cbq::quant {

inline constexpr double kRectZeta = 1.1;
inline constexpr double kRectGamma = -0.1;

// h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1).
template <class T>
T rect_sigmoid(T v) {
  const T u =
      detail::sigmoid(v) * static_cast<T>(kRectZeta - kRectGamma) + static_cast<T>(kRectGamma);
  return std::clamp(u, T(0), T(1));
}
// h'(V): 0 where the rectification is flat.
template <class T>
T rect_sigmoid_grad(T v) {
  const T sg = detail::sigmoid(v);
  const T u = sg * static_cast<T>(kRectZeta - kRectGamma) + static_cast<T>(kRectGamma);
  if (!(u > T(0) && u < T(1))) return T(0);
  return static_cast<T>(kRectZeta - kRectGamma) * sg * (T(1) - sg);
}
// V with h(V) = h, for h in (0, 1) (clamped to [1e-6, 1 − 1e-6] of the sigmoid's range).
template <class T>
T rect_sigmoid_inverse(T h) {
  T p = (h - static_cast<T>(kRectGamma)) / static_cast<T>(kRectZeta - kRectGamma);
  p = std::clamp(p, T(1e-6), T(1) - T(1e-6));
  return std::log(p / (T(1) - p));
}

// CUDA kernels of LoRA-Rounding (registered by the CUDA backend).
template <class T>
struct CudaLoraRounding {
  // Ŵ (rows, cols) from W, V (rows, cols), scale / zero (spec.param_shape; zero may be null).
  // dvfac and coef (saved for backward) may both be null. hard: h := [h ≥ ½]; v_grad: dvfac holds
  // s·h'(V) inside the grid (else 0).
  static inline void (*soft_forward)(T* y, T* dvfac, T* coef, const T* w, const T* v,
                                     const T* scale, const T* zero, int64_t rows, int64_t cols,
                                     const GridSpec& spec, bool hard, bool v_grad) = nullptr;
  // out[0] = k · Σ_i (1 − |2h(v_i) − 1|^β), v (n)
  static inline void (*reg_forward)(T* out, const T* v, int64_t n, T beta, T k) = nullptr;
  // dv (n) += −2kβ·g[0]·|2h − 1|^(β−1)·sign(2h − 1)·h'(v), g the (device) output gradient
  static inline void (*reg_backward)(T* dv, const T* g, const T* v, int64_t n, T beta,
                                     T k) = nullptr;
  // v0 (rows, cols) = h⁻¹(W/s − floor(W/s))
  static inline void (*adaround_offset)(T* v0, const T* w, const T* scale, int64_t rows,
                                        int64_t cols, const GridSpec& spec) = nullptr;
};

template <class T>
struct CpuLoraRounding {
  static void soft_forward(T* y, T* dvfac, T* coef, const T* w, const T* v, const T* scale,
                           const T* zero, int64_t rows, int64_t cols, const GridSpec& spec,
                           bool hard, bool v_grad) {
    const T lo = static_cast<T>(spec.qmin()), hi = static_cast<T>(spec.qmax());
    parallel_for(rows, ops::detail::row_grain(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        detail::for_each_group(
            spec, rows, cols, r, [&](int64_t, int64_t c0, int64_t c1, int64_t p) {
              const T sp = scale[p], zp = zero ? zero[p] : T(0);
              for (int64_t c = c0; c < c1; ++c) {
                const int64_t i = r * cols + c;
                const T u = w[i] / sp;
                const T f = std::floor(u);
                T h = rect_sigmoid(v[i]);
                if (hard) h = h >= T(0.5) ? T(1) : T(0);
                const T q = f + h + zp;
                const T qc = std::clamp(q, lo, hi);
                y[i] = sp * (qc - zp);
                if (dvfac) {
                  const bool inside = q == qc;
                  dvfac[i] = inside && v_grad ? sp * rect_sigmoid_grad(v[i]) : T(0);
                  coef[i] = inside ? (f + h) - u : qc - zp;
                }
              }
            });
    });
  }
  // Terms in T, summed serially (deterministic whatever the thread count) in double: a float sum
  // of a LLaMA-7B layer's 45M terms (each in [0, 1]) stops growing at 2^24. The total is then
  // k · sum as lora_round_reg's reg_total (bits unchanged for double).
  static void reg_forward(T* out, const T* v, int64_t n, T beta, T k) {
    double acc = 0;
    for (int64_t i = 0; i < n; ++i)
      acc += static_cast<double>(T(1) - std::pow(std::abs(T(2) * rect_sigmoid(v[i]) - T(1)), beta));
    out[0] = static_cast<T>(static_cast<double>(k) * acc);
  }
  static void reg_backward(T* dv, const T* g, const T* v, int64_t n, T beta, T k) {
    const T kk = -T(2) * k * beta * g[0];
    parallel_for(n, ops::kElementwiseGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T hp = rect_sigmoid_grad(v[i]);
        if (hp == T(0)) continue;
        const T a = T(2) * rect_sigmoid(v[i]) - T(1);
        const T sgn = a > T(0) ? T(1) : (a < T(0) ? T(-1) : T(0));
        dv[i] += kk * std::pow(std::abs(a), beta - T(1)) * sgn * hp;
      }
    });
  }
  static void adaround_offset(T* v0, const T* w, const T* scale, int64_t rows, int64_t cols,
                              const GridSpec& spec) {
    parallel_for(rows, ops::detail::row_grain(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        detail::for_each_group(spec, rows, cols, r,
                               [&](int64_t, int64_t c0, int64_t c1, int64_t q) {
                                 for (int64_t c = c0; c < c1; ++c) {
                                   const T u = w[r * cols + c] / scale[q];
                                   v0[r * cols + c] = rect_sigmoid_inverse(u - std::floor(u));
                                 }
                               });
    });
  }
};

// soft: h = h(V), differentiable in V. hard: h = [h(V) ≥ ½] ∈ {0, 1} (what harden() stores);
// V gets no gradient, s keeps its straight-through gradient — for training steps on the grid.
// hard_ste: the forward pass of `hard` with the gradient of `soft` (straight through the
// threshold): training sees the integer weight it will end with while V still learns.
enum class RoundingMode { soft, hard, hard_ste };

namespace detail {
template <class T>
void check_rounding_inputs(const char* op, const Tensor<T>& W, const Tensor<T>& s,
                           const Tensor<T>& z, const Tensor<T>& V, const GridSpec& g) {
  g.validate(op);
  CBQ_CHECK(W.ndim() == 2, "{}: weight must be 2-D (out, in), got {}", op, W.shape());
  ops::check_contiguous(op, "weight", W);
  ops::check_contiguous(op, "V", V);
  ops::check_same_device(op, W, V);
  ops::check_same_device(op, W, s);
  CBQ_CHECK(V.shape() == W.shape(), "{}: rounding logits V {} do not match the weight {}", op,
            V.shape(), W.shape());
  check_params(op, s, z, g.param_shape(W.size(0), W.size(1)), g);
}
}  // namespace detail

// Ŵ from a frozen weight W, learnable steps s, constant zero-points z and rounding logits V
// (a Var of W's shape, e.g. lora_v(A1, A2, V0)).
template <class T>
Var<T> soft_round_weight(const Tensor<T>& W, Var<T> scale, const Tensor<T>& zero, Var<T> V,
                         const GridSpec& spec, RoundingMode mode = RoundingMode::soft,
                         bool lsq_grad_scale = true) {
  constexpr const char* op = "quant::soft_round_weight";
  detail::check_rounding_inputs(op, W, scale.value(), zero, V.value(), spec);
  const int64_t rows = W.size(0), cols = W.size(1);
  Tape<T>& tape = V.tape();
  const bool rg = tape.any_requires_grad({V, scale});
  Var<T> out = tape.output(W.shape(), rg);
  Tensor<T> dvfac, coef;
  if (rg) {
    dvfac = tape.scratch(W.shape());
    coef = tape.scratch(W.shape());
  }
  Tensor<T> yv = out.value();  // shares the output's storage
  kernel_for(W.device(), &CpuLoraRounding<T>::soft_forward, CudaLoraRounding<T>::soft_forward, op)(
      yv.data(), rg ? dvfac.data() : nullptr, rg ? coef.data() : nullptr, W.data(),
      V.value().data(), scale.value().data(), zero.defined() ? zero.data() : nullptr, rows, cols,
      spec, mode != RoundingMode::soft, mode != RoundingMode::hard);
  if (rg) {
    Tensor<T> partial = tape.scratch(Shape{rows, spec.groups_per_row(cols)});
    tape.template record<detail::StepQuantNode<T>>(out, op, V, scale, dvfac, coef, partial, spec,
                                                   rows, cols, lsq_grad_scale, int64_t{0});
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Rounding regulariser

enum class Normalisation { mean, sum };

// The rounding regulariser a soft weight is asked for with it (lora_soft_weight_and_reg): L_round
// at β over the same V, normalised by `norm`.
template <class T>
struct RegularizerSpec {
  T beta = T(2);
  Normalisation norm = Normalisation::mean;
};

// What a soft weight's forward gives: Ŵ and, when asked, the rounding regulariser of the same V
// (the value lora_round_reg[_tracked] gives, bit for bit). On the CPU both come from one kernel,
// from the σ(V) the weight needs anyway, and their gradients are contracted in one backward pass
// over the weights instead of two; on the GPU the regulariser is lora_round_reg, separately.
template <class T>
struct SoftWeight {
  Var<T> weight;
  Var<T> regularizer;  // invalid when not asked for
};

namespace detail {
template <class T>
class RoundRegNode;
}  // namespace detail

// L_round = k·Σ (1 − |2h(V) − 1|^β), shape (1,); k = 1/numel (mean) or 1 (sum).
template <class T>
Var<T> rounding_reg(Var<T> V, T beta, Normalisation norm = Normalisation::mean) {
  constexpr const char* op = "quant::rounding_reg";
  CBQ_CHECK(std::isfinite(beta) && beta >= T(1),
            "{}: beta = {} must be at least 1 (the term is not differentiable at h = 1/2 below)",
            op, static_cast<double>(beta));
  const Tensor<T>& X = V.value();
  ops::check_contiguous(op, "V", X);
  const int64_t n = X.numel();
  CBQ_CHECK(n > 0, "{}: V is empty", op);
  const T k = norm == Normalisation::mean ? T(1) / static_cast<T>(n) : T(1);
  Tape<T>& tape = V.tape();
  const bool rg = tape.any_requires_grad({V});
  Var<T> out = tape.output(Shape{1}, rg);
  Tensor<T> yv = out.value();
  kernel_for(X.device(), &CpuLoraRounding<T>::reg_forward, CudaLoraRounding<T>::reg_forward, op)(
      yv.data(), X.data(), n, beta, k);
  if (rg) tape.template record<detail::RoundRegNode<T>>(out, V, beta, k);
  return out;
}

namespace detail {
template <class T>
class RoundRegNode final : public Node<T> {
 public:
  RoundRegNode(Var<T> v, T beta, T k) : v_(v), beta_(beta), k_(k) {}
  const char* name() const override { return "quant::rounding_reg"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& grad_out = tape.grad(this->output);
    kernel_for(grad_out.device(), &CpuLoraRounding<T>::reg_backward,
               CudaLoraRounding<T>::reg_backward, name())(
        v_.grad().data(), grad_out.data(), v_.value().data(), v_.value().numel(), beta_, k_);
  }

 private:
  Var<T> v_;
  T beta_, k_;
};
}  // namespace detail

// V0 with h(V0) = W/s − floor(W/s) (AdaRound's start: Ŵ = W inside the grid), written into V0.
// Recomputing it after s changes keeps Ŵ's soft value tied to the current step (see PASS.md).
template <class T>
void adaround_offset(const Tensor<T>& W, const Tensor<T>& scale, const GridSpec& spec,
                     Tensor<T>& V0) {
  CBQ_CHECK(V0.shape() == W.shape(), "quant::adaround_offset: V0 {} does not match W {}",
            V0.shape(), W.shape());
  const int64_t rows = W.size(0), cols = W.size(1);
  ops::check_same_device("quant::adaround_offset", W, V0);
  ops::check_same_device("quant::adaround_offset", W, scale);
  kernel_for(W.device(), &CpuLoraRounding<T>::adaround_offset, CudaLoraRounding<T>::adaround_offset,
             "quant::adaround_offset")(V0.data(), W.data(), scale.data(), rows, cols, spec);
}

// Hard rounding: h := [h(V) ≥ ½]; code = clamp(floor(W/s) + h + z, qmin, qmax). The result's
// dequantize() equals soft_round_weight(..., RoundingMode::hard) bit for bit when T = float.
template <class T>
QuantizedWeight harden(const Tensor<T>& W, const Tensor<T>& scale, const Tensor<T>& zero,
                       const Tensor<T>& V, const GridSpec& spec) {
  constexpr const char* op = "quant::harden";
  if (!W.is_cpu())  // the codes live on the host; the same CPU loop keeps them bit-identical
    return harden(W.to(Device::cpu), scale.to(Device::cpu),
                  zero.defined() ? zero.to(Device::cpu) : zero, V.to(Device::cpu), spec);
  detail::check_rounding_inputs(op, W, scale, zero, V, spec);
  const int64_t rows = W.size(0), cols = W.size(1);
  QuantizedWeight qw;
  qw.spec = spec;
  qw.codes = Tensor<uint8_t>::empty(W.shape());
  qw.scale = scale.template cast<float>();
  qw.zero = zero.defined() ? zero.template cast<float>() : Tensor<float>(scale.shape());
  const T lo = static_cast<T>(spec.qmin()), hi = static_cast<T>(spec.qmax());
  for (int64_t r = 0; r < rows; ++r)
    detail::for_each_group(spec, rows, cols, r, [&](int64_t, int64_t c0, int64_t c1, int64_t p) {
      const T zp = zero.defined() ? zero[p] : T(0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i = r * cols + c;
        const T h = rect_sigmoid(V[i]) >= T(0.5) ? T(1) : T(0);
        const T q = std::clamp(std::floor(W[i] / scale[p]) + h + zp, lo, hi);
        qw.codes[i] = static_cast<uint8_t>(q - lo);
      }
    });
  return qw;
}

}  // namespace cbq::quant
