// The library's verbs (include/cbq/quantize.hpp, include/cbq/export/export.hpp): cbq::quantize
// gives what each method's own entry point gives, from tokens or from hidden states;
// check_exportable refuses what a format cannot hold; export_model writes what the per-format
// writers write and, for GPTQ, leaves the model computing with the exported fp16 scales.
#include <cbq/core/half.hpp>
#include <cbq/export/export.hpp>
#include <cbq/model/random.hpp>
#include <cbq/quantize.hpp>

#include "support/files.hpp"
#include "support/fixtures.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;

namespace {

using TinyLlama = Transformer<LlamaBlock<float>>;

PassSpec verbs_spec(int bits) {
  PassSpec spec;
  spec.weight.bits = bits;
  spec.weight.granularity = quant::Granularity::per_group;
  spec.weight.group_size = 8;
  spec.window_blocks = 2;
  spec.window_overlap = 1;
  spec.rank = 2;
  return spec;
}

Calibration verbs_calibration(const ModelConfig& c) {
  const auto tokens = cbq::testing::random_tokens(400, c.vocab_size, 5);
  return sample_calibration(tokens, 4, 24, /*seed=*/0);
}

// Every layer's codes, steps and zero-points equal.
bool same_results(const QuantizationResult& a, const QuantizationResult& b) {
  if (a.layers.size() != b.layers.size() || a.layers.empty()) return false;
  for (size_t i = 0; i < a.layers.size(); ++i) {
    const quant::QuantizedWeight& x = a.layers[i].weight;
    const quant::QuantizedWeight& y = b.layers[i].weight;
    if (a.layers[i].name != b.layers[i].name || x.codes.numel() != y.codes.numel()) return false;
    for (int64_t k = 0; k < x.codes.numel(); ++k)
      if (x.codes[k] != y.codes[k]) return false;
    if (!cbq::testing::same_bits(x.scale, y.scale) || !cbq::testing::same_bits(x.zero, y.zero))
      return false;
  }
  return true;
}

}  // namespace

TEST_CASE("quantize: every method gives what its own entry point gives") {
  const ModelConfig c = tiny_llama_config();
  const Calibration calib = verbs_calibration(c);
  PassOptions options = cbq::testing::quiet_options(1);
  options.weight_init = WeightInit::rtn;
  options.gptq_percdamp = 0.05;  // the baseline must take it from the options
  const PassSpec spec = verbs_spec(3);
  auto embedded = [&](TinyLlama& m) {
    std::vector<Tensor<float>> x;
    for (const auto& s : calib.samples) x.push_back(m.embed_tensor(s));
    return x;
  };
  for (Method method : {Method::rtn, Method::gptq, Method::cbq}) {
    CAPTURE(method_name(method));
    TinyLlama via_verb(c, random_weights(c, 3)), direct(c, random_weights(c, 3));
    const QuantizationResult a = quantize(via_verb, method, spec, options, calib);
    QuantizationResult b;
    if (method == Method::cbq) {
      b = CbqPass(spec, options).run(direct, calib);
    } else {
      quant::GptqOptions layer;
      layer.percdamp = 0.05;
      b = quantize_baseline(direct, method == Method::rtn ? Baseline::rtn : Baseline::gptq, spec,
                            embedded(direct), layer, false);
    }
    CHECK(a.method == method_name(method));
    CHECK(same_results(a, b));
    // The model computes with the installed quantizers: same logits as the direct run.
    const std::vector<int32_t> probe(calib.samples[0].begin(), calib.samples[0].begin() + 12);
    CHECK(cbq::testing::same_bits(via_verb.logits(probe), direct.logits(probe)));
  }
  // The dampening is read from the options: another value gives other GPTQ codes.
  TinyLlama m1(c, random_weights(c, 3)), m2(c, random_weights(c, 3));
  PassOptions other = options;
  other.gptq_percdamp = 0.5;
  CHECK(!same_results(quantize(m1, Method::gptq, spec, options, calib),
                      quantize(m2, Method::gptq, spec, other, calib)));
}

TEST_CASE("quantize: hidden states give the same result as the tokens they embed") {
  const ModelConfig c = tiny_llama_config();
  const Calibration calib = verbs_calibration(c);
  PassOptions options = cbq::testing::quiet_options(1);
  options.weight_init = WeightInit::rtn;
  for (Method method : {Method::rtn, Method::gptq, Method::cbq}) {
    CAPTURE(method_name(method));
    TinyLlama from_tokens(c, random_weights(c, 4)), from_hidden(c, random_weights(c, 4));
    std::vector<Tensor<float>> x;
    for (const auto& s : calib.samples) x.push_back(from_hidden.embed_tensor(s));
    const auto a = quantize(from_tokens, method, verbs_spec(4), options, calib);
    const auto b = quantize(from_hidden, method, verbs_spec(4), options, std::move(x));
    CHECK(same_results(a, b));
  }
}

TEST_CASE("quantize: AnyModel and method names") {
  const ModelConfig c = tiny_llama_config();
  AnyModel any(TinyLlama(c, random_weights(c, 6)));
  const auto r = quantize(any, Method::rtn, verbs_spec(4), cbq::testing::quiet_options(1),
                          verbs_calibration(c));
  CHECK(r.layers.size() == static_cast<size_t>(7 * c.n_layers));
  for (Method m : {Method::cbq, Method::rtn, Method::gptq})
    CHECK(parse_method(method_name(m)) == m);
  CHECK(!parse_method("awq").has_value());
  for (ExportFormat f : {ExportFormat::native, ExportFormat::gguf, ExportFormat::gptq})
    CHECK(parse_export_format(export_format_name(f)) == f);
  CHECK(!parse_export_format("onnx").has_value());
}

TEST_CASE("check_exportable: refuses what a format cannot hold, naming the setting") {
  const ModelConfig llama = tiny_llama_config();
  ModelConfig opt = llama;
  opt.family = Family::opt;
  opt.architecture = "OPTForCausalLM";
  quant::GridSpec w4;
  w4.bits = 4;
  w4.granularity = quant::Granularity::per_group;
  w4.group_size = 32;
  quant::GridSpec w3 = w4;
  w3.bits = 3;
  quant::GridSpec w5 = w4;
  w5.bits = 5;
  quant::GridSpec g16 = w4;
  g16.group_size = 16;
  using cbq::testing::error_of;
  CHECK_NOTHROW(check_exportable(ExportFormat::gguf, llama, w4, 16));
  CHECK_NOTHROW(check_exportable(ExportFormat::gptq, opt, w3, 16));
  for (const auto& g : {w3, w5, g16})
    CHECK_NOTHROW(check_exportable(ExportFormat::native, opt, g, 4));
  CHECK(error_of([&] {
          check_exportable(ExportFormat::gguf, llama, w3, 16);
        }).find("3-bit weights have no GGUF block type") != std::string::npos);
  CHECK(error_of([&] {
          check_exportable(ExportFormat::gguf, llama, g16, 16);
        }).find("group size 16 is not a multiple of 32") != std::string::npos);
  CHECK(error_of([&] {
          check_exportable(ExportFormat::gguf, opt, w4, 16);
        }).find("LLaMA-family models; export OPTForCausalLM as gptq") != std::string::npos);
  CHECK(error_of([&] {
          check_exportable(ExportFormat::gptq, llama, w5, 16);
        }).find("not 5-bit ones") != std::string::npos);
  CHECK(error_of([&] {
          check_exportable(ExportFormat::gptq, llama, w4, 8);
        }).find("8-bit activations would be lost") != std::string::npos);
}

TEST_CASE("export_model: writes each format; GPTQ leaves the model on the exported fp16 scales") {
  const ModelConfig c = tiny_llama_config();
  const Calibration calib = verbs_calibration(c);
  cbq::testing::TempDir dir("export_model");
  TinyLlama m(c, random_weights(c, 8));
  QuantizationResult r =
      quantize(m, Method::rtn, verbs_spec(4), cbq::testing::quiet_options(1), calib);

  const auto native = export_model(ExportFormat::native, dir.file("m.safetensors"), m, r);
  CHECK(std::filesystem::exists(dir.file("m.safetensors")));
  CHECK(native.max_scale_change == 0);
  const auto back = io::load_native_weights(dir.file("m.safetensors"));
  REQUIRE(back.size() == r.layers.size());
  for (const LayerResult& l : r.layers) {
    CAPTURE(l.name);
    REQUIRE(back.count(l.name) == 1);
    CHECK(cbq::testing::same_bits(back.at(l.name).scale, l.weight.scale));
  }

  // A GGUF needs groups of 32: g8 is refused before anything is written.
  CHECK_THROWS_AS(export_model(ExportFormat::gguf, dir.file("m.gguf"), m, r), Error);
  CHECK(!std::filesystem::exists(dir.file("m.gguf")));

  const auto gptq = export_model(ExportFormat::gptq, dir.file("gptq"), m, r);
  CHECK(std::filesystem::exists(std::filesystem::path(dir.file("gptq")) / "model.safetensors"));
  CHECK(gptq.max_scale_change > 0);  // random steps are not fp16 values
  CHECK(gptq.max_scale_change < 1e-3);
  for (const LayerResult& l : r.layers)
    for (int64_t i = 0; i < l.weight.scale.numel(); ++i)
      REQUIRE(io::f16_to_float(io::float_to_f16(l.weight.scale[i])) == l.weight.scale[i]);
  // The model computes with the snapped result: its logits are those of a fresh model holding
  // the snapped weights.
  TinyLlama fresh(c, random_weights(c, 8));
  for (int64_t b = 0; b < c.n_layers; ++b)
    for (LinearLayer<float>* layer : fresh.blocks[b].linears())
      for (const LayerResult& l : r.layers)
        if (l.name == fmt::format("layers.{}.{}", b, layer->name))
          layer->weight.value = l.weight.dequantize();
  const std::vector<int32_t> probe(calib.samples[1].begin(), calib.samples[1].begin() + 10);
  const Tensor<float> a = m.logits(probe), e = fresh.logits(probe);
  CHECK(cbq::testing::max_abs_diff(a, e) < 1e-4);
}
