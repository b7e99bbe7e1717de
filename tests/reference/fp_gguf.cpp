// Writes a model in full precision (F32 matrices) as a GGUF file for llama.cpp, e.g. the base of
// `llama-perplexity --kl-divergence-base` (docs/MODELS.md, "KL divergence against llama.cpp"):
//
//   g++ -O2 -std=c++20 -Iinclude tests/reference/fp_gguf.cpp -o /tmp/fp_gguf -lfmt -lopenblas
//   /tmp/fp_gguf data/models/stories260K.bin data/models/tok512.bin stories260K-f32.gguf
#include <cbq/export/gguf.hpp>
#include <cbq/model/load.hpp>
#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: fp_gguf MODEL TOKENIZER OUT.gguf\n");
    return 2;
  }
  try {
    cbq::AnyModel any = cbq::load_model(argv[1], argv[2]);
    auto& m = any.llama();
    const auto report = cbq::io::export_gguf(argv[3], m, m.tokenizer.get(), nullptr);
    std::printf("%s\n", report.summary().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fp_gguf: %s\n", e.what());
    return 1;
  }
  return 0;
}
