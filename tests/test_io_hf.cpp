// Hugging Face config.json parsing and load_hf on tiny synthetic model folders (LLaMA in F16 and
// BF16, sharded; OPT with base-model names), plus missing / misshapen tensors and bad configs.
#include <doctest/doctest.h>

#include <cbq/formats/hf_config.hpp>
#include <cbq/formats/llama2c.hpp>
#include <filesystem>
#include <fstream>
#include <string>

#include "support/files.hpp"
#include "support/gradcheck.hpp"

namespace fs = std::filesystem;
using namespace cbq;
using nlohmann::json;

namespace {

using cbq::testing::error_of;
using cbq::testing::read_all;
using cbq::testing::TempDir;
using cbq::testing::write_all;

json llama_json() {
  return json{{"architectures", {"LlamaForCausalLM"}},
              {"hidden_size", 16},
              {"intermediate_size", 40},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"vocab_size", 32},
              {"max_position_embeddings", 64},
              {"rms_norm_eps", 1e-6},
              {"rope_theta", 500000.0},
              {"tie_word_embeddings", false},
              {"bos_token_id", 1},
              {"eos_token_id", 2},
              {"hidden_act", "silu"},
              {"rope_scaling", nullptr},
              {"torch_dtype", "float16"}};
}

json opt_json() {
  return json{{"architectures", {"OPTForCausalLM"}},
              {"hidden_size", 16},
              {"ffn_dim", 64},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 4},
              {"vocab_size", 50},
              {"max_position_embeddings", 32},
              {"do_layer_norm_before", true},
              {"word_embed_proj_dim", 16},
              {"activation_function", "relu"},
              {"enable_bias", true},
              {"bos_token_id", 2},
              {"eos_token_id", 2}};
}

WeightMap random_for(const ModelConfig& c, uint64_t seed) {
  WeightMap w;
  for (const auto& [name, shape] : io::expected_weight_shapes(c))
    w[name] = testing::randn<float>(shape, seed++);
  return w;
}

}  // namespace

TEST_CASE("safetensors: hf config.json for LLaMA, Mistral and OPT") {
  ModelConfig c = io::parse_hf_config(llama_json(), "config.json");
  CHECK(c.family == Family::llama);
  CHECK(c.architecture == "LlamaForCausalLM");
  CHECK(c.dim == 16);
  CHECK(c.hidden_dim == 40);
  CHECK(c.n_layers == 2);
  CHECK(c.n_heads == 4);
  CHECK(c.n_kv_heads == 2);
  CHECK(c.head_dim == 4);
  CHECK(c.vocab_size == 32);
  CHECK(c.max_seq_len == 64);
  CHECK(c.norm_eps == 1e-6);
  CHECK(c.rope_theta == 500000.0);
  CHECK(c.rope_layout == RopeLayout::rotate_half);
  CHECK_FALSE(c.tied_embeddings);
  CHECK_FALSE(c.attention_bias);

  // Defaults: kv heads = heads, head_dim = hidden/heads, eps 1e-6, theta 1e4, eos as a list.
  json j = {{"model_type", "llama"},
            {"hidden_size", 32},
            {"intermediate_size", 64},
            {"num_hidden_layers", 1},
            {"num_attention_heads", 4},
            {"vocab_size", 10},
            {"eos_token_id", {128001, 128009}},
            {"head_dim", nullptr}};
  c = io::parse_hf_config(j, "config.json");
  CHECK(c.architecture == "LlamaForCausalLM");
  CHECK(c.n_kv_heads == 4);
  CHECK(c.head_dim == 8);
  CHECK(c.norm_eps == 1e-6);
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.max_seq_len == 2048);
  CHECK(c.eos_id == 128001);
  CHECK(c.bos_id == 1);

  j = llama_json();
  j["architectures"] = {"MistralForCausalLM"};
  j["sliding_window"] = 32;
  c = io::parse_hf_config(j, "config.json");
  CHECK(c.family == Family::llama);
  CHECK(c.max_seq_len == 32);

  c = io::parse_hf_config(opt_json(), "config.json");
  CHECK(c.family == Family::opt);
  CHECK(c.hidden_dim == 64);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.tied_embeddings);  // OPT default
  CHECK(c.attention_bias);
  CHECK(c.mlp_bias);
  CHECK(c.opt_layer_norm_before);
  CHECK(c.bos_id == 2);
  CHECK(c.norm_eps == 1e-5);
}

TEST_CASE("safetensors: hf config errors name the file and the field") {
  auto expect = [](json j, const std::string& part) {
    std::string msg = error_of([&] { io::parse_hf_config(j, "/m/config.json"); });
    CHECK_MESSAGE(msg.find("/m/config.json") != std::string::npos, msg);
    CHECK_MESSAGE(msg.find(part) != std::string::npos, msg);
  };
  json j = llama_json();
  j["architectures"] = {"GPTNeoXForCausalLM"};
  expect(j, "field \"architectures\": unsupported architecture \"GPTNeoXForCausalLM\"");
  j = llama_json();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  expect(j, "field \"rope_scaling\"");
  j = llama_json();
  j["hidden_size"] = "16";
  expect(j, "field \"hidden_size\" must be an integer, got \"16\"");
  j = llama_json();
  j.erase("vocab_size");
  expect(j, "required field \"vocab_size\" is missing");
  j = llama_json();
  j["num_key_value_heads"] = 3;
  expect(j, "num_key_value_heads = 3 does not divide num_attention_heads = 4");
  j = llama_json();
  j["num_hidden_layers"] = 0;
  expect(j, "field \"num_hidden_layers\" = 0 must be positive");
  j = llama_json();
  j["hidden_act"] = "gelu";
  expect(j, "field \"hidden_act\"");
  j = opt_json();
  j["word_embed_proj_dim"] = 8;
  expect(j, "field \"word_embed_proj_dim\": 8 differs from hidden_size 16");
  j = opt_json();
  j["activation_function"] = "gelu";
  expect(j, "field \"activation_function\"");
  expect(json::array(), "not a JSON object");
  expect(json{{"model_type", "gpt2"}}, "field \"architectures\"");

  TempDir dir("hf_badjson");
  write_all(dir.file("config.json"), "{\"hidden_size\": 16,");
  std::string msg = error_of([&] { io::load_hf_config(dir.path.string()); });
  CHECK(msg.find(dir.file("config.json") + ": invalid JSON") != std::string::npos);
  msg = error_of([&] { io::load_hf_config(dir.file("nope.json")); });
  CHECK(msg.find("nope.json: cannot open") != std::string::npos);
}

TEST_CASE("safetensors: load_hf reads a LLaMA folder (F16 single file, BF16 sharded)") {
  ModelConfig cfg = io::parse_hf_config(llama_json(), "config.json");
  WeightMap w = random_for(cfg, 100);
  for (bool sharded : {false, true}) {
    TempDir dir("hf_llama");
    write_all(dir.file("config.json"), llama_json().dump(2));
    std::map<std::string, io::TensorToWrite> first, second;
    json weight_map = json::object();
    int k = 0;
    for (const auto& [name, t] : w) {
      auto& part = (sharded && k++ % 2) ? second : first;
      part[name] = sharded ? io::TensorToWrite::bf16(t) : io::TensorToWrite::f16(t);
      weight_map[name] = (&part == &first) ? "model-00001-of-00002.safetensors"
                                           : "model-00002-of-00002.safetensors";
    }
    first["model.layers.0.self_attn.rotary_emb.inv_freq"] =
        io::TensorToWrite::f32(Tensor<float>(Shape{2}));
    if (sharded) {
      io::write_safetensors(dir.file("model-00001-of-00002.safetensors"), first);
      io::write_safetensors(dir.file("model-00002-of-00002.safetensors"), second);
      write_all(dir.file("model.safetensors.index.json"), json{{"weight_map", weight_map}}.dump());
    } else {
      io::write_safetensors(dir.file("model.safetensors"), first, {{"format", "pt"}});
    }
    auto m = io::load_hf(dir.path.string());
    CHECK(m.config.dim == 16);
    REQUIRE(m.weights.size() == w.size());
    for (const auto& [name, t] : w) {
      INFO(name);
      const Tensor<float>& got = m.weights.at(name);
      REQUIRE(got.shape() == t.shape());
      for (int64_t i = 0; i < t.numel(); ++i) {
        float expect = sharded ? io::bf16_to_float(io::float_to_bf16(t[i]))
                               : io::f16_to_float(io::float_to_f16(t[i]));
        REQUIRE(got[i] == expect);
      }
    }
  }
}

TEST_CASE("safetensors: load_hf reads OPT with base-model names and drops a tied lm_head") {
  ModelConfig cfg = io::parse_hf_config(opt_json(), "config.json");
  WeightMap w = random_for(cfg, 200);
  CHECK(w.at("model.decoder.embed_positions.weight").shape() == Shape{34, 16});
  CHECK(w.count("model.decoder.layers.1.fc1.bias") == 1);
  CHECK(w.count("lm_head.weight") == 0);
  TempDir dir("hf_opt");
  write_all(dir.file("config.json"), opt_json().dump());
  std::map<std::string, io::TensorToWrite> out;
  for (const auto& [name, t] : w) out[name.substr(6)] = io::TensorToWrite::f32(t);  // "decoder..."
  out["lm_head.weight"] = io::TensorToWrite::f32(w.at("model.decoder.embed_tokens.weight"));
  io::write_safetensors(dir.file("model.safetensors"), out);
  auto m = io::load_hf(dir.path.string());
  CHECK(m.config.family == Family::opt);
  CHECK(m.weights.size() == w.size());
  CHECK(m.weights.count("lm_head.weight") == 0);
  for (const auto& [name, t] : w) CHECK(testing::max_abs_diff(m.weights.at(name), t) == 0);
}

TEST_CASE("safetensors: load_hf reports missing and misshapen tensors") {
  ModelConfig cfg = io::parse_hf_config(llama_json(), "config.json");
  WeightMap w = random_for(cfg, 300);
  TempDir dir("hf_missing");
  write_all(dir.file("config.json"), llama_json().dump());
  std::string msg = error_of([&] { io::load_hf(dir.path.string()); });
  CHECK_MESSAGE(
      msg.find("no model.safetensors or model.safetensors.index.json") != std::string::npos, msg);
  write_all(dir.file("pytorch_model.bin"), "x");
  msg = error_of([&] { io::load_hf(dir.path.string()); });
  CHECK(msg.find("PyTorch .bin checkpoints are not supported") != std::string::npos);

  std::map<std::string, io::TensorToWrite> out;
  for (const auto& [name, t] : w)
    if (name != "model.layers.1.mlp.up_proj.weight") out[name] = io::TensorToWrite::f32(t);
  const std::string file = dir.file("model.safetensors");
  io::write_safetensors(file, out);
  msg = error_of([&] { io::load_hf(dir.path.string()); });
  CHECK_MESSAGE(
      msg.find(file + ": missing tensor model.layers.1.mlp.up_proj.weight") != std::string::npos,
      msg);
  CHECK(msg.find("(40, 16)") != std::string::npos);

  out["model.layers.1.mlp.up_proj.weight"] = io::TensorToWrite::f32(Tensor<float>(Shape{16, 40}));
  io::write_safetensors(file, out);
  msg = error_of([&] { io::load_hf(dir.path.string()); });
  CHECK_MESSAGE(msg.find("tensor model.layers.1.mlp.up_proj.weight has shape (16, 40), the config "
                         "implies (40, 16)") != std::string::npos,
                msg);
  CHECK(msg.find(file) != std::string::npos);

  out["model.layers.1.mlp.up_proj.weight"] =
      io::TensorToWrite::f32(w.at("model.layers.1.mlp.up_proj.weight"));
  out.erase("lm_head.weight");  // untied config needs it
  io::write_safetensors(file, out);
  msg = error_of([&] { io::load_hf(dir.path.string()); });
  CHECK(msg.find("missing tensor lm_head.weight") != std::string::npos);
}

TEST_CASE("safetensors: load_hf on the real fixtures matches the recorded weights") {
  // tests/fixtures/*/reference.json "weights": {name: {shape, first8, sum}} written by the
  // Python generator from the same files (fp32, fp16, bf16, sharded, OPT).
  const fs::path root = fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures";
  int checked = 0;
  if (fs::exists(root)) {
    for (const auto& entry : fs::directory_iterator(root)) {
      const fs::path rec = entry.path() / "reference.json";
      if (!fs::exists(entry.path() / "config.json") || !fs::exists(rec)) continue;
      INFO(entry.path().string());
      json r = json::parse(std::ifstream(rec));
      if (!r.contains("weights")) continue;
      auto m = io::load_hf(entry.path().string());
      for (const auto& [name, w] : r["weights"].items()) {
        INFO(name);
        if (name == "lm_head.weight" && m.config.tied_embeddings) continue;
        REQUIRE(m.weights.count(name) == 1);
        const Tensor<float>& t = m.weights.at(name);
        CHECK(t.shape() == Shape(w["shape"].begin(), w["shape"].end()));
        auto first8 = w["first8"].get<std::vector<double>>();
        for (std::size_t i = 0; i < first8.size(); ++i)
          CHECK(t[static_cast<int64_t>(i)] == doctest::Approx(first8[i]).epsilon(1e-7));
        double sum = 0;
        for (int64_t i = 0; i < t.numel(); ++i) sum += t[i];
        CHECK(sum == doctest::Approx(w["sum"].get<double>()).epsilon(1e-6));
        ++checked;
      }
    }
  }
  if (checked == 0) MESSAGE("skipped: no tests/fixtures/*/reference.json with weights");
}

TEST_CASE("llama2c: fixture llama2c.bin equals the HF weights with q/k un-permuted") {
  // The generator exported tiny-llama to llama2.c's legacy format; llama2.c keeps Meta's
  // interleaved RoPE rows, Hugging Face permutes q/k rows to rotate_half: HF row
  // h*hd + t*hd/2 + i holds llama2.c row h*hd + 2*i + t.
  const fs::path dir = fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / "tiny-llama";
  if (!fs::exists(dir / "llama2c.bin") || !fs::exists(dir / "model.safetensors")) {
    MESSAGE("skipped: tests/fixtures/tiny-llama not found");
    return;
  }
  auto hf = io::load_hf(dir.string());
  auto l2 = io::load_llama2c((dir / "llama2c.bin").string());
  CHECK(l2.config.dim == hf.config.dim);
  CHECK(l2.config.n_kv_heads == hf.config.n_kv_heads);
  CHECK(l2.config.tied_embeddings == hf.config.tied_embeddings);
  CHECK(l2.config.rope_layout == RopeLayout::interleaved);
  REQUIRE(l2.weights.size() == hf.weights.size());
  const int64_t hd = hf.config.head_dim;
  for (const auto& [name, w] : hf.weights) {
    INFO(name);
    REQUIRE(l2.weights.count(name) == 1);
    const Tensor<float>& v = l2.weights.at(name);
    REQUIRE(v.shape() == w.shape());
    const bool qk =
        name.find("q_proj") != std::string::npos || name.find("k_proj") != std::string::npos;
    if (!qk) {
      CHECK(testing::max_abs_diff(v, w) == 0);
      continue;
    }
    double worst = 0;
    for (int64_t row = 0; row < w.size(0); ++row) {
      const int64_t h = row / hd, t = (row % hd) / (hd / 2), i = row % (hd / 2);
      const int64_t src = h * hd + 2 * i + t;
      for (int64_t col = 0; col < w.size(1); ++col)
        worst = std::max(worst, static_cast<double>(std::abs(w(row, col) - v(src, col))));
    }
    CHECK(worst == 0);
  }
}

TEST_CASE("safetensors: load_hf rejects more layers than the checkpoint has tensors") {
  // Found reviewing load_hf for fuzz/fuzz_hf_config, confirmed by it: num_hidden_layers =
  // 2000000000 made load_hf build the expected-name table for every layer before looking at the
  // checkpoint (a hang, then OOM).
  ModelConfig cfg = io::parse_hf_config(llama_json(), "config.json");
  std::map<std::string, io::TensorToWrite> out;
  for (const auto& [name, t] : random_for(cfg, 400)) out[name] = io::TensorToWrite::f32(t);
  TempDir dir("hf_layers");
  io::write_safetensors(dir.file("model.safetensors"), out);
  json j = llama_json();
  j["num_hidden_layers"] = 2000000000;
  write_all(dir.file("config.json"), j.dump());
  const std::string msg = error_of([&] { io::load_hf(dir.path.string()); });
  CHECK_MESSAGE(msg.find(fmt::format("config.json has 2000000000 layers but the checkpoint holds "
                                     "only {} tensors",
                                     out.size())) != std::string::npos,
                msg);
  // One more layer than stored is still reported as the missing tensors of that layer.
  j["num_hidden_layers"] = 3;
  write_all(dir.file("config.json"), j.dump());
  CHECK(error_of([&] { io::load_hf(dir.path.string()); }).find("missing tensor model.layers.2.") !=
        std::string::npos);
}
