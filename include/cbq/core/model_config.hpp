#pragma once
// Hyper-parameters of a decoder-only transformer, shared by the loaders (which fill it) and the
// model code (which builds blocks from it), plus the named-weights map loaders produce.
#include <cstdint>
#include <map>
#include <string>

#include "cbq/core/tensor.hpp"

namespace cbq {

enum class Family { llama, opt };
// How RoPE pairs dimensions: llama2.c/Meta rotate adjacent pairs (2i, 2i+1); Hugging Face
// rotates (i, i + head_dim/2) ("rotate_half"), with q/k weights permuted accordingly.
enum class RopeLayout { interleaved, rotate_half };

inline const char* family_name(Family f) { return f == Family::llama ? "llama" : "opt"; }

struct ModelConfig {
  Family family = Family::llama;
  std::string architecture;  // e.g. "LlamaForCausalLM", "OPTForCausalLM", "llama2.c"
  int64_t dim = 0;           // hidden size d
  int64_t hidden_dim = 0;    // MLP inner size (intermediate_size / ffn_dim)
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;  // == n_heads without grouped-query attention
  int64_t head_dim = 0;    // usually dim / n_heads
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;  // context length
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeLayout rope_layout = RopeLayout::rotate_half;
  bool tied_embeddings = false;  // LM head shares the token embedding
  bool attention_bias = false;   // q/k/v(/o) biases (OPT: true; Qwen2-style: q/k/v only)
  bool mlp_bias = false;
  // OPT specifics
  bool opt_layer_norm_before = true;  // pre-LN (all OPT sizes except 350m)
  int64_t opt_position_offset = 2;    // OPT's learned positions are indexed by pos + 2
  int32_t bos_id = 1;
  int32_t eos_id = 2;
};

// Weights by Hugging Face name ("model.layers.0.self_attn.q_proj.weight", ...), float32 on CPU.
// Loaders of other formats (llama2.c) translate into these names.
using WeightMap = std::map<std::string, Tensor<float>>;

}  // namespace cbq
