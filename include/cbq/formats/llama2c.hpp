#pragma once
// llama2.c checkpoints (Karpathy's run.c formats) into a ModelConfig and Hugging Face-named
// float32 weights. Reads the "legacy" export (7 int32 header, float32 weights, RoPE tables) and
// the "version 1" export (256-byte header with magic "ak42", float32 weights, no RoPE tables).
// The int8 "version 2" export is rejected. See docs/FORMATS.md.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/mmap.hpp"
#include "cbq/core/model_config.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq::io {

struct Llama2cModel {
  ModelConfig config;
  WeightMap weights;
};

// The seven int32 hyper-parameters of a llama2.c header.
struct Llama2cHeader {
  int32_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0,
          seq_len = 0;
};

inline constexpr uint32_t kLlama2cMagic = 0x616b3432;  // "ak42"

namespace detail {

inline void check_llama2c_header(const Llama2cHeader& h, const std::string& path) {
  auto positive = [&](int32_t v, const char* name) {
    CBQ_CHECK(v > 0, "{}: llama2.c header field {} = {} must be positive", path, name, v);
  };
  positive(h.dim, "dim");
  positive(h.hidden_dim, "hidden_dim");
  positive(h.n_layers, "n_layers");
  positive(h.n_heads, "n_heads");
  positive(h.n_kv_heads, "n_kv_heads");
  CBQ_CHECK(h.vocab_size != 0 && h.vocab_size != INT32_MIN,
            "{}: llama2.c header field vocab_size = {} is invalid", path, h.vocab_size);
  positive(h.seq_len, "seq_len");
  CBQ_CHECK(h.dim % h.n_heads == 0, "{}: llama2.c header: n_heads = {} does not divide dim = {}",
            path, h.n_heads, h.dim);
  CBQ_CHECK(h.n_heads % h.n_kv_heads == 0,
            "{}: llama2.c header: n_kv_heads = {} does not divide n_heads = {}", path, h.n_kv_heads,
            h.n_heads);
  CBQ_CHECK((h.dim / h.n_heads) % 2 == 0,
            "{}: llama2.c header: head size dim / n_heads = {} / {} = {} must be even for RoPE",
            path, h.dim, h.n_heads, h.dim / h.n_heads);
}

inline ModelConfig llama2c_config(const Llama2cHeader& h, bool shared) {
  ModelConfig c;
  c.family = Family::llama;
  c.architecture = "llama2.c";
  c.dim = h.dim;
  c.hidden_dim = h.hidden_dim;
  c.n_layers = h.n_layers;
  c.n_heads = h.n_heads;
  c.n_kv_heads = h.n_kv_heads;
  c.head_dim = h.dim / h.n_heads;
  c.vocab_size = h.vocab_size < 0 ? -static_cast<int64_t>(h.vocab_size) : h.vocab_size;
  c.max_seq_len = h.seq_len;
  c.norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.rope_layout = RopeLayout::interleaved;
  c.tied_embeddings = shared;
  c.attention_bias = false;
  c.mlp_bias = false;
  c.bos_id = 1;
  c.eos_id = 2;
  return c;
}

// One stored array: `count` copies (layers) of `shape`, each becoming its own tensor.
struct Llama2cArray {
  std::string name;  // HF name, "{}" replaced by the layer index when per_layer
  bool per_layer;
  Shape shape;
  bool skip = false;  // read past (RoPE tables)
};

inline std::string layer_name(const std::string& pattern, int64_t i) {
  std::string s = pattern;
  auto p = s.find("{}");
  if (p != std::string::npos) s.replace(p, 2, std::to_string(i));
  return s;
}

inline uint64_t array_floats(const Llama2cArray& a, int64_t n_layers, const std::string& path) {
  uint64_t n = static_cast<uint64_t>(a.shape.numel());
  return a.per_layer ? checked_mul(n, static_cast<uint64_t>(n_layers), path) : n;
}

inline std::vector<Llama2cArray> llama2c_arrays(const ModelConfig& c, bool legacy, bool shared) {
  const int64_t d = c.dim, hd = c.hidden_dim, kv = c.n_kv_heads * c.head_dim, V = c.vocab_size;
  const std::string L = "model.layers.{}.";
  Llama2cArray emb{"model.embed_tokens.weight", false, Shape{V, d}};
  Llama2cArray rms_att{L + "input_layernorm.weight", true, Shape{d}};
  Llama2cArray rms_ffn{L + "post_attention_layernorm.weight", true, Shape{d}};
  Llama2cArray rms_final{"model.norm.weight", false, Shape{d}};
  Llama2cArray wq{L + "self_attn.q_proj.weight", true, Shape{d, d}};
  Llama2cArray wk{L + "self_attn.k_proj.weight", true, Shape{kv, d}};
  Llama2cArray wv{L + "self_attn.v_proj.weight", true, Shape{kv, d}};
  Llama2cArray wo{L + "self_attn.o_proj.weight", true, Shape{d, d}};
  Llama2cArray w1{L + "mlp.gate_proj.weight", true, Shape{hd, d}};
  Llama2cArray w2{L + "mlp.down_proj.weight", true, Shape{d, hd}};
  Llama2cArray w3{L + "mlp.up_proj.weight", true, Shape{hd, d}};
  std::vector<Llama2cArray> out;
  if (legacy) {
    Llama2cArray freq{"freq_cis", false, Shape{c.max_seq_len, c.head_dim / 2}, true};
    out = {emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq, freq};
  } else {
    out = {rms_att, rms_ffn, rms_final, emb, wq, wk, wv, wo, w1, w2, w3};
  }
  if (!shared) out.push_back({"lm_head.weight", false, Shape{V, d}});
  return out;
}

}  // namespace detail

// What a llama2.c header says: the config, the stored arrays and the file size they need.
struct Llama2cLayout {
  Llama2cHeader header;
  bool legacy = true, shared = true;
  std::size_t header_bytes = 0;
  ModelConfig config;
  std::vector<detail::Llama2cArray> arrays;
  uint64_t expected_bytes = 0;  // header + every array
};

// The layout from the file's first bytes (`head`, at least the 256-byte header when the file
// has them) and its size; throws naming the file on an invalid header or a size mismatch.
inline Llama2cLayout llama2c_layout(std::span<const std::byte> head, uint64_t file_size,
                                    const std::string& path) {
  Llama2cLayout l;
  ByteReader r(head, path);
  if (file_size >= 4 && head.size() >= 4 && r.read<uint32_t>("magic") == kLlama2cMagic) {
    int32_t version = r.read<int32_t>("version");
    CBQ_CHECK(version == 1,
              "{}: llama2.c export version {} is not supported (only the legacy format and "
              "version 1, float32)",
              path, version);
    l.header = r.read<Llama2cHeader>("header");
    l.shared = r.read<uint8_t>("shared_classifier flag") != 0;
    l.legacy = false;
    l.header_bytes = 256;
    CBQ_CHECK(file_size >= l.header_bytes,
              "{}: truncated llama2.c version 1 header: {} bytes, expected at least {}", path,
              file_size, l.header_bytes);
    CBQ_CHECK(l.header.vocab_size > 0, "{}: llama2.c header field vocab_size = {} must be positive",
              path, l.header.vocab_size);
  } else {
    CBQ_CHECK(file_size >= sizeof(Llama2cHeader),
              "{}: truncated llama2.c header: {} bytes, expected at least {}", path, file_size,
              sizeof(Llama2cHeader));
    ByteReader r0(head, path);
    l.header = r0.read<Llama2cHeader>("header");
    l.shared = l.header.vocab_size > 0;
    l.header_bytes = sizeof(Llama2cHeader);
  }
  const Llama2cHeader& h = l.header;
  detail::check_llama2c_header(h, path);
  l.config = detail::llama2c_config(h, l.shared);
  l.arrays = detail::llama2c_arrays(l.config, l.legacy, l.shared);
  l.expected_bytes = l.header_bytes;
  for (const auto& a : l.arrays)
    l.expected_bytes =
        checked_add(l.expected_bytes,
                    checked_mul(detail::array_floats(a, l.config.n_layers, path), 4, path), path);
  CBQ_CHECK(l.expected_bytes == file_size,
            "{}: llama2.c file size mismatch: the header (dim={}, hidden_dim={}, n_layers={}, "
            "n_heads={}, n_kv_heads={}, vocab_size={}, seq_len={}) needs {} bytes, the file has {} "
            "bytes",
            path, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len,
            l.expected_bytes, file_size);
  return l;
}

// The layout of a llama2.c file from its header alone (nothing mapped or loaded).
inline Llama2cLayout probe_llama2c(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  CBQ_CHECK(in.good(), "{}: cannot open: {}", path, std::strerror(errno));
  std::vector<std::byte> head(256);
  in.read(reinterpret_cast<char*>(head.data()), static_cast<std::streamsize>(head.size()));
  head.resize(static_cast<std::size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(path, ec);
  CBQ_CHECK(!ec, "{}: cannot read its size: {}", path, ec.message());
  return llama2c_layout(head, size, path);
}

// Loads a llama2.c checkpoint. The file size must match the header exactly.
// q/k weights are kept as stored (interleaved RoPE pairs): config.rope_layout = interleaved.
inline Llama2cModel load_llama2c(const std::string& path) {
  MappedFile file(path);
  const Llama2cLayout layout = llama2c_layout(file.bytes(), file.size(), path);
  const ModelConfig& config = layout.config;
  const auto& arrays = layout.arrays;
  const std::size_t header_bytes = layout.header_bytes;
  Llama2cModel model{config, {}};
  ByteReader body(file.bytes().subspan(header_bytes), path);
  for (const auto& a : arrays) {
    const int64_t copies = a.per_layer ? config.n_layers : 1;
    const std::size_t bytes = static_cast<std::size_t>(a.shape.numel()) * sizeof(float);
    for (int64_t i = 0; i < copies; ++i) {
      auto src = body.take(bytes, a.name);
      if (a.skip) continue;
      Tensor<float> t = Tensor<float>::empty(a.shape);
      if (bytes) std::memcpy(t.data(), src.data(), bytes);
      model.weights.emplace(detail::layer_name(a.name, i), std::move(t));
    }
  }
  return model;
}

// Writes `weights` as a legacy llama2.c checkpoint (the inverse of load_llama2c). The config
// must use the interleaved RoPE layout (llama2.c's); lm_head.weight is written unless tied.
// The RoPE tables are recomputed from config.rope_theta as llama2.c's export does.
inline void save_llama2c(const std::string& path, const ModelConfig& c, const WeightMap& weights) {
  CBQ_CHECK(c.family == Family::llama && c.rope_layout == RopeLayout::interleaved,
            "{}: save_llama2c needs a llama-family config with interleaved RoPE", path);
  CBQ_CHECK(!c.attention_bias && !c.mlp_bias, "{}: llama2.c has no biases", path);
  CBQ_CHECK(c.head_dim * c.n_heads == c.dim,
            "{}: llama2.c needs head_dim * n_heads = dim ({} * {} != {})", path, c.head_dim,
            c.n_heads, c.dim);
  auto i32 = [&](int64_t v, const char* name) {
    CBQ_CHECK(v > 0 && v <= INT32_MAX, "{}: {} = {} does not fit a llama2.c header", path, name, v);
    return static_cast<int32_t>(v);
  };
  Llama2cHeader h{i32(c.dim, "dim"),
                  i32(c.hidden_dim, "hidden_dim"),
                  i32(c.n_layers, "n_layers"),
                  i32(c.n_heads, "n_heads"),
                  i32(c.n_kv_heads, "n_kv_heads"),
                  i32(c.vocab_size, "vocab_size"),
                  i32(c.max_seq_len, "max_seq_len")};
  if (!c.tied_embeddings) h.vocab_size = -h.vocab_size;
  detail::check_llama2c_header(h, path);
  auto arrays = detail::llama2c_arrays(c, true, c.tied_embeddings);
  // Validate everything before creating the file.
  for (const auto& a : arrays) {
    if (a.skip) continue;
    for (int64_t i = 0; i < (a.per_layer ? c.n_layers : 1); ++i) {
      std::string name = detail::layer_name(a.name, i);
      auto it = weights.find(name);
      CBQ_CHECK(it != weights.end(), "{}: save_llama2c: missing tensor {}", path, name);
      CBQ_CHECK(it->second.shape() == a.shape,
                "{}: save_llama2c: tensor {} has shape {}, expected {}", path, name,
                it->second.shape(), a.shape);
    }
  }
  write_file_atomic(path, [&](std::ofstream& out) {
    write_pod(out, h);
    const int64_t half = c.head_dim / 2;
    for (const auto& a : arrays) {
      if (a.skip) {
        const bool real = &a == &arrays[11];  // the first table is cos, the second sin
        std::vector<float> table(static_cast<std::size_t>(c.max_seq_len * half));
        for (int64_t t = 0; t < c.max_seq_len; ++t)
          for (int64_t k = 0; k < half; ++k) {
            double freq = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * k) /
                                                           static_cast<double>(c.head_dim));
            double angle = static_cast<double>(static_cast<float>(t) * static_cast<float>(freq));
            table[static_cast<std::size_t>(t * half + k)] =
                static_cast<float>(real ? std::cos(angle) : std::sin(angle));
          }
        out.write(reinterpret_cast<const char*>(table.data()),
                  static_cast<std::streamsize>(table.size() * sizeof(float)));
        continue;
      }
      for (int64_t i = 0; i < (a.per_layer ? c.n_layers : 1); ++i) {
        Tensor<float> t = weights.at(detail::layer_name(a.name, i)).to(Device::cpu);
        out.write(reinterpret_cast<const char*>(t.data()),
                  static_cast<std::streamsize>(t.numel() * sizeof(float)));
      }
    }
  });
}

}  // namespace cbq::io
