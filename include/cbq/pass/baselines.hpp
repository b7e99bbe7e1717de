#pragma once
// The baselines every PTQ method is compared with, applied to a whole model block by block:
//   RTN  — round-to-nearest with min/max steps (weights), min/max static or per-token dynamic
//          activation quantizers;
//   GPTQ — Frantar et al. 2022 for the weights, run as the reference (IST-DASLab/gptq llama.py
//          with --true-sequential): each layer is quantized from the Hessian of its input on the
//          quantized path — the blocks before and the layers of its block that come earlier in
//          the forward pass already quantized; the block's output for the next block is computed
//          with the whole block quantized. GPTQ itself is weight-only; for WxA<16 configurations
//          its weights are paired with the same min/max activation quantizers as RTN (how W4A8/W4A4
//          "GPTQ" rows are usually made).
// Both install hardened QuantLinear transforms, as the CBQ pass does, so the model evaluates the
// quantized weights afterwards.
#include <chrono>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "cbq/pass/pass.hpp"
#include "cbq/quant/gptq.hpp"
#include "cbq/quant/rtn.hpp"

namespace cbq {

enum class Baseline { rtn, gptq };

// The GPTQ baseline over a whole model.
struct GptqBaselineOptions {
  quant::GptqOptions layer;  // per layer: dampening, block size, act-order, static groups
  // true (the reference's --true-sequential, which its published LLaMA numbers use): a block's
  // layers are quantized in the order of their inputs — the block's activation sites, for LLaMA
  // q/k/v, then o_proj, then gate/up, then down_proj — and each group's Hessians come from the
  // block run with the groups before it already quantized. false: every layer's Hessian from the
  // unquantized block (the reference's default).
  bool true_sequential = true;
  // Called after each layer is quantized with its name, Hessian and result (reports, checks).
  std::function<void(const std::string&, const Tensor<double>&, const quant::GptqResult&)> on_layer;

  GptqBaselineOptions() = default;
  GptqBaselineOptions(const quant::GptqOptions& layer_options)  // NOLINT: implicit on purpose
      : layer(layer_options) {}
};

namespace detail {
// Groups of linear-layer indices (into block.linears()) in the order GPTQ quantizes them:
// one group per activation site (the layers reading the same input), in forward order; layers
// no site lists form a last group.
template <TransformerBlock Block>
std::vector<std::vector<size_t>> sequential_groups(Block& block) {
  const auto linears = block.linears();
  std::vector<std::vector<size_t>> groups;
  std::vector<bool> seen(linears.size(), false);
  for (const auto& site : block.activation_sites()) {
    std::vector<size_t> g;
    for (const auto* consumer : site.consumers)
      for (size_t j = 0; j < linears.size(); ++j)
        if (linears[j] == consumer) {
          CBQ_CHECK(!seen[j], "GPTQ: layer {} of block {} reads two activation sites",
                    linears[j]->name, block.index());
          seen[j] = true;
          g.push_back(j);
        }
    if (!g.empty()) groups.push_back(std::move(g));
  }
  std::vector<size_t> rest;
  for (size_t j = 0; j < linears.size(); ++j)
    if (!seen[j]) rest.push_back(j);
  if (!rest.empty()) groups.push_back(std::move(rest));
  return groups;
}
}  // namespace detail

template <TransformerBlock Block>
QuantizationResult quantize_baseline(Transformer<Block>& model, Baseline method,
                                     const PassSpec& spec,
                                     std::vector<Tensor<typename Block::scalar_type>> x,
                                     const GptqBaselineOptions& gptq = {}, bool verbose = true) {
  using T = typename Block::scalar_type;
  const auto start = std::chrono::steady_clock::now();
  spec.weight.validate(method == Baseline::rtn ? "RTN" : "GPTQ");
  QuantizationResult result;
  result.method = method == Baseline::rtn ? "rtn" : "gptq";
  result.config = spec.describe_quantizer();
  if (method == Baseline::gptq) {
    if (gptq.layer.act_order) result.config += " act-order";
    if (gptq.layer.static_groups) result.config += " static-groups";
    if (!gptq.true_sequential) result.config += " not true-sequential";
  }
  QuantLinearConfig config = spec.layer_config();
  config.rounding = RoundingKind::nearest;  // the weights come from RTN / GPTQ
  const bool need_data = method == Baseline::gptq || config.act_mode == ActMode::static_per_tensor;
  if (model.num_blocks() > 0) spec.check_act_layers(model.blocks[0]);
  CBQ_CHECK(!need_data || !x.empty(), "{}: calibration data is required", result.method);
  for (int64_t b = 0; b < model.num_blocks(); ++b) {
    auto linears = model.blocks[b].linears();
    std::vector<std::vector<size_t>> groups;
    if (method == Baseline::gptq && gptq.true_sequential) {
      groups = detail::sequential_groups(model.blocks[b]);
    } else {
      groups.emplace_back(linears.size());
      std::iota(groups.back().begin(), groups.back().end(), size_t{0});
    }
    std::vector<LayerResult> block_results(linears.size());
    for (const std::vector<size_t>& group : groups) {
      // Statistics of the group's layer inputs on the quantized path: the blocks before and the
      // groups of this block quantized earlier compute with their quantizers.
      std::vector<quant::MinMaxObserver<T>> ranges(linears.size());
      std::vector<std::unique_ptr<quant::HessianAccumulator>> hessians(linears.size());
      for (size_t j : group) {
        ranges[j].name = fmt::format("layers.{}.{} input", b, linears[j]->name);
        if (method == Baseline::gptq)
          hessians[j] = std::make_unique<quant::HessianAccumulator>(
              linears[j]->in_features(), fmt::format("layers.{}.{}", b, linears[j]->name));
      }
      if (need_data) {
        BlockContext<T> ctx;
        ctx.on_linear_input = [&](const LinearLayer<T>& layer, const Tensor<T>& in) {
          for (size_t j : group) {
            if (linears[j] != &layer) continue;
            ranges[j].observe(in);
            if (hessians[j]) hessians[j]->add_batch(in);
          }
        };
        for (const Tensor<T>& xi : x) model.run_block(b, xi, ctx);
      }
      for (size_t j : group) {
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
          const Tensor<double> h = hessians[j]->hessian();
          CBQ_CHECK(hessians[j]->rows() > 0, "gptq({}): the layer saw no calibration rows", name);
          quant::GptqResult g = quant::gptq_quantize(w, h, spec.weight, gptq.layer, name);
          if (gptq.on_layer) gptq.on_layer(name, h, g);
          q->set_result(std::move(g.weight));
        }
        if (layer_config.act_mode == ActMode::static_per_tensor)
          q->init_activation_range(ranges[j].min, ranges[j].max);
        layer->transform = q;
        block_results[j] =
            LayerResult{name, q->result(), q->act_scale(), q->act_zero(), q->act_clip_logit()};
      }
    }
    for (LayerResult& r : block_results) result.layers.push_back(std::move(r));
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
