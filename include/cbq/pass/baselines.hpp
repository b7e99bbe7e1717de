#pragma once
// The baselines every PTQ method is compared with, applied to a whole model block by block:
//   RTN  — round-to-nearest with min/max steps (weights), min/max static or per-token dynamic
//          activation quantizers;
//   GPTQ — Frantar et al. 2022 for the weights: each block's layers are quantized from Hessians
//          of their inputs on the quantized path (the blocks before are already quantized), all
//          layers of a block from the same block input (GPTQ's default, not "true sequential").
//          GPTQ itself is weight-only; for WxA<16 configurations its weights are paired with the
//          same min/max activation quantizers as RTN (how W4A8/W4A4 "GPTQ" rows are usually made).
// Both install hardened QuantLinear transforms, as the CBQ pass does, so the model evaluates the
// quantized weights afterwards.
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "cbq/pass/pass.hpp"
#include "cbq/quant/gptq.hpp"
#include "cbq/quant/rtn.hpp"

namespace cbq {

enum class Baseline { rtn, gptq };

template <TransformerBlock Block>
QuantizationResult quantize_baseline(Transformer<Block>& model, Baseline method,
                                     const PassSpec& spec,
                                     std::vector<Tensor<typename Block::scalar_type>> x,
                                     const quant::GptqOptions& gptq = {}, bool verbose = true) {
  using T = typename Block::scalar_type;
  const auto start = std::chrono::steady_clock::now();
  spec.weight.validate(method == Baseline::rtn ? "RTN" : "GPTQ");
  QuantizationResult result;
  result.method = method == Baseline::rtn ? "rtn" : "gptq";
  result.config = spec.describe_quantizer();
  QuantLinearConfig config = spec.layer_config();
  config.rounding = RoundingKind::nearest;  // the weights come from RTN / GPTQ
  const bool need_data = method == Baseline::gptq || config.act_mode == ActMode::static_per_tensor;
  if (model.num_blocks() > 0) spec.check_act_layers(model.blocks[0]);
  CBQ_CHECK(!need_data || !x.empty(), "{}: calibration data is required", result.method);
  for (int64_t b = 0; b < model.num_blocks(); ++b) {
    auto linears = model.blocks[b].linears();
    // Statistics of every layer's input on the quantized path.
    std::vector<quant::MinMaxObserver<T>> ranges;
    std::vector<quant::HessianAccumulator> hessians;
    for (auto* l : linears) {
      ranges.push_back(quant::MinMaxObserver<T>{fmt::format("layers.{}.{} input", b, l->name)});
      if (method == Baseline::gptq)
        hessians.emplace_back(l->in_features(), fmt::format("layers.{}.{}", b, l->name));
    }
    if (need_data) {
      BlockContext<T> ctx;
      ctx.full_precision = true;
      ctx.on_linear_input = [&](const LinearLayer<T>& layer, const Tensor<T>& in) {
        for (size_t j = 0; j < linears.size(); ++j) {
          if (linears[j] != &layer) continue;
          ranges[j].observe(in);
          if (method == Baseline::gptq) hessians[j].add_batch(in);
        }
      };
      for (const Tensor<T>& xi : x) model.run_block(b, xi, ctx);
    }
    for (size_t j = 0; j < linears.size(); ++j) {
      LinearLayer<T>* layer = linears[j];
      const std::string name = fmt::format("layers.{}.{}", b, layer->name);
      QuantLinearConfig layer_config = config;
      if (!spec.quantizes_input_of(layer->name)) {
        layer_config.act_bits = 16;
        layer_config.act_mode = ActMode::none;
      }
      auto q = std::make_shared<QuantLinear<T>>(name, layer->weight.value, layer_config);
      Tensor<float> w = layer->weight.value.template cast<float>();
      if (method == Baseline::rtn) {
        q->set_result(quant::rtn_quantize(w, spec.weight, name));
      } else {
        q->set_result(quant::gptq_quantize(w, hessians[j], spec.weight, gptq).weight);
      }
      if (layer_config.act_mode == ActMode::static_per_tensor)
        q->init_activation_range(ranges[j].min, ranges[j].max);
      layer->transform = q;
      result.layers.push_back(
          LayerResult{name, q->result(), q->act_scale(), q->act_zero(), q->act_clip_logit()});
    }
    if (need_data)
      for (Tensor<T>& xi : x) xi = model.run_block(b, xi);
    if (verbose)
      fmt::print("{}: block {}/{} quantized ({:.1f}s)\n", result.method, b + 1, model.num_blocks(),
                 detail::seconds_since(start));
  }
  result.seconds = detail::seconds_since(start);
  return result;
}

// Removes every installed transform: the model computes in full precision again.
template <TransformerBlock Block>
void clear_quantization(Transformer<Block>& model) {
  for (auto& b : model.blocks)
    for (auto* l : b.linears()) l->transform.reset();
}

}  // namespace cbq
