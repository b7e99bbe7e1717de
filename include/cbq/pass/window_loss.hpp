#pragma once
// The loss of one window of the CBQ pass (DESIGN §2; PASS.md "Loss balance"): how its terms are
// scaled (LossScaling, measured once per window), the loss itself (WindowLoss) and, when it is not
// finite, where the first non-finite value comes from. The trainer (pass/window_trainer.hpp)
// only steps the optimiser on it, so a window of other units is a new loss, not a new trainer.
#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "cbq/model/linear_layer.hpp"
#include "cbq/ops/add.hpp"
#include "cbq/ops/attention_map_kl.hpp"
#include "cbq/ops/kl_softmax.hpp"
#include "cbq/ops/matmul.hpp"
#include "cbq/ops/mse.hpp"
#include "cbq/ops/mul.hpp"
#include "cbq/ops/scale.hpp"
#include "cbq/pass/checks_and_timing.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/device_support.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/pass/units.hpp"
#include "cbq/pass/window_schedule.hpp"
#include "cbq/quant/result.hpp"

namespace cbq {

// How the window's reconstruction terms are scaled (PassOptions::loss_scale), measured once
// per window from its full-precision targets.
template <class T>
struct LossScaling {
  double energy_fp = 0, energy_hom = 0;  // mean_t ‖a_t‖² of T_fp(X_fp) and T_fp(X_q)
  // token: per sample, (L, 1) factors 1/‖a_t‖ of each target's rows, and a (1, d) row of ones
  // that expands them to (L, d) through a matmul (any device).
  std::vector<Tensor<T>> rows_fp, rows_hom;
  Tensor<T> ones;
};

// The targets' energies and, for LossScale::token, their per-token factors.
template <class T>
LossScaling<T> measure_loss_scaling(const PassOptions& options, const std::vector<Tensor<T>>& t_fp,
                                    const std::vector<Tensor<T>>& t_hom, Device device) {
  LossScaling<T> s;
  const bool token = options.loss_scale == LossScale::token;
  auto measure = [&](const std::vector<Tensor<T>>& targets, std::vector<Tensor<T>>& rows) {
    double sum = 0;
    int64_t count = 0;
    for (const Tensor<T>& t : targets) {
      const Tensor<T> h = t.is_cpu() ? t : t.to(Device::cpu);
      const int64_t L = h.size(0), d = h.size(1);
      Tensor<T> f = Tensor<T>::empty(Shape{L, 1});
      for (int64_t r = 0; r < L; ++r) {
        double e = 0;
        for (int64_t c = 0; c < d; ++c) e += static_cast<double>(h(r, c)) * h(r, c);
        sum += e;
        // A zero target row would divide by zero: such a token weighs as if its energy were
        // the smallest normal float (its error is then all the loss sees of it).
        f(r, 0) = static_cast<T>(1.0 / std::sqrt(std::max(e, 1e-30)));
      }
      count += L;
      if (token) rows.push_back(device == Device::cpu ? f : f.to(device));
    }
    return sum / static_cast<double>(std::max<int64_t>(count, 1));
  };
  s.energy_fp = measure(t_fp, s.rows_fp);
  s.energy_hom = measure(t_hom, s.rows_hom);
  if (token && !t_fp.empty()) s.ones = Tensor<T>::full(Shape{1, t_fp[0].size(1)}, T(1)).to(device);
  return s;
}

// The full-precision path's attention inputs of a window (PassOptions::attention_kl): for the
// a-th attention the window's forward meets, q[a][n] (L, Hq·hd) and k[a][n] (L, Hkv·hd) of
// calibration sample n, after RoPE. Empty when the term is off.
template <class T>
struct AttentionTargets {
  std::vector<std::vector<Tensor<T>>> q, k;
  bool empty() const { return q.empty(); }
};

// The targets of PassOptions::boundary_loss in a window that freezes units [first, unit] and
// trains later ones too: T_fp(X_fp) and T_fp(X_q) at the output of `unit`, and their scaling.
template <class T>
struct BoundaryTargets {
  int64_t unit = -1;  // −1: no boundary term in this window
  const std::vector<Tensor<T>>* fp = nullptr;
  const std::vector<Tensor<T>>* hom = nullptr;
  LossScaling<T> scaling;
};

// The loss of window `w` on calibration sample n (operator()): the window's blocks on the
// quantized path X_q against T_fp(X_fp) and T_fp(X_q), each term scaled per
// PassOptions::loss_scale, the output KL when asked, and with reg_beta > 0 γ_r · the mean of the
// active layers' rounding regularisers, which the forward gives with the weights
// (TransformLosses). Activation sets kept in host memory while the model is on the GPU are
// copied per use into one device buffer each.
template <class Model, class T>
class WindowLoss {
 public:
  WindowLoss(PassUnits<Model>& units, const Window& w, const PassOptions& options,
             const std::vector<QuantLinear<T>*>& active, const std::vector<Tensor<T>>& x_q,
             const std::vector<Tensor<T>>& t_fp, const std::vector<Tensor<T>>& t_hom,
             const std::vector<Tensor<T>>& t_out, const LossScaling<T>& scaling,
             const AttentionTargets<T>* attention = nullptr,
             const BoundaryTargets<T>* boundary = nullptr)
      : units_(units),
        model_(units.model()),
        w_(w),
        o_(options),
        active_(active),
        x_q_(x_q),
        t_fp_(t_fp),
        t_hom_(t_hom),
        t_out_(t_out),
        scaling_(scaling),
        attention_(attention),
        boundary_(boundary && boundary->unit >= 0 ? boundary : nullptr),
        device_(units.model().device()),
        tau_(static_cast<T>(options.kld_temperature)),
        output_loss_(options.output_kld > 0 &&
                     (options.output_kld_all || w.last + 1 == units.count())),
        dim_(units.model().config.dim) {}

  // Whether the output KL is one of the terms (PassOptions::output_kld).
  bool has_output_loss() const { return output_loss_; }

  // The loss (on `tape`, cleared first) and its terms.
  std::pair<Var<T>, LossTerms> operator()(Tape<T>& tape, int64_t n, T reg_beta) {
    tape.clear();
    const bool reg_on = reg_beta > T(0);
    // Each layer's regulariser comes with its weight (from the same kernel on the CPU).
    TransformLosses<T> losses{reg_beta, {}};
    Var<T> y = tape.constant(staged(x_q_[n], staged_x_));
    BlockContext<T> ctx;
    if (reg_on) ctx.losses = &losses;
    std::vector<std::pair<Var<T>, Var<T>>> attention;  // the quantized path's q, k per attention
    if (attention_ && !attention_->empty())
      ctx.on_attention = [&](Var<T> q, Var<T> k) { attention.emplace_back(q, k); };
    LossTerms terms;
    Var<T> loss;
    auto add_term = [&](Var<T> term, double& slot) {
      slot = static_cast<double>(detail::element_at(term.value(), 0));
      loss = loss.valid() ? ops::add(loss, term) : term;
    };
    for (int64_t u = w_.first; u <= w_.last; ++u) {
      y = units_.forward(tape, u, y, ctx);
      if (boundary_ && u == boundary_->unit) add_boundary(tape, y, n, loss, terms.boundary);
    }
    if (o_.loss_full_precision)
      reconstruction(tape, tape.constant(staged(t_fp_[n], staged_fp_)), y, scaling_.energy_fp,
                     scaling_.rows_fp, n, add_term, terms.l2_fp, terms.kld_fp);
    if (o_.loss_homologous)
      reconstruction(tape, tape.constant(staged(t_hom_[n], staged_hom_)), y, scaling_.energy_hom,
                     scaling_.rows_hom, n, add_term, terms.l2_hom, terms.kld_hom);
    if (output_loss_) {
      // Earlier windows reach the output through the later units in full precision; the
      // last window's T_fp(X_fp) is the model's last hidden state itself.
      BlockContext<T> fp;
      fp.full_precision = true;
      Var<T> q = y;
      for (int64_t u = w_.last + 1; u < units_.count(); ++u) q = units_.forward(tape, u, q, fp);
      const bool last = w_.last + 1 == units_.count();
      Var<T> target = model_.head(tape, tape.constant(last ? staged(t_fp_[n], staged_fp_)
                                                           : staged(t_out_[n], staged_out_)));
      Var<T> out = ops::scale(ops::kl_softmax(target, model_.head(tape, q), T(1)),
                              static_cast<T>(o_.output_kld));
      add_term(out, terms.output_kld);
    }
    if (!attention.empty()) {
      CBQ_CHECK(attention.size() == attention_->q.size(),
                "CBQ: the window's forward met {} attentions, its targets hold {}",
                attention.size(), attention_->q.size());
      const ModelConfig& c = model_.config;
      Var<T> sum;
      for (size_t a = 0; a < attention.size(); ++a) {
        auto [q, k] = attention[a];
        const Tensor<T>& qt = attention_->q[a][static_cast<size_t>(n)];
        const Tensor<T>& kt = attention_->k[a][static_cast<size_t>(n)];
        Var<T> kl =
            ops::attention_map_kl(tape.constant(on_device(qt)), tape.constant(on_device(kt)), q, k,
                                  c.n_heads, kt.size(1) / c.head_dim, c.head_dim, true);
        sum = sum.valid() ? ops::add(sum, kl) : kl;
      }
      add_term(ops::scale(sum, static_cast<T>(o_.attention_kl)), terms.attention_kl);
    }
    if (reg_on) {
      Var<T> reg = regularizer([&](QuantLinear<T>* q) { return forward_reg(losses, q); });
      if (reg.valid()) add_term(reg, terms.round);
    }
    terms.total = static_cast<double>(detail::element_at(loss.value(), 0));
    return {loss, terms};
  }

  // Per-sample terms of samples [begin, end) without gradients, in the training forward or
  // with the given rounding.
  std::vector<LossTerms> evaluate(int64_t begin, int64_t end,
                                  std::optional<quant::RoundingMode> mode) {
    for (QuantLinear<T>* q : active_) q->set_forward_rounding(mode);
    Tape<T> eval_tape(device_);
    NoGrad<T> off(eval_tape);
    std::vector<LossTerms> out;
    for (int64_t n = begin; n < end; ++n) out.push_back((*this)(eval_tape, n, T(0)).second);
    for (QuantLinear<T>* q : active_) q->set_forward_rounding(std::nullopt);
    return out;
  }

  // γ_r · the regularisers' mean at β, computed from the layers alone (no forward).
  double regularizer_value(double at_beta) {
    if (o_.gamma_round <= 0) return 0.0;
    Tape<T> eval_tape(device_);
    NoGrad<T> off(eval_tape);
    Var<T> reg = regularizer([&](QuantLinear<T>* q) {
      return q->rounding_regularizer(eval_tape, static_cast<T>(at_beta));
    });
    return reg.valid() ? static_cast<double>(detail::element_at(reg.value(), 0)) : 0.0;
  }

 private:
  // A target kept in host memory while the model is on the GPU, copied up per use.
  Tensor<T> on_device(const Tensor<T>& t) const {
    return t.device() == device_ ? t : t.to(device_);
  }
  const Tensor<T>& staged(const Tensor<T>& t, Tensor<T>& buffer) {
    if (t.device() == device_) return t;
    if (!buffer.defined()) buffer = Tensor<T>::empty(t.shape(), device_);
    buffer.copy_from(t);
    return buffer;
  }

  // boundary_loss · (E(T_fp(X_fp), y) + E(T_fp(X_q), y)) at the frozen units' output y, added to
  // `loss` and summed into `slot`.
  void add_boundary(Tape<T>& tape, Var<T> y, int64_t n, Var<T>& loss, double& slot) {
    const BoundaryTargets<T>& b = *boundary_;
    auto add_weighted = [&](Var<T> term, double& sum) {
      term = ops::scale(term, static_cast<T>(o_.boundary_loss));
      sum += static_cast<double>(detail::element_at(term.value(), 0));
      loss = loss.valid() ? ops::add(loss, term) : term;
    };
    if (o_.loss_full_precision)
      reconstruction(tape, tape.constant(staged((*b.fp)[n], staged_boundary_fp_)), y,
                     b.scaling.energy_fp, b.scaling.rows_fp, n, add_weighted, slot, slot);
    if (o_.loss_homologous)
      reconstruction(tape, tape.constant(staged((*b.hom)[n], staged_boundary_hom_)), y,
                     b.scaling.energy_hom, b.scaling.rows_hom, n, add_weighted, slot, slot);
  }

  // E(target, y) in the pass's loss scale, into the l2 / kld slots.
  template <class AddTerm>
  void reconstruction(Tape<T>& tape, Var<T> target, Var<T> y, double energy,
                      const std::vector<Tensor<T>>& rows, int64_t n, AddTerm&& add_term,
                      double& l2_slot, double& kld_slot) {
    T kl_tau = tau_;
    switch (o_.loss_scale) {
      case LossScale::absolute:
        break;
      case LossScale::window:
        kl_tau = static_cast<T>(o_.kld_temperature *
                                std::sqrt(std::max(energy, 1e-30) / static_cast<double>(dim_)));
        break;
      case LossScale::token: {
        // Both sides' tokens divided by the target token's norm: the L2 is the relative error
        // per token, the KL sees a_t / rms(a_t) at τ = 1.
        Var<T> factors =
            ops::matmul(tape.constant(rows[static_cast<size_t>(n)]), tape.constant(scaling_.ones));
        target = ops::mul(target, factors);
        y = ops::mul(y, factors);
        kl_tau = static_cast<T>(o_.kld_temperature / std::sqrt(static_cast<double>(dim_)));
        break;
      }
    }
    if (o_.loss_l2) {
      Var<T> l2 = ops::row_sq_error(target, y);
      if (o_.loss_scale == LossScale::window)
        l2 = ops::scale(l2, static_cast<T>(1.0 / std::max(energy, 1e-30)));
      add_term(l2, l2_slot);
    }
    if (o_.loss_kld) add_term(ops::kl_softmax(target, y, kl_tau), kld_slot);
  }

  // γ_r · mean over the active layers of each layer's L_round, layer_reg(q) (a Var; invalid
  // when no layer has rounding to regularise), summed in the order of `active`.
  template <class LayerReg>
  Var<T> regularizer(LayerReg&& layer_reg) {
    Var<T> reg;
    int64_t count = 0;
    for (QuantLinear<T>* q : active_) {
      Var<T> r = layer_reg(q);
      if (!r.valid()) continue;
      reg = reg.valid() ? ops::add(reg, r) : r;
      ++count;
    }
    // Mean over layers of each layer's mean: every layer weighs the same.
    if (reg.valid())
      reg = ops::scale(reg, static_cast<T>(o_.gamma_round / static_cast<double>(count)));
    return reg;
  }

  // A layer's L_round as the window's forward gave it with its weight.
  static Var<T> forward_reg(const TransformLosses<T>& losses, const QuantLinear<T>* q) {
    for (const auto& [layer, r] : losses.rounding)
      if (layer == q) return r;
    return Var<T>{};
  }

  PassUnits<Model>& units_;
  Model& model_;
  const Window& w_;
  const PassOptions& o_;
  const std::vector<QuantLinear<T>*>& active_;
  const std::vector<Tensor<T>>&x_q_, &t_fp_, &t_hom_, &t_out_;
  const LossScaling<T>& scaling_;
  const AttentionTargets<T>* attention_;  // null: no attention-map term
  const BoundaryTargets<T>* boundary_;    // null: no boundary term in this window
  Device device_;
  T tau_;
  bool output_loss_;
  int64_t dim_;
  Tensor<T> staged_x_, staged_fp_, staged_hom_, staged_out_, staged_boundary_fp_,
      staged_boundary_hom_;
};

// The first learned value of the window that is not finite ("the learned parameter NAME of
// layer LAYER", "the learned norm weight NAME"), or empty. The window trainer asks after every
// step.
template <class T>
std::string first_non_finite_parameter(const std::vector<QuantLinear<T>*>& active,
                                       const std::vector<Parameter<T>*>& norms = {}) {
  auto first_bad = [](const std::vector<Parameter<T>*>& params) -> const Parameter<T>* {
    for (const Parameter<T>* p : params)
      if (!detail::all_finite(p->value)) return p;
    return nullptr;
  };
  for (QuantLinear<T>* q : active) {
    const Parameter<T>* p = first_bad(q->weight_step_params());
    if (!p) p = first_bad(q->act_params());
    if (!p) p = first_bad(q->rounding_params());
    if (p) return fmt::format("the learned parameter {} of layer {}", p->name, q->name());
  }
  for (const Parameter<T>* p : norms)
    if (!detail::all_finite(p->value)) return fmt::format("the learned norm weight {}", p->name);
  return {};
}

// Where a non-finite loss comes from: a learned parameter, or the first linear input / block
// output along the window's forward on this sample.
template <class Model, class T>
std::string locate_non_finite(PassUnits<Model>& units, const Window& w, const Tensor<T>& x,
                              const std::vector<QuantLinear<T>*>& active) {
  Model& model = units.model();
  if (std::string bad = first_non_finite_parameter(active); !bad.empty()) return bad;
  Tape<T> tape(model.device());
  NoGrad<T> off(tape);
  std::string where;
  int64_t unit = w.first;
  BlockContext<T> ctx;
  ctx.on_linear_input = [&](const LinearLayer<T>& layer, const Tensor<T>& in) {
    if (where.empty() && !detail::all_finite(in))
      where = fmt::format("the input of layer layers.{}.{} ({})", units.block(unit), layer.name,
                          units.range(unit, unit));
  };
  if (!detail::all_finite(x)) return "the window's input (the quantized path)";
  Var<T> y = tape.constant(x.device() == model.device() ? x : x.to(model.device()));
  for (; unit <= w.last && where.empty(); ++unit) {
    y = units.forward(tape, unit, y, ctx);
    if (where.empty() && !detail::all_finite(y.value()))
      where = fmt::format("the output of {}", units.range(unit, unit));
  }
  return where.empty()
             ? std::string(
                   "none in the block outputs (the squared error or the KL term overflowed)")
             : where;
}

}  // namespace cbq
