#pragma once
// QuantLinear: the LinearTransform a quantization pass installs on every linear layer.
//   y = Q_x(x) · Ŵᵀ + b
// Q_x is the activation fake-quantizer (none, static per-tensor with a learned step, or dynamic
// per-token with a learned clipping factor). Ŵ is
//   nearest: s·(clamp(round(W/s) + z) − z) with learned steps s (LSQ),
//   lora:    s·(clamp(floor(W/s) + h(V0 + A1·A2) + z) − z)  (LoRA-Rounding),
//   full:    s·(clamp(floor(W/s) + h(V) + z) − z), V a full (out, in) matrix (AdaRound),
// until harden() fixes the rounding: then Ŵ is the constant dequantized integer weight.
// With a fixed grid (QuantLinearConfig::fixed_grid) the integer part is computed with the
// starting steps s₀ and the learned steps scale it: Ŵ = (s/s₀)·s₀·(clamp(floor(W/s₀) + h + z) − z),
// so learning s never re-rounds a weight (the codes move only through h).
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cbq/model/linear_layer.hpp"
#include "cbq/ops/matmul.hpp"
#include "cbq/ops/mul.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/device_support.hpp"
#include "cbq/quant/act_quant.hpp"
#include "cbq/quant/fake_quant.hpp"
#include "cbq/quant/lora_rounding.hpp"

namespace cbq {

enum class ActMode { none, static_per_tensor, dynamic_per_token };

struct QuantLinearConfig {
  quant::GridSpec weight;
  int act_bits = 16;
  bool act_symmetric = false;
  ActMode act_mode = ActMode::none;
  RoundingKind rounding = RoundingKind::lora;
  int64_t rank = 5;
  quant::LoraInit lora_init;
  bool lsq_grad_scale = true;
  // AdaRound start only: recompute V0 from the current steps before every forward, so h(V0)
  // stays the fractional part of W/s while s learns (a frozen V0 encodes the initial s only).
  bool v0_tracks_step = true;
  // soft: h(V) in the forward; hard_ste: the integer weight in the forward, gradients of soft.
  quant::RoundingMode rounding_mode = quant::RoundingMode::soft;
  // The integer grid stays at the starting steps; the learned steps scale it (see above).
  bool fixed_grid = false;
};

template <class T>
class QuantLinear final : public LinearTransform<T> {
 public:
  // `weight` is the (possibly CFP-truncated) weight to quantize; `name` is unique in the model
  // ("layers.3.q_proj") and names the parameters in messages. The steps and zero-points start
  // at min/max of `weight`, or at `start`'s (a GPTQ solution whose `weight` is the compensated
  // weight GPTQ rounded; `weight_replaced` marks it so checkpoints keep it).
  QuantLinear(std::string name, const Tensor<T>& weight, const QuantLinearConfig& config,
              const quant::QuantizedWeight* start = nullptr, bool weight_replaced = false)
      : name_(std::move(name)),
        config_(config),
        W_(weight.clone()),
        weight_replaced_(weight_replaced) {
    config_.weight.validate(name_.c_str());
    Tensor<T> s, z;
    if (start) {
      const Shape grid = config_.weight.param_shape(W_.size(0), W_.size(1));
      CBQ_CHECK(start->scale.shape() == grid && start->zero.shape() == grid,
                "{}: starting steps {} / zero-points {} do not match the grid {} of weight {}",
                name_, start->scale.shape(), start->zero.shape(), grid, W_.shape());
      s = cast_from_float(start->scale);
      z = cast_from_float(start->zero);
      for (int64_t i = 0; i < s.numel(); ++i)
        CBQ_CHECK(std::isfinite(static_cast<double>(s[i])) && s[i] > T(0),
                  "{}: starting step {} is {} (must be positive and finite)", name_, i,
                  static_cast<double>(s[i]));
      if (!W_.is_cpu()) {
        s = s.to(W_.device());
        z = z.to(W_.device());
      }
    } else {
      quant::init_minmax(W_, config_.weight, s, z);
    }
    w_scale_ = Parameter<T>(name_ + ".w_scale", s);
    w_scale_init_ = s.clone();
    w_scale_floor_ = s.to(Device::cpu);  // every tensor below lives on the weight's device
    for (int64_t i = 0; i < s.numel(); ++i) w_scale_floor_[i] *= static_cast<T>(kMinStepFraction);
    if (!W_.is_cpu()) w_scale_floor_ = w_scale_floor_.to(W_.device());
    // all-zero when symmetric
    w_zero_ = config_.weight.symmetric ? Tensor<T>(s.shape(), W_.device()) : z;
    const int64_t rows = W_.size(0), cols = W_.size(1);
    if (config_.fixed_grid) init_fixed_grid(s);
    switch (config_.rounding) {
      case RoundingKind::lora:
        lora_ = quant::init_lora_rounding(name_, W_, w_scale_.value, w_zero_, config_.weight,
                                          config_.rank, config_.lora_init);
        break;
      case RoundingKind::full:
        // V = V0 + ΔV with ΔV a full (rows, cols) parameter starting at 0; V0 as for LoRA.
        full_v_ = Parameter<T>(name_ + ".v", Tensor<T>(Shape{rows, cols}, W_.device()));
        if (config_.lora_init.start == quant::LoraStart::adaround) {
          full_v0_ = Tensor<T>(Shape{rows, cols}, W_.device());
          quant::adaround_offset(W_, w_scale_.value, config_.weight, full_v0_);
        }
        break;
      case RoundingKind::nearest:
        break;
    }
    if (config_.act_mode == ActMode::static_per_tensor) {
      act_scale_ =
          Parameter<T>(name_ + ".x_scale", Tensor<T>::full(Shape{1}, T(1)).to(W_.device()));
      act_zero_ = Tensor<T>(Shape{1}, W_.device());
    } else if (config_.act_mode == ActMode::dynamic_per_token) {
      act_clip_ = Parameter<T>(
          name_ + ".x_clip_logit",
          Tensor<T>::full(Shape{1}, static_cast<T>(quant::kDefaultClipLogit)).to(W_.device()));
    }
  }

  const std::string& name() const { return name_; }
  const QuantLinearConfig& config() const { return config_; }
  bool hardened() const { return hardened_; }

  // Overrides the forward's rounding (e.g. hard, to measure what harden() will deploy) until
  // reset with std::nullopt; the training mode is config().rounding_mode.
  void set_forward_rounding(std::optional<quant::RoundingMode> mode) { forward_mode_ = mode; }

  // Static activation step from the calibration range of this layer's input.
  void init_activation_range(T lo, T hi) {
    if (config_.act_mode != ActMode::static_per_tensor) return;
    auto p = quant::init_act_static(lo, hi, config_.act_bits, config_.act_symmetric);
    detail::set_element(act_scale_.value, 0, p.scale);
    detail::set_element(act_zero_, 0, p.zero);
    act_scale_floor_ = p.scale * static_cast<T>(kMinStepFraction);
    act_scale_init_ = Tensor<T>::full(Shape{1}, p.scale).to(W_.device());
  }
  // Per-element learning-rate scales for the step parameters: their initial values, so that
  // Adam's updates are relative to each step (see optim/adam.hpp).
  std::vector<Tensor<T>> weight_step_lr_scales() const { return {w_scale_init_}; }
  std::vector<Tensor<T>> act_lr_scales() const {
    if (config_.act_mode == ActMode::static_per_tensor)
      return {act_scale_init_.defined() ? act_scale_init_ : Tensor<T>::full(Shape{1}, T(1))};
    if (config_.act_mode == ActMode::dynamic_per_token) return {Tensor<T>::full(Shape{1}, T(1))};
    return {};
  }

  // Keeps learned steps positive after an optimiser update: no step goes below
  // kMinStepFraction of its min/max (RTN) value, which would clip 95 % of the range anyway.
  void project_steps() {
    if (!W_.is_cpu()) {  // one kernel per tensor, no copy
      detail::clamp_min(w_scale_.value, w_scale_floor_, T(0), "QuantLinear::project_steps");
      if (act_scale_.value.defined())
        detail::clamp_min(act_scale_.value, Tensor<T>(), act_scale_floor_,
                          "QuantLinear::project_steps");
      return;
    }
    for (int64_t i = 0; i < w_scale_.value.numel(); ++i)
      w_scale_.value[i] = std::max(w_scale_.value[i], w_scale_floor_[i]);
    if (act_scale_.value.defined())
      act_scale_.value[0] = std::max(act_scale_.value[0], act_scale_floor_);
  }

  Var<T> forward(Tape<T>& tape, LinearLayer<T>& layer, Var<T> x,
                 TransformLosses<T>* losses) override {
    const ops::LinearArgs<T> a = *linear_args(tape, layer, x, losses);
    return ops::linear(a.x, a.w, a.b);
  }
  // With losses->rounding_beta > 0 the weight comes with its rounding regulariser at that β
  // (soft_weight), added to losses->rounding.
  std::optional<ops::LinearArgs<T>> linear_args(Tape<T>& tape, LinearLayer<T>& layer, Var<T> x,
                                                TransformLosses<T>* losses) override {
    Var<T> xq = quantize_input(tape, x);
    Var<T> w;
    if (hardened_) {
      w = tape.constant(W_hard_);
    } else {
      const bool with_reg = losses && losses->rounding_beta > T(0);
      quant::SoftWeight<T> sw =
          soft_weight(tape, with_reg ? std::optional<T>(losses->rounding_beta) : std::nullopt);
      w = sw.weight;
      if (with_reg && sw.regularizer.valid()) losses->rounding.emplace_back(this, sw.regularizer);
    }
    return ops::LinearArgs<T>{xq, w, layer.has_bias() ? tape.param(layer.bias) : Var<T>{}};
  }

  // Mean over this layer's weights of (1 − |2h − 1|^β), computed on its own (a forward asked
  // for it through TransformLosses gets the same value from the weight's kernel); an invalid
  // Var when there is no rounding to regularise (nearest, or hardened).
  Var<T> rounding_regularizer(Tape<T>& tape, T beta) {
    if (hardened_) return Var<T>{};
    if (config_.rounding == RoundingKind::lora && lora_tracks())
      return quant::lora_round_reg_tracked(W_, config_.fixed_grid ? w_scale_init_ : w_scale_.value,
                                           config_.weight, tape.param(lora_.A1),
                                           tape.param(lora_.A2), beta);
    if (config_.rounding == RoundingKind::lora)
      return quant::lora_round_reg(tape.param(lora_.A1), tape.param(lora_.A2), lora_.v0(), beta);
    if (config_.rounding == RoundingKind::full && full_tracks())
      return quant::full_round_reg_tracked(W_, config_.fixed_grid ? w_scale_init_ : w_scale_.value,
                                           config_.weight, tape.param(full_v_), beta);
    if (config_.rounding == RoundingKind::full)
      return quant::full_round_reg(tape.param(full_v_), full_v0(), beta);
    return Var<T>{};
  }

  // Trainable parameters by optimiser group.
  std::vector<Parameter<T>*> weight_step_params() { return {&w_scale_}; }
  std::vector<Parameter<T>*> act_params() {
    if (config_.act_mode == ActMode::static_per_tensor) return {&act_scale_};
    if (config_.act_mode == ActMode::dynamic_per_token) return {&act_clip_};
    return {};
  }
  std::vector<Parameter<T>*> rounding_params() {
    if (config_.rounding == RoundingKind::lora) return {&lora_.A1, &lora_.A2};
    if (config_.rounding == RoundingKind::full) return {&full_v_};
    return {};
  }

  // Fixes the rounding (h := [h ≥ ½]) and freezes every parameter; the layer then computes with
  // the integer weight. Returns the codes, scales and zero-points.
  const quant::QuantizedWeight& harden() {
    if (hardened_) return result_;
    // The checks and the codes are computed on the host (a copy of the steps on the GPU).
    const Tensor<T> s = w_scale_.value.is_cpu() ? w_scale_.value : w_scale_.value.to(Device::cpu);
    for (int64_t i = 0; i < s.numel(); ++i)
      CBQ_CHECK(std::isfinite(static_cast<double>(s[i])) && s[i] > T(0),
                "{}: learned weight step {} is {} (must be positive and finite)", name_, i,
                static_cast<double>(s[i]));
    track_step();
    // The codes come from the grid's steps (the starting ones for a fixed grid), the scales are
    // the learned steps.
    const Tensor<T> g = config_.fixed_grid ? w_scale_init_.to(Device::cpu) : s;
    switch (config_.rounding) {
      case RoundingKind::lora:
        result_ = quant::harden(W_, g, w_zero_, lora_, config_.weight, lora_tracks());
        break;
      case RoundingKind::full:
        result_ = quant::harden_full(W_, g, w_zero_, full_v_.value, full_v0(), config_.weight,
                                     full_tracks());
        break;
      case RoundingKind::nearest:
        result_ = quant::quantize_weight(W_, g, w_zero_, config_.weight);
        break;
    }
    if (config_.fixed_grid) result_.scale = s.template cast<float>();
    measure_learning(s);
    freeze();
    return result_;
  }
  // How far learning moved this layer (set by harden()): the mean relative change of the weight
  // steps from their RTN values, and the fraction of codes that differ from round-to-nearest
  // with the final steps (the rounding decisions the method changed).
  double step_change() const { return step_change_; }
  double rounding_flips() const { return rounding_flips_; }
  // The fraction of codes that differ from the start's (RTN's or GPTQ's) codes (set by harden()).
  double codes_changed() const { return codes_changed_; }
  // The weight the layer started from, dequantized: RTN's, or GPTQ's for the GPTQ start.
  Tensor<T> start_weight() const {
    const Tensor<float> deq =
        quant::quantize_weight(W_, w_scale_init_, w_zero_, config_.weight).dequantize();
    Tensor<T> w;
    if constexpr (std::is_same_v<T, float>) {
      w = deq;
    } else {
      w = deq.template cast<T>();
    }
    return W_.is_cpu() ? w : w.to(W_.device());
  }
  // The relative output error ‖x(Ŵ − W)ᵀ‖² / ‖xWᵀ‖² of the start's and the final weight on the
  // layer's calibration inputs, measured by the pass after hardening (0 until then).
  void set_output_errors(double start, double final_error) {
    output_error_start_ = start;
    output_error_ = final_error;
  }
  double output_error_start() const { return output_error_start_; }
  double output_error() const { return output_error_; }
  const quant::QuantizedWeight& result() const { return result_; }
  // Fixes the layer to an integer weight computed elsewhere (RTN, GPTQ).
  void set_result(quant::QuantizedWeight qw) {
    CBQ_CHECK(qw.rows() == W_.size(0) && qw.cols() == W_.size(1),
              "{}: quantized weight ({}, {}) does not match the layer {}", name_, qw.rows(),
              qw.cols(), W_.shape());
    result_ = std::move(qw);
    freeze();
  }
  // The weight the layer computes with now (soft while training, integer after harden()).
  Tensor<T> current_weight() {
    if (hardened_) return W_hard_;
    Tape<T> tape(W_.device());
    NoGrad<T> off(tape);
    return soft_weight(tape, std::nullopt).weight.value().clone();
  }
  // Everything that defines the layer between two optimiser steps, for checkpoints
  // (pass/checkpoint.hpp): tensors and scalars by name. Restoring it into a layer constructed
  // with the same weight and configuration reproduces the layer bit for bit. The state's tensors
  // are on the host; restore() puts them on the layer's device.
  struct State {
    std::map<std::string, Tensor<T>> tensors;
    std::map<std::string, double> scalars;
  };
  State state() const {
    State st;
    auto put = [&](const char* key, const Tensor<T>& t) {
      if (t.defined()) st.tensors[key] = t.to(Device::cpu);
    };
    put("w_scale", w_scale_.value);
    put("w_scale_init", w_scale_init_);
    put("w_scale_floor", w_scale_floor_);
    put("w_zero", w_zero_);
    put("act_scale", act_scale_.value);
    put("act_scale_init", act_scale_init_);
    put("act_zero", act_zero_);
    put("act_clip", act_clip_.value);
    put("lora_a1", lora_.A1.value);
    put("lora_a2", lora_.A2.value);
    put("lora_v0", lora_.V0);
    put("full_v", full_v_.value);
    put("full_v0", full_v0_);
    if (weight_replaced_ && !hardened_) put("weight", W_);
    st.scalars["hardened"] = hardened_ ? 1 : 0;
    st.scalars["act_scale_floor"] = static_cast<double>(act_scale_floor_);
    st.scalars["step_change"] = step_change_;
    st.scalars["rounding_flips"] = rounding_flips_;
    st.scalars["codes_changed"] = codes_changed_;
    st.scalars["output_error_start"] = output_error_start_;
    st.scalars["output_error"] = output_error_;
    if (hardened_) {
      st.tensors["codes"] = result_.codes.template cast<T>();
      st.tensors["q_scale"] = cast_from_float(result_.scale);
      st.tensors["q_zero"] = cast_from_float(result_.zero);
      if (!result_.group_index.empty()) {
        Tensor<T> g = Tensor<T>::empty(Shape{static_cast<int64_t>(result_.group_index.size())});
        for (size_t i = 0; i < result_.group_index.size(); ++i)
          g[static_cast<int64_t>(i)] = static_cast<T>(result_.group_index[i]);
        st.tensors["g_idx"] = g;
      }
    }
    return st;
  }
  void restore(const State& st) {
    auto get = [&](const char* key) -> const Tensor<T>* {
      auto it = st.tensors.find(key);
      return it == st.tensors.end() ? nullptr : &it->second;
    };
    auto scalar = [&](const char* key) {
      auto it = st.scalars.find(key);
      CBQ_CHECK(it != st.scalars.end(), "{}: checkpoint state lacks '{}'", name_, key);
      return it->second;
    };
    auto optional_scalar = [&](const char* key) {  // statistics added after cbq-checkpoint-1
      auto it = st.scalars.find(key);
      return it == st.scalars.end() ? 0.0 : it->second;
    };
    auto load = [&](const char* key, Tensor<T>& dst) {
      const Tensor<T>* src = get(key);
      CBQ_CHECK((src != nullptr) == dst.defined(),
                "{}: checkpoint state {} '{}' but the layer {} (different configuration?)", name_,
                src ? "has" : "lacks", key, dst.defined() ? "has it" : "does not");
      if (!src) return;
      CBQ_CHECK(src->shape() == dst.shape(), "{}: checkpoint tensor '{}' has shape {}, expected {}",
                name_, key, src->shape(), dst.shape());
      dst = src->to(W_.device());
    };
    load("w_scale", w_scale_.value);
    load("w_scale_init", w_scale_init_);
    if (config_.fixed_grid) init_fixed_grid(w_scale_init_);  // the grid of the restored start
    load("w_scale_floor", w_scale_floor_);
    load("w_zero", w_zero_);
    load("act_scale", act_scale_.value);
    if (const Tensor<T>* t = get("act_scale_init")) act_scale_init_ = t->to(W_.device());
    load("act_zero", act_zero_);
    load("act_clip", act_clip_.value);
    act_scale_floor_ = static_cast<T>(scalar("act_scale_floor"));
    if (scalar("hardened") != 0) {
      const Tensor<T>* codes = get("codes");
      const Tensor<T>* qs = get("q_scale");
      const Tensor<T>* qz = get("q_zero");
      CBQ_CHECK(codes && qs && qz, "{}: checkpoint of a hardened layer lacks its integer weight",
                name_);
      CBQ_CHECK(codes->shape() == W_.shape(), "{}: checkpoint codes {} do not match the weight {}",
                name_, codes->shape(), W_.shape());
      quant::QuantizedWeight qw;
      qw.spec = config_.weight;
      qw.codes = Tensor<uint8_t>::empty(codes->shape());
      const T code_max = static_cast<T>((int64_t{1} << qw.spec.bits) - 1);
      for (int64_t i = 0; i < codes->numel(); ++i) {
        const T c = (*codes)[i];
        CBQ_CHECK(c == std::nearbyint(c) && c >= T(0) && c <= code_max,
                  "{}: checkpoint code {} at element {} is not an integer in [0, {}] ({} bits)",
                  name_, static_cast<double>(c), i, static_cast<double>(code_max), qw.spec.bits);
        qw.codes[i] = static_cast<uint8_t>(c);
      }
      qw.scale = qs->template cast<float>();
      qw.zero = qz->template cast<float>();
      if (const Tensor<T>* g = get("g_idx"))
        for (int64_t i = 0; i < g->numel(); ++i)
          qw.group_index.push_back(static_cast<int32_t>((*g)[i]));
      set_result(std::move(qw));
      step_change_ = scalar("step_change");
      rounding_flips_ = scalar("rounding_flips");
      codes_changed_ = optional_scalar("codes_changed");
      output_error_start_ = optional_scalar("output_error_start");
      output_error_ = optional_scalar("output_error");
      return;
    }
    load("lora_a1", lora_.A1.value);
    load("lora_a2", lora_.A2.value);
    load("lora_v0", lora_.V0);
    load("full_v", full_v_.value);
    load("full_v0", full_v0_);
    if (const Tensor<T>* w = get("weight")) {  // a replaced (GPTQ-compensated) weight
      CBQ_CHECK(w->shape() == W_.shape(), "{}: checkpoint weight {} does not match the layer's {}",
                name_, w->shape(), W_.shape());
      W_ = w->to(W_.device());
      weight_replaced_ = true;
    }
  }

  T act_scale() const {
    return act_scale_.value.defined() ? detail::element_at(act_scale_.value, 0) : T(0);
  }
  T act_zero() const { return act_zero_.defined() ? detail::element_at(act_zero_, 0) : T(0); }
  T act_clip_logit() const {
    return act_clip_.value.defined() ? detail::element_at(act_clip_.value, 0) : T(0);
  }

 private:
  quant::GridSpec act_spec() const {
    quant::GridSpec g;
    g.bits = config_.act_bits;
    g.symmetric = config_.act_symmetric;
    g.granularity = quant::Granularity::per_tensor;
    return g;
  }

  static Tensor<T> cast_from_float(const Tensor<float>& t) {
    if constexpr (std::is_same_v<T, float>) {
      return t.clone();
    } else {
      return t.template cast<T>();
    }
  }

  Var<T> quantize_input(Tape<T>& tape, Var<T> x) {
    switch (config_.act_mode) {
      case ActMode::static_per_tensor:
        return quant::fake_quant_act_static(x, tape.param(act_scale_), act_zero_, act_spec(),
                                            config_.lsq_grad_scale);
      case ActMode::dynamic_per_token:
        return quant::fake_quant_act_per_token(x, tape.param(act_clip_), act_spec());
      case ActMode::none:
      default:
        return x;
    }
  }

  // LoRA or full rounding with V0 following the steps: the kernels recompute V0 from s themselves.
  bool lora_tracks() const { return config_.v0_tracks_step && lora_.V0.defined(); }
  bool full_tracks() const { return config_.v0_tracks_step && full_v0_.defined(); }
  const Tensor<T>* full_v0() const { return full_v0_.defined() ? &full_v0_ : nullptr; }
  // Brings the stored V0 = h⁻¹(W/s − floor(W/s)) in step with the current s (see v0_tracks_step)
  // before hardening; the kernels that track the step recompute V0 and never read the stored
  // one, which between hardenings (and in checkpoints) holds the start's.
  // (A fixed grid's V0 belongs to the starting steps and never moves.)
  void track_step() {
    if (!config_.v0_tracks_step || config_.fixed_grid) return;
    if (config_.rounding == RoundingKind::lora && lora_.V0.defined())
      quant::adaround_offset(W_, w_scale_.value, config_.weight, lora_.V0);
    if (config_.rounding == RoundingKind::full && full_v0_.defined())
      quant::adaround_offset(W_, w_scale_.value, config_.weight, full_v0_);
  }
  // The steps the integer grid is computed with: the learned ones, or the start's when fixed.
  Var<T> grid_steps(Tape<T>& tape) {
    return config_.fixed_grid ? tape.constant(w_scale_init_) : tape.param(w_scale_);
  }
  // Fixed grid: the per-element factor s/s₀ as (rows, cols), from the (rows, groups) or (1, 1)
  // steps through constant 0/1 expansion matrices (matmuls, so every device has it).
  void init_fixed_grid(const Tensor<T>& s0) {
    const int64_t rows = W_.size(0), cols = W_.size(1);
    const quant::GridSpec& g = config_.weight;
    Tensor<T> inv = s0.to(Device::cpu).clone();
    for (int64_t i = 0; i < inv.numel(); ++i) inv[i] = T(1) / inv[i];
    const int64_t groups = g.param_shape(rows, cols).cols();
    Tensor<T> cols_of = Tensor<T>(Shape{groups, cols});
    for (int64_t c = 0; c < cols; ++c)
      cols_of(g.granularity == quant::Granularity::per_group ? c / g.group_cols(cols) : 0, c) =
          T(1);
    inv_start_step_ = W_.is_cpu() ? inv : inv.to(W_.device());
    group_columns_ = W_.is_cpu() ? cols_of : cols_of.to(W_.device());
    if (g.granularity == quant::Granularity::per_tensor)
      tensor_rows_ = Tensor<T>::full(Shape{rows, 1}, T(1)).to(W_.device());
  }
  Var<T> grid_factor(Tape<T>& tape) {
    Var<T> ratio = ops::mul(tape.param(w_scale_), tape.constant(inv_start_step_));
    if (tensor_rows_.defined()) ratio = ops::matmul(tape.constant(tensor_rows_), ratio);
    return ops::matmul(ratio, tape.constant(group_columns_));
  }
  // Ŵ, and with reg_beta its rounding regulariser at that β (none for nearest rounding).
  quant::SoftWeight<T> soft_weight(Tape<T>& tape, std::optional<T> reg_beta) {
    quant::SoftWeight<T> sw = grid_weight(tape, reg_beta);
    if (config_.fixed_grid) sw.weight = ops::mul(sw.weight, grid_factor(tape));
    return sw;
  }
  // Ŵ on the grid's steps (the learned ones, or for a fixed grid the start's, then scaled).
  quant::SoftWeight<T> grid_weight(Tape<T>& tape, std::optional<T> reg_beta) {
    const Tensor<T>& zero = w_zero_;
    const quant::RoundingMode mode = forward_mode_.value_or(config_.rounding_mode);
    switch (config_.rounding) {
      case RoundingKind::lora: {
        if (reg_beta) {
          const quant::RegularizerSpec<T> reg{*reg_beta, quant::Normalisation::mean};
          if (lora_tracks())
            return quant::lora_soft_weight_tracked_and_reg(
                W_, grid_steps(tape), zero, tape.param(lora_.A1), tape.param(lora_.A2),
                config_.weight, reg, mode, config_.lsq_grad_scale);
          return quant::lora_soft_weight_and_reg(W_, grid_steps(tape), zero, tape.param(lora_.A1),
                                                 tape.param(lora_.A2), lora_.v0(), config_.weight,
                                                 reg, mode, config_.lsq_grad_scale);
        }
        if (lora_tracks())
          return {quant::lora_soft_weight_tracked(W_, grid_steps(tape), zero, tape.param(lora_.A1),
                                                  tape.param(lora_.A2), config_.weight, mode,
                                                  config_.lsq_grad_scale),
                  Var<T>{}};
        return {quant::lora_soft_weight(W_, grid_steps(tape), zero, tape.param(lora_.A1),
                                        tape.param(lora_.A2), lora_.v0(), config_.weight, mode,
                                        config_.lsq_grad_scale),
                Var<T>{}};
      }
      case RoundingKind::full: {  // the LoRA kernels with a full ΔV (quant/lora_rounding.hpp)
        if (reg_beta) {
          const quant::RegularizerSpec<T> reg{*reg_beta, quant::Normalisation::mean};
          if (full_tracks())
            return quant::full_soft_weight_tracked_and_reg(W_, grid_steps(tape), zero,
                                                           tape.param(full_v_), config_.weight, reg,
                                                           mode, config_.lsq_grad_scale);
          return quant::full_soft_weight_and_reg(W_, grid_steps(tape), zero, tape.param(full_v_),
                                                 full_v0(), config_.weight, reg, mode,
                                                 config_.lsq_grad_scale);
        }
        if (full_tracks())
          return {quant::full_soft_weight_tracked(W_, grid_steps(tape), zero, tape.param(full_v_),
                                                  config_.weight, mode, config_.lsq_grad_scale),
                  Var<T>{}};
        return {quant::full_soft_weight(W_, grid_steps(tape), zero, tape.param(full_v_), full_v0(),
                                        config_.weight, mode, config_.lsq_grad_scale),
                Var<T>{}};
      }
      case RoundingKind::nearest:
      default:
        return {quant::fake_quant_weight(tape.constant(W_), grid_steps(tape), zero, config_.weight,
                                         config_.lsq_grad_scale),
                Var<T>{}};
    }
  }

  // Computes with result_'s integer weight from now on; nothing trains any more.
  void freeze() {
    Tensor<float> deq = result_.dequantize();
    if constexpr (std::is_same_v<T, float>) {
      W_hard_ = deq;
    } else {
      W_hard_ = deq.template cast<T>();
    }
    if (!W_.is_cpu()) W_hard_ = W_hard_.to(W_.device());
    for (Parameter<T>* p : all_params()) p->trainable = false;
    lora_ = {};
    full_v_ = {};
    full_v0_ = {};
    hardened_ = true;
  }

  void measure_learning(const Tensor<T>& s) {  // s on the host
    const Tensor<T> init = w_scale_init_.is_cpu() ? w_scale_init_ : w_scale_init_.to(Device::cpu);
    double change = 0;
    for (int64_t i = 0; i < s.numel(); ++i)
      change += std::abs(static_cast<double>(s[i] - init[i])) / static_cast<double>(init[i]);
    step_change_ = change / static_cast<double>(s.numel());
    // Round-to-nearest on the grid's steps (for a fixed grid the start's codes)...
    const quant::QuantizedWeight nearest =
        quant::quantize_weight(W_, config_.fixed_grid ? init : s, w_zero_, config_.weight);
    // ...and the start's codes (RTN's, or GPTQ's for the GPTQ start).
    const quant::QuantizedWeight start = quant::quantize_weight(W_, init, w_zero_, config_.weight);
    int64_t flips = 0, changed = 0;
    for (int64_t i = 0; i < nearest.codes.numel(); ++i) {
      flips += nearest.codes[i] != result_.codes[i];
      changed += start.codes[i] != result_.codes[i];
    }
    const auto n = static_cast<double>(nearest.codes.numel());
    rounding_flips_ = static_cast<double>(flips) / n;
    codes_changed_ = static_cast<double>(changed) / n;
  }

  std::vector<Parameter<T>*> all_params() {
    std::vector<Parameter<T>*> all = weight_step_params();
    for (auto* p : act_params()) all.push_back(p);
    for (auto* p : rounding_params()) all.push_back(p);
    return all;
  }

  std::string name_;
  QuantLinearConfig config_;
  Tensor<T> W_;                   // (out, in), the weight being quantized
  bool weight_replaced_ = false;  // W_ is not the model's weight (GPTQ start)
  static constexpr double kMinStepFraction = 0.05;
  Parameter<T> w_scale_;
  Tensor<T> w_scale_floor_, w_scale_init_;
  Tensor<T> act_scale_init_;
  T act_scale_floor_ = T(0);
  Tensor<T> w_zero_;  // zero-points, all 0 for symmetric grids
  quant::LoraRoundingParams<T> lora_;
  Parameter<T> full_v_;  // ΔV for full rounding
  Tensor<T> full_v0_;
  Parameter<T> act_scale_;
  Tensor<T> act_zero_;
  Parameter<T> act_clip_;
  Tensor<T> inv_start_step_, group_columns_, tensor_rows_;  // fixed grid (init_fixed_grid)
  std::optional<quant::RoundingMode> forward_mode_;
  bool hardened_ = false;
  double step_change_ = 0, rounding_flips_ = 0, codes_changed_ = 0;
  double output_error_start_ = 0, output_error_ = 0;
  quant::QuantizedWeight result_;
  Tensor<T> W_hard_;
};

}  // namespace cbq
