// Writes a model in full precision (F32 matrices) as a GGUF file for llama.cpp after the offline
// rotations of model/rotation.hpp (RMSNorms folded, R1 and R2 with seed SEED), or unrotated with
// SEED "none"; scripts/rotation-llamacpp.sh scores both (docs/ROTATION.md):
//
//   g++ -O2 -std=c++20 -Iinclude tests/reference/rotated_gguf.cpp -o /tmp/rotated_gguf \
//       -lfmt -lopenblas
//   /tmp/rotated_gguf data/models/stories260K.bin data/models/tok512.bin rotated.gguf 0
#include <cbq/export/gguf.hpp>
#include <cbq/model/load.hpp>
#include <cbq/model/rotation.hpp>
#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: rotated_gguf MODEL TOKENIZER OUT.gguf SEED|none\n");
    return 2;
  }
  try {
    cbq::AnyModel any = cbq::load_model(argv[1], argv[2]);
    auto& m = any.llama();
    if (std::string(argv[4]) != "none") {
      cbq::RotationOptions opt;
      opt.seed = std::stoull(argv[4]);
      const cbq::RotationReport r = cbq::rotate_model(m, opt);
      std::printf("rotated: R1 %s, R2 %s%s\n", r.r1.c_str(), r.r2.c_str(),
                  r.untied_head ? ", head untied" : "");
    }
    const auto report = cbq::io::export_gguf(argv[3], m, m.tokenizer.get(), nullptr);
    std::printf("%s\n", report.summary().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rotated_gguf: %s\n", e.what());
    return 1;
  }
  return 0;
}
