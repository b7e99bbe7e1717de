#pragma once
// A named linear layer inside a block, and the hook through which a quantization pass replaces
// its computation (fake-quantized weights and inputs) without the block knowing about it.
#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cbq/core/tape.hpp"
#include "cbq/ops/linear.hpp"

namespace cbq {

template <class T>
class LinearLayer;
template <class T>
class LinearTransform;

// Loss terms that installed transforms give with their forward when a training loss asks for
// them (BlockContext::losses): values of that one forward, owned by the caller, not layer state.
template <class T>
struct TransformLosses {
  // > 0: every transform that rounds adaptively adds its rounding regulariser at this β.
  T rounding_beta = T(0);
  std::vector<std::pair<const LinearTransform<T>*, Var<T>>> rounding;  // in forward order
};

// Installed on a LinearLayer by a quantization pass; computes y from x in place of x·Wᵀ + b.
// `losses` (may be null) receives the loss terms the forward is asked for.
template <class T>
class LinearTransform {
 public:
  virtual ~LinearTransform() = default;
  virtual Var<T> forward(Tape<T>& tape, LinearLayer<T>& layer, Var<T> x,
                         TransformLosses<T>* losses) = 0;
  // When forward is ops::linear of some (input, weight, bias): those, so that run_linears can
  // compute several layers' products side by side. The default (none) makes it call forward.
  virtual std::optional<ops::LinearArgs<T>> linear_args(Tape<T>&, LinearLayer<T>&, Var<T>,
                                                        TransformLosses<T>*) {
    return std::nullopt;
  }
};

template <class T>
class LinearLayer {
 public:
  std::string name;     // the Hugging Face module name inside the block: "q_proj", "fc1", ...
  Parameter<T> weight;  // (out, in); frozen (not trainable) in the full-precision model
  Parameter<T> bias;    // (out,) or undefined
  // Set by a quantization pass (shared: the model owns what it evaluates with).
  std::shared_ptr<LinearTransform<T>> transform;

  LinearLayer() = default;
  LinearLayer(std::string name_, Tensor<T> w, Tensor<T> b = Tensor<T>())
      : name(std::move(name_)),
        weight(name + ".weight", std::move(w), false),
        bias(name + ".bias", std::move(b), false) {}

  bool has_bias() const { return bias.value.defined(); }
  int64_t in_features() const { return weight.value.size(1); }
  int64_t out_features() const { return weight.value.size(0); }

  // y = x · Wᵀ + b, or whatever the installed transform computes.
  Var<T> operator()(Tape<T>& tape, Var<T> x, bool full_precision = false,
                    TransformLosses<T>* losses = nullptr) {
    if (transform && !full_precision) return transform->forward(tape, *this, x, losses);
    return ops::linear(x, tape.param(weight), has_bias() ? tape.param(bias) : Var<T>{});
  }
  // The arguments of the ops::linear that operator() computes, or none when the transform does
  // not say (then call operator()).
  std::optional<ops::LinearArgs<T>> linear_args(Tape<T>& tape, Var<T> x,
                                                bool full_precision = false,
                                                TransformLosses<T>* losses = nullptr) {
    if (transform && !full_precision) return transform->linear_args(tape, *this, x, losses);
    return ops::LinearArgs<T>{x, tape.param(weight), has_bias() ? tape.param(bias) : Var<T>{}};
  }
};

// Per-call context of a block's forward pass.
template <class T>
struct BlockContext {
  int64_t pos0 = 0;  // sequence position of the first row (RoPE, learned positions)
  // Ignore installed transforms: the full-precision path of a model being quantized.
  bool full_precision = false;
  // Called with every linear layer's input before the layer runs (calibration statistics:
  // GPTQ Hessians, CFP channel maxima, activation ranges).
  std::function<void(const LinearLayer<T>&, const Tensor<T>&)> on_linear_input;
  // Where the installed transforms put the loss terms a training loss asks for (null: none).
  TransformLosses<T>* losses = nullptr;
  // Called with the attention's query and key (after RoPE), before the attention runs: ACBQ's
  // attention-map loss compares the probability maps they make (pass/window_loss.hpp).
  std::function<void(Var<T> q, Var<T> k)> on_attention;
};

template <class T>
Var<T> run_linear(Tape<T>& tape, LinearLayer<T>& layer, Var<T> x, const BlockContext<T>& ctx) {
  if (ctx.on_linear_input) ctx.on_linear_input(layer, x.value());
  return layer(tape, x, ctx.full_precision, ctx.losses);
}

// Several layers reading the same input (Q, K, V; gate and up): what run_linear gives for each
// in turn, with the products computed side by side (ops::linear_batch). Every layer's input
// hook runs before any of them computes.
template <class T, size_t N>
std::array<Var<T>, N> run_linears(Tape<T>& tape, const std::array<LinearLayer<T>*, N>& layers,
                                  Var<T> x, const BlockContext<T>& ctx) {
  std::array<Var<T>, N> out;
  std::array<ops::LinearArgs<T>, N> args;
  std::array<size_t, N> slot{};
  int batched = 0;
  for (size_t i = 0; i < N; ++i) {
    LinearLayer<T>& layer = *layers[i];
    if (ctx.on_linear_input) ctx.on_linear_input(layer, x.value());
    if (std::optional<ops::LinearArgs<T>> a =
            layer.linear_args(tape, x, ctx.full_precision, ctx.losses)) {
      args[static_cast<size_t>(batched)] = *a;
      slot[static_cast<size_t>(batched++)] = i;
    } else {
      out[i] = layer(tape, x, ctx.full_precision, ctx.losses);
    }
  }
  std::array<Var<T>, N> results;
  ops::linear_batch(args.data(), batched, results.data());
  for (int j = 0; j < batched; ++j)
    out[slot[static_cast<size_t>(j)]] = results[static_cast<size_t>(j)];
  return out;
}

}  // namespace cbq
