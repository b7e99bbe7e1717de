#pragma once
// The block concept: what the pipeline (evaluation, calibration, the CBQ pass) needs from a
// transformer block. LLaMA and OPT satisfy it; a new family (Mistral, Qwen2, a user's own block)
// plugs in by satisfying it, without edits to the pipeline.
#include <cmath>
#include <concepts>
#include <functional>
#include <string>
#include <vector>

#include "cbq/core/model_config.hpp"
#include "cbq/model/linear_layer.hpp"

namespace cbq {

// A group of linear layers that consume the same activation, and how to fold a per-channel
// scale of that activation into the layer that produces it (CFP / SmoothQuant-style scaling):
// fold_into_producer(s) divides the producer's output channel p by s[p]; the pipeline multiplies
// consumer input column j by s[producer_channel(j)]. With grouped-query attention several query
// heads read one value head, so o_proj's input channel h·hd + i comes from v_proj's output
// channel (h / group)·hd + i: `producer_channel` holds that map (empty = identity).
template <class T>
struct ActivationSite {
  std::string name;  // e.g. "attn_in", "mlp_in", "o_proj_in", "down_proj_in"
  std::vector<LinearLayer<T>*> consumers;
  int64_t producer_channels = 0;
  std::vector<int64_t> producer_channel;  // size = consumer input channels, or empty
  std::function<void(const std::vector<T>& scale)> fold_into_producer;

  int64_t producer_of(int64_t consumer_channel) const {
    return producer_channel.empty() ? consumer_channel
                                    : producer_channel[static_cast<size_t>(consumer_channel)];
  }
};

template <class B>
concept TransformerBlock = requires(B& block, const B& cblock, Tape<typename B::scalar_type>& tape,
                                    Var<typename B::scalar_type> x,
                                    const BlockContext<typename B::scalar_type>& ctx) {
  typename B::scalar_type;
  // (T, d) → (T, d)
  { block.forward(tape, x, ctx) } -> std::same_as<Var<typename B::scalar_type>>;
  // Every linear layer, by name, in a fixed order.
  { block.linears() } -> std::same_as<std::vector<LinearLayer<typename B::scalar_type>*>>;
  // Every other parameter (norm weights/biases), which quantization leaves in full precision.
  { block.other_parameters() } -> std::same_as<std::vector<Parameter<typename B::scalar_type>*>>;
  {
    block.activation_sites()
    } -> std::same_as<std::vector<ActivationSite<typename B::scalar_type>>>;
  { cblock.config() } -> std::same_as<const ModelConfig&>;
  { cblock.index() } -> std::convertible_to<int64_t>;
};

// A block whose forward is two halves, each with its residual (ACBQ's sub-block units):
//   forward(x) = forward_ffn(forward_attention(x)),
// attention_linears() ++ ffn_linears() = linears() and attention_parameters() ++
// ffn_parameters() = other_parameters(), in order (tests/test_units.cpp checks both).
template <class B>
concept SplitTransformerBlock = TransformerBlock<B> &&
    requires(B& block, Tape<typename B::scalar_type>& tape, Var<typename B::scalar_type> x,
             const BlockContext<typename B::scalar_type>& ctx) {
  { block.forward_attention(tape, x, ctx) } -> std::same_as<Var<typename B::scalar_type>>;
  { block.forward_ffn(tape, x, ctx) } -> std::same_as<Var<typename B::scalar_type>>;
  { block.attention_linears() } -> std::same_as<std::vector<LinearLayer<typename B::scalar_type>*>>;
  { block.ffn_linears() } -> std::same_as<std::vector<LinearLayer<typename B::scalar_type>*>>;
  {
    block.attention_parameters()
    } -> std::same_as<std::vector<Parameter<typename B::scalar_type>*>>;
  { block.ffn_parameters() } -> std::same_as<std::vector<Parameter<typename B::scalar_type>*>>;
};

// A part of a block that the pass treats as one unit: the whole block (CBQ), or one half (ACBQ).
enum class BlockPart { whole, attention, ffn };

inline const char* block_part_name(BlockPart part) {
  switch (part) {
    case BlockPart::attention:
      return "attention";
    case BlockPart::ffn:
      return "ffn";
    default:
      return "block";
  }
}

namespace detail {
template <class B>
[[noreturn]] void fail_unsplit(BlockPart part) {
  fail(
      "{} unit: this block type does not expose its attention and FFN halves "
      "(cbq::SplitTransformerBlock: forward_attention, forward_ffn, attention_linears, "
      "ffn_linears, attention_parameters, ffn_parameters); use whole-block units",
      block_part_name(part));
}
}  // namespace detail

// The block's forward restricted to `part`.
template <TransformerBlock B>
Var<typename B::scalar_type> forward_part(B& block, BlockPart part,
                                          Tape<typename B::scalar_type>& tape,
                                          Var<typename B::scalar_type> x,
                                          const BlockContext<typename B::scalar_type>& ctx) {
  if (part == BlockPart::whole) return block.forward(tape, x, ctx);
  if constexpr (SplitTransformerBlock<B>) {
    return part == BlockPart::attention ? block.forward_attention(tape, x, ctx)
                                        : block.forward_ffn(tape, x, ctx);
  } else {
    detail::fail_unsplit<B>(part);
  }
}
// The linear layers of `part`, in the order of block.linears().
template <TransformerBlock B>
std::vector<LinearLayer<typename B::scalar_type>*> part_linears(B& block, BlockPart part) {
  if (part == BlockPart::whole) return block.linears();
  if constexpr (SplitTransformerBlock<B>) {
    return part == BlockPart::attention ? block.attention_linears() : block.ffn_linears();
  } else {
    detail::fail_unsplit<B>(part);
  }
}
// The other parameters (norms) of `part`, in the order of block.other_parameters().
template <TransformerBlock B>
std::vector<Parameter<typename B::scalar_type>*> part_parameters(B& block, BlockPart part) {
  if (part == BlockPart::whole) return block.other_parameters();
  if constexpr (SplitTransformerBlock<B>) {
    return part == BlockPart::attention ? block.attention_parameters() : block.ffn_parameters();
  } else {
    detail::fail_unsplit<B>(part);
  }
}

// Scales the activation at `site` by 1/s (per producer channel) while keeping the block's function
// unchanged: the producer's output channel p is divided by s[p] and every consumer's input column
// j is multiplied by s[producer_of(j)]. All s must be positive.
template <class T>
void apply_channel_scale(ActivationSite<T>& site, const std::vector<T>& s) {
  CBQ_CHECK(static_cast<int64_t>(s.size()) == site.producer_channels,
            "channel scale at '{}': {} scales for {} channels", site.name, s.size(),
            site.producer_channels);
  for (T v : s)
    CBQ_CHECK(v > T(0) && std::isfinite(static_cast<double>(v)),
              "channel scale at '{}': scale {} is not a positive finite number", site.name, v);
  site.fold_into_producer(s);
  for (LinearLayer<T>* layer : site.consumers) {
    Tensor<T>& w = layer->weight.value;  // (out, in)
    const int64_t out = w.size(0), in = w.size(1);
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) w[r * in + j] *= s[static_cast<size_t>(site.producer_of(j))];
  }
}

}  // namespace cbq
