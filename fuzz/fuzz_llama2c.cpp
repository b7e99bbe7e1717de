// libFuzzer target: llama2.c checkpoints (legacy and version-1 headers) through load_llama2c.
#include <cbq/formats/llama2c.hpp>

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = cbq::fuzz::write_file("model.bin", data, size);
  cbq::fuzz::accept_errors([&] {
    const cbq::io::Llama2cModel m = cbq::io::load_llama2c(path);
    // Every weight was copied out of the file, so together they cannot exceed it.
    uint64_t bytes = 0;
    for (const auto& [name, t] : m.weights) {
      FUZZ_CHECK(t.numel() >= 0);
      bytes += static_cast<uint64_t>(t.numel()) * sizeof(float);
    }
    FUZZ_CHECK(bytes <= size);
    FUZZ_CHECK(m.config.dim > 0 && m.config.n_layers > 0 && m.config.vocab_size > 0);
  });
  return 0;
}
