#pragma once
// Activation fake quantizers (the inputs of linear layers), as autodiff ops.
//
// Bits: 2 to 8 quantize; bits ≥ 16 means "no quantization" (the ops return their input
// unchanged, so A16 configurations need no special case). 9 to 15 and < 2 are errors.
//
// (a) fake_quant_act_static: one learnable step s (shape (1,)) and a constant zero-point for the
//     whole tensor, initialised from calibration statistics (MinMaxObserver → init_act_static).
//     Same forward and derivative as fake_quant_weight per-tensor (fake_quant.hpp):
//       inside: dx += G, ds += g·G·(round(x/s) − x/s);  outside: ds += g·G·(B − z)
//     with the LSQ scale g = 1/sqrt(d · qmax), d = features per token (the last dimension):
//     LSQ's N_F for an activation is the number of features of one example, not the batch.
//
// (b) fake_quant_act_per_token: a step per token (row t of the (..., d) input) from that token's
//     own range, shrunk by a learnable clipping factor α = σ(c) (c a (1,) logit):
//       asymmetric: lo = min(min_t x, 0), hi = max(max_t x, 0)  (the grid always holds 0),
//                   s_t = (hi − lo)·α/qmax,  z_t = round(−lo·α/s_t) = round(−lo·qmax/(hi − lo))
//       symmetric:  m = max_t |x|, s_t = m·α/qmax (qmax = 2^(b−1) − 1), z_t = 0
//     then x̂ = s_t·(clamp(round(x/s_t) + z_t, qmin, qmax) − z_t).
//     Derivative (STE on both roundings, G = dx̂, per row t):
//       A_t = Σ_i G_i·coef_i   with coef_i = round(v_i) − v_i inside, B − z_t outside  (= ∂x̂/∂s)
//       Z_t = Σ_{i outside} G_i·(−s_t)                                                  (= ∂x̂/∂z)
//       dx_i += G_i·[inside]                                        (straight-through)
//       ds_t/dc = (hi − lo)/qmax · α(1 − α)   →  dc += Σ_t A_t · ds_t/dc
//       z_t's pre-rounding value −lo·α/s_t = −lo·qmax/(hi − lo) does not depend on c, so the
//       zero-point contributes nothing to dc, but it does depend on the row's extremes:
//       ∂s/∂hi = α/qmax, ∂s/∂lo = −α/qmax, ∂z/∂hi = lo·qmax/(hi − lo)², ∂z/∂lo = −hi·qmax/(hi −
//       lo)² dx_{argmax} += A_t·∂s/∂hi + Z_t·∂z/∂hi   (only when hi = max_t x > 0, i.e. not the 0
//       floor) dx_{argmin} += A_t·∂s/∂lo + Z_t·∂z/∂lo   (only when lo = min_t x < 0) symmetric:
//       dx_{argmax|x|} += A_t·sign(x)·α/qmax.
//     This is the exact gradient of the surrogate in which both rounding residuals are frozen
//     (see docs/QUANTIZATION.md); a constant row (hi = lo) gets the minimum step and no
//     s / z gradients. No LSQ gradient scale here: c is a clipping logit shared by all tokens,
//     not a step size, so LSQ's balancing argument does not apply.
//
// CUDA: (a) runs on CudaStepQuant (fake_quant.hpp); (b) on CudaActQuant below, one warp per token.
// α = σ(c) is computed on the host as for the CPU, and the device repeats every expression of the
// token grid with IEEE round-to-nearest operations (no FMA), with the same first-occurrence rule
// for the argmax / argmin, so steps, zero-points and codes equal the CPU's bit for bit; the row
// sums of the backward are reduced in a different (fixed) order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cbq/quant/fake_quant.hpp"

namespace cbq::quant {

// CUDA kernels of the dynamic per-token quantizer (registered by the CUDA backend).
template <class T>
struct CudaActQuant {
  // x (rows, d) → y (rows, d); pass, coef (rows, d) and rowsave (rows, kTokenSaved) are saved
  // for backward and may all be null. alpha = σ(clip logit).
  static inline void (*per_token_forward)(T* y, T* pass, T* coef, T* rowsave, const T* x,
                                          int64_t rows, int64_t d, T alpha,
                                          const GridSpec& spec) = nullptr;
  // dx (rows, d) += ... (may be null), dc[0] += Σ_rows partial, partial (rows) scratch.
  static inline void (*per_token_backward)(T* dx, T* dc, T* partial, const T* g, const T* pass,
                                           const T* coef, const T* rowsave, int64_t rows, int64_t d,
                                           bool symmetric) = nullptr;
};

// True when `bits` means "keep the activation in floating point".
inline bool is_identity_bits(int bits) { return bits >= 16; }

inline void validate_act_bits(const char* op, int bits) {
  CBQ_CHECK((bits >= 2 && bits <= 8) || bits >= 16,
            "{}: {} activation bits is unsupported (2 to 8 quantize, 16 or more means none)", op,
            bits);
}

// A clipping logit c with σ(c) = ratio (0 < ratio < 1).
template <class T>
T clip_logit_for(T ratio) {
  CBQ_CHECK(ratio > T(0) && ratio < T(1), "quant::clip_logit_for: ratio {} is not in (0, 1)",
            static_cast<double>(ratio));
  return std::log(ratio / (T(1) - ratio));
}
// The default initial clipping logit (OmniQuant's): σ(4) ≈ 0.982, almost no clipping.
inline constexpr double kDefaultClipLogit = 4.0;

// ---------------------------------------------------------------------------------------------
// Calibration statistics for static activation steps.

// Running min / max over every observed tensor. NaN or infinity is an error naming the
// observer and the element.
template <class T>
struct MinMaxObserver {
  std::string name = "activation";
  T min = std::numeric_limits<T>::infinity();
  T max = -std::numeric_limits<T>::infinity();
  int64_t count = 0;  // elements seen

  void observe(const Tensor<T>& x) {
    CBQ_CHECK(x.is_cpu() && x.is_contiguous(),
              "MinMaxObserver '{}': expected a contiguous CPU tensor, got shape {}", name,
              x.shape());
    const T* p = x.data();
    for (int64_t i = 0; i < x.numel(); ++i) {
      CBQ_CHECK(std::isfinite(p[i]),
                "MinMaxObserver '{}': element {} of a calibration tensor of shape {} is {}", name,
                i, x.shape(), static_cast<double>(p[i]));
      min = std::min(min, p[i]);
      max = std::max(max, p[i]);
    }
    count += x.numel();
  }
  bool empty() const { return count == 0; }
  void reset() { *this = MinMaxObserver{name}; }
};

template <class T>
struct ActStaticParams {
  T scale = 1;
  T zero = 0;
};

// RTN step and zero-point for an activation range [min, max] (0 is always included), as
// minmax_params for weights. For bits ≥ 16 returns s = 1, z = 0 (unused by the identity path).
template <class T>
ActStaticParams<T> init_act_static(T min, T max, int bits, bool symmetric = false) {
  constexpr const char* op = "quant::init_act_static";
  validate_act_bits(op, bits);
  CBQ_CHECK(std::isfinite(min) && std::isfinite(max) && min <= max,
            "{}: invalid calibration range [{}, {}] (observe at least one finite tensor first)", op,
            static_cast<double>(min), static_cast<double>(max));
  ActStaticParams<T> p;
  if (is_identity_bits(bits)) return p;
  GridSpec g;
  g.bits = bits;
  g.symmetric = symmetric;
  g.granularity = Granularity::per_tensor;
  minmax_params(min, max, g, p.scale, p.zero);
  return p;
}
template <class T>
ActStaticParams<T> init_act_static(const MinMaxObserver<T>& obs, int bits, bool symmetric = false) {
  CBQ_CHECK(!obs.empty(), "quant::init_act_static: observer '{}' has seen no data", obs.name);
  return init_act_static(obs.min, obs.max, bits, symmetric);
}

// ---------------------------------------------------------------------------------------------
// (a) static per-tensor

// x of any shape (..., d); scale a (1,) Var; zero a (1,) tensor (or undefined for 0).
// spec.bits and spec.symmetric are used; the granularity is per-tensor whatever spec says.
template <class T>
Var<T> fake_quant_act_static(Var<T> x, Var<T> scale, const Tensor<T>& zero, GridSpec spec,
                             bool lsq_grad_scale = true) {
  constexpr const char* op = "quant::fake_quant_act_static";
  validate_act_bits(op, spec.bits);
  if (is_identity_bits(spec.bits)) return x;
  spec.granularity = Granularity::per_tensor;
  const Tensor<T>& X = x.value();
  ops::check_contiguous(op, "input", X);
  ops::check_same_device(op, X, scale.value());
  CBQ_CHECK(X.ndim() >= 1, "{}: input must have at least one dimension", op);
  CBQ_CHECK(scale.value().numel() == 1 && scale.value().ndim() == 1,
            "{}: scale must have shape (1,), got {}", op, scale.shape());
  CBQ_CHECK(!zero.defined() || zero.numel() == 1, "{}: zero must have shape (1,), got {}", op,
            zero.shape());
  const int64_t d = X.size(-1), rows = d == 0 ? 0 : X.numel() / d;
  detail::check_params(op, scale.value().reshape(Shape{1, 1}),
                       zero.defined() ? zero.reshape(Shape{1, 1}) : zero, Shape{1, 1}, spec);
  return detail::step_quant(op, x, scale, zero, spec, rows, d, X.shape(), lsq_grad_scale,
                            std::max<int64_t>(d, 1));
}

// ---------------------------------------------------------------------------------------------
// (b) dynamic per-token with a learnable clipping factor

namespace detail {

template <class T>
T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

// Per-row quantities the per-token forward computes; backward needs all but z and s.
template <class T>
struct TokenGrid {
  T s = 1, z = 0;
  T ds_dc = 0;                 // ∂s/∂c
  T ds_dhi = 0, ds_dlo = 0;    // ∂s/∂x at the argmax / argmin element
  T dz_dhi = 0, dz_dlo = 0;    // ∂z/∂x (STE) at the argmax / argmin element
  int64_t ihi = -1, ilo = -1;  // column of the element that sets hi / lo (−1: the 0 floor)
};

template <class T>
TokenGrid<T> token_grid(const T* x, int64_t d, T alpha, const GridSpec& g) {
  TokenGrid<T> t;
  const T qmax = static_cast<T>(g.qmax());
  const T dalpha = alpha * (T(1) - alpha);
  if (g.symmetric) {
    T m = 0;
    for (int64_t c = 0; c < d; ++c)
      if (std::abs(x[c]) > m) {
        m = std::abs(x[c]);
        t.ihi = c;
      }
    const T s = m * alpha / qmax;
    if (!(s > min_step<T>())) {
      t.s = min_step<T>();
      t.ihi = -1;
      return t;
    }
    t.s = s;
    t.ds_dc = m / qmax * dalpha;
    t.ds_dhi = (x[t.ihi] >= 0 ? T(1) : T(-1)) * alpha / qmax;
    return t;
  }
  T lo = 0, hi = 0;
  for (int64_t c = 0; c < d; ++c) {
    if (x[c] > hi) {
      hi = x[c];
      t.ihi = c;
    }
    if (x[c] < lo) {
      lo = x[c];
      t.ilo = c;
    }
  }
  const T range = hi - lo;
  const T s = range * alpha / qmax;
  if (!(s > min_step<T>())) {  // a constant (or nearly constant) row: fixed minimum step
    t.s = min_step<T>();
    t.z = std::clamp(round_even(-lo / t.s), T(0), qmax);
    t.ihi = t.ilo = -1;
    return t;
  }
  t.s = s;
  t.z = std::clamp(round_even(-lo * qmax / range), T(0), qmax);
  t.ds_dc = range / qmax * dalpha;
  t.ds_dhi = alpha / qmax;
  t.ds_dlo = -alpha / qmax;
  t.dz_dhi = lo * qmax / (range * range);
  t.dz_dlo = -hi * qmax / (range * range);
  return t;
}

// Saved per row: ds_dc, ds_dhi, ds_dlo, dz_dhi, dz_dlo, s, ihi, ilo (the indices as T; exact
// because d < 2^24 is checked by the forward).
inline constexpr int64_t kTokenSaved = 8;

}  // namespace detail

template <class T>
struct CpuActQuant {
  static void per_token_forward(T* y, T* pass, T* coef, T* rowsave, const T* x, int64_t rows,
                                int64_t d, T alpha, const GridSpec& spec) {
    const T qlo = static_cast<T>(spec.qmin()), qhi = static_cast<T>(spec.qmax());
    parallel_for(rows, ops::detail::row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * d;
        const detail::TokenGrid<T> t = detail::token_grid(xr, d, alpha, spec);
        for (int64_t i = 0; i < d; ++i) {
          const T v = xr[i] / t.s;
          const T rv = round_even(v);
          const T q = rv + t.z;
          const T qc = std::clamp(q, qlo, qhi);
          y[r * d + i] = t.s * (qc - t.z);
          if (pass) {
            const bool inside = q == qc;
            pass[r * d + i] = inside ? T(1) : T(0);
            coef[r * d + i] = inside ? rv - v : qc - t.z;
          }
        }
        if (rowsave) {
          T* sv = rowsave + r * detail::kTokenSaved;
          sv[0] = t.ds_dc;
          sv[1] = t.ds_dhi;
          sv[2] = t.ds_dlo;
          sv[3] = t.dz_dhi;
          sv[4] = t.dz_dlo;
          sv[5] = t.s;
          sv[6] = static_cast<T>(t.ihi);
          sv[7] = static_cast<T>(t.ilo);
        }
      }
    });
  }
  static void per_token_backward(T* dx, T* dc, T* partial, const T* g, const T* pass, const T* coef,
                                 const T* rowsave, int64_t rows, int64_t d, bool symmetric) {
    parallel_for(rows, ops::detail::row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* gr = g + r * d;
        const T* ps = pass + r * d;
        const T* cf = coef + r * d;
        const T* sv = rowsave + r * detail::kTokenSaved;
        T A = 0, Z = 0;
        for (int64_t i = 0; i < d; ++i) {
          A += gr[i] * cf[i];           // Σ G·∂x̂/∂s
          Z += gr[i] * (T(1) - ps[i]);  // Σ_{outside} G (times −s below)
        }
        Z *= -sv[5];
        partial[r] = A * sv[0];  // dc contribution of this row
        if (!dx) continue;
        T* o = dx + r * d;
        for (int64_t i = 0; i < d; ++i) o[i] += gr[i] * ps[i];
        const auto ihi = static_cast<int64_t>(sv[6]), ilo = static_cast<int64_t>(sv[7]);
        if (ihi >= 0) o[ihi] += A * sv[1] + (symmetric ? T(0) : Z * sv[3]);
        if (ilo >= 0) o[ilo] += A * sv[2] + Z * sv[4];
      }
    });
    if (dc) {
      T acc = 0;
      for (int64_t r = 0; r < rows; ++r) acc += partial[r];
      dc[0] += acc;
    }
  }
};

namespace detail {
template <class T>
class PerTokenNode;
}  // namespace detail

// x (..., d); clip_logit a (1,) Var (σ(c) is the clipping factor); spec.bits / spec.symmetric.
template <class T>
Var<T> fake_quant_act_per_token(Var<T> x, Var<T> clip_logit, const GridSpec& spec) {
  constexpr const char* op = "quant::fake_quant_act_per_token";
  validate_act_bits(op, spec.bits);
  if (is_identity_bits(spec.bits)) return x;
  const Tensor<T>& X = x.value();
  ops::check_contiguous(op, "input", X);
  ops::check_same_device(op, X, clip_logit.value());
  CBQ_CHECK(X.ndim() >= 1, "{}: input must have at least one dimension", op);
  CBQ_CHECK(clip_logit.value().ndim() == 1 && clip_logit.value().numel() == 1,
            "{}: clip_logit must have shape (1,), got {}", op, clip_logit.shape());
  const T c =
      clip_logit.value().is_cpu() ? clip_logit.value()[0] : clip_logit.value().to(Device::cpu)[0];
  CBQ_CHECK(std::isfinite(c), "{}: clip_logit = {} is not finite", op, static_cast<double>(c));
  const int64_t d = X.size(-1), rows = d == 0 ? 0 : X.numel() / d;
  CBQ_CHECK(d < (int64_t{1} << 24), "{}: {} features per token exceed 2^24", op, d);
  const T alpha = detail::sigmoid(c);
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x, clip_logit});
  Var<T> out = tape.output(X.shape(), rg);
  Tensor<T> pass, coef, rowsave;
  if (rg) {
    pass = tape.scratch(X.shape());
    coef = tape.scratch(X.shape());
    rowsave = tape.scratch(Shape{std::max<int64_t>(rows, 1), detail::kTokenSaved});
  }
  Tensor<T> yv = out.value();  // shares the output's storage
  kernel_for(X.device(), &CpuActQuant<T>::per_token_forward, CudaActQuant<T>::per_token_forward,
             op)(yv.data(), rg ? pass.data() : nullptr, rg ? coef.data() : nullptr,
                 rg ? rowsave.data() : nullptr, X.data(), rows, d, alpha, spec);
  if (rg) {
    Tensor<T> partial = tape.scratch(Shape{std::max<int64_t>(rows, 1)});
    tape.template record<detail::PerTokenNode<T>>(out, x, clip_logit, pass, coef, rowsave, partial,
                                                  rows, d, spec.symmetric);
  }
  return out;
}

namespace detail {
template <class T>
class PerTokenNode final : public Node<T> {
 public:
  PerTokenNode(Var<T> x, Var<T> c, Tensor<T> pass, Tensor<T> coef, Tensor<T> rowsave,
               Tensor<T> partial, int64_t rows, int64_t d, bool symmetric)
      : x_(x),
        c_(c),
        pass_(pass),
        coef_(coef),
        rowsave_(rowsave),
        partial_(partial),
        rows_(rows),
        d_(d),
        symmetric_(symmetric) {}
  const char* name() const override { return "quant::fake_quant_act_per_token"; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& grad_out = tape.grad(this->output);
    kernel_for(grad_out.device(), &CpuActQuant<T>::per_token_backward,
               CudaActQuant<T>::per_token_backward, name())(
        x_.requires_grad() ? x_.grad().data() : nullptr,
        c_.requires_grad() ? c_.grad().data() : nullptr, partial_.data(), grad_out.data(),
        pass_.data(), coef_.data(), rowsave_.data(), rows_, d_, symmetric_);
  }

 private:
  Var<T> x_, c_;
  Tensor<T> pass_, coef_, rowsave_, partial_;
  int64_t rows_, d_;
  bool symmetric_;
};
}  // namespace detail

}  // namespace cbq::quant
