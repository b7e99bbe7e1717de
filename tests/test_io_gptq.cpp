// GPTQ checkpoint writer and reader (include/cbq/export/gptq.hpp): the packed words against
// hand-computed values and against AutoGPTQ's pack loop (transcribed below), exact round trips of
// RTN / GPTQ / CBQ results on tiny random LLaMA and OPT models and on stories260K, and the errors
// for damaged folders. With CBQ_GPTQ_EXPORT_DIR set, the exported folders are kept there with a
// cbq_reference.safetensors each, for tests/reference/check_gptq.py.
#include <cbq/core/mmap.hpp>
#include <cbq/export/gptq.hpp>
#include <cbq/model/rotation.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/calibration.hpp>
#include <cstdlib>
#include <filesystem>
#include <random>

#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::random_tokens;
namespace fs = std::filesystem;

namespace {

// AutoGPTQ's QuantLinear.pack (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py), transcribed:
// packs a (k, n) matrix of b-bit integers along k into (k/32·b, n) 32-bit words. With k = in it
// is qweight (intweight = codes transposed); applied to zerosᵀ it is the qzeros loop.
std::vector<uint32_t> autogptq_pack(const std::vector<uint32_t>& iw, int64_t k, int64_t n,
                                    int bits) {
  const int64_t rows = k / 32 * bits;
  std::vector<uint32_t> q(static_cast<size_t>(rows * n), 0);
  auto at = [&](int64_t r, int64_t c) -> uint32_t& { return q[static_cast<size_t>(r * n + c)]; };
  auto w = [&](int64_t r, int64_t c) { return iw[static_cast<size_t>(r * n + c)]; };
  for (int64_t c = 0; c < n; ++c) {
    int64_t i = 0, row = 0;
    while (row < rows) {
      if (bits != 3) {
        for (int64_t j = i; j < i + 32 / bits; ++j) at(row, c) |= w(j, c) << (bits * (j - i));
        i += 32 / bits;
        ++row;
      } else {
        for (int64_t j = i; j < i + 10; ++j) at(row, c) |= w(j, c) << (3 * (j - i));
        i += 10;
        at(row, c) |= w(i, c) << 30;
        ++row;
        at(row, c) |= (w(i, c) >> 2) & 1;
        ++i;
        for (int64_t j = i; j < i + 10; ++j) at(row, c) |= w(j, c) << (3 * (j - i) + 1);
        i += 10;
        at(row, c) |= w(i, c) << 31;
        ++row;
        at(row, c) |= (w(i, c) >> 1) & 0x3;
        ++i;
        for (int64_t j = i; j < i + 10; ++j) at(row, c) |= w(j, c) << (3 * (j - i) + 2);
        i += 10;
        ++row;
      }
    }
  }
  return q;
}

uint32_t word(const Tensor<int32_t>& t, int64_t i) { return static_cast<uint32_t>(t[i]); }

// A folder for one export: a temporary one, or CBQ_GPTQ_EXPORT_DIR/<name> (kept) when set.
struct ExportDir {
  std::unique_ptr<testing::TempDir> temp;
  std::string path;
  bool kept = false;
  explicit ExportDir(const std::string& name) {
    const char* keep = name.empty() ? nullptr : std::getenv("CBQ_GPTQ_EXPORT_DIR");
    if (keep) {
      path = (fs::path(keep) / name).string();
      fs::remove_all(path);
      fs::create_directories(path);
      kept = true;
    } else {
      temp = std::make_unique<testing::TempDir>("gptq_rt");
      path = temp->path.string();
    }
  }
};

// What check_gptq.py compares against: every quantized module's weight as the in-memory model
// computes with it (GPTQ row order), and the reloaded model's logits for `tokens`.
void write_reference(const ExportDir& d, const std::map<std::string, Tensor<float>>& weights,
                     const std::vector<int32_t>& tokens, const Tensor<float>& logits) {
  if (!d.kept) return;
  std::map<std::string, io::TensorToWrite> t;
  for (const auto& [name, w] : weights) t[name] = io::TensorToWrite::f32(w);
  t["tokens"] = io::TensorToWrite::i32(
      Tensor<int32_t>::from(tokens, Shape{static_cast<int64_t>(tokens.size())}));
  t["logits"] = io::TensorToWrite::f32(logits.clone());
  io::write_safetensors((fs::path(d.path) / "cbq_reference.safetensors").string(), t);
}

// HF's q/k permutation for interleaved RoPE checkpoints (convert_llama_weights_to_hf's
// w.view(heads, hd/2, 2, in).transpose(1, 2)): row (h, j, i) of the result is row (h, i, j).
template <class T>
Tensor<T> hf_permute_rows(const Tensor<T>& t, int64_t heads, int64_t hd) {
  const int64_t cols = t.numel() / t.size(0);
  Tensor<T> out = Tensor<T>::empty(t.shape());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < hd / 2; ++i)
      for (int64_t j = 0; j < 2; ++j)
        for (int64_t c = 0; c < cols; ++c)
          out[(h * hd + j * (hd / 2) + i) * cols + c] = t[(h * hd + 2 * i + j) * cols + c];
  return out;
}

// Every field of `got` equals `want` bit for bit (want in GPTQ layout: per-tensor expanded).
void check_same(const quant::QuantizedWeight& got, const quant::QuantizedWeight& want,
                const std::string& name) {
  CAPTURE(name);
  REQUIRE(got.codes.shape() == want.codes.shape());
  CHECK(got.spec.bits == want.spec.bits);
  CHECK(got.spec.symmetric == want.spec.symmetric);
  const bool want_per_group = want.spec.granularity == quant::Granularity::per_group;
  CHECK((got.spec.granularity == quant::Granularity::per_group) == want_per_group);
  if (want_per_group) CHECK(got.spec.group_size == want.spec.group_size);
  int64_t code_diff = 0;
  for (int64_t i = 0; i < want.codes.numel(); ++i) code_diff += got.codes[i] != want.codes[i];
  CHECK(code_diff == 0);
  const Tensor<float> ws = want.spec.granularity == quant::Granularity::per_tensor
                               ? Tensor<float>::full(Shape{want.rows(), 1}, want.scale[0])
                               : want.scale;
  const Tensor<float> wz = want.spec.granularity == quant::Granularity::per_tensor
                               ? Tensor<float>::full(Shape{want.rows(), 1}, want.zero[0])
                               : want.zero;
  REQUIRE(got.scale.shape() == ws.shape());
  CHECK(testing::max_abs_diff(got.scale, ws) == 0.0);
  CHECK(testing::max_abs_diff(got.zero, wz) == 0.0);
  CHECK(got.group_index == want.group_index);
  CHECK(testing::max_abs_diff(got.dequantize(), want.dequantize()) == 0.0);
}

// A LLaMA whose every width is a multiple of 32 (what GPTQ kernels need), for the external check.
ModelConfig standard_llama_config() {
  ModelConfig c = tiny_llama_config();
  c.architecture = "LlamaForCausalLM";
  c.dim = 64;
  c.hidden_dim = 128;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.n_layers = 2;
  c.vocab_size = 96;
  c.max_seq_len = 64;
  return c;
}
ModelConfig standard_opt_config() {
  ModelConfig c = tiny_opt_config();
  c.architecture = "OPTForCausalLM";
  c.dim = 64;
  c.hidden_dim = 128;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.head_dim = 16;
  c.n_layers = 2;
  c.vocab_size = 96;
  c.max_seq_len = 64;
  return c;
}

struct Case {
  Baseline method;
  int bits;
  bool symmetric;
  quant::Granularity granularity;
  int64_t group;
  bool act_order;
};

// Quantizes a fresh random model, snaps scales, exports, reloads, and checks the round trip:
// every layer bit-equal, the reloaded logits and perplexity equal to the in-memory model's.
template <class Block>
io::GptqExportSummary round_trip(const ModelConfig& c, const Case& k, io::GptqCheckpointFormat fmt,
                                 const std::string& keep_as = "",
                                 const RotationOptions& rotation = Rotation<>::options()) {
  Transformer<Block> model(c, random_weights(c, 11 + static_cast<uint64_t>(k.bits)));
  if (rotation.any()) rotate_model(model, rotation);  // folded: the export holds it all
  PassSpec spec;
  spec.weight.bits = k.bits;
  spec.weight.symmetric = k.symmetric;
  spec.weight.granularity = k.granularity;
  spec.weight.group_size = k.group;
  std::vector<Tensor<float>> x;
  for (uint64_t s = 0; s < 3; ++s)
    x.push_back(model.embed_tensor(random_tokens(24, c.vocab_size, 100 + s)));
  quant::GptqOptions g;
  g.act_order = k.act_order;
  QuantizationResult result = quantize_baseline(model, k.method, spec, x, g, false);
  io::snap_scales_to_f16(model, result);
  ExportDir dir(keep_as);
  io::GptqExportOptions o;
  o.format = fmt;
  o.float32_parameters = true;
  o.require_f16_scales = true;
  io::GptqExportSummary summary = io::save_gptq(dir.path, model, result, o);
  io::GptqCheckpoint ck = io::load_gptq(dir.path);
  CHECK(ck.quantization.bits == k.bits);
  CHECK(ck.quantization.sym == k.symmetric);
  CHECK(ck.quantization.checkpoint_format == summary.checkpoint_format);
  REQUIRE(ck.layers.size() == result.layers.size());
  std::map<std::string, Tensor<float>> reference;
  for (const LayerResult& l : result.layers) {
    check_same(ck.layers.at(l.name), l.weight, l.name);
    // The in-memory model computes with exactly these weights.
    const int64_t b = std::stoll(l.name.substr(7, l.name.find('.', 7) - 7));
    for (auto* layer : model.blocks[b].linears())
      if (fmt::format("layers.{}.{}", b, layer->name) == l.name) {
        auto q = std::dynamic_pointer_cast<QuantLinear<float>>(layer->transform);
        REQUIRE(q != nullptr);
        CHECK(testing::max_abs_diff(q->current_weight(), ck.layers.at(l.name).dequantize()) == 0.0);
        reference[io::hf_linear_module(c, b, layer->name) + ".weight"] = q->current_weight();
      }
  }
  const auto tokens = random_tokens(32, c.vocab_size, 7);
  Tensor<float> mem = model.logits(tokens).clone();
  Tensor<float> back = ck.model.logits(tokens).clone();
  CHECK(testing::max_abs_diff(mem, back) == 0.0);
  const double p_mem = eval::perplexity_gptq(model, tokens, 16).perplexity;
  const double p_back =
      ck.model.visit([&](auto& m) { return eval::perplexity_gptq(m, tokens, 16).perplexity; });
  CHECK(p_mem == p_back);
  write_reference(dir, reference, tokens, back);
  return summary;
}

const quant::Granularity kGroup = quant::Granularity::per_group;

}  // namespace

TEST_CASE("gptq format: qweight words match hand-computed values for 4, 3, 8 and 2 bits") {
  // 4 bits: codes 1..8 of output 0 → nibble k holds code k: 0x87654321; output 1 alternates
  // 15, 0 → 0x0F0F0F0F. qweight is (in·b/32, out) = (1, 2).
  Tensor<uint8_t> c4 =
      Tensor<uint8_t>::from({1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 15, 0, 15, 0, 15, 0}, Shape{2, 8});
  Tensor<int32_t> q4 = io::gptq_pack_qweight(c4, 4);
  REQUIRE(q4.shape() == Shape{1, 2});
  CHECK(word(q4, 0) == 0x87654321u);
  CHECK(word(q4, 1) == 0x0F0F0F0Fu);
  // 8 bits: 0x11, 0x22, 0x33, 0xFF → byte k = code k.
  Tensor<int32_t> q8 =
      io::gptq_pack_qweight(Tensor<uint8_t>::from({0x11, 0x22, 0x33, 0xFF}, Shape{1, 4}), 8);
  REQUIRE(q8.shape() == Shape{1, 1});
  CHECK(word(q8, 0) == 0xFF332211u);
  // 2 bits: codes 0, 1, 2, 3 repeated → every byte 0b11100100.
  std::vector<uint8_t> v2(16);
  for (int k = 0; k < 16; ++k) v2[static_cast<size_t>(k)] = static_cast<uint8_t>(k % 4);
  Tensor<int32_t> q2 = io::gptq_pack_qweight(Tensor<uint8_t>::from(v2, Shape{1, 16}), 2);
  CHECK(word(q2, 0) == 0xE4E4E4E4u);
  // 3 bits, 32 codes in 3 words: code 0 = 5 (bits 0–2 of word 0); code 10 = 7 straddles: bits
  // 30–31 of word 0 (0b11) and bit 0 of word 1 (1); code 11 = 3 at bit 1 of word 1 (0b110);
  // code 21 = 5 straddles: bit 31 of word 1 (1) and bits 0–1 of word 2 (0b10); code 31 = 6 at
  // bits 29–31 of word 2.
  std::vector<uint8_t> v3(32, 0);
  v3[0] = 5;
  v3[10] = 7;
  v3[11] = 3;
  v3[21] = 5;
  v3[31] = 6;
  Tensor<int32_t> q3 = io::gptq_pack_qweight(Tensor<uint8_t>::from(v3, Shape{1, 32}), 3);
  REQUIRE(q3.shape() == Shape{3, 1});
  CHECK(word(q3, 0) == 0xC0000005u);
  CHECK(word(q3, 1) == 0x80000007u);
  CHECK(word(q3, 2) == 0xC0000002u);
  // Unpacking gives the codes back.
  CHECK(io::gptq_unpack_qweight(q3, 3, 32)[10] == 7);
  CHECK(io::gptq_unpack_qweight(q3, 3, 32)[21] == 5);
}

TEST_CASE("gptq format: qweight and qzeros equal AutoGPTQ's pack loop on random codes") {
  std::mt19937_64 rng(3);
  for (int bits : {2, 3, 4, 8}) {
    CAPTURE(bits);
    const int64_t in = 96, out = 64;
    Tensor<uint8_t> codes = Tensor<uint8_t>::empty(Shape{out, in});
    for (int64_t i = 0; i < codes.numel(); ++i)
      codes[i] = static_cast<uint8_t>(rng() % (1u << bits));
    std::vector<uint32_t> intweight(static_cast<size_t>(in * out));  // (in, out) = codesᵀ
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i)
        intweight[static_cast<size_t>(i * out + o)] = codes[o * in + i];
    const auto ref = autogptq_pack(intweight, in, out, bits);
    Tensor<int32_t> q = io::gptq_pack_qweight(codes, bits);
    REQUIRE(q.shape() == Shape{in / 32 * bits, out});
    int64_t diff = 0;
    for (int64_t i = 0; i < q.numel(); ++i) diff += word(q, i) != ref[static_cast<size_t>(i)];
    CHECK(diff == 0);
    // qzeros: (groups, out) packed along out = AutoGPTQ's loop over the transposed matrix.
    const int64_t groups = 3;
    Tensor<uint8_t> z = Tensor<uint8_t>::empty(Shape{groups, out});
    for (int64_t i = 0; i < z.numel(); ++i) z[i] = static_cast<uint8_t>(rng() % (1u << bits));
    std::vector<uint32_t> zt(static_cast<size_t>(out * groups));  // (out, groups)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t o = 0; o < out; ++o) zt[static_cast<size_t>(o * groups + g)] = z[g * out + o];
    const auto zref = autogptq_pack(zt, out, groups, bits);  // (out/32·b, groups)
    Tensor<int32_t> qz = io::gptq_pack_qzeros(z, bits);
    REQUIRE(qz.shape() == Shape{groups, out / 32 * bits});
    diff = 0;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t w = 0; w < out / 32 * bits; ++w)
        diff += word(qz, g * (out / 32 * bits) + w) != zref[static_cast<size_t>(w * groups + g)];
    CHECK(diff == 0);
    Tensor<uint8_t> back = io::gptq_unpack_qzeros(qz, bits, out);
    int64_t zdiff = 0;
    for (int64_t i = 0; i < z.numel(); ++i) zdiff += back[i] != z[i];
    CHECK(zdiff == 0);
  }
}

TEST_CASE("gptq format: symmetric v1 checkpoints hold the well-known qzeros words") {
  // Symmetric GPTQ has z = 2^(b−1); v1 stores z − 1: 7 in every nibble (0x77777777, as in every
  // published 4-bit GPTQ checkpoint), 127 per byte at 8 bits, 1 per 2-bit field.
  for (auto [bits, expected] : {std::pair{4, 0x77777777u}, {8, 0x7F7F7F7Fu}, {2, 0x55555555u}}) {
    CAPTURE(bits);
    ModelConfig c = standard_llama_config();
    Transformer<LlamaBlock<float>> model(c, random_weights(c, 1));
    PassSpec spec;
    spec.weight.bits = bits;
    spec.weight.symmetric = true;
    spec.weight.group_size = 32;
    QuantizationResult r = quantize_baseline(model, Baseline::rtn, spec, {}, {}, false);
    testing::TempDir dir("gptq_sym");
    io::GptqExportSummary s = io::save_gptq(dir.path.string(), model, r);
    CHECK(s.checkpoint_format == "gptq");
    io::SafetensorsFile f(dir.file("model.safetensors"));
    Tensor<int32_t> qz = f.to_int32("model.layers.0.mlp.down_proj.qzeros");
    CHECK(qz.shape() == Shape{128 / 32, 64 * bits / 32});
    int64_t other = 0;
    for (int64_t i = 0; i < qz.numel(); ++i) other += word(qz, i) != expected;
    CHECK(other == 0);
    CHECK(f.info("model.layers.0.mlp.down_proj.scales").dtype == io::Dtype::F16);
    CHECK(f.info("model.layers.0.mlp.down_proj.qweight").shape == Shape{128 * bits / 32, 64});
    CHECK(f.info("model.embed_tokens.weight").dtype == io::Dtype::F16);
    auto cfg = nlohmann::json::parse(io::read_text_file(dir.file("config.json")));
    CHECK(cfg["architectures"][0] == "LlamaForCausalLM");
    CHECK(cfg["quantization_config"]["quant_method"] == "gptq");
    CHECK(cfg["quantization_config"]["bits"] == bits);
    CHECK(cfg["quantization_config"]["group_size"] == 32);
    CHECK(cfg["quantization_config"]["sym"] == true);
    CHECK(cfg["quantization_config"]["desc_act"] == false);
    CHECK(cfg["quantization_config"]["checkpoint_format"] == "gptq");
    auto qcfg = nlohmann::json::parse(io::read_text_file(dir.file("quantize_config.json")));
    CHECK(qcfg == cfg["quantization_config"]);
  }
}

TEST_CASE("gptq format: RTN and GPTQ results on tiny LLaMA and OPT round-trip exactly") {
  const std::vector<Case> cases = {
      {Baseline::rtn, 4, true, kGroup, 8, false},
      {Baseline::rtn, 4, false, kGroup, 8, false},
      {Baseline::gptq, 3, false, kGroup, 8, false},
      {Baseline::gptq, 2, false, kGroup, 8, false},
      {Baseline::gptq, 8, true, kGroup, 8, false},
      {Baseline::gptq, 4, false, kGroup, 8, true},
      {Baseline::gptq, 4, true, kGroup, 8, true},
      {Baseline::rtn, 4, false, quant::Granularity::per_channel, 0, false},
      {Baseline::rtn, 3, true, quant::Granularity::per_tensor, 0, false}};
  for (const Case& k : cases)
    for (auto fmt : {io::GptqCheckpointFormat::automatic, io::GptqCheckpointFormat::v2}) {
      CAPTURE(k.bits);
      CAPTURE(k.symmetric);
      CAPTURE(int(k.granularity));
      CAPTURE(k.act_order);
      CAPTURE(int(fmt));
      auto s = round_trip<LlamaBlock<float>>(tiny_llama_config(), k, fmt);
      CHECK(s.desc_act == k.act_order);
      CHECK(s.checkpoint_format ==
            (fmt == io::GptqCheckpointFormat::v2 || s.zero_points_at_zero ? "gptq_v2" : "gptq"));
      auto so = round_trip<OptBlock<float>>(tiny_opt_config(), k, fmt);
      // tiny configs (d 16, hidden 28) are below GPTQ kernels' widths: reported, still exact.
      CHECK(!so.nonstandard_layers.empty());
    }
}

TEST_CASE("gptq format: a zero-point of 0 is written as gptq_v2, and refused by forced v1") {
  // Every weight of a layer non-negative → the min/max grid puts z = 0 in every group.
  ModelConfig c = standard_llama_config();
  WeightMap w = random_weights(c, 5);
  for (auto& [name, t] : w)
    if (name.find("q_proj.weight") != std::string::npos)
      for (int64_t i = 0; i < t.numel(); ++i) t[i] = std::abs(t[i]);
  Transformer<LlamaBlock<float>> model(c, w);
  PassSpec spec;
  spec.weight.bits = 4;
  spec.weight.group_size = 32;
  QuantizationResult r = quantize_baseline(model, Baseline::rtn, spec, {}, {}, false);
  REQUIRE(r.find("layers.0.q_proj")->weight.zero[0] == 0.f);
  io::snap_scales_to_f16(model, r);
  ExportDir dir("llama-w4g32-zero-points-0");
  io::GptqExportOptions o;
  o.format = io::GptqCheckpointFormat::v1;
  CHECK_THROWS_WITH_AS(io::save_gptq(dir.path, model, r, o), doctest::Contains("cannot hold"),
                       cbq::Error);
  io::GptqExportOptions automatic;
  automatic.float32_parameters = true;
  io::GptqExportSummary s = io::save_gptq(dir.path, model, r, automatic);
  CHECK(s.checkpoint_format == "gptq_v2");
  CHECK(s.zero_points_at_zero >= 64 * 2);  // q_proj: 64 outputs × 2 groups in each block
  io::SafetensorsFile f((fs::path(dir.path) / "model.safetensors").string());
  // v2 stores z itself: the q_proj zero-points are 0, packed: words of zeros.
  Tensor<int32_t> qz = f.to_int32("model.layers.0.self_attn.q_proj.qzeros");
  int64_t nonzero = 0;
  for (int64_t i = 0; i < qz.numel(); ++i) nonzero += qz[i] != 0;
  CHECK(nonzero == 0);
  io::GptqCheckpoint ck = io::load_gptq(dir.path);
  CHECK(ck.quantization.checkpoint_format == "gptq_v2");
  std::map<std::string, Tensor<float>> reference;
  for (const LayerResult& l : r.layers) {
    check_same(ck.layers.at(l.name), l.weight, l.name);
    const int64_t b = std::stoll(l.name.substr(7, l.name.find('.', 7) - 7));
    reference[io::hf_linear_module(c, b, l.name.substr(l.name.rfind('.') + 1)) + ".weight"] =
        l.weight.dequantize();
  }
  const auto tokens = random_tokens(32, c.vocab_size, 3);
  Tensor<float> mem = model.logits(tokens).clone();
  Tensor<float> back = ck.model.logits(tokens).clone();
  CHECK(testing::max_abs_diff(mem, back) == 0.0);
  write_reference(dir, reference, tokens, back);
}

TEST_CASE("gptq format: CBQ results round-trip exactly") {
  ModelConfig c = standard_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 21));
  std::vector<Tensor<float>> x;
  for (uint64_t s = 0; s < 2; ++s)
    x.push_back(model.embed_tensor(random_tokens(16, c.vocab_size, s)));
  PassOptions o;
  o.epochs = 1;
  o.max_steps = 2;
  o.verbose = false;
  using P = Pass<Quantizer<3, PerGroup<32>>, ActQuant<16>, SlidingWindow<2, 1>, LoraRounding<2>>;
  QuantizationResult r = P(o).run_from_hidden(model, x);
  io::F16ScaleSnap snap = io::snap_scales_to_f16(model, r);
  CHECK(snap.scales > 0);
  testing::TempDir dir("gptq_cbq");
  io::GptqExportOptions eo;
  eo.float32_parameters = true;
  eo.require_f16_scales = true;
  io::save_gptq(dir.path.string(), model, r, eo);
  io::GptqCheckpoint ck = io::load_gptq(dir.path.string());
  for (const LayerResult& l : r.layers) check_same(ck.layers.at(l.name), l.weight, l.name);
  const auto tokens = random_tokens(32, c.vocab_size, 9);
  Tensor<float> mem = model.logits(tokens).clone();
  CHECK(testing::max_abs_diff(mem, ck.model.logits(tokens)) == 0.0);
}

TEST_CASE("gptq format: exports for the external check (widths multiple of 32)") {
  // The same round trip on models GPTQ kernels accept; with CBQ_GPTQ_EXPORT_DIR set the folders
  // stay for tests/reference/check_gptq.py.
  auto s1 = round_trip<LlamaBlock<float>>(
      standard_llama_config(), {Baseline::gptq, 4, false, kGroup, 32, true},
      io::GptqCheckpointFormat::automatic, "llama-w4g32-actorder");
  CHECK(s1.nonstandard_layers.empty());
  auto s2 = round_trip<LlamaBlock<float>>(standard_llama_config(),
                                          {Baseline::gptq, 3, false, kGroup, 32, false},
                                          io::GptqCheckpointFormat::v2, "llama-w3g32-v2");
  CHECK(s2.checkpoint_format == "gptq_v2");
  auto s3 = round_trip<OptBlock<float>>(standard_opt_config(),
                                        {Baseline::rtn, 4, true, kGroup, 32, false},
                                        io::GptqCheckpointFormat::automatic, "opt-w4g32-sym");
  CHECK(s3.checkpoint_format == "gptq");
  auto s4 = round_trip<OptBlock<float>>(
      standard_opt_config(), {Baseline::gptq, 2, false, quant::Granularity::per_channel, 0, false},
      io::GptqCheckpointFormat::automatic, "opt-w2-perchannel");
  CHECK(s4.nonstandard_layers.empty());
  auto s5 = round_trip<LlamaBlock<float>>(standard_llama_config(),
                                          {Baseline::gptq, 8, true, kGroup, 32, false},
                                          io::GptqCheckpointFormat::automatic, "llama-w8g32-sym");
  CHECK(s5.checkpoint_format == "gptq");
  // Rotated (R1 + R2, folded; the tied heads come out untied): still plain checkpoints.
  round_trip<LlamaBlock<float>>(
      standard_llama_config(), {Baseline::gptq, 4, false, kGroup, 32, false},
      io::GptqCheckpointFormat::automatic, "llama-w4g32-rotated", Rotation<R1, R2>::options(3));
  round_trip<OptBlock<float>>(standard_opt_config(), {Baseline::gptq, 4, false, kGroup, 32, false},
                              io::GptqCheckpointFormat::automatic, "opt-w4g32-rotated",
                              Rotation<R1, R2>::options(3));
}

TEST_CASE("gptq format: a Hugging Face fixture keeps its config fields and tokenizer") {
  for (const char* name : {"tiny-llama", "tiny-opt"}) {
    CAPTURE(name);
    const fs::path src = fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / name;
    AnyModel any = load_model(src.string());
    testing::TempDir dir("gptq_fixture");
    PassSpec spec;
    spec.weight.bits = 4;
    spec.weight.group_size = 32;
    any.visit([&](auto& m) {
      QuantizationResult r = quantize_baseline(m, Baseline::rtn, spec, {}, {}, false);
      io::snap_scales_to_f16(m, r);
      io::GptqExportOptions o;
      o.source_dir = src.string();
      io::GptqExportSummary s = io::save_gptq(dir.path.string(), m, r, o);
      CHECK(std::find(s.files.begin(), s.files.end(), "tokenizer.json") != s.files.end());
      io::GptqCheckpoint ck = io::load_gptq(dir.path.string());
      for (const LayerResult& l : r.layers) check_same(ck.layers.at(l.name), l.weight, l.name);
      REQUIRE(ck.model.tokenizer() != nullptr);
      const std::string text = "Once upon a time, a little dog ran.";
      CHECK(ck.model.tokenizer()->encode(text, true, false) ==
            m.tokenizer->encode(text, true, false));
    });
    auto src_cfg = nlohmann::json::parse(io::read_text_file((src / "config.json").string()));
    auto cfg = nlohmann::json::parse(io::read_text_file(dir.file("config.json")));
    for (const auto& [key, value] : src_cfg.items())
      if (key != "torch_dtype" && key != "dtype") CHECK(cfg[key] == value);
    CHECK(cfg["torch_dtype"] == "float16");
    CHECK(cfg["dtype"] == "float16");
    CHECK(cfg["quantization_config"]["bits"] == 4);
  }
}

TEST_CASE("gptq format: stories260K round-trips exactly, perplexity included") {
  const fs::path data = testing::data_dir();
  if (!fs::exists(data / "models" / "stories260K.bin")) {
    MESSAGE("skipped: stories260K.bin not found under " << data.string());
    return;
  }
  const std::string model_path = (data / "models" / "stories260K.bin").string();
  const std::string tok_path = (data / "models" / "tok512.bin").string();
  const std::string train =
      io::read_text_file((data / "text" / "tinystories_train_excerpt.txt").string());
  std::string valid = io::read_text_file((data / "text" / "tinystories_valid_200k.txt").string());
  valid.resize(20000);
  struct Run {
    std::string name;
    Baseline method;
    int bits;
    bool symmetric, act_order;
  };
  for (const Run& run : {Run{"rtn-w4g32-sym", Baseline::rtn, 4, true, false},
                         Run{"rtn-w4g32-asym", Baseline::rtn, 4, false, false},
                         Run{"gptq-w4g32-asym", Baseline::gptq, 4, false, false},
                         Run{"gptq-w3g32-asym", Baseline::gptq, 3, false, false},
                         Run{"gptq-w4g32-actorder", Baseline::gptq, 4, false, true}}) {
    CAPTURE(run.name);
    AnyModel any = load_model(model_path, tok_path);
    LlamaModel& m = any.llama();
    const auto tokens = m.tokenizer->encode(valid, true, false);
    Calibration calib = sample_calibration(m.tokenizer->encode(train, true, false), 8, 128, 0);
    std::vector<Tensor<float>> x;
    for (const auto& s : calib.samples) x.push_back(m.embed_tensor(s));
    PassSpec spec;
    spec.weight.bits = run.bits;
    spec.weight.symmetric = run.symmetric;
    spec.weight.group_size = 32;
    quant::GptqOptions g;
    g.act_order = run.act_order;
    QuantizationResult r = quantize_baseline(m, run.method, spec, x, g, false);
    const double ppl_f32_scales = eval::perplexity_gptq(m, tokens, 256).perplexity;
    io::F16ScaleSnap snap = io::snap_scales_to_f16(m, r);
    const double ppl = eval::perplexity_gptq(m, tokens, 256).perplexity;
    MESSAGE(run.name << ": perplexity " << ppl_f32_scales << " with F32 scales, " << ppl
                     << " with F16 scales (" << snap.changed << " of " << snap.scales
                     << " scales moved, at most " << snap.max_relative_change << " relative)");
    CHECK(std::abs(ppl - ppl_f32_scales) / ppl_f32_scales < 1e-3);
    CHECK(snap.max_relative_change <= 1.0 / 2048);  // F16 keeps 11 significant bits

    for (bool f32 : {true, false}) {
      ExportDir dir(fmt::format("stories260K-{}{}", run.name, f32 ? "-f32" : ""));
      io::GptqExportOptions o;
      o.float32_parameters = f32;
      o.require_f16_scales = true;
      o.tokenizer_file = tok_path;
      io::GptqExportSummary s = io::save_gptq(dir.path, m, r, o);
      CHECK(s.rope_permuted);
      CHECK(s.desc_act == run.act_order);
      CHECK(!s.nonstandard_layers.empty());  // hidden 172: 172·b is no multiple of 32
      io::GptqCheckpoint ck = io::load_gptq(dir.path);
      CHECK(ck.config.rope_layout == RopeLayout::rotate_half);
      REQUIRE(ck.model.tokenizer() != nullptr);  // tokenizer.bin copied beside
      std::map<std::string, Tensor<float>> reference;
      for (const LayerResult& l : r.layers) {
        quant::QuantizedWeight want = l.weight;
        const bool q = l.name.ends_with("q_proj"), k = l.name.ends_with("k_proj");
        if (q || k) {
          const int64_t heads = q ? m.config.n_heads : m.config.n_kv_heads;
          want.codes = hf_permute_rows(want.codes, heads, m.config.head_dim);
          want.scale = hf_permute_rows(want.scale, heads, m.config.head_dim);
          want.zero = hf_permute_rows(want.zero, heads, m.config.head_dim);
        }
        check_same(ck.layers.at(l.name), want, l.name);
        const int64_t b = std::stoll(l.name.substr(7, l.name.find('.', 7) - 7));
        reference[io::hf_linear_module(m.config, b, l.name.substr(l.name.rfind('.') + 1)) +
                  ".weight"] = want.dequantize();
      }
      // The reloaded model uses HF's rotate_half RoPE on permuted rows: the same function, with
      // sums in another order (float rounding only).
      const double back = ck.model.visit(
          [&](auto& mm) { return eval::perplexity_gptq(mm, tokens, 256).perplexity; });
      MESSAGE(run.name << (f32 ? " F32" : " F16") << " parameters: reloaded perplexity " << back
                       << " vs in memory " << ppl);
      CHECK(std::abs(back - ppl) / ppl < (f32 ? 1e-6 : 2e-3));
      const std::vector<int32_t> probe(tokens.begin(), tokens.begin() + 64);
      write_reference(dir, reference, probe, ck.model.logits(probe));
    }
  }
}

TEST_CASE("gptq format: damaged folders give errors naming the tensor and the numbers") {
  ModelConfig c = standard_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 2));
  PassSpec spec;
  spec.weight.bits = 4;
  spec.weight.group_size = 32;
  QuantizationResult r = quantize_baseline(model, Baseline::rtn, spec, {}, {}, false);
  testing::TempDir dir("gptq_bad");
  const std::string d = dir.path.string();
  auto fresh = [&] { io::save_gptq(d, model, r); };
  fresh();
  const std::string st = dir.file("model.safetensors");
  // Rewrites model.safetensors with `edit` applied to its tensors.
  auto rewrite = [&](const std::function<void(std::map<std::string, io::TensorToWrite>&)>& edit) {
    std::map<std::string, io::TensorToWrite> t;
    {
      io::SafetensorsFile f(st);
      for (const auto& name : f.names())
        t[name] = f.info(name).dtype == io::Dtype::I32 ? io::TensorToWrite::i32(f.to_int32(name))
                                                       : io::TensorToWrite::f16(f.to_float(name));
    }
    edit(t);
    io::write_safetensors(st, t, {{"format", "pt"}});
  };
  const std::string qw = "model.layers.1.mlp.up_proj.qweight";
  rewrite([&](auto& t) {
    Tensor<int32_t> w = std::get<Tensor<int32_t>>(t[qw].source);
    t[qw] = io::TensorToWrite::i32(w.slice(0, 0, w.size(0) - 1).contiguous());
  });
  CHECK_THROWS_WITH_AS(io::load_gptq(d),
                       doctest::Contains((qw + " has shape (7, 128), expected (8, 128)").c_str()),
                       cbq::Error);
  fresh();
  rewrite([&](auto& t) { t.erase("model.layers.0.self_attn.k_proj.scales"); });
  CHECK_THROWS_WITH_AS(io::load_gptq(d),
                       doctest::Contains("model.layers.0.self_attn.k_proj.scales is missing"),
                       cbq::Error);
  fresh();
  rewrite([&](auto& t) {
    auto g = std::get<Tensor<int32_t>>(t["model.layers.0.mlp.down_proj.g_idx"].source).clone();
    g[5] = 9;
    t["model.layers.0.mlp.down_proj.g_idx"] = io::TensorToWrite::i32(g);
  });
  CHECK_THROWS_WITH_AS(io::load_gptq(d),
                       doctest::Contains("down_proj.g_idx: column 5 is in group 9, outside [0, 4)"),
                       cbq::Error);
  // bits in the config disagree with the tensors.
  fresh();
  auto cfg = nlohmann::json::parse(io::read_text_file(dir.file("config.json")));
  cfg["quantization_config"]["bits"] = 3;
  testing::write_all(dir.file("config.json"), cfg.dump());
  CHECK_THROWS_WITH_AS(io::load_gptq(d),
                       doctest::Contains("model.layers.0.mlp.down_proj.qweight has shape (16, 64), "
                                         "expected (12, 64)"),
                       cbq::Error);
  // sym = true over asymmetric zero-points.
  fresh();
  cfg = nlohmann::json::parse(io::read_text_file(dir.file("config.json")));
  cfg["quantization_config"]["sym"] = true;
  testing::write_all(dir.file("config.json"), cfg.dump());
  CHECK_THROWS_WITH_AS(io::load_gptq(d), doctest::Contains("with sym = true"), cbq::Error);
  // No quantization config at all.
  fresh();
  cfg = nlohmann::json::parse(io::read_text_file(dir.file("config.json")));
  cfg.erase("quantization_config");
  testing::write_all(dir.file("config.json"), cfg.dump());
  fs::remove(dir.file("quantize_config.json"));
  CHECK_THROWS_WITH_AS(io::load_gptq(d), doctest::Contains("not a GPTQ checkpoint"), cbq::Error);
  // A truncated safetensors file.
  fresh();
  const std::string bytes = testing::read_all(st);
  testing::write_all(st, bytes.substr(0, bytes.size() - 1000));
  CHECK_THROWS_WITH_AS(io::load_gptq(d), doctest::Contains("out of range"), cbq::Error);
}

TEST_CASE("gptq format: the writer refuses what a GPTQ checkpoint cannot hold") {
  ModelConfig c = standard_llama_config();
  Transformer<LlamaBlock<float>> model(c, random_weights(c, 4));
  PassSpec spec;
  spec.weight.bits = 4;
  spec.weight.group_size = 32;
  testing::TempDir dir("gptq_refuse");
  const std::string d = dir.path.string();
  QuantizationResult r = quantize_baseline(model, Baseline::rtn, spec, {}, {}, false);
  io::GptqExportOptions strict;
  strict.require_f16_scales = true;
  CHECK_THROWS_WITH_AS(io::save_gptq(d, model, r, strict), doctest::Contains("is not an F16 value"),
                       cbq::Error);
  // Without the strict option the scales are rounded and counted.
  io::GptqExportSummary s = io::save_gptq(d, model, r);
  CHECK(s.scales_rounded > 0);
  // Activation quantizers have no place in a GPTQ checkpoint.
  clear_quantization(model);
  PassSpec a8 = spec;
  a8.act_bits = 8;
  std::vector<Tensor<float>> x{model.embed_tensor(random_tokens(16, c.vocab_size, 1))};
  QuantizationResult ra = quantize_baseline(model, Baseline::rtn, a8, x, {}, false);
  CHECK_THROWS_WITH_AS(io::save_gptq(d, model, ra), doctest::Contains("weight-only"), cbq::Error);
  io::GptqExportOptions drop;
  drop.drop_activation_quantizers = true;
  CHECK_NOTHROW(io::save_gptq(d, model, ra, drop));
  // A missing layer.
  QuantizationResult partial = r;
  partial.layers.pop_back();
  CHECK_THROWS_WITH_AS(io::save_gptq(d, model, partial),
                       doctest::Contains("layers.1.down_proj is not in the result"), cbq::Error);
  // A non-integer zero-point.
  QuantizationResult bad = r;
  bad.layers[0].weight.zero = bad.layers[0].weight.zero.clone();
  bad.layers[0].weight.zero[3] = 2.5f;
  CHECK_THROWS_WITH_AS(io::save_gptq(d, model, bad),
                       doctest::Contains("zero-point 2.5 at row 1, group 1 is not an integer"),
                       cbq::Error);
}
