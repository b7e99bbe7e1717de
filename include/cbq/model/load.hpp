#pragma once
// One entry point for every supported checkpoint: load_model(path) reads a llama2.c `.bin` file
// or a Hugging Face folder (config.json + safetensors), builds the model of the right family with
// its tokenizer, and returns it as an AnyModel (a LLaMA- or OPT-family Transformer<float>).
//
//   auto model = cbq::load_model("stories260K.bin", "tok512.bin");
//   fmt::print("{}\n", cbq::describe(model));
//   model.visit([&](auto& m) { auto logits = m.logits(m.tokenizer->encode("Once", true, false));
//   });
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "cbq/core/error.hpp"
#include "cbq/formats/gguf_llama.hpp"
#include "cbq/formats/hf_config.hpp"
#include "cbq/formats/llama2c.hpp"
#include "cbq/model/llama_block.hpp"
#include "cbq/model/opt_block.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/tokenizer/gguf_tokenizer.hpp"
#include "cbq/tokenizer/hf_tokenizer.hpp"
#include "cbq/tokenizer/llama2c_tokenizer.hpp"

namespace cbq::io {

// A GGUF LLaMA with the tokenizer its metadata holds (null when the vocabulary is not usable; the
// reason is in `notes`).
struct GgufModel : GgufLlama {
  std::shared_ptr<const Tokenizer> tokenizer;
};

// read_gguf_llama (formats/gguf_llama.hpp) plus the file's tokenizer
// (tokenizer/gguf_tokenizer.hpp).
inline GgufModel load_gguf(const std::string& path, bool read_tokenizer = true) {
  GgufFile f(path);
  GgufModel out;
  static_cast<GgufLlama&>(out) = read_gguf_llama(f);
  if (read_tokenizer) {
    std::string why_not;
    out.tokenizer = gguf_tokenizer(f, out.config.vocab_size, why_not);
    if (!out.tokenizer) out.notes.push_back("no tokenizer: " + why_not);
  }
  return out;
}

// load_gguf as a Transformer<LlamaBlock<float>> with its tokenizer (if usable).
inline Transformer<LlamaBlock<float>> load_gguf_llama(const std::string& path) {
  GgufModel g = load_gguf(path);
  Transformer<LlamaBlock<float>> m(g.config, g.weights);
  m.tokenizer = g.tokenizer;
  return m;
}

}  // namespace cbq::io

namespace cbq {

using LlamaModel = Transformer<LlamaBlock<float>>;
using OptModel = Transformer<OptBlock<float>>;

// A loaded model of one of the supported families. visit() hands the concrete Transformer to a
// generic lambda, so code written against Transformer<Block> runs on either family.
class AnyModel {
 public:
  using variant_type = std::variant<LlamaModel, OptModel>;

  AnyModel(LlamaModel m, std::string source = "")
      : model_(std::move(m)), source_(std::move(source)) {}
  AnyModel(OptModel m, std::string source = "")
      : model_(std::move(m)), source_(std::move(source)) {}

  template <class F>
  decltype(auto) visit(F&& f) {
    return std::visit(std::forward<F>(f), model_);
  }
  template <class F>
  decltype(auto) visit(F&& f) const {
    return std::visit(std::forward<F>(f), model_);
  }

  const ModelConfig& config() const {
    return visit([](const auto& m) -> const ModelConfig& { return m.config; });
  }
  Family family() const { return config().family; }
  // The tokenizer found with the model (null when none was).
  const std::shared_ptr<const Tokenizer>& tokenizer() const {
    return visit(
        [](const auto& m) -> const std::shared_ptr<const Tokenizer>& { return m.tokenizer; });
  }
  void set_tokenizer(std::shared_ptr<const Tokenizer> tok) {
    visit([&](auto& m) { m.tokenizer = std::move(tok); });
  }
  // The path it was loaded from ("" when built in memory).
  const std::string& source() const { return source_; }

  bool is_llama() const { return std::holds_alternative<LlamaModel>(model_); }
  bool is_opt() const { return std::holds_alternative<OptModel>(model_); }
  LlamaModel& llama() { return get<LlamaModel>("llama"); }
  OptModel& opt() { return get<OptModel>("opt"); }
  variant_type& variant() { return model_; }
  const variant_type& variant() const { return model_; }

  // Logits (T, V) of `tokens` from position 0 (valid until the next evaluation call).
  Tensor<float> logits(const std::vector<int32_t>& tokens) {
    return visit([&](auto& m) { return m.logits(tokens); });
  }

 private:
  template <class M>
  M& get(const char* want) {
    M* m = std::get_if<M>(&model_);
    CBQ_CHECK(m != nullptr, "AnyModel: the model is {}, not {}", family_name(family()), want);
    return *m;
  }

  variant_type model_;
  std::string source_;
};

// Number of scalars in every parameter of the model (embeddings, blocks, final norm, LM head;
// a tied LM head counts once).
template <class Model>
int64_t parameter_count(Model& m) {
  auto numel = [](const auto& p) { return p.value.defined() ? p.value.numel() : int64_t(0); };
  int64_t n = numel(m.embed_tokens) + numel(m.embed_positions) + numel(m.final_norm_weight) +
              numel(m.final_norm_bias) + numel(m.lm_head);
  for (auto& b : m.blocks) {
    for (auto* l : b.linears()) n += numel(l->weight) + numel(l->bias);
    for (auto* p : b.other_parameters()) n += numel(*p);
  }
  return n;
}
inline int64_t parameter_count(AnyModel& m) {
  return m.visit([](auto& t) { return parameter_count(t); });
}

namespace detail {
inline std::string human_count(int64_t n) {
  const double v = static_cast<double>(n);
  if (n >= 1000000000) return fmt::format("{:.2f}B", v / 1e9);
  if (n >= 1000000) return fmt::format("{:.2f}M", v / 1e6);
  if (n >= 1000) return fmt::format("{:.1f}K", v / 1e3);
  return fmt::format("{}", n);
}

// The first non-finite element of `t` (−1 when all are finite).
inline int64_t first_non_finite(const Tensor<float>& t) {
  const Tensor<float> c = t.is_cpu() ? t.contiguous() : t.to(Device::cpu);
  const float* p = c.data();
  for (int64_t i = 0; i < c.numel(); ++i)
    if (!std::isfinite(p[i])) return i;
  return -1;
}

inline std::string element_position(const Shape& shape, int64_t i) {
  if (shape.ndim() != 2) return fmt::format("element {}", i);
  return fmt::format("element {} (row {}, column {})", i, i / shape[1], i % shape[1]);
}

}  // namespace detail

// A one-paragraph summary: family, architecture, dimensions, layers, heads, vocabulary, context,
// parameter count, tokenizer.
template <class Model>
std::string describe(Model& m, const std::string& source = "") {
  const ModelConfig& c = m.config;
  const int64_t params = parameter_count(m);
  std::string s = fmt::format("{} model ({}{}{}): dim {}, {} hidden {}, {} layers, {} heads",
                              family_name(c.family), c.architecture, source.empty() ? "" : " from ",
                              source, c.dim, c.family == Family::opt ? "FFN" : "MLP", c.hidden_dim,
                              c.n_layers, c.n_heads);
  if (c.n_kv_heads != c.n_heads) s += fmt::format(" / {} KV heads", c.n_kv_heads);
  s += fmt::format(" (head dim {}), vocabulary {}, context {}", c.head_dim, c.vocab_size,
                   c.max_seq_len);
  if (c.family == Family::llama)
    s += fmt::format(", RoPE {} theta {}",
                     c.rope_layout == RopeLayout::interleaved ? "interleaved" : "rotate-half",
                     c.rope_theta);
  else
    s += ", learned positions";
  s += fmt::format(", {} embeddings, {} parameters ({}).", c.tied_embeddings ? "tied" : "untied",
                   detail::human_count(params), params);
  if (m.tokenizer)
    s += fmt::format(" Tokenizer: {} tokens, BOS {}, EOS {}.", m.tokenizer->vocab_size(),
                     m.tokenizer->bos_id(), m.tokenizer->eos_id());
  else
    s += " No tokenizer.";
  return s;
}
inline std::string describe(AnyModel& m) {
  return m.visit([&](auto& t) { return describe(t, m.source()); });
}

// The first parameter of `m` holding a NaN or Inf, as "NAME: element … (value)", or "" when
// every parameter is finite (used to name the cause of a non-finite result).
template <class Model>
std::string find_non_finite_parameter(Model& m) {
  std::string found;
  auto look = [&](const auto& p) {
    if (!found.empty() || !p.value.defined()) return;
    const Tensor<float> v = p.value.to(Device::cpu).template cast<float>();
    const int64_t i = detail::first_non_finite(v);
    if (i >= 0)
      found = fmt::format("{}: {} holds {}", p.name, detail::element_position(v.shape(), i),
                          v.contiguous().data()[i]);
  };
  look(m.embed_tokens);
  look(m.embed_positions);
  for (auto& b : m.blocks) {
    for (auto* l : b.linears()) {
      look(l->weight);
      look(l->bias);
    }
    for (auto* p : b.other_parameters()) look(*p);
  }
  look(m.final_norm_weight);
  look(m.final_norm_bias);
  look(m.lm_head);
  return found;
}

namespace detail {

// The first bytes of a file (fewer when it is shorter).
inline std::string file_magic(const std::filesystem::path& p, std::size_t n) {
  std::ifstream in(p, std::ios::binary);
  std::string s(n, '\0');
  in.read(s.data(), static_cast<std::streamsize>(n));
  s.resize(static_cast<std::size_t>(std::max<std::streamsize>(in.gcount(), 0)));
  return s;
}

// tokenizer.json (or a folder holding it) → HfTokenizer; anything else → llama2.c tokenizer.bin.
inline std::shared_ptr<const Tokenizer> load_tokenizer_file(const std::filesystem::path& p,
                                                            int64_t model_vocab_size) {
  namespace fs = std::filesystem;
  CBQ_CHECK(fs::exists(p), "load_model: tokenizer {} does not exist", p.string());
  const bool json = fs::is_directory(p) || p.extension() == ".json";
  if (json) {
    HfTokenizerOptions o;
    o.model_vocab_size = model_vocab_size;
    return std::make_shared<HfTokenizer>(HfTokenizer::load(p.string(), o));
  }
  return std::make_shared<Llama2cTokenizer>(p.string(), model_vocab_size);
}

template <class Model>
AnyModel build_model(const ModelConfig& c, const WeightMap& w, std::string source) {
  return AnyModel(Model(c, w), std::move(source));
}

// Every parameter of a checkpoint is finite (embeddings, norms, LM head, biases, not only the
// blocks' linear layers): a NaN would otherwise reach every result as a NaN perplexity.
inline void check_finite_weights(const WeightMap& w, const std::string& source) {
  for (const auto& [name, t] : w) {
    const int64_t i = first_non_finite(t);
    if (i >= 0)
      fail(
          "{}: tensor {} holds a non-finite value ({}) at {} of shape {}; refusing to load a "
          "model with NaN or Inf parameters",
          source, name, t.is_cpu() ? t.contiguous().data()[i] : 0.f, element_position(t.shape(), i),
          t.shape());
  }
}

inline AnyModel from_weights(const ModelConfig& c, const WeightMap& w, const std::string& source) {
  check_finite_weights(w, source);
  if (c.family == Family::llama) return build_model<LlamaModel>(c, w, source);
  return build_model<OptModel>(c, w, source);
}

}  // namespace detail

// Loads a model:
//  * a llama2.c checkpoint (`.bin`, legacy or version-1 float32 export). Tokenizer: the given
//    path, else `tokenizer.bin` beside the model, else none.
//  * a Hugging Face folder (config.json + model.safetensors or a sharded index; a path to its
//    config.json or a .safetensors file inside it also works). Tokenizer: the given path, else
//    `tokenizer.json` in the folder, else none.
// A tokenizer path ending in .json (or naming a folder) is read as tokenizer.json, anything
// else as a llama2.c tokenizer.bin; its vocabulary must fit the model's.
// Throws cbq::Error naming the path for a missing path, an unknown format or a bad checkpoint.
inline AnyModel load_model(const std::string& path, const std::string& tokenizer_path = "") {
  namespace fs = std::filesystem;
  CBQ_CHECK(!path.empty(), "load_model: empty model path");
  const fs::path p(path);
  std::error_code ec;
  const fs::file_status st = fs::status(p, ec);
  CBQ_CHECK(fs::exists(st), "load_model: {} does not exist", path);

  fs::path hf_dir;
  if (fs::is_directory(st)) {
    if (!fs::exists(p / "config.json")) {
      std::string hint;
      for (const auto& e : fs::directory_iterator(p, ec))
        if (e.path().extension() == ".bin" && e.path().filename() != "tokenizer.bin" &&
            e.path().filename().string().rfind("pytorch_model", 0) != 0) {
          hint = fmt::format(" (to load the llama2.c checkpoint {}, pass the file itself)",
                             e.path().string());
          break;
        }
      fail(
          "load_model: {} is a folder without config.json: expected a Hugging Face model folder "
          "(config.json + model.safetensors) or a llama2.c .bin file{}",
          path, hint);
    }
    hf_dir = p;
  } else if (p.filename() == "config.json" || p.extension() == ".safetensors" ||
             p.filename() == "model.safetensors.index.json") {
    hf_dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
    CBQ_CHECK(fs::exists(hf_dir / "config.json"),
              "load_model: {} has no config.json beside it (a Hugging Face model needs one)", path);
  } else {
    CBQ_CHECK(fs::is_regular_file(st), "load_model: {} is not a regular file or a folder", path);
    const std::string magic = detail::file_magic(p, 4);
    if (magic == "GGUF") {
      io::GgufModel g = io::load_gguf(path, /*read_tokenizer=*/tokenizer_path.empty());
      AnyModel m = detail::from_weights(g.config, g.weights, path);
      if (!tokenizer_path.empty())
        m.set_tokenizer(detail::load_tokenizer_file(tokenizer_path, g.config.vocab_size));
      else if (g.tokenizer)
        m.set_tokenizer(g.tokenizer);
      return m;
    }
    if (!magic.empty() && (magic[0] == '{' || magic[0] == '['))
      fail(
          "load_model: {} looks like a JSON file, not a model (pass the Hugging Face folder "
          "holding config.json, or a llama2.c .bin file)",
          path);
    if (magic.size() >= 2 && magic[0] == 'P' && magic[1] == 'K')
      fail(
          "load_model: {} is a zip archive (a PyTorch .pt/.bin pickle?); convert it to "
          "safetensors or a llama2.c export",
          path);
    io::Llama2cModel l2;
    try {
      l2 = io::load_llama2c(path);
    } catch (const Error& e) {
      fail(
          "load_model: {} is not a Hugging Face folder, so it was read as a llama2.c checkpoint, "
          "which failed: {}",
          path, e.what());
    }
    AnyModel m = detail::from_weights(l2.config, l2.weights, path);
    l2.weights.clear();
    fs::path tok =
        tokenizer_path.empty() ? p.parent_path() / "tokenizer.bin" : fs::path(tokenizer_path);
    if (!tokenizer_path.empty() || fs::exists(tok)) {
      try {
        m.set_tokenizer(detail::load_tokenizer_file(tok, l2.config.vocab_size));
      } catch (const Error& e) {
        if (!tokenizer_path.empty()) throw;
        fail(
            "load_model: {} found beside the model does not fit it ({}); pass the right "
            "tokenizer path",
            tok.string(), e.what());
      }
    }
    return m;
  }

  io::HfModel hf = io::load_hf(hf_dir.string());
  AnyModel m = detail::from_weights(hf.config, hf.weights, hf_dir.string());
  hf.weights.clear();
  fs::path tok = tokenizer_path.empty() ? hf_dir / "tokenizer.json" : fs::path(tokenizer_path);
  if (!tokenizer_path.empty() || fs::exists(tok))
    m.set_tokenizer(detail::load_tokenizer_file(tok, hf.config.vocab_size));
  return m;
}

// What a model path holds, from its headers alone: nothing is mapped or loaded, so the tools can
// check memory, disk and options against it in the first second.
struct ModelProbe {
  std::string format;  // "llama2.c", "Hugging Face", "GGUF"
  ModelConfig config;
  int64_t parameters = 0;   // scalars of every parameter (a tied LM head once)
  uint64_t file_bytes = 0;  // the files the loader maps
  // Bytes of float32 parameters in memory.
  uint64_t parameter_bytes() const { return static_cast<uint64_t>(parameters) * sizeof(float); }
};

inline int64_t expected_parameter_count(const ModelConfig& c) {
  int64_t n = 0;
  for (const auto& [name, shape] : io::expected_weight_shapes(c)) n += shape.numel();
  return n;
}

// Reads the config of a model path as load_model would find it (llama2.c header, config.json,
// GGUF metadata); throws cbq::Error naming the path as load_model does.
inline ModelProbe probe_model(const std::string& path) {
  namespace fs = std::filesystem;
  CBQ_CHECK(!path.empty(), "load_model: empty model path");
  const fs::path p(path);
  std::error_code ec;
  const fs::file_status st = fs::status(p, ec);
  CBQ_CHECK(fs::exists(st), "load_model: {} does not exist", path);
  ModelProbe probe;
  fs::path hf_dir;
  if (fs::is_directory(st)) {
    hf_dir = p;
  } else if (p.filename() == "config.json" || p.extension() == ".safetensors" ||
             p.filename() == "model.safetensors.index.json") {
    hf_dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  } else {
    CBQ_CHECK(fs::is_regular_file(st), "load_model: {} is not a regular file or a folder", path);
    probe.file_bytes = fs::file_size(p, ec);
    if (detail::file_magic(p, 4) == "GGUF") {
      probe.format = "GGUF";
      probe.config = io::gguf_llama_config(io::GgufFile(path));
    } else {
      probe.format = "llama2.c";
      probe.config = io::probe_llama2c(path).config;
    }
    probe.parameters = expected_parameter_count(probe.config);
    return probe;
  }
  CBQ_CHECK(fs::exists(hf_dir / "config.json"),
            "load_model: {} is a folder without config.json: expected a Hugging Face model folder "
            "(config.json + model.safetensors) or a llama2.c .bin file",
            path);
  probe.format = "Hugging Face";
  probe.config = io::load_hf_config(hf_dir.string());
  probe.parameters = expected_parameter_count(probe.config);
  for (const auto& e : fs::directory_iterator(hf_dir, ec))
    if (e.path().extension() == ".safetensors" && e.is_regular_file(ec))
      probe.file_bytes += e.file_size(ec);
  return probe;
}

// The tokenizer load_model attaches to `path`'s model, loaded alone before the weights (so that
// a text too short for a window is refused before a large model is read): `tokenizer_path`, else
// tokenizer.bin beside a llama2.c file or tokenizer.json in a Hugging Face folder. Null for a
// GGUF file without `tokenizer_path` (its vocabulary is inside the model) and when there is none.
inline std::shared_ptr<const Tokenizer> load_tokenizer_for(const std::string& path,
                                                           const std::string& tokenizer_path,
                                                           const ModelProbe& probe) {
  namespace fs = std::filesystem;
  fs::path tok = tokenizer_path;
  if (tok.empty()) {
    if (probe.format == "llama2.c") tok = fs::path(path).parent_path() / "tokenizer.bin";
    if (probe.format == "Hugging Face")
      tok = (fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path()) /
            "tokenizer.json";
  }
  if (tok.empty() || !fs::exists(tok)) return nullptr;
  return detail::load_tokenizer_file(tok, probe.config.vocab_size);
}

}  // namespace cbq
