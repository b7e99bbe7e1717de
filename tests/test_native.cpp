#include <cbq/export/native.hpp>
#include <cbq/model/llama_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/baselines.hpp>
#include <filesystem>

#include "support/gradcheck.hpp"

using namespace cbq;

TEST_CASE("native format: RTN and GPTQ results round-trip through the file exactly") {
  ModelConfig c = tiny_llama_config();
  for (int bits : {2, 3, 4, 8})
    for (bool act_order : {false, true}) {
      Transformer<LlamaBlock<float>> model(c, random_weights(c, 7));
      PassSpec spec;
      spec.weight.bits = bits;
      spec.weight.group_size = 8;
      std::vector<Tensor<float>> x;
      for (int i = 0; i < 3; ++i) x.push_back(model.embed_tensor({1, 5, 9, 2, 7, 3, 4, 11}));
      quant::GptqOptions g;
      g.act_order = act_order;
      auto result = quantize_baseline(model, Baseline::gptq, spec, x, g, false);
      const std::string path = (std::filesystem::temp_directory_path() /
                                fmt::format("cbq_native_{}_{}.safetensors", bits, act_order))
                                   .string();
      io::save_native(path, model, result);
      auto loaded = io::load_native_weights(path);
      REQUIRE(loaded.size() == result.layers.size());
      for (const auto& l : result.layers) {
        const auto& w = loaded.at(l.name);
        CHECK(testing::max_abs_diff(w.dequantize(), l.weight.dequantize()) == 0.0);
        CHECK(w.group_index == l.weight.group_index);
      }
      io::SafetensorsFile file(path);
      CHECK(file.metadata().at("method") == "gptq");
      CHECK(testing::max_abs_diff(file.to_float("model.norm.weight"),
                                  model.final_norm_weight.value) == 0.0);
      std::filesystem::remove(path);
    }
}

TEST_CASE("native format: a file that is not cbq's is refused with its name") {
  const std::string path =
      (std::filesystem::temp_directory_path() / "cbq_not_native.safetensors").string();
  io::write_safetensors(path, {{"x", io::TensorToWrite::f32(Tensor<float>(Shape{2}))}}, {});
  CHECK_THROWS_WITH_AS(io::load_native_weights(path),
                       doctest::Contains("metadata 'format' is missing"), cbq::Error);
  std::filesystem::remove(path);
}
