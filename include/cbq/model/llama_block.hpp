#pragma once
// The LLaMA block (also llama2.c, Mistral-style configs, and Qwen2-style q/k/v biases):
//   h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1))),  n1 = rmsnorm(x)
//   y = h + down_proj(silu(gate_proj(n2)) ⊙ up_proj(n2)),                   n2 = rmsnorm(h)
// With an online R4 rotation (model/rotation.hpp) the MLP activation is rotated before down_proj,
// whose weight then holds W·M: down_proj(g·M) = g·M·(W·M)ᵀ = g·Wᵀ.
#include <memory>
#include <string>
#include <vector>

#include "cbq/model/block.hpp"
#include "cbq/model/inference.hpp"
#include "cbq/model/weights.hpp"
#include "cbq/ops/add.hpp"
#include "cbq/ops/attention.hpp"
#include "cbq/ops/hadamard.hpp"
#include "cbq/ops/rmsnorm.hpp"
#include "cbq/ops/rope.hpp"
#include "cbq/ops/swiglu.hpp"

namespace cbq {

template <class T>
class LlamaBlock {
 public:
  using scalar_type = T;

  Parameter<T> input_layernorm;           // (d,)
  Parameter<T> post_attention_layernorm;  // (d,)
  LinearLayer<T> q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
  // R4: the MLP activation x ← x·M before down_proj (null: none). Set by rotate_model, which
  // also folds M into down_proj; a run-time op, so formats without it refuse the model.
  std::shared_ptr<const ops::HadamardTransform> down_proj_rotation;
  // The fitted transform of the MLP input n2 ← n2·M before gate/up (null: none), set by
  // fit_online_transforms, which folds M⁻ᵀ into gate/up; a run-time op like R4.
  std::shared_ptr<const ops::HadamardTransform> mlp_input_transform;

  LlamaBlock(const ModelConfig& config, int64_t index, const WeightMap& weights)
      : config_(config), index_(index) {
    const int64_t d = config.dim, hd = config.head_dim, f = config.hidden_dim;
    const int64_t q_out = config.n_heads * hd, kv_out = config.n_kv_heads * hd;
    const std::string p = "model.layers." + std::to_string(index) + ".";
    input_layernorm =
        Parameter<T>(p + "input_layernorm.weight",
                     take_weight<T>(weights, p + "input_layernorm.weight", {d}), false);
    post_attention_layernorm =
        Parameter<T>(p + "post_attention_layernorm.weight",
                     take_weight<T>(weights, p + "post_attention_layernorm.weight", {d}), false);
    auto lin = [&](const char* module, const char* name, int64_t out, int64_t in, bool bias) {
      const std::string base = p + module + "." + name;
      return LinearLayer<T>(name, take_weight<T>(weights, base + ".weight", {out, in}),
                            bias ? take_optional<T>(weights, base + ".bias", {out}) : Tensor<T>());
    };
    const bool ab = config.attention_bias;
    q_proj = lin("self_attn", "q_proj", q_out, d, ab);
    k_proj = lin("self_attn", "k_proj", kv_out, d, ab);
    v_proj = lin("self_attn", "v_proj", kv_out, d, ab);
    o_proj = lin("self_attn", "o_proj", d, q_out, false);
    gate_proj = lin("mlp", "gate_proj", f, d, config.mlp_bias);
    up_proj = lin("mlp", "up_proj", f, d, config.mlp_bias);
    down_proj = lin("mlp", "down_proj", d, f, config.mlp_bias);
  }

  const ModelConfig& config() const { return config_; }
  int64_t index() const { return index_; }

  // x (T, d) → (T, d): the attention half, then the FFN half.
  Var<T> forward(Tape<T>& tape, Var<T> x, const BlockContext<T>& ctx) {
    return forward_ffn(tape, forward_attention(tape, x, ctx), ctx);
  }
  // The two halves (ACBQ's sub-block units): h = x + o_proj(attn(…)), and y = h + down_proj(…).
  Var<T> forward_attention(Tape<T>& tape, Var<T> x, const BlockContext<T>& ctx) {
    const ModelConfig& c = config_;
    Var<T> n1 = ops::rmsnorm(x, tape.param(input_layernorm), c.norm_eps);
    // q (T, Hq·hd), k and v (T, Hkv·hd)
    auto [q, k, v] = run_linears<T, 3>(tape, {&q_proj, &k_proj, &v_proj}, n1, ctx);
    q = ops::rope(q, c.n_heads, c.head_dim, c.rope_layout, c.rope_theta, ctx.pos0);
    k = ops::rope(k, c.n_kv_heads, c.head_dim, c.rope_layout, c.rope_theta, ctx.pos0);
    if (ctx.on_attention) ctx.on_attention(q, k);
    Var<T> a = ops::attention(q, k, v, c.n_heads, c.n_kv_heads, c.head_dim, true);
    return ops::add(x, run_linear(tape, o_proj, a, ctx));
  }
  Var<T> forward_ffn(Tape<T>& tape, Var<T> h, const BlockContext<T>& ctx) {
    const ModelConfig& c = config_;
    Var<T> n2 = ops::rmsnorm(h, tape.param(post_attention_layernorm), c.norm_eps);
    if (mlp_input_transform) n2 = ops::hadamard(n2, mlp_input_transform);
    auto [gate, up] = run_linears<T, 2>(tape, {&gate_proj, &up_proj}, n2, ctx);
    Var<T> g = ops::swiglu(gate, up);
    if (down_proj_rotation) g = ops::hadamard(g, down_proj_rotation);
    return ops::add(h, run_linear(tape, down_proj, g, ctx));
  }

  // forward() without a tape, on the CPU (model/inference.hpp): x (T, d) becomes the block's
  // output; the intermediates live in `ws`. Installed transforms are applied; calibration hooks
  // and BlockContext::full_precision are not (evaluation only).
  void infer(InferenceWorkspace<T>& ws, Tensor<T>& x, int64_t pos0 = 0) {
    using W = InferenceWorkspace<T>;
    const ModelConfig& c = config_;
    const int64_t n = x.size(0), d = c.dim, hd = c.head_dim, f = c.hidden_dim;
    const int64_t q_width = c.n_heads * hd, kv_width = c.n_kv_heads * hd;
    Tensor<T> n1 = ws.matrix(W::kA, n, d);
    ops::CpuRmsNorm<T>::forward(n1.data(), nullptr, x.data(), input_layernorm.value.data(), n, d,
                                c.norm_eps);
    Tensor<T> q = ws.matrix(W::kB, n, q_width), k = ws.matrix(W::kC, n, kv_width),
              v = ws.matrix(W::kD, n, kv_width);
    infer_linears<T, 3>(ws, {&q_proj, &k_proj, &v_proj}, n1, {q, k, v});
    const auto tables = ops::detail::rope_tables<T>(n, hd, c.rope_theta, pos0);
    ops::CpuRope<T>::apply(q.data(), q.data(), tables.first.data(), tables.second.data(), n,
                           c.n_heads, hd, c.rope_layout, T(1), false);
    ops::CpuRope<T>::apply(k.data(), k.data(), tables.first.data(), tables.second.data(), n,
                           c.n_kv_heads, hd, c.rope_layout, T(1), false);
    Tensor<T> a = ws.matrix(W::kE, n, q_width);
    const ops::detail::AttentionDims dims{n,  c.n_heads, c.n_kv_heads,
                                          hd, true,      1.0 / std::sqrt(static_cast<double>(hd))};
    ops::CpuAttention<T>::forward(a.data(), nullptr, q.data(), k.data(), v.data(), dims.seq_len,
                                  dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.causal,
                                  static_cast<T>(dims.scale));
    Tensor<T> o = ws.matrix(W::kA, n, d);
    infer_linears<T, 1>(ws, {&o_proj}, a, {o});
    infer_add(x, o);  // h
    Tensor<T> n2 = ws.matrix(W::kA, n, d);
    ops::CpuRmsNorm<T>::forward(n2.data(), nullptr, x.data(), post_attention_layernorm.value.data(),
                                n, d, c.norm_eps);
    // The online transforms write into a buffer that is free at that point (kE: the attention
    // output; kC: up after SwiGLU), not in place: a dense transform's GEMM cannot run in place.
    if (mlp_input_transform) {
      Tensor<T> t = ws.matrix(W::kE, n, d);
      mlp_input_transform->apply(n2.data(), t.data(), n, false, false);
      n2 = t;
    }
    Tensor<T> gate = ws.matrix(W::kB, n, f), up = ws.matrix(W::kC, n, f);
    infer_linears<T, 2>(ws, {&gate_proj, &up_proj}, n2, {gate, up});
    ops::CpuSwiglu<T>::forward(gate.data(), gate.data(), up.data(), gate.numel());
    Tensor<T> g = gate;
    if (down_proj_rotation) {  // the same kernel as ops::hadamard's forward
      down_proj_rotation->apply(gate.data(), up.data(), n * f / down_proj_rotation->size(), false,
                                false);
      g = up;
    }
    Tensor<T> down = ws.matrix(W::kD, n, d);
    infer_linears<T, 1>(ws, {&down_proj}, g, {down});
    infer_add(x, down);
  }

  std::vector<LinearLayer<T>*> linears() {
    return {&q_proj, &k_proj, &v_proj, &o_proj, &gate_proj, &up_proj, &down_proj};
  }
  std::vector<Parameter<T>*> other_parameters() {
    return {&input_layernorm, &post_attention_layernorm};
  }
  // What each half holds (in the order of linears() and other_parameters()).
  std::vector<LinearLayer<T>*> attention_linears() { return {&q_proj, &k_proj, &v_proj, &o_proj}; }
  std::vector<LinearLayer<T>*> ffn_linears() { return {&gate_proj, &up_proj, &down_proj}; }
  std::vector<Parameter<T>*> attention_parameters() { return {&input_layernorm}; }
  std::vector<Parameter<T>*> ffn_parameters() { return {&post_attention_layernorm}; }

  std::vector<ActivationSite<T>> activation_sites() {
    const int64_t d = config_.dim, hd = config_.head_dim;
    const int64_t group = config_.n_heads / config_.n_kv_heads;
    std::vector<int64_t> o_to_v(static_cast<size_t>(config_.n_heads * hd));
    for (int64_t h = 0; h < config_.n_heads; ++h)
      for (int64_t i = 0; i < hd; ++i) o_to_v[h * hd + i] = (h / group) * hd + i;
    std::vector<ActivationSite<T>> sites;
    sites.push_back(
        {"attn_in", {&q_proj, &k_proj, &v_proj}, d, {}, [this](const std::vector<T>& s) {
           divide_rows<T>(input_layernorm.value, nullptr, s);
         }});
    sites.push_back({"o_proj_in",
                     {&o_proj},
                     config_.n_kv_heads * hd,
                     std::move(o_to_v),
                     [this](const std::vector<T>& s) {
                       divide_rows(v_proj.weight.value, &v_proj.bias.value, s);
                     }});
    if (!mlp_input_transform)  // a fitted transform mixes the norm's channels: no site
      sites.push_back({"mlp_in", {&gate_proj, &up_proj}, d, {}, [this](const std::vector<T>& s) {
                         divide_rows<T>(post_attention_layernorm.value, nullptr, s);
                       }});
    // silu(g) ⊙ (u / s) = (silu(g) ⊙ u) / s: scaling up_proj's rows scales down_proj's input.
    // Under R4, down_proj reads rotated channels, which no producer scale reaches: no site.
    if (!down_proj_rotation)
      sites.push_back(
          {"down_proj_in", {&down_proj}, config_.hidden_dim, {}, [this](const std::vector<T>& s) {
             divide_rows(up_proj.weight.value, &up_proj.bias.value, s);
           }});
    return sites;
  }

 private:
  ModelConfig config_;
  int64_t index_ = 0;
};

static_assert(SplitTransformerBlock<LlamaBlock<float>>);
static_assert(SplitTransformerBlock<LlamaBlock<double>>);

}  // namespace cbq
