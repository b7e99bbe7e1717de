#pragma once
// cbq's native output: one safetensors file holding the quantized model (docs/FORMATS.md).
//   <layer>.qweight   I32 (rows, words)  codes (stored = q − qmin) packed little-endian along the
//                                        input dimension, 32/b per word (3 bits cross words)
//   <layer>.scales    F32 (param shape)  steps s
//   <layer>.zeros     F32 (param shape)  zero-points z (integer-valued; 0 for symmetric)
//   <layer>.g_idx     I32 (cols,)        only for act-order GPTQ: group of each input column
//   every other parameter (embeddings, norms, biases, LM head) in F32 under its Hugging Face name
//   metadata: format = "cbq-native-1", method, config, bits, group_size, granularity, symmetric,
//             and per layer "<layer>.act" = "scale,zero,clip_logit" for activation quantizers.
// x̂ = s · (stored + qmin − z). <layer> is cbq's layer name "layers.{i}.{linear}" (e.g.
// "layers.3.q_proj"); the GGUF and GPTQ exporters translate to the names other tools expect.
#include <algorithm>
#include <cstring>
#include <map>
#include <string>

#include <fmt/format.h>

#include "cbq/formats/safetensors.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/quant/pack.hpp"
#include "cbq/quant/result.hpp"

namespace cbq::io {

inline const char* granularity_name(quant::Granularity g) {
  switch (g) {
    case quant::Granularity::per_tensor:
      return "per_tensor";
    case quant::Granularity::per_channel:
      return "per_channel";
    default:
      return "per_group";
  }
}

inline quant::Granularity parse_granularity(const std::string& s, const std::string& file) {
  if (s == "per_tensor") return quant::Granularity::per_tensor;
  if (s == "per_channel") return quant::Granularity::per_channel;
  if (s == "per_group") return quant::Granularity::per_group;
  fail("{}: unknown granularity '{}' in the metadata", file, s);
}

template <TransformerBlock Block>
void save_native(const std::string& path, Transformer<Block>& model,
                 const QuantizationResult& result) {
  CBQ_CHECK(!result.layers.empty(), "save_native: the result holds no quantized layer");
  std::map<std::string, TensorToWrite> tensors;
  std::map<std::string, std::string> meta;
  const quant::GridSpec spec = result.layers.front().weight.spec;
  meta["format"] = "cbq-native-1";
  meta["method"] = result.method;
  meta["config"] = result.config;
  meta["bits"] = std::to_string(spec.bits);
  meta["group_size"] = std::to_string(spec.group_size);
  meta["granularity"] = granularity_name(spec.granularity);
  meta["symmetric"] = spec.symmetric ? "true" : "false";
  meta["architecture"] = model.config.architecture;
  auto f32 = [](const Tensor<typename Block::scalar_type>& t) {
    if constexpr (std::is_same_v<typename Block::scalar_type, float>) {
      return TensorToWrite::f32(t);
    } else {
      return TensorToWrite::f32(t.template cast<float>());
    }
  };
  for (const LayerResult& l : result.layers) {
    const quant::QuantizedWeight& w = l.weight;
    Tensor<uint32_t> words = quant::pack_u32(w.codes, w.spec.bits);
    Tensor<int32_t> as_i32 = Tensor<int32_t>::empty(words.shape());
    std::memcpy(as_i32.data(), words.data(), sizeof(uint32_t) * static_cast<size_t>(words.numel()));
    tensors[l.name + ".qweight"] = TensorToWrite::i32(as_i32);
    tensors[l.name + ".scales"] = TensorToWrite::f32(w.scale);
    tensors[l.name + ".zeros"] = TensorToWrite::f32(w.zero);
    if (!w.group_index.empty()) {
      Tensor<int32_t> g = Tensor<int32_t>::empty(Shape{static_cast<int64_t>(w.group_index.size())});
      for (size_t i = 0; i < w.group_index.size(); ++i)
        g[static_cast<int64_t>(i)] = w.group_index[i];
      tensors[l.name + ".g_idx"] = TensorToWrite::i32(g);
    }
    meta[l.name + ".shape"] = fmt::format("{},{}", w.rows(), w.cols());
    if (l.act_scale != 0 || l.act_clip_logit != 0)
      meta[l.name + ".act"] = fmt::format("{},{},{}", l.act_scale, l.act_zero, l.act_clip_logit);
  }
  // The parameters quantization leaves in full precision (after any CFP scaling).
  auto put = [&](const Parameter<typename Block::scalar_type>& p) {
    if (p.value.defined()) tensors[p.name] = f32(p.value);
  };
  put(model.embed_tokens);
  put(model.embed_positions);
  put(model.final_norm_weight);
  put(model.final_norm_bias);
  put(model.lm_head);
  for (int64_t b = 0; b < model.num_blocks(); ++b) {
    for (auto* p : model.blocks[b].other_parameters()) put(*p);
    for (auto* l : model.blocks[b].linears())
      if (l->has_bias()) tensors[fmt::format("layers.{}.{}.bias", b, l->name)] = f32(l->bias.value);
  }
  write_safetensors(path, tensors, meta);
}

// The quantized layers of a native file, by layer name.
inline std::map<std::string, quant::QuantizedWeight> load_native_weights(const std::string& path) {
  SafetensorsFile file(path);
  const auto& meta = file.metadata();
  auto get = [&](const std::string& key) {
    auto it = meta.find(key);
    CBQ_CHECK(it != meta.end(), "{}: metadata '{}' is missing (not a cbq native file?)", path, key);
    return it->second;
  };
  CBQ_CHECK(get("format") == "cbq-native-1", "{}: format '{}' is not cbq-native-1", path,
            get("format"));
  quant::GridSpec spec;
  spec.bits = std::stoi(get("bits"));
  spec.group_size = std::stoll(get("group_size"));
  spec.granularity = parse_granularity(get("granularity"), path);
  spec.symmetric = get("symmetric") == "true";
  spec.validate(path.c_str());
  std::map<std::string, quant::QuantizedWeight> out;
  for (const std::string& name : file.names()) {
    const std::string suffix = ".qweight";
    if (name.size() <= suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const std::string layer = name.substr(0, name.size() - suffix.size());
    const std::string shape = get(layer + ".shape");
    const int64_t rows = std::stoll(shape.substr(0, shape.find(','))),
                  cols = std::stoll(shape.substr(shape.find(',') + 1));
    Tensor<int32_t> words = file.to_int32(name);
    CBQ_CHECK(words.ndim() == 2 && words.size(0) == rows,
              "{}: tensor '{}' has shape {}, expected ({}, words)", path, name, words.shape(),
              rows);
    Tensor<uint32_t> u = Tensor<uint32_t>::empty(words.shape());
    std::memcpy(u.data(), words.data(), sizeof(uint32_t) * static_cast<size_t>(words.numel()));
    quant::QuantizedWeight w;
    w.spec = spec;
    w.codes = quant::unpack_u32(u, spec.bits, cols);
    w.scale = file.to_float(layer + ".scales");
    w.zero = file.to_float(layer + ".zeros");
    const Shape ps = spec.param_shape(rows, cols);
    CBQ_CHECK(w.scale.shape() == ps && w.zero.shape() == ps,
              "{}: scales/zeros of '{}' have shapes {} and {}, expected {}", path, layer,
              w.scale.shape(), w.zero.shape(), ps);
    const auto names = file.names();
    if (std::find(names.begin(), names.end(), layer + ".g_idx") != names.end()) {
      Tensor<int32_t> g = file.to_int32(layer + ".g_idx");
      w.group_index.assign(g.data(), g.data() + g.numel());
    }
    out[layer] = std::move(w);
  }
  CBQ_CHECK(!out.empty(), "{}: no quantized layer (*.qweight) in the file", path);
  return out;
}

}  // namespace cbq::io
