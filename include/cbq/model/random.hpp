#pragma once
// Random weights for a ModelConfig under the Hugging Face names: for tests, benchmarks at real
// shapes (LLaMA-7B, OPT-125M) without the checkpoint, and for engines trying the pass.
#include <cmath>
#include <random>
#include <string>

#include "cbq/core/model_config.hpp"

namespace cbq {

namespace detail {
inline Tensor<float> random_tensor(const Shape& shape, std::mt19937_64& rng, double std,
                                   double mean = 0.0) {
  std::normal_distribution<double> dist(mean, std);
  Tensor<float> t = Tensor<float>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(dist(rng));
  return t;
}
}  // namespace detail

// Linear weights ~ N(0, 1/in), norm weights ~ N(1, 0.1), biases and embeddings ~ N(0, 0.1).
inline WeightMap random_weights(const ModelConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  WeightMap w;
  const int64_t d = c.dim, f = c.hidden_dim, hd = c.head_dim, V = c.vocab_size;
  const int64_t q = c.n_heads * hd, kv = c.n_kv_heads * hd;
  auto lin = [&](const std::string& name, int64_t out, int64_t in, bool bias) {
    w[name + ".weight"] = detail::random_tensor({out, in}, rng, 1.0 / std::sqrt(double(in)));
    if (bias) w[name + ".bias"] = detail::random_tensor({out}, rng, 0.1);
  };
  auto norm = [&](const std::string& name, bool bias) {
    w[name + ".weight"] = detail::random_tensor({d}, rng, 0.1, 1.0);
    if (bias) w[name + ".bias"] = detail::random_tensor({d}, rng, 0.1);
  };
  const bool opt = c.family == Family::opt;
  const std::string root = opt ? "model.decoder." : "model.";
  w[root + "embed_tokens.weight"] = detail::random_tensor({V, d}, rng, 1.0);
  if (opt)
    w[root + "embed_positions.weight"] =
        detail::random_tensor({c.max_seq_len + c.opt_position_offset, d}, rng, 0.1);
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string p = root + "layers." + std::to_string(i) + ".";
    if (opt) {
      norm(p + "self_attn_layer_norm", true);
      norm(p + "final_layer_norm", true);
      lin(p + "self_attn.q_proj", d, d, true);
      lin(p + "self_attn.k_proj", d, d, true);
      lin(p + "self_attn.v_proj", d, d, true);
      lin(p + "self_attn.out_proj", d, d, true);
      lin(p + "fc1", f, d, true);
      lin(p + "fc2", d, f, true);
    } else {
      norm(p + "input_layernorm", false);
      norm(p + "post_attention_layernorm", false);
      lin(p + "self_attn.q_proj", q, d, c.attention_bias);
      lin(p + "self_attn.k_proj", kv, d, c.attention_bias);
      lin(p + "self_attn.v_proj", kv, d, c.attention_bias);
      lin(p + "self_attn.o_proj", d, q, false);
      lin(p + "mlp.gate_proj", f, d, c.mlp_bias);
      lin(p + "mlp.up_proj", f, d, c.mlp_bias);
      lin(p + "mlp.down_proj", d, f, c.mlp_bias);
    }
  }
  if (opt) {
    norm(root + "final_layer_norm", true);
  } else {
    norm("model.norm", false);
  }
  if (!c.tied_embeddings)
    w["lm_head.weight"] = detail::random_tensor({V, d}, rng, 1.0 / std::sqrt(double(d)));
  return w;
}

// Small configurations for tests.
inline ModelConfig tiny_llama_config() {
  ModelConfig c;
  c.family = Family::llama;
  c.architecture = "test-llama";
  c.dim = 16;
  c.hidden_dim = 28;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.vocab_size = 37;
  c.max_seq_len = 32;
  c.rope_layout = RopeLayout::rotate_half;
  return c;
}
inline ModelConfig tiny_opt_config() {
  ModelConfig c = tiny_llama_config();
  c.family = Family::opt;
  c.architecture = "test-opt";
  c.n_kv_heads = c.n_heads;
  c.tied_embeddings = true;
  c.attention_bias = true;
  c.mlp_bias = true;
  c.bos_id = 2;
  return c;
}

}  // namespace cbq
