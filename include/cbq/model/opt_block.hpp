#pragma once
// The OPT block (pre-LayerNorm variant, all sizes but 350m):
//   h = x + out_proj(attn(q_proj(n1), k_proj(n1), v_proj(n1))),  n1 = layernorm(x)
//   y = h + fc2(relu(fc1(n2))),                                   n2 = layernorm(h)
// Biases everywhere; OPT scales q by head_dim^−1/2 after q_proj, which equals scaling the scores.
#include <memory>
#include <string>
#include <vector>

#include "cbq/model/block.hpp"
#include "cbq/model/inference.hpp"
#include "cbq/model/weights.hpp"
#include "cbq/ops/activations.hpp"
#include "cbq/ops/add.hpp"
#include "cbq/ops/attention.hpp"
#include "cbq/ops/hadamard.hpp"
#include "cbq/ops/layernorm.hpp"

namespace cbq {

template <class T>
class OptBlock {
 public:
  using scalar_type = T;

  Parameter<T> self_attn_layer_norm_weight, self_attn_layer_norm_bias;  // (d,)
  Parameter<T> final_layer_norm_weight, final_layer_norm_bias;          // (d,)
  LinearLayer<T> q_proj, k_proj, v_proj, out_proj, fc1, fc2;
  // R4: the FFN activation r ← r·M before fc2 (null: none). Set by rotate_model, which folds M
  // into fc2 (model/rotation.hpp).
  std::shared_ptr<const ops::HadamardTransform> fc2_rotation;
  // The fitted transform of fc1's input n2 ← n2·M (null: none), set by fit_online_transforms,
  // which folds M⁻ᵀ into fc1; a run-time op like R4.
  std::shared_ptr<const ops::HadamardTransform> fc1_input_transform;

  OptBlock(const ModelConfig& config, int64_t index, const WeightMap& weights)
      : config_(config), index_(index) {
    CBQ_CHECK(config.opt_layer_norm_before,
              "OPT: post-LayerNorm models (do_layer_norm_before = false, OPT-350m) are not "
              "supported");
    const int64_t d = config.dim, f = config.hidden_dim;
    const std::string p = "model.decoder.layers." + std::to_string(index) + ".";
    auto param = [&](const std::string& name) {
      return Parameter<T>(p + name, take_weight<T>(weights, p + name, {d}), false);
    };
    self_attn_layer_norm_weight = param("self_attn_layer_norm.weight");
    self_attn_layer_norm_bias = param("self_attn_layer_norm.bias");
    final_layer_norm_weight = param("final_layer_norm.weight");
    final_layer_norm_bias = param("final_layer_norm.bias");
    auto lin = [&](const std::string& module, const char* name, int64_t out, int64_t in) {
      const std::string base = p + module;
      return LinearLayer<T>(name, take_weight<T>(weights, base + ".weight", {out, in}),
                            config.attention_bias || config.mlp_bias
                                ? take_weight<T>(weights, base + ".bias", {out})
                                : Tensor<T>());
    };
    q_proj = lin("self_attn.q_proj", "q_proj", d, d);
    k_proj = lin("self_attn.k_proj", "k_proj", d, d);
    v_proj = lin("self_attn.v_proj", "v_proj", d, d);
    out_proj = lin("self_attn.out_proj", "out_proj", d, d);
    fc1 = lin("fc1", "fc1", f, d);
    fc2 = lin("fc2", "fc2", d, f);
  }

  const ModelConfig& config() const { return config_; }
  int64_t index() const { return index_; }

  // x (T, d) → (T, d): the attention half, then the FFN half.
  Var<T> forward(Tape<T>& tape, Var<T> x, const BlockContext<T>& ctx) {
    return forward_ffn(tape, forward_attention(tape, x, ctx), ctx);
  }
  // The two halves (ACBQ's sub-block units): h = x + out_proj(attn(…)), and y = h + fc2(…).
  Var<T> forward_attention(Tape<T>& tape, Var<T> x, const BlockContext<T>& ctx) {
    const ModelConfig& c = config_;
    Var<T> n1 = ops::layernorm(x, tape.param(self_attn_layer_norm_weight),
                               tape.param(self_attn_layer_norm_bias), c.norm_eps);
    auto [q, k, v] = run_linears<T, 3>(tape, {&q_proj, &k_proj, &v_proj}, n1, ctx);
    if (ctx.on_attention) ctx.on_attention(q, k);
    Var<T> a = ops::attention(q, k, v, c.n_heads, c.n_heads, c.head_dim, true);
    return ops::add(x, run_linear(tape, out_proj, a, ctx));
  }
  Var<T> forward_ffn(Tape<T>& tape, Var<T> h, const BlockContext<T>& ctx) {
    const ModelConfig& c = config_;
    Var<T> n2 = ops::layernorm(h, tape.param(final_layer_norm_weight),
                               tape.param(final_layer_norm_bias), c.norm_eps);
    if (fc1_input_transform) n2 = ops::hadamard(n2, fc1_input_transform);
    Var<T> r = ops::relu(run_linear(tape, fc1, n2, ctx));
    if (fc2_rotation) r = ops::hadamard(r, fc2_rotation);
    return ops::add(h, run_linear(tape, fc2, r, ctx));
  }

  // forward() without a tape, on the CPU (model/inference.hpp): x (T, d) becomes the block's
  // output; the intermediates live in `ws`. Installed transforms are applied; calibration hooks
  // and BlockContext::full_precision are not (evaluation only).
  void infer(InferenceWorkspace<T>& ws, Tensor<T>& x, int64_t /*pos0*/ = 0) {
    using W = InferenceWorkspace<T>;
    const ModelConfig& c = config_;
    const int64_t n = x.size(0), d = c.dim, hd = c.head_dim, f = c.hidden_dim;
    Tensor<T> n1 = ws.matrix(W::kA, n, d);
    ops::CpuLayerNorm<T>::forward(n1.data(), nullptr, nullptr, x.data(),
                                  self_attn_layer_norm_weight.value.data(),
                                  self_attn_layer_norm_bias.value.data(), n, d, c.norm_eps);
    Tensor<T> q = ws.matrix(W::kB, n, d), k = ws.matrix(W::kC, n, d), v = ws.matrix(W::kD, n, d);
    infer_linears<T, 3>(ws, {&q_proj, &k_proj, &v_proj}, n1, {q, k, v});
    Tensor<T> a = ws.matrix(W::kE, n, d);
    const ops::detail::AttentionDims dims{n,  c.n_heads, c.n_heads,
                                          hd, true,      1.0 / std::sqrt(static_cast<double>(hd))};
    ops::CpuAttention<T>::forward(a.data(), nullptr, q.data(), k.data(), v.data(), dims.seq_len,
                                  dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.causal,
                                  static_cast<T>(dims.scale));
    Tensor<T> o = ws.matrix(W::kA, n, d);
    infer_linears<T, 1>(ws, {&out_proj}, a, {o});
    infer_add(x, o);  // h
    Tensor<T> n2 = ws.matrix(W::kA, n, d);
    ops::CpuLayerNorm<T>::forward(n2.data(), nullptr, nullptr, x.data(),
                                  final_layer_norm_weight.value.data(),
                                  final_layer_norm_bias.value.data(), n, d, c.norm_eps);
    if (fc1_input_transform) {  // into the attention output's free buffer: a GEMM, not in place
      Tensor<T> t = ws.matrix(W::kE, n, d);
      fc1_input_transform->apply(n2.data(), t.data(), n, false, false);
      n2 = t;
    }
    Tensor<T> h1 = ws.matrix(W::kB, n, f);
    infer_linears<T, 1>(ws, {&fc1}, n2, {h1});
    T* hp = h1.data();
    parallel_for(h1.numel(), ops::kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) hp[i] = ops::detail::Relu::value(hp[i]);
    });
    if (fc2_rotation)  // the same kernel as ops::hadamard's forward
      fc2_rotation->apply(hp, hp, n * f / fc2_rotation->size(), false, false);
    Tensor<T> o2 = ws.matrix(W::kC, n, d);
    infer_linears<T, 1>(ws, {&fc2}, h1, {o2});
    infer_add(x, o2);
  }

  std::vector<LinearLayer<T>*> linears() {
    return {&q_proj, &k_proj, &v_proj, &out_proj, &fc1, &fc2};
  }
  std::vector<Parameter<T>*> other_parameters() {
    return {&self_attn_layer_norm_weight, &self_attn_layer_norm_bias, &final_layer_norm_weight,
            &final_layer_norm_bias};
  }
  // What each half holds (in the order of linears() and other_parameters()).
  std::vector<LinearLayer<T>*> attention_linears() {
    return {&q_proj, &k_proj, &v_proj, &out_proj};
  }
  std::vector<LinearLayer<T>*> ffn_linears() { return {&fc1, &fc2}; }
  std::vector<Parameter<T>*> attention_parameters() {
    return {&self_attn_layer_norm_weight, &self_attn_layer_norm_bias};
  }
  std::vector<Parameter<T>*> ffn_parameters() {
    return {&final_layer_norm_weight, &final_layer_norm_bias};
  }

  std::vector<ActivationSite<T>> activation_sites() {
    const int64_t d = config_.dim;
    std::vector<ActivationSite<T>> sites;
    sites.push_back(
        {"attn_in", {&q_proj, &k_proj, &v_proj}, d, {}, [this](const std::vector<T>& s) {
           divide_rows(self_attn_layer_norm_weight.value, &self_attn_layer_norm_bias.value, s);
         }});
    sites.push_back({"out_proj_in", {&out_proj}, d, {}, [this](const std::vector<T>& s) {
                       divide_rows(v_proj.weight.value, &v_proj.bias.value, s);
                     }});
    if (!fc1_input_transform)  // a fitted transform mixes the norm's channels: no site
      sites.push_back({"fc1_in", {&fc1}, d, {}, [this](const std::vector<T>& s) {
                         divide_rows(final_layer_norm_weight.value, &final_layer_norm_bias.value,
                                     s);
                       }});
    // relu(z / s) = relu(z) / s for s > 0: scaling fc1's rows scales fc2's input.
    // Under R4, fc2 reads rotated channels, which no producer scale reaches: no site.
    if (!fc2_rotation)
      sites.push_back({"fc2_in", {&fc2}, config_.hidden_dim, {}, [this](const std::vector<T>& s) {
                         divide_rows(fc1.weight.value, &fc1.bias.value, s);
                       }});
    return sites;
  }

 private:
  ModelConfig config_;
  int64_t index_ = 0;
};

static_assert(SplitTransformerBlock<OptBlock<float>>);

}  // namespace cbq
