#pragma once
// quant::fake_quant_weight: the uniform fake quantizer of a (rows, cols) weight as an autodiff op.
//
//   v = w / s_p,  r = round(v) (half to even),  q = r + z_p,
//   q_c = clamp(q, qmin, qmax),  ŵ = s_p · (q_c − z_p)
//
// with (s_p, z_p) the parameters of the group p that element (i, j) belongs to (grid.hpp).
// `s` is a learnable Var; `z` is a constant tensor (integer-valued; zeros for symmetric grids).
//
// Derivative (straight-through estimator for round, LSQ for the step; G = dŵ):
//   inside  (qmin ≤ q ≤ qmax):   dw += G,   ds_p += g_p · G · (r − v)
//   outside (q clamped to B):    dw += 0,   ds_p += g_p · G · (B − z_p)
// (inside ŵ = s·round(w/s), whose derivative in s with round treated as the identity is
//  round(v) + s·(−w/s²) = r − v; outside ŵ = s·(B − z), linear in s.)
// g_p = 1/sqrt(N_p · qmax) (LSQ's gradient scale, N_p = number of elements sharing s_p; the
// short last group has its own, smaller N_p) when lsq_grad_scale, else 1.
// An element exactly on a bound (q = qmin or q = qmax) is inside: the clamp does not engage.
//
// CUDA (CudaStepQuant, cuda/cbq/cuda/quant/fake_quant.cuh): the forward evaluates the same
// expressions in the same order with IEEE round-to-nearest operations (no FMA contraction) and
// rint, so values, codes and clamp decisions equal the CPU's bit for bit. The step gradient is
// reduced per group by one warp in a fixed order, then per tensor by one block: deterministic.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "cbq/ops/common.hpp"
#include "cbq/quant/grid.hpp"

namespace cbq::quant {

// CUDA kernels of the fake quantizers with a learnable step (registered by the CUDA backend).
template <class T>
struct CudaStepQuant {
  // Forward of a (rows, cols) view: y = x̂; pass and coef (saved for backward) may both be null.
  // scale, zero: spec.param_shape(rows, cols); zero may be null (all 0).
  static inline void (*forward)(T* y, T* pass, T* coef, const T* x, const T* scale, const T* zero,
                                int64_t rows, int64_t cols, const GridSpec& spec) = nullptr;
  // dx[i] += g[i] · pass[i], i < n
  static inline void (*backward_input)(T* dx, const T* g, const T* pass, int64_t n) = nullptr;
  // partial (rows, groups per row) = Σ_{i ∈ group} g_i · coef_i, then ds_p += lsq_p · partial_p
  // (per-tensor: ds_0 += lsq · Σ_rows partial). lsq_n > 0 overrides N in the LSQ scale.
  static inline void (*backward_scale)(T* ds, T* partial, const T* g, const T* coef, int64_t rows,
                                       int64_t cols, const GridSpec& spec, bool lsq,
                                       int64_t lsq_n) = nullptr;
};

namespace detail {

// Calls f(r, k, c0, c1, p) for every group: row r, group k of the row, columns [c0, c1), and
// the index p of its (s, z) in the parameter tensors.
template <class F>
void for_each_group(const GridSpec& g, int64_t rows, int64_t cols, int64_t r, F&& f) {
  const int64_t gc = std::max<int64_t>(g.group_cols(cols), 1), ng = g.groups_per_row(cols);
  (void)rows;
  for (int64_t k = 0; k < ng; ++k) {
    const int64_t c0 = k * gc, c1 = std::min(cols, (k + 1) * gc);
    const int64_t p = g.granularity == Granularity::per_tensor ? 0 : r * ng + k;
    f(k, c0, c1, p);
  }
}

// Number of elements that share parameter p of a (rows, cols) weight.
inline int64_t elements_sharing(const GridSpec& g, int64_t p, int64_t rows, int64_t cols) {
  switch (g.granularity) {
    case Granularity::per_tensor:
      return rows * cols;
    case Granularity::per_channel:
      return cols;
    case Granularity::per_group:
    default: {
      const int64_t k = p % g.groups_per_row(cols);
      return std::min(cols, (k + 1) * g.group_size) - k * g.group_size;
    }
  }
}

// LSQ gradient scale 1/sqrt(N · qmax) (Esser et al. 2019, with Q_P = qmax of the grid).
template <class T>
T lsq_scale(bool enabled, int64_t n, const GridSpec& g) {
  if (!enabled) return T(1);
  return T(1) / std::sqrt(static_cast<T>(n) * static_cast<T>(g.qmax()));
}

// Checks a scale / zero-point pair against the expected parameter shape; every step must be
// positive and finite, zero-points integer-valued, inside [0, qmax], and 0 for symmetric grids.
// Parameters on the GPU are copied to the host for the check (they are small).
template <class T>
void check_params(const char* op, const Tensor<T>& scale, const Tensor<T>& zero,
                  const Shape& expected, const GridSpec& g) {
  CBQ_CHECK(scale.shape() == expected, "{}: scale has shape {}, expected {}", op, scale.shape(),
            expected);
  ops::check_contiguous(op, "scale", scale);
  if (zero.defined()) ops::check_same_device(op, scale, zero);
  const Tensor<T> s = scale.is_cpu() ? scale : scale.to(Device::cpu);
  // A branch-free scan first (these run on every step for every layer); the loop that names the
  // offending element only when it finds one.
  const T* sp = s.data();
  const T largest = std::numeric_limits<T>::max();
  int64_t bad = 0;
  for (int64_t i = 0; i < s.numel(); ++i) bad += !((sp[i] > T(0)) & (sp[i] <= largest));
  for (int64_t i = 0; bad && i < s.numel(); ++i)
    CBQ_CHECK(std::isfinite(s[i]) && s[i] > T(0), "{}: scale[{}] = {} is not a positive step", op,
              i, static_cast<double>(s[i]));
  if (!zero.defined()) return;  // an undefined zero tensor means all zero-points are 0
  CBQ_CHECK(zero.shape() == expected, "{}: zero has shape {}, expected {}", op, zero.shape(),
            expected);
  ops::check_contiguous(op, "zero", zero);
  const Tensor<T> z = zero.is_cpu() ? zero : zero.to(Device::cpu);
  const T* zp = z.data();
  const T zmax = g.symmetric ? T(0) : static_cast<T>(g.qmax());
  bad = 0;
  for (int64_t i = 0; i < z.numel(); ++i)
    bad += !((zp[i] == std::floor(zp[i])) & (zp[i] >= T(0)) & (zp[i] <= zmax));
  for (int64_t i = 0; bad && i < z.numel(); ++i) {
    const T v = z[i];
    if (g.symmetric) {
      CBQ_CHECK(v == T(0), "{}: zero[{}] = {} but a symmetric grid has zero-points 0", op, i,
                static_cast<double>(v));
    } else {
      CBQ_CHECK(v == std::floor(v) && v >= T(0) && v <= static_cast<T>(g.qmax()),
                "{}: zero[{}] = {} is not an integer in [0, {}]", op, i, static_cast<double>(v),
                g.qmax());
    }
  }
}

// ds_p += g_p · partial_p from the per-(row, group) partial sums Σ G·coef (partial: rows × groups
// per row; per-tensor: summed over rows first). lsq_n > 0 overrides N in the LSQ scale.
template <class T>
void scatter_step_partials(const GridSpec& g, int64_t rows, int64_t cols, const T* part, T* ds,
                           bool lsq, int64_t lsq_n) {
  if (g.granularity == Granularity::per_tensor) {
    T acc = 0;
    for (int64_t r = 0; r < rows; ++r) acc += part[r];
    const int64_t n = lsq_n > 0 ? lsq_n : rows * cols;
    ds[0] += lsq_scale<T>(lsq, n, g) * acc;
    return;
  }
  const int64_t ng = g.groups_per_row(cols);
  // Only the last group of a row can be short: two scales serve every group.
  const T full = lsq_scale<T>(lsq, lsq_n > 0 ? lsq_n : elements_sharing(g, 0, rows, cols), g);
  const T last = lsq_scale<T>(lsq, lsq_n > 0 ? lsq_n : elements_sharing(g, ng - 1, rows, cols), g);
  for (int64_t r = 0; r < rows; ++r) {
    T* d = ds + r * ng;
    const T* pr = part + r * ng;
    for (int64_t k = 0; k + 1 < ng; ++k) d[k] += full * pr[k];
    d[ng - 1] += last * pr[ng - 1];
  }
}

}  // namespace detail

template <class T>
struct CpuStepQuant {
  static void forward(T* y, T* pass, T* coef, const T* x, const T* scale, const T* zero,
                      int64_t rows, int64_t cols, const GridSpec& spec) {
    const T lo = static_cast<T>(spec.qmin()), hi = static_cast<T>(spec.qmax());
    parallel_for(rows, ops::detail::row_grain(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        detail::for_each_group(spec, rows, cols, r,
                               [&](int64_t, int64_t c0, int64_t c1, int64_t p) {
                                 const T sp = scale[p], zp = zero ? zero[p] : T(0);
                                 for (int64_t c = c0; c < c1; ++c) {
                                   const int64_t i = r * cols + c;
                                   const T v = x[i] / sp;
                                   const T rv = round_even(v);
                                   const T q = rv + zp;
                                   const T qc = std::clamp(q, lo, hi);
                                   y[i] = sp * (qc - zp);
                                   if (pass) {
                                     const bool inside = q == qc;
                                     pass[i] = inside ? T(1) : T(0);
                                     coef[i] = inside ? rv - v : qc - zp;
                                   }
                                 }
                               });
    });
  }
  // Straight-through inside the clamp range.
  static void backward_input(T* dx, const T* g, const T* pass, int64_t n) {
    parallel_for(n, ops::kElementwiseGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dx[i] += g[i] * pass[i];
    });
  }
  // Per (row, group) partial sums Σ G·coef, then scatter (per-tensor: sum over rows).
  static void backward_scale(T* ds, T* partial, const T* g, const T* coef, int64_t rows,
                             int64_t cols, const GridSpec& spec, bool lsq, int64_t lsq_n) {
    const int64_t ng = spec.groups_per_row(cols);
    parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        detail::for_each_group(spec, rows, cols, r,
                               [&](int64_t k, int64_t c0, int64_t c1, int64_t) {
                                 T acc = 0;
                                 for (int64_t c = c0; c < c1; ++c)
                                   acc += g[r * cols + c] * coef[r * cols + c];
                                 partial[r * ng + k] = acc;
                               });
    });
    detail::scatter_step_partials(spec, rows, cols, partial, ds, lsq, lsq_n);
  }
};

namespace detail {

template <class T>
class StepQuantNode;

// Shared forward of fake_quant_weight and fake_quant_act_static on a (rows, cols) view.
// lsq_n > 0 overrides N in the LSQ scale.
template <class T>
Var<T> step_quant(const char* op, Var<T> x, Var<T> s, const Tensor<T>& z, const GridSpec& g,
                  int64_t rows, int64_t cols, const Shape& out_shape, bool lsq, int64_t lsq_n) {
  Tape<T>& tape = x.tape();
  const bool rg = tape.any_requires_grad({x, s});
  Var<T> out = tape.output(out_shape, rg);
  Tensor<T> yv = out.value();  // shares the output's storage
  Tensor<T> pass, coef;
  if (rg) {
    pass = tape.scratch(out_shape);
    coef = tape.scratch(out_shape);
  }
  kernel_for(x.value().device(), &CpuStepQuant<T>::forward, CudaStepQuant<T>::forward, op)(
      yv.data(), rg ? pass.data() : nullptr, rg ? coef.data() : nullptr, x.value().data(),
      s.value().data(), z.defined() ? z.data() : nullptr, rows, cols, g);
  if (rg) {
    Tensor<T> partial = tape.scratch(Shape{rows, g.groups_per_row(cols)});
    tape.template record<StepQuantNode<T>>(out, op, x, s, pass, coef, partial, g, rows, cols, lsq,
                                           lsq_n);
  }
  return out;
}

// The saved state and backward of every fake quantizer with a learnable step per group:
//   dx += G ⊙ pass,   ds_p += g_p · Σ_{i ∈ p} G_i · coef_i
// pass (1 inside, 0 clamped) and coef (r − v inside, B − z outside) are saved by the forward.
template <class T>
class StepQuantNode final : public Node<T> {
 public:
  StepQuantNode(const char* name, Var<T> x, Var<T> s, Tensor<T> pass, Tensor<T> coef,
                Tensor<T> partial, GridSpec g, int64_t rows, int64_t cols, bool lsq, int64_t lsq_n)
      : name_(name),
        x_(x),
        s_(s),
        pass_(pass),
        coef_(coef),
        partial_(partial),
        g_(g),
        rows_(rows),
        cols_(cols),
        lsq_(lsq),
        lsq_n_(lsq_n) {}
  const char* name() const override { return name_; }
  void backward(Tape<T>& tape) override {
    const Tensor<T>& grad_out = tape.grad(this->output);
    const Device device = grad_out.device();
    if (x_.requires_grad())
      kernel_for(device, &CpuStepQuant<T>::backward_input, CudaStepQuant<T>::backward_input, name_)(
          x_.grad().data(), grad_out.data(), pass_.data(), rows_ * cols_);
    if (s_.requires_grad())
      kernel_for(device, &CpuStepQuant<T>::backward_scale, CudaStepQuant<T>::backward_scale, name_)(
          s_.grad().data(), partial_.data(), grad_out.data(), coef_.data(), rows_, cols_, g_, lsq_,
          lsq_n_);
  }

 private:
  const char* name_;
  Var<T> x_, s_;
  Tensor<T> pass_, coef_, partial_;
  GridSpec g_;
  int64_t rows_, cols_;
  bool lsq_;
  int64_t lsq_n_;
};

}  // namespace detail

// Fake-quantizes a (rows, cols) weight with learnable steps `scale` (spec.param_shape(rows,
// cols)) and constant zero-points `zero` (same shape; pass an undefined tensor for all-zero).
// Initialise (scale, zero) with init_minmax (RTN).
template <class T>
Var<T> fake_quant_weight(Var<T> w, Var<T> scale, const Tensor<T>& zero, const GridSpec& spec,
                         bool lsq_grad_scale = true) {
  constexpr const char* op = "quant::fake_quant_weight";
  spec.validate(op);
  const Tensor<T>& W = w.value();
  CBQ_CHECK(W.ndim() == 2, "{}: weight must be 2-D (out, in), got {}", op, W.shape());
  ops::check_contiguous(op, "weight", W);
  const int64_t rows = W.size(0), cols = W.size(1);
  ops::check_same_device(op, W, scale.value());
  detail::check_params(op, scale.value(), zero, spec.param_shape(rows, cols), spec);
  return detail::step_quant(op, w, scale, zero, spec, rows, cols, W.shape(), lsq_grad_scale,
                            int64_t{0});
}

// The same quantizer without a tape: ŵ for given (scale, zero), e.g. for evaluation.
template <class T>
Tensor<T> fake_quant_weight_value(const Tensor<T>& w, const Tensor<T>& scale, const Tensor<T>& zero,
                                  const GridSpec& spec) {
  Tape<T> tape(w.device());
  NoGrad<T> off(tape);
  return fake_quant_weight(tape.constant(w), tape.constant(scale), zero, spec).value().clone();
}

// The integer codes of `w` on the grid (scale, zero), as a QuantizedWeight whose dequantize()
// equals fake_quant_weight's output bit for bit when T = float.
template <class T>
QuantizedWeight quantize_weight(const Tensor<T>& w, const Tensor<T>& scale, const Tensor<T>& zero,
                                const GridSpec& spec) {
  constexpr const char* op = "quant::quantize_weight";
  if (!w.is_cpu() || !scale.is_cpu() ||
      (zero.defined() && !zero.is_cpu()))  // codes live on the host
    return quantize_weight(w.to(Device::cpu), scale.to(Device::cpu),
                           zero.defined() ? zero.to(Device::cpu) : zero, spec);
  spec.validate(op);
  CBQ_CHECK(w.ndim() == 2, "{}: weight must be 2-D (out, in), got {}", op, w.shape());
  ops::check_contiguous(op, "weight", w);
  const int64_t rows = w.size(0), cols = w.size(1);
  detail::check_params(op, scale, zero, spec.param_shape(rows, cols), spec);
  QuantizedWeight qw;
  qw.spec = spec;
  qw.codes = Tensor<uint8_t>::empty(w.shape());
  qw.scale = scale.template cast<float>();
  qw.zero = zero.defined() ? zero.template cast<float>() : Tensor<float>(scale.shape());
  const T lo = static_cast<T>(spec.qmin());
  for (int64_t r = 0; r < rows; ++r)
    detail::for_each_group(spec, rows, cols, r, [&](int64_t, int64_t c0, int64_t c1, int64_t p) {
      const T zp = zero.defined() ? zero[p] : T(0);
      for (int64_t c = c0; c < c1; ++c)
        qw.codes[r * cols + c] =
            static_cast<uint8_t>(quantize_code(w[r * cols + c], scale[p], zp, spec) - lo);
    });
  return qw;
}

}  // namespace cbq::quant
