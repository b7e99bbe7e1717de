#pragma once
// A GGUF file with architecture "llama" as a ModelConfig and float weights under Hugging Face
// names (dequantized). Bytes only: building the Transformer and its tokenizer is model/load.hpp's.
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/model_config.hpp"
#include "cbq/formats/gguf.hpp"

namespace cbq::io {

struct GgufLlama {
  ModelConfig config;
  WeightMap weights;                                // Hugging Face names, dequantized to float
  std::map<std::string, std::string> tensor_types;  // GGUF name → "Q4_0", ...
  std::vector<std::string> notes;
};

namespace detail {

// f32 metadata widened through its shortest decimal form (1e-5f → 1e-5), so configs written
// from decimal values come back as they were.
inline double widen_f32(double v) {
  const float f = static_cast<float>(v);
  return std::stod(fmt::format("{}", f));
}

}  // namespace detail

// The config of a GGUF LLaMA from its metadata and the token embedding's shape (no tensor data
// is read).
inline ModelConfig gguf_llama_config(const GgufFile& f) {
  const std::string& path = f.path();
  const std::string arch = f.get<std::string>("general.architecture");
  CBQ_CHECK(arch == "llama",
            "{}: GGUF architecture '{}' is not supported (cbq reads architecture 'llama')", path,
            arch);
  auto key = [&](const char* k) { return arch + "." + k; };
  if (const GgufValue* s = f.find(key("rope.scaling.type")))
    CBQ_CHECK(s->type() == GgufType::string && s->as_string() == "none",
              "{}: RoPE scaling is not supported by cbq's LLaMA block", path);
  CBQ_CHECK(f.get_or<int64_t>(key("expert_count"), 0) == 0,
            "{}: mixture-of-experts models are not supported", path);
  ModelConfig c;
  c.family = Family::llama;
  c.architecture = f.get_or<std::string>("cbq.architecture", "gguf");
  c.dim = f.get<int64_t>(key("embedding_length"));
  c.hidden_dim = f.get<int64_t>(key("feed_forward_length"));
  c.n_layers = f.get<int64_t>(key("block_count"));
  c.n_heads = f.get<int64_t>(key("attention.head_count"));
  c.n_kv_heads = f.get_or<int64_t>(key("attention.head_count_kv"), c.n_heads);
  c.max_seq_len = f.get<int64_t>(key("context_length"));
  CBQ_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 &&
                c.max_seq_len > 0 && c.n_layers <= 100000,
            "{}: invalid dimensions (embedding {}, FFN {}, blocks {}, heads {}/{}, context {})",
            path, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.max_seq_len);
  CBQ_CHECK(c.n_heads % c.n_kv_heads == 0, "{}: {} KV heads do not divide {} heads", path,
            c.n_kv_heads, c.n_heads);
  if (f.find(key("attention.key_length"))) {
    c.head_dim = f.get<int64_t>(key("attention.key_length"));
    CBQ_CHECK(f.get_or<int64_t>(key("attention.value_length"), c.head_dim) == c.head_dim,
              "{}: different key and value head sizes are not supported", path);
  } else {
    CBQ_CHECK(c.dim % c.n_heads == 0, "{}: {} heads do not divide the embedding length {}", path,
              c.n_heads, c.dim);
    c.head_dim = c.dim / c.n_heads;
  }
  CBQ_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, "{}: head size {} must be even and positive",
            path, c.head_dim);
  // Products of these (heads × head size, FFN × embedding) are formed before any tensor shape is
  // compared: bound them so that they cannot overflow int64.
  for (int64_t v : {c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.max_seq_len})
    CBQ_CHECK(v <= INT32_MAX, "{}: dimension {} is too large (at most 2^31 - 1)", path, v);
  const int64_t rot = f.get_or<int64_t>(key("rope.dimension_count"), c.head_dim);
  CBQ_CHECK(rot == c.head_dim,
            "{}: rope.dimension_count {} differs from the head size {} (partial rotary embeddings "
            "are not supported)",
            path, rot, c.head_dim);
  c.norm_eps = detail::widen_f32(f.get<double>(key("attention.layer_norm_rms_epsilon")));
  c.rope_theta = f.find(key("rope.freq_base"))
                     ? detail::widen_f32(f.get<double>(key("rope.freq_base")))
                     : 10000.0;
  c.rope_layout = RopeLayout::interleaved;
  const GgufTensorInfo& embd = f.tensor("token_embd.weight");
  CBQ_CHECK(embd.ne.size() == 2 && embd.ne[0] == c.dim,
            "{}: token_embd.weight has ne = [{}], expected [{}, vocab]", path,
            fmt::join(embd.ne, ", "), c.dim);
  c.vocab_size = embd.ne[1];
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  c.attention_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.mlp_bias = f.find_tensor("blk.0.ffn_gate.bias") != nullptr;
  c.bos_id = static_cast<int32_t>(f.get_or<int64_t>("tokenizer.ggml.bos_token_id", 1));
  c.eos_id = static_cast<int32_t>(f.get_or<int64_t>("tokenizer.ggml.eos_token_id", 2));

  return c;
}

// Reads a GGUF LLaMA (architecture "llama": as written by export_gguf, llama.cpp's converters or
// llama-quantize with F32/F16/BF16/Q4_0/Q4_1/Q8_0 tensors) into a config and float weights under
// Hugging Face names, RoPE layout interleaved (the vocabulary: tokenizer/gguf_tokenizer.hpp). FFN
// padding written by export_gguf is removed again (cbq.feed_forward_length_unpadded) when the
// padded entries are zero. A tensor that dequantizes to a NaN or Inf is refused, naming it and the
// block.
inline GgufLlama read_gguf_llama(const GgufFile& f) {
  const std::string& path = f.path();
  GgufLlama out;
  out.config = gguf_llama_config(f);
  ModelConfig& c = out.config;
  std::map<std::string, bool> used;
  auto take = [&](const std::string& gguf, const std::string& hf, const Shape& shape) {
    const GgufTensorInfo& t = f.tensor(gguf);
    CBQ_CHECK(t.shape() == shape, "{}: tensor '{}' has shape {} (ne = [{}]), expected {}", path,
              gguf, t.shape(), fmt::join(t.ne, ", "), shape);
    out.weights[hf] = f.to_float(gguf);
    // A NaN/Inf block scale (or minimum) makes its whole block non-finite: name the block.
    const Tensor<float>& w = out.weights[hf];
    for (int64_t i = 0; i < w.numel(); ++i)
      if (!std::isfinite(w.data()[i])) {
        const int64_t block = ggml_traits(t.type).block;
        fail("{}: tensor '{}' ({}) holds a non-finite value ({}) at element {}{}", path, gguf,
             ggml_type_name(t.type), w.data()[i], i,
             block > 1 ? fmt::format(" (block {}: its scale or minimum is not finite)", i / block)
                       : std::string());
      }
    out.tensor_types[gguf] = ggml_type_name(t.type);
    used[gguf] = true;
  };
  const int64_t d = c.dim, F = c.hidden_dim, q = c.n_heads * c.head_dim,
                kv = c.n_kv_heads * c.head_dim, V = c.vocab_size;
  take("token_embd.weight", "model.embed_tokens.weight", {V, d});
  take("output_norm.weight", "model.norm.weight", {d});
  if (!c.tied_embeddings) take("output.weight", "lm_head.weight", {V, d});
  for (int64_t b = 0; b < c.n_layers; ++b) {
    const std::string g = fmt::format("blk.{}.", b);
    const std::string h = fmt::format("model.layers.{}.", b);
    take(g + "attn_norm.weight", h + "input_layernorm.weight", {d});
    take(g + "ffn_norm.weight", h + "post_attention_layernorm.weight", {d});
    take(g + "attn_q.weight", h + "self_attn.q_proj.weight", {q, d});
    take(g + "attn_k.weight", h + "self_attn.k_proj.weight", {kv, d});
    take(g + "attn_v.weight", h + "self_attn.v_proj.weight", {kv, d});
    take(g + "attn_output.weight", h + "self_attn.o_proj.weight", {d, q});
    take(g + "ffn_gate.weight", h + "mlp.gate_proj.weight", {F, d});
    take(g + "ffn_up.weight", h + "mlp.up_proj.weight", {F, d});
    take(g + "ffn_down.weight", h + "mlp.down_proj.weight", {d, F});
    if (c.attention_bias) {
      take(g + "attn_q.bias", h + "self_attn.q_proj.bias", {q});
      take(g + "attn_k.bias", h + "self_attn.k_proj.bias", {kv});
      take(g + "attn_v.bias", h + "self_attn.v_proj.bias", {kv});
    }
    if (c.mlp_bias) {
      take(g + "ffn_gate.bias", h + "mlp.gate_proj.bias", {F});
      take(g + "ffn_up.bias", h + "mlp.up_proj.bias", {F});
      take(g + "ffn_down.bias", h + "mlp.down_proj.bias", {d});
    }
    CBQ_CHECK(!f.find_tensor(g + "attn_output.bias"),
              "{}: attn_output.bias is not supported by cbq's LLaMA block", path);
  }
  for (const GgufTensorInfo& t : f.tensors())
    CBQ_CHECK(used.count(t.name), "{}: tensor '{}' is not part of a cbq LLaMA model", path, t.name);

  // Remove export_gguf's FFN padding when it is all zeros.
  if (f.find("cbq.feed_forward_length_unpadded")) {
    const int64_t F0 = f.get<int64_t>("cbq.feed_forward_length_unpadded");
    CBQ_CHECK(F0 > 0 && F0 <= F, "{}: cbq.feed_forward_length_unpadded = {} with FFN {}", path, F0,
              F);
    bool zero = true;
    for (int64_t b = 0; b < c.n_layers && zero; ++b) {
      const std::string h = fmt::format("model.layers.{}.mlp.", b);
      for (const char* n : {"gate_proj", "up_proj"}) {
        const Tensor<float>& t = out.weights.at(h + n + ".weight");
        for (int64_t i = F0 * d; i < F * d; ++i) zero = zero && t[i] == 0.0f;
        if (c.mlp_bias) {
          const Tensor<float>& bias = out.weights.at(h + n + ".bias");
          for (int64_t i = F0; i < F; ++i) zero = zero && bias[i] == 0.0f;
        }
      }
      const Tensor<float>& down = out.weights.at(h + "down_proj.weight");
      for (int64_t r = 0; r < d; ++r)
        for (int64_t k = F0; k < F; ++k) zero = zero && down[r * F + k] == 0.0f;
    }
    if (zero && F0 < F) {
      for (int64_t b = 0; b < c.n_layers; ++b) {
        const std::string h = fmt::format("model.layers.{}.mlp.", b);
        for (const char* n :
             {"gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias"}) {
          auto it = out.weights.find(h + n);
          if (it != out.weights.end()) it->second = it->second.slice(0, 0, F0).clone();
        }
        Tensor<float>& down = out.weights.at(h + "down_proj.weight");
        Tensor<float> trimmed = Tensor<float>::empty(Shape{d, F0});
        for (int64_t r = 0; r < d; ++r)
          for (int64_t k = 0; k < F0; ++k) trimmed[r * F0 + k] = down[r * F + k];
        down = trimmed;
      }
      c.hidden_dim = F0;
    } else if (!zero) {
      out.notes.push_back(
          fmt::format("FFN padding {} → {} kept: the padded entries are not zero", F0, F));
    }
  }

  return out;
}

}  // namespace cbq::io
