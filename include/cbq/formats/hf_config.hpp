#pragma once
// Hugging Face checkpoints: config.json → ModelConfig (LlamaForCausalLM, MistralForCausalLM,
// OPTForCausalLM) and load_hf(dir) → config + float32 weights (model.safetensors or a sharded
// model.safetensors.index.json), every tensor checked against the shape the config implies.
// See docs/FORMATS.md.
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/mmap.hpp"
#include "cbq/core/model_config.hpp"
#include "cbq/formats/safetensors.hpp"

namespace cbq::io {

namespace detail {

class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }
  int64_t integer(const char* key, std::optional<int64_t> fallback = std::nullopt) const {
    if (!has(key)) {
      CBQ_CHECK(fallback.has_value(), "{}: required field \"{}\" is missing", source_, key);
      return *fallback;
    }
    const auto& v = j_[key];
    CBQ_CHECK(v.is_number_integer(), "{}: field \"{}\" must be an integer, got {}", source_, key,
              v.dump());
    return v.get<int64_t>();
  }
  int64_t positive(const char* key, std::optional<int64_t> fallback = std::nullopt) const {
    int64_t v = integer(key, fallback);
    CBQ_CHECK(v > 0, "{}: field \"{}\" = {} must be positive", source_, key, v);
    return v;
  }
  double number(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    const auto& v = j_[key];
    CBQ_CHECK(v.is_number(), "{}: field \"{}\" must be a number, got {}", source_, key, v.dump());
    return v.get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const auto& v = j_[key];
    CBQ_CHECK(v.is_boolean(), "{}: field \"{}\" must be true or false, got {}", source_, key,
              v.dump());
    return v.get<bool>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const auto& v = j_[key];
    CBQ_CHECK(v.is_string(), "{}: field \"{}\" must be a string, got {}", source_, key, v.dump());
    return v.get<std::string>();
  }
  // A token id that may be given as a list (first element used) or null.
  int32_t token_id(const char* key, int32_t fallback) const {
    if (!has(key)) return fallback;
    nlohmann::json v = j_[key];
    if (v.is_array()) {
      if (v.empty()) return fallback;
      v = v[0];
    }
    CBQ_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT32_MAX,
              "{}: field \"{}\" must be a token id, got {}", source_, key, j_[key].dump());
    return static_cast<int32_t>(v.get<int64_t>());
  }
  [[noreturn]] void unsupported(const char* key, const std::string& why) const {
    fail("{}: field \"{}\": {}", source_, key, why);
  }

 private:
  const nlohmann::json& j_;
  std::string source_;
};

inline nlohmann::json parse_json_file(const std::string& path) {
  std::string text = read_text_file(path);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: invalid JSON: {}", path, e.what());
  }
}

}  // namespace detail

// config.json contents → ModelConfig. `source` names the file in errors.
inline ModelConfig parse_hf_config(const nlohmann::json& j, const std::string& source) {
  CBQ_CHECK(j.is_object(), "{}: config is not a JSON object", source);
  detail::ConfigReader r(j, source);
  std::string arch;
  if (r.has("architectures")) {
    const auto& a = j["architectures"];
    CBQ_CHECK(a.is_array() && !a.empty() && a[0].is_string(),
              "{}: field \"architectures\" must be a non-empty list of strings, got {}", source,
              a.dump());
    arch = a[0].get<std::string>();
  } else {
    const std::string mt = r.string("model_type", "");
    if (mt == "llama")
      arch = "LlamaForCausalLM";
    else if (mt == "mistral")
      arch = "MistralForCausalLM";
    else if (mt == "opt")
      arch = "OPTForCausalLM";
    else
      r.unsupported("architectures", fmt::format("missing, and model_type \"{}\" is not one of "
                                                 "llama, mistral, opt",
                                                 mt));
  }
  ModelConfig c;
  c.architecture = arch;
  if (arch == "LlamaForCausalLM" || arch == "MistralForCausalLM") {
    c.family = Family::llama;
    c.dim = r.positive("hidden_size");
    c.hidden_dim = r.positive("intermediate_size");
    c.n_layers = r.positive("num_hidden_layers");
    c.n_heads = r.positive("num_attention_heads");
    c.n_kv_heads = r.positive("num_key_value_heads", c.n_heads);
    CBQ_CHECK(c.n_heads % c.n_kv_heads == 0,
              "{}: num_key_value_heads = {} does not divide num_attention_heads = {}", source,
              c.n_kv_heads, c.n_heads);
    if (!r.has("head_dim"))
      CBQ_CHECK(c.dim % c.n_heads == 0,
                "{}: num_attention_heads = {} does not divide hidden_size = {} (and no head_dim)",
                source, c.n_heads, c.dim);
    c.head_dim = r.positive("head_dim", c.dim / std::max<int64_t>(c.n_heads, 1));
    CBQ_CHECK(c.head_dim % 2 == 0, "{}: head_dim = {} must be even for RoPE", source, c.head_dim);
    c.vocab_size = r.positive("vocab_size");
    c.max_seq_len = r.positive("max_position_embeddings", 2048);
    c.norm_eps = r.number("rms_norm_eps", 1e-6);
    c.rope_theta = r.number("rope_theta", 10000.0);
    c.rope_layout = RopeLayout::rotate_half;
    c.tied_embeddings = r.boolean("tie_word_embeddings", false);
    c.attention_bias = r.boolean("attention_bias", false);
    c.mlp_bias = r.boolean("mlp_bias", false);
    c.bos_id = r.token_id("bos_token_id", 1);
    c.eos_id = r.token_id("eos_token_id", 2);
    const std::string act = r.string("hidden_act", "silu");
    if (act != "silu")
      r.unsupported("hidden_act", fmt::format("\"{}\" is not supported (silu)", act));
    if (r.has("rope_scaling"))
      r.unsupported("rope_scaling",
                    fmt::format("RoPE scaling {} is not supported", j["rope_scaling"].dump()));
    if (r.has("sliding_window")) {
      // Mistral: attention within a window; exact for contexts up to the window.
      int64_t w = r.positive("sliding_window");
      c.max_seq_len = std::min(c.max_seq_len, w);
    }
    CBQ_CHECK(c.rope_theta > 0, "{}: rope_theta = {} must be positive", source, c.rope_theta);
  } else if (arch == "OPTForCausalLM") {
    c.family = Family::opt;
    c.dim = r.positive("hidden_size");
    c.hidden_dim = r.positive("ffn_dim");
    c.n_layers = r.positive("num_hidden_layers");
    c.n_heads = r.positive("num_attention_heads");
    CBQ_CHECK(c.dim % c.n_heads == 0,
              "{}: num_attention_heads = {} does not divide hidden_size = {}", source, c.n_heads,
              c.dim);
    c.n_kv_heads = c.n_heads;
    c.head_dim = c.dim / c.n_heads;
    c.vocab_size = r.positive("vocab_size");
    c.max_seq_len = r.positive("max_position_embeddings", 2048);
    c.norm_eps = 1e-5;
    c.rope_layout = RopeLayout::rotate_half;  // unused: OPT has learned positions
    c.tied_embeddings = r.boolean("tie_word_embeddings", true);
    c.attention_bias = c.mlp_bias = r.boolean("enable_bias", true);
    c.opt_layer_norm_before = r.boolean("do_layer_norm_before", true);
    c.opt_position_offset = 2;
    c.bos_id = r.token_id("bos_token_id", 2);
    c.eos_id = r.token_id("eos_token_id", 2);
    const int64_t proj = r.positive("word_embed_proj_dim", c.dim);
    if (proj != c.dim)
      r.unsupported("word_embed_proj_dim",
                    fmt::format("{} differs from hidden_size {} (project_in/project_out, as in "
                                "opt-350m, is not supported)",
                                proj, c.dim));
    const std::string act = r.string("activation_function", "relu");
    if (act != "relu")
      r.unsupported("activation_function", fmt::format("\"{}\" is not supported (relu)", act));
    if (r.boolean("_remove_final_layer_norm", false))
      r.unsupported("_remove_final_layer_norm", "true is not supported");
    if (!r.boolean("layer_norm_elementwise_affine", true))
      r.unsupported("layer_norm_elementwise_affine", "false is not supported");
  } else {
    r.unsupported("architectures",
                  fmt::format("unsupported architecture \"{}\" (supported: LlamaForCausalLM, "
                              "MistralForCausalLM, OPTForCausalLM)",
                              arch));
  }
  return c;
}

// Reads config.json (a path to the file or to its folder).
inline ModelConfig load_hf_config(const std::string& path) {
  std::filesystem::path p(path);
  if (std::filesystem::is_directory(p)) p /= "config.json";
  return parse_hf_config(detail::parse_json_file(p.string()), p.string());
}

// Every weight the model code expects, with its shape, under Hugging Face names.
// llama: model.embed_tokens / model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
// post_attention_layernorm, mlp.{gate,up,down}_proj} / model.norm / lm_head (untied).
// opt: model.decoder.{embed_tokens, embed_positions, final_layer_norm,
// layers.{i}.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm}}
// / lm_head (untied).
inline std::map<std::string, Shape> expected_weight_shapes(const ModelConfig& c) {
  std::map<std::string, Shape> s;
  const int64_t d = c.dim, h = c.hidden_dim, V = c.vocab_size;
  if (c.family == Family::llama) {
    const int64_t q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
    s["model.embed_tokens.weight"] = {V, d};
    for (int64_t i = 0; i < c.n_layers; ++i) {
      const std::string p = fmt::format("model.layers.{}.", i);
      s[p + "input_layernorm.weight"] = {d};
      s[p + "post_attention_layernorm.weight"] = {d};
      s[p + "self_attn.q_proj.weight"] = {q, d};
      s[p + "self_attn.k_proj.weight"] = {kv, d};
      s[p + "self_attn.v_proj.weight"] = {kv, d};
      s[p + "self_attn.o_proj.weight"] = {d, q};
      if (c.attention_bias) {
        s[p + "self_attn.q_proj.bias"] = {q};
        s[p + "self_attn.k_proj.bias"] = {kv};
        s[p + "self_attn.v_proj.bias"] = {kv};
        s[p + "self_attn.o_proj.bias"] = {d};
      }
      s[p + "mlp.gate_proj.weight"] = {h, d};
      s[p + "mlp.up_proj.weight"] = {h, d};
      s[p + "mlp.down_proj.weight"] = {d, h};
      if (c.mlp_bias) {
        s[p + "mlp.gate_proj.bias"] = {h};
        s[p + "mlp.up_proj.bias"] = {h};
        s[p + "mlp.down_proj.bias"] = {d};
      }
    }
    s["model.norm.weight"] = {d};
  } else {
    const std::string D = "model.decoder.";
    s[D + "embed_tokens.weight"] = {V, d};
    s[D + "embed_positions.weight"] = {c.max_seq_len + c.opt_position_offset, d};
    if (c.opt_layer_norm_before) {
      s[D + "final_layer_norm.weight"] = {d};
      s[D + "final_layer_norm.bias"] = {d};
    }
    for (int64_t i = 0; i < c.n_layers; ++i) {
      const std::string p = fmt::format("{}layers.{}.", D, i);
      for (const char* proj : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
        s[p + "self_attn." + proj + ".weight"] = {d, d};
        if (c.attention_bias) s[p + "self_attn." + proj + ".bias"] = {d};
      }
      s[p + "fc1.weight"] = {h, d};
      s[p + "fc2.weight"] = {d, h};
      if (c.mlp_bias) {
        s[p + "fc1.bias"] = {h};
        s[p + "fc2.bias"] = {d};
      }
      for (const char* ln : {"self_attn_layer_norm", "final_layer_norm"}) {
        s[p + ln + ".weight"] = {d};
        s[p + ln + ".bias"] = {d};
      }
    }
  }
  if (!c.tied_embeddings) s["lm_head.weight"] = {V, d};
  return s;
}

struct HfModel {
  ModelConfig config;
  WeightMap weights;
};

// Loads a Hugging Face model folder: config.json plus model.safetensors or
// model.safetensors.index.json (shards). Tensors (F32/F16/BF16/F64) become float32. Every
// expected tensor must be present with its exact shape; names stored without the "model."
// prefix (base-model checkpoints, e.g. "decoder.layers.0...") are accepted. Other tensors
// (rotary inv_freq buffers, a tied lm_head) are ignored.
inline HfModel load_hf(const std::string& dir) {
  namespace fs = std::filesystem;
  CBQ_CHECK(fs::is_directory(dir), "{}: not a model folder", dir);
  HfModel m;
  m.config = load_hf_config(dir);
  if (!fs::exists(fs::path(dir) / "model.safetensors") &&
      !fs::exists(fs::path(dir) / "model.safetensors.index.json")) {
    const bool bin = fs::exists(fs::path(dir) / "pytorch_model.bin") ||
                     fs::exists(fs::path(dir) / "pytorch_model.bin.index.json");
    fail("{}: no model.safetensors or model.safetensors.index.json{}", dir,
         bin ? " (PyTorch .bin checkpoints are not supported: convert them to safetensors)" : "");
  }
  SafetensorsCheckpoint ckpt(dir);
  // Every layer stores several tensors: a bound before the per-layer name table is built.
  CBQ_CHECK(static_cast<uint64_t>(m.config.n_layers) <= ckpt.names().size(),
            "{}: config.json has {} layers but the checkpoint holds only {} tensors",
            ckpt.source_path(), m.config.n_layers, ckpt.names().size());
  for (const auto& [name, shape] : expected_weight_shapes(m.config)) {
    std::string stored = name;
    if (!ckpt.contains(stored) && name.rfind("model.", 0) == 0 && ckpt.contains(name.substr(6)))
      stored = name.substr(6);
    CBQ_CHECK(ckpt.contains(stored), "{}: missing tensor {} ({} {} for {})", ckpt.source_path(),
              name, family_name(m.config.family), shape, m.config.architecture);
    const TensorInfo& info = ckpt.info(stored);
    CBQ_CHECK(info.shape == shape, "{}: tensor {} has shape {}, the config implies {}",
              ckpt.file_of(stored).path(), stored, info.shape, shape);
    m.weights.emplace(name, ckpt.to_float(stored));
  }
  return m;
}

}  // namespace cbq::io
