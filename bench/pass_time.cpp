// The CBQ pass's estimate (pass/estimate.hpp) against the measured pass, on a real model with
// calibration segments drawn from token ids (llama-tokenize --ids output, or whitespace-separated),
// W4A16 g32 and the pass's defaults otherwise.
//
//   pass_time MODEL --ids FILE [--samples N] [--seq-len L] [--epochs E] [--threads T]
//             [--estimate-only] [--tokenizer PATH]
//
// Prints the estimate, then runs the pass and prints its wall time (the pass itself, as
// cbq-quantize's "time" column) and the process's peak RSS.
#include <sys/resource.h>

#include <cbq/cbq.hpp>
#include <cbq/model/load.hpp>
#include <cbq/pass/estimate.hpp>
#include <charconv>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "pass_time: %s\nusage: pass_time MODEL --ids FILE [--samples N] [--seq-len L] "
               "[--epochs E] [--threads T] [--estimate-only] [--tokenizer PATH]\n",
               why.c_str());
  std::exit(2);
}

int64_t number(const std::string& flag, const std::string& v) {
  int64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size() || n < 1)
    usage(flag + " expects a positive integer, got \"" + v + "\"");
  return n;
}

std::vector<int32_t> read_ids(const std::string& path) {
  std::ifstream in(path);
  if (!in) cbq::fail("{}: cannot open the ids file", path);
  std::string s((std::istreambuf_iterator<char>(in)), {});
  for (char& c : s)
    if (c == '[' || c == ']' || c == ',') c = ' ';
  std::istringstream is(s);
  std::vector<int32_t> ids;
  int64_t v = 0;
  while (is >> v) ids.push_back(static_cast<int32_t>(v));
  return ids;
}

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
  cbq::blas::use_best_blas_kernels(argc, argv);
  std::string model_path, ids_path, tokenizer;
  int64_t samples = 16, seq_len = 512, epochs = 1, threads = 0;
  bool estimate_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--ids")
      ids_path = value();
    else if (a == "--samples")
      samples = number(a, value());
    else if (a == "--seq-len")
      seq_len = number(a, value());
    else if (a == "--epochs")
      epochs = number(a, value());
    else if (a == "--threads")
      threads = number(a, value());
    else if (a == "--tokenizer")
      tokenizer = value();
    else if (a == "--estimate-only")
      estimate_only = true;
    else if (!a.empty() && a[0] == '-')
      usage("unknown option " + a);
    else if (model_path.empty())
      model_path = a;
    else
      usage("more than one model");
  }
  if (model_path.empty() || ids_path.empty()) usage("a MODEL and --ids are required");
  try {
    if (threads > 0) cbq::set_num_threads(static_cast<int>(threads));
    cbq::AnyModel any = cbq::load_model(model_path, tokenizer);
    cbq::PassSpec spec;
    spec.weight.bits = 4;
    spec.weight.group_size = 32;
    cbq::PassOptions options;
    options.epochs = epochs;
    options.verbose = false;
    const std::vector<int32_t> ids = read_ids(ids_path);
    const cbq::Calibration calib = cbq::sample_calibration(ids, samples, seq_len, 0);
    std::printf("%s: %lld × %lld tokens, %lld epoch(s), W4A16 g32, %d threads, %s\n",
                model_path.c_str(), static_cast<long long>(samples),
                static_cast<long long>(seq_len), static_cast<long long>(epochs), cbq::num_threads(),
                cbq::blas::blas_core_summary().c_str());
    any.visit([&](auto& m) {
      const cbq::PassEstimate e = cbq::estimate_pass(m, spec, options, samples, seq_len);
      std::printf("estimate: %s\n", e.summary().c_str());
      std::printf("estimate_seconds=%.2f estimate_peak_mib=%.0f\n", e.seconds,
                  static_cast<double>(e.peak_bytes) / (1 << 20));
      std::fflush(stdout);
      if (estimate_only) return;
      cbq::CbqPass pass(spec, options);
      const cbq::QuantizationResult r = pass.run(m, calib);
      std::printf("measured: CBQ pass %.1f s, peak RSS %.0f MiB\n", r.seconds, peak_rss_mib());
      std::printf("measured_seconds=%.2f peak_rss_mib=%.0f\n", r.seconds, peak_rss_mib());
    });
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pass_time: %s\n", e.what());
    return 1;
  }
  return 0;
}
