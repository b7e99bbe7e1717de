// llama2.c checkpoint loader: the real stories260K model, synthetic round trips and corrupted
// copies (truncated, too long, bad header values).
#include <doctest/doctest.h>

#include <cbq/formats/llama2c.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <cbq/model/random.hpp>

#include "support/files.hpp"
#include "support/gradcheck.hpp"

namespace fs = std::filesystem;
using namespace cbq;

namespace {

using cbq::testing::error_of;
using cbq::testing::read_all;
using cbq::testing::TempDir;
using cbq::testing::write_all;

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const std::string& path, const char* data, std::size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data, static_cast<std::streamsize>(n));
}
std::string model_path() { return cbq::testing::data_dir() + "/models/stories260K.bin"; }

ModelConfig small_config(bool tied) {
  ModelConfig c;
  c.architecture = "llama2.c";
  c.dim = 16;
  c.hidden_dim = 24;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.vocab_size = 11;
  c.max_seq_len = 8;
  c.rope_layout = RopeLayout::interleaved;
  c.tied_embeddings = tied;
  return c;
}

void check_equal(const WeightMap& a, const WeightMap& b) {
  REQUIRE(a.size() == b.size());
  for (const auto& [name, t] : a) {
    INFO(name);
    REQUIRE(b.count(name) == 1);
    REQUIRE(b.at(name).shape() == t.shape());
    CHECK(testing::max_abs_diff(t, b.at(name)) == 0.0);
  }
}

}  // namespace

TEST_CASE("llama2c: loads stories260K with its header, names and raw values") {
  const std::string path = model_path();
  if (!fs::exists(path)) {
    MESSAGE("skipped: " << path << " not found");
    return;
  }
  auto m = io::load_llama2c(path);
  const ModelConfig& c = m.config;
  CHECK(c.family == Family::llama);
  CHECK(c.architecture == "llama2.c");
  CHECK(c.dim == 64);
  CHECK(c.hidden_dim == 172);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.head_dim == 8);
  CHECK(c.vocab_size == 512);
  CHECK(c.max_seq_len == 512);
  CHECK(c.tied_embeddings);
  CHECK(c.rope_layout == RopeLayout::interleaved);
  CHECK(c.norm_eps == 1e-5);
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.bos_id == 1);
  CHECK(c.eos_id == 2);
  CHECK(m.weights.size() == 1 + 5 * 9 + 1);
  CHECK(m.weights.count("lm_head.weight") == 0);
  CHECK(m.weights.at("model.embed_tokens.weight").shape() == Shape{512, 64});
  CHECK(m.weights.at("model.layers.4.self_attn.k_proj.weight").shape() == Shape{32, 64});
  CHECK(m.weights.at("model.layers.0.mlp.down_proj.weight").shape() == Shape{64, 172});
  CHECK(m.weights.at("model.layers.0.mlp.gate_proj.weight").shape() == Shape{172, 64});
  CHECK(m.weights.at("model.norm.weight").shape() == Shape{64});

  // Spot-check values against the raw file: llama2.c order, offsets in floats after the header.
  auto raw = read_bytes(path);
  auto at = [&](int64_t float_index) {
    float v;
    std::memcpy(&v, raw.data() + 28 + 4 * float_index, 4);
    return v;
  };
  const int64_t V = 512, d = 64, L = 5, kv = 32, h = 172;
  CHECK(m.weights.at("model.embed_tokens.weight")(3, 5) == at(3 * d + 5));
  int64_t off = V * d;
  CHECK(m.weights.at("model.layers.2.input_layernorm.weight")[7] == at(off + 2 * d + 7));
  off += L * d;
  CHECK(m.weights.at("model.layers.1.self_attn.q_proj.weight")(10, 3) ==
        at(off + 1 * d * d + 10 * d + 3));
  off += L * d * d;
  CHECK(m.weights.at("model.layers.3.self_attn.k_proj.weight")(31, 63) ==
        at(off + 3 * kv * d + 31 * d + 63));
  off += 2 * L * kv * d + L * d * d + L * d;  // wk, wv, wo, rms_ffn
  CHECK(m.weights.at("model.layers.4.mlp.gate_proj.weight")(171, 0) ==
        at(off + 4 * h * d + 171 * d));
  off += 3 * L * h * d;
  CHECK(m.weights.at("model.norm.weight")[63] == at(off + 63));
}

TEST_CASE("llama2c: synthetic checkpoints round trip (tied, untied, GQA)") {
  TempDir dir("llama2c_rt");
  for (bool tied : {true, false}) {
    ModelConfig c = small_config(tied);
    WeightMap w = random_weights(c, tied ? 10 : 20);
    const std::string path = dir.file(tied ? "tied.bin" : "untied.bin");
    io::save_llama2c(path, c, w);
    CHECK_FALSE(cbq::testing::has_temporaries(dir.path));
    auto raw = read_bytes(path);
    int32_t vocab;
    std::memcpy(&vocab, raw.data() + 20, 4);
    CHECK(vocab == (tied ? 11 : -11));  // negative vocab_size = separate classifier
    auto m = io::load_llama2c(path);
    CHECK(m.config.tied_embeddings == tied);
    CHECK(m.config.vocab_size == 11);
    CHECK(m.config.n_kv_heads == 2);
    check_equal(w, m.weights);
  }
}

TEST_CASE("llama2c: version 1 export (256-byte header, norms first) loads like legacy") {
  TempDir dir("llama2c_v1");
  ModelConfig c = small_config(false);
  WeightMap w = random_weights(c, 77);
  std::string bytes;
  auto put = [&](const void* p, std::size_t n) { bytes.append(static_cast<const char*>(p), n); };
  uint32_t magic = io::kLlama2cMagic;
  int32_t version = 1;
  int32_t hdr[7] = {16, 24, 2, 4, 2, 11, 8};
  uint8_t shared = 0;
  put(&magic, 4);
  put(&version, 4);
  put(hdr, sizeof hdr);
  put(&shared, 1);
  bytes.resize(256, '\0');
  auto put_tensor = [&](const std::string& name) {
    const auto& t = w.at(name);
    put(t.data(), static_cast<std::size_t>(t.numel()) * 4);
  };
  auto per_layer = [&](const std::string& suffix) {
    for (int i = 0; i < 2; ++i) put_tensor(fmt::format("model.layers.{}.{}", i, suffix));
  };
  per_layer("input_layernorm.weight");
  per_layer("post_attention_layernorm.weight");
  put_tensor("model.norm.weight");
  put_tensor("model.embed_tokens.weight");
  for (const char* s : {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                        "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                        "mlp.gate_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"})
    per_layer(s);
  put_tensor("lm_head.weight");
  const std::string path = dir.file("v1.bin");
  write_bytes(path, bytes.data(), bytes.size());
  auto m = io::load_llama2c(path);
  CHECK_FALSE(m.config.tied_embeddings);
  check_equal(w, m.weights);

  version = 2;
  std::memcpy(bytes.data() + 4, &version, 4);
  write_bytes(path, bytes.data(), bytes.size());
  CHECK(error_of([&] { io::load_llama2c(path); }).find("version 2 is not supported") !=
        std::string::npos);
}

TEST_CASE("llama2c: truncated and too-long files name expected and actual bytes") {
  const std::string src = model_path();
  if (!fs::exists(src)) {
    MESSAGE("skipped: " << src << " not found");
    return;
  }
  TempDir dir("llama2c_trunc");
  auto raw = read_bytes(src);
  REQUIRE(raw.size() == 1056540);
  const std::string path = dir.file("cut.bin");
  for (std::size_t cut : {std::size_t{0}, std::size_t{3}, std::size_t{27}}) {
    write_bytes(path, raw.data(), cut);
    std::string msg = error_of([&] { io::load_llama2c(path); });
    CHECK_MESSAGE(msg.find(path) != std::string::npos, msg);
    CHECK_MESSAGE(msg.find("truncated llama2.c header") != std::string::npos, msg);
    CHECK_MESSAGE(msg.find(fmt::format("{} bytes", cut)) != std::string::npos, msg);
  }
  for (std::size_t cut :
       {std::size_t{28}, std::size_t{1000}, raw.size() / 2, raw.size() - 4, raw.size() - 1}) {
    write_bytes(path, raw.data(), cut);
    std::string msg = error_of([&] { io::load_llama2c(path); });
    CHECK_MESSAGE(msg.find(path) != std::string::npos, msg);
    CHECK_MESSAGE(msg.find("needs 1056540 bytes") != std::string::npos, msg);
    CHECK_MESSAGE(msg.find(fmt::format("file has {} bytes", cut)) != std::string::npos, msg);
  }
  raw.push_back(0);
  raw.push_back(0);
  write_bytes(path, raw.data(), raw.size());
  std::string msg = error_of([&] { io::load_llama2c(path); });
  CHECK_MESSAGE(msg.find("needs 1056540 bytes, the file has 1056542 bytes") != std::string::npos,
                msg);
}

TEST_CASE("llama2c: invalid header values are rejected before any allocation") {
  TempDir dir("llama2c_hdr");
  const std::string path = dir.file("bad.bin");
  auto check = [&](std::vector<int32_t> h, const std::string& expected) {
    h.resize(64, 0);  // some payload
    write_bytes(path, reinterpret_cast<const char*>(h.data()), h.size() * 4);
    std::string msg = error_of([&] { io::load_llama2c(path); });
    CHECK_MESSAGE(msg.find(path) != std::string::npos, msg);
    CHECK_MESSAGE(msg.find(expected) != std::string::npos, msg);
  };
  check({64, 172, 0, 8, 4, 512, 512}, "n_layers = 0 must be positive");
  check({64, 172, 5, 8, -4, 512, 512}, "n_kv_heads = -4 must be positive");
  check({64, 172, 5, 7, 7, 512, 512}, "n_heads = 7 does not divide dim = 64");
  check({64, 172, 5, 8, 3, 512, 512}, "n_kv_heads = 3 does not divide n_heads = 8");
  check({64, 172, 5, 8, 4, 0, 512}, "vocab_size = 0 is invalid");
  check({64, 172, 5, 8, 4, 512, -1}, "seq_len = -1 must be positive");
  check({48, 172, 5, 16, 4, 512, 512}, "head size dim / n_heads = 48 / 16 = 3 must be even");
  // Huge values: the expected size is computed without overflow and does not match.
  check({2147483644, 2147483647, 2147483647, 2, 1, 2147483647, 2147483647}, "overflows");
  check({65536, 65536, 65536, 2, 1, 65536, 2}, "needs ");
}

TEST_CASE("llama2c: a missing file names the path and the system error") {
  std::string msg = error_of([] { io::load_llama2c("/nonexistent/dir/model.bin"); });
  CHECK(msg.find("/nonexistent/dir/model.bin") != std::string::npos);
  CHECK(msg.find("No such file") != std::string::npos);
  TempDir dir("llama2c_dir");
  msg = error_of([&] { io::load_llama2c(dir.path.string()); });
  CHECK(msg.find("not a regular file") != std::string::npos);
}

TEST_CASE("llama2c: MappedFile is move-only and exposes the bytes") {
  TempDir dir("mmap");
  const std::string path = dir.file("x.bin");
  write_bytes(path, "abcdef", 6);
  io::MappedFile a(path);
  CHECK(a.size() == 6);
  CHECK(std::memcmp(a.data(), "abcdef", 6) == 0);
  io::MappedFile b(std::move(a));
  CHECK(b.size() == 6);
  CHECK(a.size() == 0);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  CHECK(a.data() == nullptr);
  write_bytes(path, "", 0);
  io::MappedFile empty(path);
  CHECK(empty.size() == 0);
  static_assert(!std::is_copy_constructible_v<io::MappedFile>);
}
