// libFuzzer target: Hugging Face config.json through load_hf_config and, when it parses, load_hf
// against the real tiny-llama fixture weights (every tensor checked against the config's shapes).
#include <cbq/formats/hf_config.hpp>
#include <filesystem>

#include "fuzz_common.hpp"

namespace {

const std::filesystem::path& model_dir() {
  static const std::filesystem::path dir = [] {
    namespace fs = std::filesystem;
    const fs::path d = cbq::fuzz::scratch_dir() / "hf";
    fs::create_directories(d);
    fs::copy_file(cbq::fuzz::fixtures_dir() / "tiny-llama" / "model.safetensors",
                  d / "model.safetensors", fs::copy_options::overwrite_existing);
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path dir = model_dir();
  const std::string path = cbq::fuzz::write_file("hf/config.json", data, size);
  cbq::fuzz::accept_errors([&] {
    const cbq::ModelConfig c = cbq::io::load_hf_config(path);
    FUZZ_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0);
    FUZZ_CHECK(c.n_kv_heads > 0 && c.head_dim > 0 && c.vocab_size > 0 && c.max_seq_len > 0);
    FUZZ_CHECK(c.n_heads % c.n_kv_heads == 0);
    const cbq::io::HfModel m = cbq::io::load_hf(dir.string());
    for (const auto& [name, shape] : cbq::io::expected_weight_shapes(m.config))
      FUZZ_CHECK(m.weights.at(name).shape() == shape);
  });
  return 0;
}
