#pragma once
// GPTQ checkpoints as AutoGPTQ, GPTQModel and transformers + optimum write them: a Hugging Face
// folder (config.json with "quantization_config", quantize_config.json, model.safetensors, the
// tokenizer) in which every linear layer <m> of the blocks is stored as
//   <m>.qweight  I32 (ceil(in·b/32), out)  codes packed along the input dimension (quant/pack.hpp)
//   <m>.qzeros   I32 (groups, ceil(out·b/32))  zero-points packed along the output dimension
//   <m>.scales   F16 (groups, out)
//   <m>.g_idx    I32 (in,)  group of every input column (act-order permutes it)
//   <m>.bias     F16 (out,) where the model has one (OPT)
// and every other parameter in F16 (or F32) under its Hugging Face name. Dequantization is
// ŵ[o, i] = scales[g_idx[i], o] · (q[o, i] − z[g_idx[i], o]). The zero-point convention
// (docs/GPTQ_FORMAT.md has the evidence):
//   checkpoint_format "gptq"    (v1, AutoGPTQ) stores z − 1; every loader adds 1 back, so z = 0
//                               cannot be stored (it wraps to 2^b − 1 and reads back as 2^b);
//   checkpoint_format "gptq_v2" (GPTQModel)    stores z itself.
// save_gptq writes v1 when every zero-point is ≥ 1 (always true for symmetric grids, where
// z = 2^(b−1)) — the format every GPTQ reader understands — and v2 otherwise, so that what is
// written is what the pass computed. Scales are F16 in the file: snap_scales_to_f16 rounds a
// result's scales (and the model's installed quantizers) to F16 first, which makes the reloaded
// weights bit-equal to the ones the pass evaluates.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cbq/core/half.hpp"
#include "cbq/core/mmap.hpp"
#include "cbq/formats/hf_config.hpp"
#include "cbq/formats/safetensors.hpp"
#include "cbq/model/load.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/pass/quant_linear.hpp"
#include "cbq/quant/pack.hpp"
#include "cbq/quant/result.hpp"

namespace cbq::io {

// Which zero-point convention to write (see the header comment).
enum class GptqCheckpointFormat { automatic, v1, v2 };

inline const char* gptq_format_name(GptqCheckpointFormat f) {
  return f == GptqCheckpointFormat::v2 ? "gptq_v2" : "gptq";
}

struct GptqExportOptions {
  // automatic: v1 ("gptq") when every zero-point is ≥ 1, else v2 ("gptq_v2"). v1 refuses a
  // zero-point of 0 (it cannot be stored); v2 always stores exactly.
  GptqCheckpointFormat format = GptqCheckpointFormat::automatic;
  // The parameters quantization leaves in full precision (embeddings, norms, biases, LM head):
  // F16 as GPTQ tools write them, or F32 (then a reloaded model computes exactly as in memory).
  bool float32_parameters = false;
  // A Hugging Face model folder the model came from: its config.json becomes the base of ours
  // (every field kept, quantization_config added) and its tokenizer files are copied.
  std::string source_dir;
  // A tokenizer file to copy when source_dir has none: tokenizer.json (copied as is) or a
  // llama2.c tokenizer.bin (copied as tokenizer.bin: cbq's load_gptq reads it, HF tools do not).
  std::string tokenizer_file;
  // Written into quantization_config (informational: what GPTQ's dampening was).
  double damp_percent = 0.01;
  // true: fail when a scale is not exactly an F16 value (call snap_scales_to_f16 first) instead
  // of rounding it while writing.
  bool require_f16_scales = false;
  // GPTQ checkpoints hold weight-only quantization; a result with activation quantizers (WxA8,
  // WxA4) is refused unless this is set, in which case they are left out.
  bool drop_activation_quantizers = false;
};

struct GptqExportSummary {
  std::string checkpoint_format;  // "gptq" (v1) or "gptq_v2"
  int64_t layers = 0;
  int64_t zero_points_at_zero = 0;  // asymmetric groups with z = 0 (these force v2)
  int64_t scales_rounded = 0;       // scales that were not F16 values and got rounded
  bool desc_act = false;            // some layer has a non-trivial g_idx (act-order)
  bool rope_permuted = false;       // llama2.c q/k rows reordered for HF's rotate_half RoPE
  // Layers whose shapes GPTQ kernels (AutoGPTQ, GPTQModel, vLLM) reject: in·b or out·b not a
  // multiple of 32, or a group size that does not divide in. cbq reads them; others do not.
  std::vector<std::string> nonstandard_layers;
  std::vector<std::string> notes;  // everything else worth telling the user
  std::vector<std::string> files;  // what was written into the folder
};

// ---- packing (the AutoGPTQ bit layout, quant/pack.hpp) ----

namespace detail {
inline Tensor<int32_t> as_int32(const Tensor<uint32_t>& u) {
  Tensor<int32_t> t = Tensor<int32_t>::empty(u.shape());
  if (u.numel()) std::memcpy(t.data(), u.data(), sizeof(uint32_t) * static_cast<size_t>(u.numel()));
  return t;
}
inline Tensor<uint32_t> as_uint32(const Tensor<int32_t>& s) {
  Tensor<int32_t> c = s.contiguous();
  Tensor<uint32_t> t = Tensor<uint32_t>::empty(c.shape());
  if (c.numel()) std::memcpy(t.data(), c.data(), sizeof(int32_t) * static_cast<size_t>(c.numel()));
  return t;
}
}  // namespace detail

// (out, in) stored codes → qweight (ceil(in·bits/32), out).
inline Tensor<int32_t> gptq_pack_qweight(const Tensor<uint8_t>& codes, int bits) {
  return detail::as_int32(quant::pack_gptq_qweight(codes, bits));
}
// qweight (ceil(in·bits/32), out) → (out, in) codes.
inline Tensor<uint8_t> gptq_unpack_qweight(const Tensor<int32_t>& qweight, int bits, int64_t in) {
  return quant::unpack_gptq_qweight(detail::as_uint32(qweight), bits, in);
}
// (groups, out) stored zero-points (already z or z − 1, each < 2^bits) → qzeros
// (groups, ceil(out·bits/32)): the same bit stream, along the output dimension.
inline Tensor<int32_t> gptq_pack_qzeros(const Tensor<uint8_t>& zeros, int bits) {
  return detail::as_int32(quant::pack_u32(zeros, bits));
}
inline Tensor<uint8_t> gptq_unpack_qzeros(const Tensor<int32_t>& qzeros, int bits, int64_t out) {
  return quant::unpack_u32(detail::as_uint32(qzeros), bits, out);
}

// ---- names and layouts ----

// The Hugging Face module of block `block`'s linear layer `linear`:
// "model.layers.3.self_attn.q_proj", "model.decoder.layers.0.fc1", ...
inline std::string hf_linear_module(const ModelConfig& c, int64_t block,
                                    const std::string& linear) {
  if (c.family == Family::llama) {
    const std::string p = fmt::format("model.layers.{}.", block);
    if (linear == "q_proj" || linear == "k_proj" || linear == "v_proj" || linear == "o_proj")
      return p + "self_attn." + linear;
    if (linear == "gate_proj" || linear == "up_proj" || linear == "down_proj")
      return p + "mlp." + linear;
  } else {
    const std::string p = fmt::format("model.decoder.layers.{}.", block);
    if (linear == "q_proj" || linear == "k_proj" || linear == "v_proj" || linear == "out_proj")
      return p + "self_attn." + linear;
    if (linear == "fc1" || linear == "fc2") return p + linear;
  }
  fail("GPTQ: no Hugging Face module name for linear layer '{}' of a {} block", linear,
       family_name(c.family));
}

// Row order turning q/k rows of interleaved RoPE (llama2.c / Meta: pairs (2i, 2i+1)) into HF's
// rotate_half layout (pairs (i, i + hd/2)), as transformers' convert_llama_weights_to_hf
// permutes them: new row h·hd + j·hd/2 + i holds old row h·hd + 2i + j. order[new] = old.
inline std::vector<int64_t> rotate_half_row_order(int64_t heads, int64_t head_dim) {
  std::vector<int64_t> order(static_cast<size_t>(heads * head_dim));
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < 2; ++j)
      for (int64_t i = 0; i < half; ++i)
        order[static_cast<size_t>(h * head_dim + j * half + i)] = h * head_dim + 2 * i + j;
  return order;
}

namespace detail {

template <class T>
Tensor<T> permute_rows(const Tensor<T>& t, const std::vector<int64_t>& order) {
  Tensor<T> c = t.contiguous();
  const int64_t rows = c.size(0), cols = c.ndim() == 2 ? c.size(1) : 1;
  CBQ_CHECK(static_cast<int64_t>(order.size()) == rows, "permute_rows: {} rows, order of {}", rows,
            order.size());
  Tensor<T> out = Tensor<T>::empty(c.shape());
  for (int64_t r = 0; r < rows; ++r)
    std::copy(c.data() + order[static_cast<size_t>(r)] * cols,
              c.data() + order[static_cast<size_t>(r)] * cols + cols, out.data() + r * cols);
  return out;
}

// Per-tensor (s, z) repeated for every row: GPTQ has no per-tensor form (group_size −1 is per
// output channel), and the repetition is exact.
inline quant::QuantizedWeight expand_per_tensor(const quant::QuantizedWeight& w) {
  if (w.spec.granularity != quant::Granularity::per_tensor) return w;
  quant::QuantizedWeight e = w;
  e.spec.granularity = quant::Granularity::per_channel;
  e.scale = Tensor<float>::full(Shape{w.rows(), 1}, w.scale[0]);
  e.zero = Tensor<float>::full(Shape{w.rows(), 1}, w.zero[0]);
  return e;
}

inline int64_t gptq_groups(const quant::GridSpec& spec, int64_t in) {
  return spec.granularity == quant::Granularity::per_group ? spec.groups_per_row(in) : 1;
}

// The g_idx GPTQ stores: act-order's group_index, else column c in group c / G (0 per channel).
inline std::vector<int32_t> gptq_g_idx(const quant::QuantizedWeight& w) {
  const int64_t in = w.cols();
  if (!w.group_index.empty() && w.spec.granularity == quant::Granularity::per_group)
    return w.group_index;
  std::vector<int32_t> g(static_cast<size_t>(in), 0);
  if (w.spec.granularity == quant::Granularity::per_group)
    for (int64_t c = 0; c < in; ++c)
      g[static_cast<size_t>(c)] = static_cast<int32_t>(c / w.spec.group_size);
  return g;
}

inline bool is_trivial_g_idx(const std::vector<int32_t>& g, const quant::GridSpec& spec) {
  for (size_t c = 0; c < g.size(); ++c) {
    const int64_t want = spec.granularity == quant::Granularity::per_group
                             ? static_cast<int64_t>(c) / spec.group_size
                             : 0;
    if (g[c] != want) return false;
  }
  return true;
}

// The GPTQ zero-points z (groups, out) of a weight: 2^(b−1) for symmetric grids (cbq stores
// codes q + 2^(b−1) with z = 0, so ŵ = s·(stored − 2^(b−1)) either way), else cbq's z.
inline Tensor<int32_t> gptq_zero_points(const quant::QuantizedWeight& w, const std::string& layer) {
  const int64_t out = w.rows(), ng = gptq_groups(w.spec, w.cols());
  const int64_t zmax = (int64_t{1} << w.spec.bits) - 1;
  Tensor<int32_t> z = Tensor<int32_t>::empty(Shape{ng, out});
  for (int64_t o = 0; o < out; ++o)
    for (int64_t g = 0; g < ng; ++g) {
      const float v = w.zero[o * ng + g];
      if (w.spec.symmetric) {
        CBQ_CHECK(v == 0.f,
                  "GPTQ: layer {}: symmetric grid with zero-point {} at row {}, group {} (cbq's "
                  "symmetric zero-points are 0)",
                  layer, v, o, g);
        z[g * out + o] = static_cast<int32_t>(int64_t{1} << (w.spec.bits - 1));
      } else {
        CBQ_CHECK(
            std::isfinite(v) && v == std::nearbyint(v) && v >= 0.f && v <= static_cast<float>(zmax),
            "GPTQ: layer {}: zero-point {} at row {}, group {} is not an integer in [0, {}]", layer,
            v, o, g, zmax);
        z[g * out + o] = static_cast<int32_t>(v);
      }
    }
  return z;
}

inline nlohmann::ordered_json read_ordered_json(const std::string& path) {
  std::string text = read_text_file(path);
  try {
    return nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: invalid JSON: {}", path, e.what());
  }
}

inline void write_json_file(const std::string& path, const nlohmann::ordered_json& j) {
  const std::string text = j.dump(2) + "\n";
  write_file_atomic(path, [&](std::ofstream& out) {
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
  });
}

// config.json contents for a model without a source config.json.
inline nlohmann::ordered_json hf_config_json(const ModelConfig& c) {
  nlohmann::ordered_json j;
  if (c.family == Family::llama) {
    j["architectures"] = {"LlamaForCausalLM"};
    j["model_type"] = "llama";
    j["hidden_size"] = c.dim;
    j["intermediate_size"] = c.hidden_dim;
    j["num_hidden_layers"] = c.n_layers;
    j["num_attention_heads"] = c.n_heads;
    j["num_key_value_heads"] = c.n_kv_heads;
    j["head_dim"] = c.head_dim;
    j["hidden_act"] = "silu";
    j["max_position_embeddings"] = c.max_seq_len;
    j["rms_norm_eps"] = c.norm_eps;
    j["rope_theta"] = c.rope_theta;
    j["rope_scaling"] = nullptr;
    j["attention_bias"] = c.attention_bias;
    j["mlp_bias"] = c.mlp_bias;
  } else {
    j["architectures"] = {"OPTForCausalLM"};
    j["model_type"] = "opt";
    j["hidden_size"] = c.dim;
    j["word_embed_proj_dim"] = c.dim;
    j["ffn_dim"] = c.hidden_dim;
    j["num_hidden_layers"] = c.n_layers;
    j["num_attention_heads"] = c.n_heads;
    j["max_position_embeddings"] = c.max_seq_len;
    j["activation_function"] = "relu";
    j["do_layer_norm_before"] = c.opt_layer_norm_before;
    j["enable_bias"] = c.attention_bias;
    j["layer_norm_elementwise_affine"] = true;
    j["pad_token_id"] = 1;
  }
  j["vocab_size"] = c.vocab_size;
  j["dtype"] = "float16";  // set by the writer, with torch_dtype (older transformers)
  j["tie_word_embeddings"] = c.tied_embeddings;
  j["bos_token_id"] = c.bos_id;
  j["eos_token_id"] = c.eos_id;
  return j;
}

}  // namespace detail

// ---- F16 scales ----

struct F16ScaleSnap {
  int64_t scales = 0;   // scales looked at
  int64_t changed = 0;  // scales that were not F16 values
  int64_t flushed_to_zero =
      0;  // positive scales below F16's range (only all-zero groups have them)
  double max_relative_change = 0;
};

// Rounds every scale of `result` to the nearest F16 value (what a GPTQ checkpoint can hold);
// codes and zero-points stay. Fails on a scale beyond F16's range (|s| > 65504).
inline F16ScaleSnap snap_scales_to_f16(QuantizationResult& result) {
  F16ScaleSnap st;
  for (LayerResult& l : result.layers) {
    Tensor<float>& s = l.weight.scale;
    s = s.clone();  // results may share storage with a quantizer; never write through it
    for (int64_t i = 0; i < s.numel(); ++i) {
      const float before = s[i];
      const float after = f16_to_float(float_to_f16(before));
      CBQ_CHECK(std::isfinite(after),
                "snap_scales_to_f16: layer {}: scale {} at index {} is beyond the F16 range "
                "(65504)",
                l.name, before, i);
      ++st.scales;
      if (after != before) {
        ++st.changed;
        if (after == 0.f && before != 0.f) ++st.flushed_to_zero;
        if (before != 0.f)
          st.max_relative_change =
              std::max(st.max_relative_change,
                       std::abs(static_cast<double>(after) - before) / std::abs(before));
      }
      s[i] = after;
    }
  }
  return st;
}

// The same, and the model's installed quantizers (QuantLinear, as the CBQ pass and
// quantize_baseline install them) compute with the snapped weights from now on, so evaluating
// `model` measures exactly what save_gptq writes.
template <TransformerBlock Block>
F16ScaleSnap snap_scales_to_f16(Transformer<Block>& model, QuantizationResult& result) {
  using T = typename Block::scalar_type;
  F16ScaleSnap st = snap_scales_to_f16(result);
  std::map<std::string, const LayerResult*> by_name;
  for (const LayerResult& l : result.layers) by_name[l.name] = &l;
  for (int64_t b = 0; b < model.num_blocks(); ++b)
    for (LinearLayer<T>* layer : model.blocks[b].linears()) {
      const std::string name = fmt::format("layers.{}.{}", b, layer->name);
      auto it = by_name.find(name);
      if (it == by_name.end()) continue;
      auto q = std::dynamic_pointer_cast<QuantLinear<T>>(layer->transform);
      CBQ_CHECK(q != nullptr,
                "snap_scales_to_f16: layer {} has no installed QuantLinear (was the model "
                "quantized by this result?)",
                name);
      q->set_result(it->second->weight);
    }
  return st;
}

// ---- writer ----

// Writes `model` quantized by `result` as a GPTQ checkpoint folder `dir` (created if needed):
// model.safetensors, config.json, quantize_config.json and the tokenizer (see the options).
// LLaMA- and OPT-family models; every linear layer of every block must be in the result, with
// one grid for all. A llama2.c model's q/k rows are reordered for HF's rotate_half RoPE (exact:
// a row permutation of codes, scales and zero-points).
template <TransformerBlock Block>
GptqExportSummary save_gptq(const std::string& dir, Transformer<Block>& model,
                            const QuantizationResult& result,
                            const GptqExportOptions& options = {}) {
  namespace fs = std::filesystem;
  using T = typename Block::scalar_type;
  const ModelConfig& c = model.config;
  CBQ_CHECK(!result.layers.empty(), "save_gptq({}): the result holds no quantized layer", dir);
  const quant::GridSpec spec = result.layers.front().weight.spec;
  // What load_gptq and the GPTQ kernels read; anything else would be a folder nobody loads.
  CBQ_CHECK(spec.bits == 2 || spec.bits == 3 || spec.bits == 4 || spec.bits == 8,
            "save_gptq({}): {}-bit weights cannot be stored as GPTQ (2, 3, 4 or 8 bits); save "
            "the native format instead",
            dir, spec.bits);
  CBQ_CHECK(options.source_dir.empty() || !fs::exists(options.source_dir) ||
                !detail::path_within(options.source_dir, dir),
            "save_gptq({}): the folder is (or holds) the source folder {}; refusing to replace it",
            dir, options.source_dir);
  std::map<std::string, const LayerResult*> by_name;
  for (const LayerResult& l : result.layers) {
    const quant::GridSpec& s = l.weight.spec;
    CBQ_CHECK(
        s.bits == spec.bits && s.symmetric == spec.symmetric && s.granularity == spec.granularity &&
            (s.granularity != quant::Granularity::per_group || s.group_size == spec.group_size),
        "save_gptq({}): layer {} uses a different grid than layer {} (GPTQ checkpoints hold "
        "one bits / group size / symmetry for every layer)",
        dir, l.name, result.layers.front().name);
    CBQ_CHECK(options.drop_activation_quantizers || (l.act_scale == 0 && l.act_clip_logit == 0),
              "save_gptq({}): layer {} has an activation quantizer ({}); GPTQ checkpoints are "
              "weight-only: save the native format, or set drop_activation_quantizers",
              dir, l.name, result.config);
    by_name[l.name] = &l;
  }
  GptqExportSummary summary;
  const bool permute_rope = c.family == Family::llama && c.rope_layout == RopeLayout::interleaved;
  summary.rope_permuted = permute_rope;
  auto to_float = [](const Tensor<T>& t) -> Tensor<float> {
    if constexpr (std::is_same_v<T, float>) {
      return t;
    } else {
      return t.template cast<float>();
    }
  };

  struct Packed {
    std::string module;
    quant::QuantizedWeight weight;  // GPTQ row order, per-tensor expanded
    Tensor<int32_t> zeros;          // (groups, out), z
    Tensor<float> bias;
  };
  std::vector<Packed> packed;
  std::map<std::string, Tensor<float>> dense;  // every other parameter by HF name
  int64_t zero_at_zero = 0;
  std::string first_zero;
  for (int64_t b = 0; b < model.num_blocks(); ++b) {
    for (Parameter<T>* p : model.blocks[b].other_parameters())
      if (p->value.defined()) dense[p->name] = to_float(p->value);
    for (LinearLayer<T>* layer : model.blocks[b].linears()) {
      const std::string name = fmt::format("layers.{}.{}", b, layer->name);
      auto it = by_name.find(name);
      CBQ_CHECK(it != by_name.end(),
                "save_gptq({}): linear layer {} is not in the result (a GPTQ checkpoint needs "
                "every linear layer of every block quantized)",
                dir, name);
      Packed pk;
      pk.module = hf_linear_module(c, b, layer->name);
      pk.weight = detail::expand_per_tensor(it->second->weight);
      CBQ_CHECK(
          pk.weight.rows() == layer->out_features() && pk.weight.cols() == layer->in_features(),
          "save_gptq({}): layer {}: quantized weight ({}, {}) does not match the layer's "
          "({}, {})",
          dir, name, pk.weight.rows(), pk.weight.cols(), layer->out_features(),
          layer->in_features());
      if (layer->has_bias()) pk.bias = to_float(layer->bias.value).clone();
      if (permute_rope && (layer->name == "q_proj" || layer->name == "k_proj")) {
        const int64_t heads = layer->name == "q_proj" ? c.n_heads : c.n_kv_heads;
        const auto order = rotate_half_row_order(heads, c.head_dim);
        pk.weight.codes = detail::permute_rows(pk.weight.codes, order);
        pk.weight.scale = detail::permute_rows(pk.weight.scale, order);
        pk.weight.zero = detail::permute_rows(pk.weight.zero, order);
        if (pk.bias.defined()) pk.bias = detail::permute_rows(pk.bias, order);
      }
      pk.zeros = detail::gptq_zero_points(pk.weight, name);
      for (int64_t i = 0; i < pk.zeros.numel(); ++i)
        if (pk.zeros[i] == 0) {
          if (first_zero.empty())
            first_zero = fmt::format("{} (group {}, output {})", name, i / pk.weight.rows(),
                                     i % pk.weight.rows());
          ++zero_at_zero;
        }
      const int64_t in = pk.weight.cols(), out = pk.weight.rows();
      std::vector<std::string> why;
      if (in * spec.bits % 32)
        why.push_back(
            fmt::format("in_features·bits = {}·{} is not a multiple of 32", in, spec.bits));
      if (out * spec.bits % 32)
        why.push_back(
            fmt::format("out_features·bits = {}·{} is not a multiple of 32", out, spec.bits));
      if (spec.granularity == quant::Granularity::per_group && in % spec.group_size)
        why.push_back(
            fmt::format("group size {} does not divide in_features {}", spec.group_size, in));
      if (!why.empty()) {
        std::string line = pk.module + ": " + why[0];
        for (size_t k = 1; k < why.size(); ++k) line += "; " + why[k];
        summary.nonstandard_layers.push_back(std::move(line));
      }
      if (!detail::is_trivial_g_idx(detail::gptq_g_idx(pk.weight), pk.weight.spec))
        summary.desc_act = true;
      packed.push_back(std::move(pk));
    }
  }
  GptqCheckpointFormat format = options.format;
  if (format == GptqCheckpointFormat::automatic)
    format = zero_at_zero ? GptqCheckpointFormat::v2 : GptqCheckpointFormat::v1;
  CBQ_CHECK(format != GptqCheckpointFormat::v1 || zero_at_zero == 0,
            "save_gptq({}): {} zero-points are 0 (first: {}), which the v1 format (\"gptq\", "
            "stores z − 1) cannot hold; write v2 (\"gptq_v2\") or let the format be chosen",
            dir, zero_at_zero, first_zero);
  summary.checkpoint_format = gptq_format_name(format);
  summary.zero_points_at_zero = zero_at_zero;
  summary.layers = static_cast<int64_t>(packed.size());

  auto put_dense = [&](const Parameter<T>& p) {
    if (p.value.defined()) dense[p.name] = to_float(p.value);
  };
  put_dense(model.embed_tokens);
  put_dense(model.embed_positions);
  put_dense(model.final_norm_weight);
  put_dense(model.final_norm_bias);
  put_dense(model.lm_head);

  std::map<std::string, TensorToWrite> tensors;
  auto float_tensor = [&](const Tensor<float>& t) {
    return options.float32_parameters ? TensorToWrite::f32(t) : TensorToWrite::f16(t);
  };
  std::set<std::string> quantized_weights;
  for (Packed& pk : packed) {
    const quant::QuantizedWeight& w = pk.weight;
    const int64_t in = w.cols(), out = w.rows(), ng = detail::gptq_groups(w.spec, in);
    tensors[pk.module + ".qweight"] = TensorToWrite::i32(gptq_pack_qweight(w.codes, w.spec.bits));
    Tensor<uint8_t> stored = Tensor<uint8_t>::empty(Shape{ng, out});
    for (int64_t i = 0; i < stored.numel(); ++i)
      stored[i] = static_cast<uint8_t>(pk.zeros[i] - (format == GptqCheckpointFormat::v1 ? 1 : 0));
    tensors[pk.module + ".qzeros"] = TensorToWrite::i32(gptq_pack_qzeros(stored, w.spec.bits));
    Tensor<float> scales = Tensor<float>::empty(Shape{ng, out});
    for (int64_t o = 0; o < out; ++o)
      for (int64_t g = 0; g < ng; ++g) {
        const float s = w.scale[o * ng + g];
        const float h = f16_to_float(float_to_f16(s));
        CBQ_CHECK(std::isfinite(h),
                  "save_gptq({}): {}: scale {} (row {}, group {}) is beyond the "
                  "F16 range (65504)",
                  dir, pk.module, s, o, g);
        if (h != s) {
          CBQ_CHECK(!options.require_f16_scales,
                    "save_gptq({}): {}: scale {} (row {}, group {}) is not an F16 value (nearest: "
                    "{}); call snap_scales_to_f16 first for an exact checkpoint",
                    dir, pk.module, s, o, g, h);
          ++summary.scales_rounded;
        }
        scales[g * out + o] = s;
      }
    tensors[pk.module + ".scales"] = TensorToWrite::f16(scales);
    const std::vector<int32_t> g_idx = detail::gptq_g_idx(w);
    tensors[pk.module + ".g_idx"] = TensorToWrite::i32(Tensor<int32_t>::from(g_idx, Shape{in}));
    if (pk.bias.defined()) tensors[pk.module + ".bias"] = float_tensor(pk.bias);
    quantized_weights.insert(pk.module + ".weight");
    quantized_weights.insert(pk.module + ".bias");
  }
  for (const auto& [name, shape] : expected_weight_shapes(c)) {
    if (quantized_weights.count(name)) {
      // A bias the config implies but cbq's block does not compute with (LLaMA's o_proj under
      // attention_bias): zeros keep HF's module computing what cbq computes.
      if (!tensors.count(name) && name.size() > 5 && name.substr(name.size() - 5) == ".bias") {
        tensors[name] = float_tensor(Tensor<float>(shape));
        summary.notes.push_back(
            fmt::format("{}: written as zeros (cbq's block has no such bias)", name));
      }
      continue;
    }
    auto it = dense.find(name);
    CBQ_CHECK(it != dense.end(), "save_gptq({}): the model has no parameter {} ({})", dir, name,
              shape);
    CBQ_CHECK(it->second.shape() == shape,
              "save_gptq({}): parameter {} has shape {}, the config "
              "implies {}",
              dir, name, it->second.shape(), shape);
    tensors[name] = float_tensor(it->second);
  }

  // The folder is built under a temporary name and replaces `dir` as a whole at the end: a kill
  // or a full disk leaves the old folder (or none), never a mixture of files.
  AtomicDir out_dir(dir);
  const fs::path root(out_dir.path());
  write_safetensors((root / "model.safetensors").string(), tensors, {{"format", "pt"}});
  summary.files.push_back("model.safetensors");

  // quantization_config, as transformers' GPTQConfig / GPTQModel's QuantizeConfig spell it.
  nlohmann::ordered_json q;
  q["quant_method"] = "gptq";
  q["bits"] = spec.bits;
  q["group_size"] = spec.granularity == quant::Granularity::per_group ? spec.group_size : -1;
  q["desc_act"] = summary.desc_act;
  q["sym"] = spec.symmetric;
  q["static_groups"] = false;
  q["true_sequential"] = true;
  q["damp_percent"] = options.damp_percent;
  q["checkpoint_format"] = summary.checkpoint_format;
  q["pack_dtype"] = "int32";
  q["lm_head"] = false;
  q["model_file_base_name"] = "model";
  q["meta"] = {
      {"quantizer", {"cbq:0.1.0"}}, {"cbq_method", result.method}, {"cbq_config", result.config}};

  nlohmann::ordered_json config;
  const fs::path source_config =
      options.source_dir.empty() ? fs::path() : fs::path(options.source_dir) / "config.json";
  if (!source_config.empty() && fs::exists(source_config)) {
    config = detail::read_ordered_json(source_config.string());
    CBQ_CHECK(config.is_object(), "save_gptq: {} is not a JSON object", source_config.string());
  } else {
    config = detail::hf_config_json(c);
    if (c.architecture == "llama2.c")
      summary.notes.push_back("config.json generated from the llama2.c header");
  }
  // transformers ≥ 4.56 writes "dtype", older versions "torch_dtype": keep both in step.
  const char* dtype = options.float32_parameters ? "float32" : "float16";
  config["torch_dtype"] = dtype;
  if (config.contains("dtype")) config["dtype"] = dtype;
  config["quantization_config"] = q;
  detail::write_json_file((root / "config.json").string(), config);
  summary.files.push_back("config.json");
  detail::write_json_file((root / "quantize_config.json").string(), q);
  summary.files.push_back("quantize_config.json");

  // Tokenizer: the source folder's Hugging Face files, else the given file.
  auto copy_in = [&](const fs::path& from, const std::string& to) {
    const std::string bytes = read_text_file(from.string());
    write_file_atomic((root / to).string(), [&](std::ofstream& out) {
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    });
    summary.files.push_back(to);
  };
  bool tokenizer = false;
  if (!options.source_dir.empty()) {
    for (const char* f :
         {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
          "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json"}) {
      const fs::path p = fs::path(options.source_dir) / f;
      if (fs::exists(p)) {
        copy_in(p, f);
        if (std::string(f) == "tokenizer.json") tokenizer = true;
      }
    }
  }
  if (!tokenizer && !options.tokenizer_file.empty()) {
    const fs::path p(options.tokenizer_file);
    CBQ_CHECK(fs::is_regular_file(p), "save_gptq({}): tokenizer file {} does not exist", dir,
              p.string());
    const bool json = p.extension() == ".json";
    copy_in(p, json ? "tokenizer.json" : "tokenizer.bin");
    tokenizer = true;
    if (!json)
      summary.notes.push_back(
          "tokenizer.bin (llama2.c) copied: cbq reads it, Hugging Face tools need a "
          "tokenizer.json from elsewhere");
  }
  if (!tokenizer) summary.notes.push_back("no tokenizer written (none given)");
  out_dir.commit();
  return summary;
}

// ---- reader ----

struct GptqQuantizationConfig {
  int bits = 4;
  int64_t group_size = 128;  // −1: one group per output channel
  bool desc_act = false;
  bool sym = true;
  std::string checkpoint_format = "gptq";  // "gptq" (v1: z − 1 stored) or "gptq_v2"
  std::string source;                      // the file it was read from

  bool v2() const { return checkpoint_format == "gptq_v2"; }
  quant::GridSpec grid() const {
    quant::GridSpec g;
    g.bits = bits;
    g.symmetric = sym;
    g.granularity =
        group_size > 0 ? quant::Granularity::per_group : quant::Granularity::per_channel;
    g.group_size = group_size > 0 ? group_size : 128;
    return g;
  }
};

// config.json's "quantization_config", else quantize_config.json, of a GPTQ folder.
inline GptqQuantizationConfig read_gptq_quantization_config(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path cfg = fs::path(dir) / "config.json", qcfg = fs::path(dir) / "quantize_config.json";
  nlohmann::json j;
  std::string source;
  if (fs::exists(cfg)) {
    nlohmann::json c = detail::parse_json_file(cfg.string());
    if (c.is_object() && c.contains("quantization_config") &&
        c["quantization_config"].is_object()) {
      j = c["quantization_config"];
      source = cfg.string() + " quantization_config";
    }
  }
  if (j.is_null() && fs::exists(qcfg)) {
    j = detail::parse_json_file(qcfg.string());
    source = qcfg.string();
  }
  CBQ_CHECK(!j.is_null(),
            "{}: not a GPTQ checkpoint: neither config.json's quantization_config nor "
            "quantize_config.json is there",
            dir);
  CBQ_CHECK(j.is_object(), "{}: is not a JSON object", source);
  detail::ConfigReader r(j, source);
  const std::string method = r.string("quant_method", "gptq");
  CBQ_CHECK(method == "gptq", "{}: quant_method \"{}\" is not \"gptq\"", source, method);
  GptqQuantizationConfig q;
  q.source = source;
  q.bits = static_cast<int>(r.integer("bits"));
  CBQ_CHECK(q.bits == 2 || q.bits == 3 || q.bits == 4 || q.bits == 8,
            "{}: bits = {} is not one of 2, 3, 4, 8", source, q.bits);
  q.group_size = r.integer("group_size", -1);
  CBQ_CHECK(q.group_size == -1 || q.group_size > 0, "{}: group_size = {} must be -1 or positive",
            source, q.group_size);
  q.desc_act = r.boolean("desc_act", false);
  q.sym = r.boolean("sym", true);
  q.checkpoint_format = r.string("checkpoint_format", "gptq");
  CBQ_CHECK(q.checkpoint_format == "gptq" || q.checkpoint_format == "gptq_v2",
            "{}: checkpoint_format \"{}\" is not \"gptq\" or \"gptq_v2\"", source,
            q.checkpoint_format);
  CBQ_CHECK(!r.boolean("lm_head", false), "{}: a quantized lm_head is not supported", source);
  return q;
}

// One quantized linear module `module` ((out, in) weight) of a GPTQ checkpoint: codes, scales,
// zero-points and g_idx as cbq's QuantizedWeight (symmetric checkpoints give cbq's symmetric
// grid: codes as stored, z = 0; a trivial g_idx gives an empty group_index).
inline quant::QuantizedWeight read_gptq_linear(const SafetensorsCheckpoint& ckpt,
                                               const std::string& module, int64_t out, int64_t in,
                                               const GptqQuantizationConfig& q) {
  const std::string src = ckpt.source_path();
  auto need = [&](const std::string& suffix) {
    const std::string name = module + suffix;
    CBQ_CHECK(ckpt.contains(name), "{}: tensor {} is missing ({}-bit GPTQ layer of shape ({}, {}))",
              src, name, q.bits, out, in);
    return name;
  };
  auto shape_check = [&](const std::string& name, const Shape& want, const char* what) {
    const Shape& got = ckpt.info(name).shape;
    CBQ_CHECK(got == want,
              "{}: tensor {} has shape {}, expected {} ({}; in_features {}, out_features {}, {} "
              "bits, group_size {})",
              src, name, got, want, what, in, out, q.bits, q.group_size);
  };
  const quant::GridSpec spec = q.grid();
  const int64_t ng = q.group_size > 0 ? (in + q.group_size - 1) / q.group_size : 1;
  const std::string qw = need(".qweight"), qz = need(".qzeros"), sc = need(".scales");
  shape_check(qw, Shape{quant::packed_words(in, q.bits), out}, "ceil(in·bits/32), out");
  shape_check(qz, Shape{ng, quant::packed_words(out, q.bits)}, "groups, ceil(out·bits/32)");
  shape_check(sc, Shape{ng, out}, "groups, out");
  quant::QuantizedWeight w;
  w.spec = spec;
  w.codes = gptq_unpack_qweight(ckpt.to_int32(qw), q.bits, in);
  Tensor<uint8_t> zs = gptq_unpack_qzeros(ckpt.to_int32(qz), q.bits, out);  // (ng, out)
  Tensor<float> scales = ckpt.to_float(sc);                                 // (ng, out)
  w.scale = Tensor<float>::empty(Shape{out, ng});
  w.zero = Tensor<float>::empty(Shape{out, ng});
  const int64_t half = int64_t{1} << (q.bits - 1);
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t o = 0; o < out; ++o) {
      // v1 loaders add 1 after unpacking (a stored 2^b − 1 reads as 2^b, as they compute it).
      const int64_t z = static_cast<int64_t>(zs[g * out + o]) + (q.v2() ? 0 : 1);
      if (q.sym)
        CBQ_CHECK(z == half,
                  "{}: tensor {}: zero-point {} at group {}, output {} with sym = true (symmetric "
                  "GPTQ has {} everywhere; checkpoint_format \"{}\")",
                  src, qz, z, g, o, half, q.checkpoint_format);
      w.scale[o * ng + g] = scales[g * out + o];
      w.zero[o * ng + g] = q.sym ? 0.f : static_cast<float>(z);
    }
  if (ckpt.contains(module + ".g_idx")) {
    const std::string gi = module + ".g_idx";
    shape_check(gi, Shape{in}, "in");
    Tensor<int32_t> g = ckpt.to_int32(gi);
    std::vector<int32_t> idx(g.data(), g.data() + g.numel());
    for (int64_t c = 0; c < in; ++c)
      CBQ_CHECK(idx[static_cast<size_t>(c)] >= 0 && idx[static_cast<size_t>(c)] < ng,
                "{}: tensor {}: column {} is in group {}, outside [0, {})", src, gi, c,
                idx[static_cast<size_t>(c)], ng);
    if (!detail::is_trivial_g_idx(idx, spec)) {
      CBQ_CHECK(q.group_size > 0, "{}: tensor {}: a non-zero group index with group_size -1", src,
                gi);
      w.group_index = std::move(idx);
    }
  }
  return w;
}

struct GptqCheckpoint {
  ModelConfig config;
  GptqQuantizationConfig quantization;
  std::map<std::string, quant::QuantizedWeight> layers;  // by cbq layer name "layers.3.q_proj"
  AnyModel model;  // dequantized weights (float32); the folder's tokenizer when it has one
};

// Reads a GPTQ checkpoint folder (LLaMA / Mistral / OPT): every quantized linear module as a
// QuantizedWeight, and the model with dequantized weights, ready for eval::perplexity. Modules
// stored dense (.weight, e.g. excluded by GPTQModel's "dynamic") are read as they are.
// Tokenizer: `tokenizer_path`, else tokenizer.json in the folder, else tokenizer.bin (llama2.c).
inline GptqCheckpoint load_gptq(const std::string& dir, const std::string& tokenizer_path = "") {
  namespace fs = std::filesystem;
  CBQ_CHECK(fs::is_directory(dir), "load_gptq: {} is not a folder", dir);
  const ModelConfig config = load_hf_config(dir);
  const GptqQuantizationConfig q = read_gptq_quantization_config(dir);
  SafetensorsCheckpoint ckpt(dir);
  CBQ_CHECK(!ckpt.contains("lm_head.qweight"), "{}: a quantized lm_head is not supported",
            ckpt.source_path());
  // Every layer stores several tensors: a bound before the per-layer name table is built.
  CBQ_CHECK(static_cast<uint64_t>(config.n_layers) <= ckpt.names().size(),
            "{}: config.json has {} layers but the checkpoint holds only {} tensors",
            ckpt.source_path(), config.n_layers, ckpt.names().size());
  // module → (block, linear name)
  std::map<std::string, std::pair<int64_t, std::string>> modules;
  const std::vector<std::string> linears =
      config.family == Family::llama
          ? std::vector<std::string>{"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                     "gate_proj", "up_proj", "down_proj"}
          : std::vector<std::string>{"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"};
  for (int64_t b = 0; b < config.n_layers; ++b)
    for (const std::string& l : linears) modules[hf_linear_module(config, b, l)] = {b, l};
  std::map<std::string, quant::QuantizedWeight> layers;
  WeightMap weights;
  for (const auto& [name, shape] : expected_weight_shapes(config)) {
    const std::string suffix = ".weight";
    const bool is_weight = name.size() > suffix.size() &&
                           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    const std::string module = is_weight ? name.substr(0, name.size() - suffix.size()) : "";
    auto m = modules.find(module);
    if (is_weight && m != modules.end() && ckpt.contains(module + ".qweight")) {
      quant::QuantizedWeight w = read_gptq_linear(ckpt, module, shape[0], shape[1], q);
      weights.emplace(name, w.dequantize());
      layers.emplace(fmt::format("layers.{}.{}", m->second.first, m->second.second), std::move(w));
      continue;
    }
    std::string stored = name;
    if (!ckpt.contains(stored) && name.rfind("model.", 0) == 0 && ckpt.contains(name.substr(6)))
      stored = name.substr(6);
    CBQ_CHECK(ckpt.contains(stored), "{}: missing tensor {} ({} for {})", ckpt.source_path(),
              is_weight && m != modules.end() ? module + ".qweight" : name, shape,
              config.architecture);
    const TensorInfo& info = ckpt.info(stored);
    CBQ_CHECK(info.shape == shape, "{}: tensor {} has shape {}, the config implies {}",
              ckpt.file_of(stored).path(), stored, info.shape, shape);
    weights.emplace(name, ckpt.to_float(stored));
  }
  CBQ_CHECK(!layers.empty(), "{}: no quantized layer (*.qweight) found", ckpt.source_path());
  AnyModel model = cbq::detail::from_weights(config, weights, dir);
  weights.clear();
  fs::path tok;
  if (!tokenizer_path.empty())
    tok = tokenizer_path;
  else if (fs::exists(fs::path(dir) / "tokenizer.json"))
    tok = fs::path(dir) / "tokenizer.json";
  else if (fs::exists(fs::path(dir) / "tokenizer.bin"))
    tok = fs::path(dir) / "tokenizer.bin";
  if (!tok.empty()) model.set_tokenizer(cbq::detail::load_tokenizer_file(tok, config.vocab_size));
  return GptqCheckpoint{config, q, std::move(layers), std::move(model)};
}

}  // namespace cbq::io
