// cbq's GPTQ baseline on stories260K with each of the switches that separate it from the
// reference run (docs/BASELINES.md, "Checked against the reference"); prints one line with the
// GPTQ-protocol perplexity (tinystories_valid_200k.txt, ctx 512) per run:
//
//   g++ -O2 -std=c++20 -Iinclude tests/reference/gptq_seeds.cpp -o /tmp/gptq_seeds -lfmt -lopenblas
//   /tmp/gptq_seeds --bits 4 --group 32 --sampler gptq --seed 0        # the reference's run
//   /tmp/gptq_seeds --sampler cbq --true-sequential 0 --updated-group-params --seed 0  # former
//   /tmp/gptq_seeds ... --dump DIR    # <layer>.H.npy / .Q.npy for compare_gptq.py
//
// Options: --data DIR (default data), --bits B, --group G (0 = per-channel), --seed S,
// --sampler cbq|gptq, --true-sequential 0|1, --updated-group-params, --act-order,
// --static-groups, --samples N, --threads N.
#include <cbq/cbq.hpp>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>

namespace {

// A (rows, cols) float64 array in NumPy's .npy format (version 1.0).
void write_npy(const std::string& path, const cbq::Tensor<double>& t) {
  std::ofstream f(path, std::ios::binary);
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (" +
                       std::to_string(t.size(0)) + ", " + std::to_string(t.size(1)) + "), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  const auto len = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(reinterpret_cast<const char*>(&len), 2);
  f << header;
  const cbq::Tensor<double> c = t.contiguous();
  f.write(reinterpret_cast<const char*>(c.data()),
          static_cast<std::streamsize>(c.numel() * sizeof(double)));
  CBQ_CHECK(f.good(), "gptq_seeds: cannot write {}", path);
}

}  // namespace

int main(int argc, char** argv) {
  std::string data = "data", sampler = "gptq", dump;
  int bits = 4, group = 32, threads = 1;
  int64_t samples = 128;
  uint64_t seed = 0;
  cbq::GptqBaselineOptions o;  // true-sequential, the reference's group parameters
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string k = argv[i];
      auto value = [&]() -> std::string {
        CBQ_CHECK(i + 1 < argc, "gptq_seeds: {} needs a value", k);
        return argv[++i];
      };
      if (k == "--data")
        data = value();
      else if (k == "--bits")
        bits = std::stoi(value());
      else if (k == "--group")
        group = std::stoi(value());
      else if (k == "--seed")
        seed = std::stoull(value());
      else if (k == "--samples")
        samples = std::stoll(value());
      else if (k == "--threads")
        threads = std::stoi(value());
      else if (k == "--sampler")
        sampler = value();
      else if (k == "--true-sequential")
        o.true_sequential = std::stoi(value()) != 0;
      else if (k == "--updated-group-params")
        o.layer.reference_group_params = false;
      else if (k == "--act-order")
        o.layer.act_order = true;
      else if (k == "--static-groups")
        o.layer.static_groups = true;
      else if (k == "--dump")
        dump = value();
      else
        cbq::fail("gptq_seeds: unknown option {}", k);
    }
    CBQ_CHECK(sampler == "gptq" || sampler == "cbq", "gptq_seeds: --sampler {} (cbq or gptq)",
              sampler);
    cbq::set_num_threads(threads);
    cbq::AnyModel any =
        cbq::load_model(data + "/models/stories260K.bin", data + "/models/tok512.bin");
    auto& m = any.llama();
    const cbq::Tokenizer& tok = *m.tokenizer;
    const auto calib_tokens =
        tok.encode(cbq::io::read_text_file(data + "/text/tinystories_train_excerpt.txt"));
    const auto eval_tokens =
        tok.encode(cbq::io::read_text_file(data + "/text/tinystories_valid_200k.txt"));
    const cbq::Calibration calib =
        sampler == "gptq" ? cbq::sample_calibration_gptq(calib_tokens, samples, 512, seed)
                          : cbq::sample_calibration(calib_tokens, samples, 512, seed);
    std::vector<cbq::Tensor<float>> x;
    for (const auto& s : calib.samples) x.push_back(m.embed_tensor(s));
    cbq::PassSpec spec;
    spec.weight.bits = bits;
    spec.weight.granularity =
        group > 0 ? cbq::quant::Granularity::per_group : cbq::quant::Granularity::per_channel;
    if (group > 0) spec.weight.group_size = group;
    if (!dump.empty())
      o.on_layer = [&](const std::string& name, const cbq::Tensor<double>& h,
                       const cbq::quant::GptqResult& r) {
        write_npy(dump + "/" + name + ".H.npy", h);
        write_npy(dump + "/" + name + ".Q.npy", r.dequantized.cast<double>());
      };
    cbq::quantize_baseline(m, cbq::Baseline::gptq, spec, std::move(x), o, false);
    const double ppl = cbq::eval::perplexity_gptq(m, eval_tokens, 512).perplexity;
    std::printf(
        "cbq W%d g%d sampler %s true-sequential %d reference-group-params %d act-order %d "
        "static-groups %d seed %llu: %.4f\n",
        bits, group, sampler.c_str(), o.true_sequential ? 1 : 0,
        o.layer.reference_group_params ? 1 : 0, o.layer.act_order ? 1 : 0,
        o.layer.static_groups ? 1 : 0, static_cast<unsigned long long>(seed), ppl);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gptq_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
