// libFuzzer target: model.safetensors.index.json (sharded checkpoints) through
// SafetensorsCheckpoint. The input is the index; the folder also holds the three real shards of
// tests/fixtures/tiny-llama-sharded, so weight_map entries can name existing files.
#include <cbq/formats/safetensors.hpp>
#include <filesystem>

#include "fuzz_common.hpp"

namespace {

const std::filesystem::path& model_dir() {
  static const std::filesystem::path dir = [] {
    namespace fs = std::filesystem;
    const fs::path d = cbq::fuzz::scratch_dir() / "sharded";
    fs::create_directories(d);
    for (const auto& e : fs::directory_iterator(cbq::fuzz::fixtures_dir() / "tiny-llama-sharded"))
      if (e.path().extension() == ".safetensors")
        fs::copy_file(e.path(), d / e.path().filename(), fs::copy_options::overwrite_existing);
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path dir = model_dir();
  cbq::fuzz::write_file("sharded/model.safetensors.index.json", data, size);
  cbq::fuzz::accept_errors([&] {
    const cbq::io::SafetensorsCheckpoint ckpt(dir.string());
    FUZZ_CHECK(!ckpt.source_path().empty());
    int converted = 0;
    for (const auto& name : ckpt.names()) {
      const cbq::io::TensorInfo& info = ckpt.info(name);
      FUZZ_CHECK(ckpt.file_of(name).contains(name));
      if (converted++ < 2 && info.dtype != cbq::io::Dtype::I32)
        FUZZ_CHECK(ckpt.to_float(name).shape() == info.shape);
    }
  });
  return 0;
}
