// Perplexity throughput of cbq's evaluation on given token ids, for the side-by-side comparison
// with llama.cpp's llama-perplexity in scripts/bench-eval.sh (both read the ids that
// llama-tokenize wrote, so both score the same tokens).
//
//   eval_throughput MODEL --ids FILE [--ctx N] [--threads N] [--chunks K] [--protocol
//   llamacpp|gptq]
//                   [--bos ID] [--tokenizer PATH]
//   eval_throughput MODEL --tokenizer PATH --export-gguf OUT.gguf   # an F32 GGUF for llama.cpp
//
// --ids: token ids as llama-tokenize --ids prints them ("[1, 2, 3]") or whitespace-separated.
// --bos: llama.cpp protocol only, the id that replaces each chunk's first token (llama.cpp does
// this when the GGUF's add_bos_token is true); default: keep the first token.
// Prints the perplexity, the evaluation's wall time and tokens/s (tokens fed through the model
// per second of evaluation, the model load excluded, as llama-perplexity's "prompt eval" line),
// the threads, the BLAS core and the peak RSS.
#include <cbq/cbq.hpp>
#include <cbq/eval/perplexity.hpp>
#include <cbq/export/gguf.hpp>
#include <cbq/model/load.hpp>
#include <charconv>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>
#include "bench_tools.hpp"

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "eval_throughput: %s\nusage: eval_throughput MODEL --ids FILE [--ctx N] "
               "[--threads N] [--chunks K] [--protocol llamacpp|gptq] [--bos ID] "
               "[--tokenizer PATH]\n       eval_throughput MODEL [--tokenizer PATH] "
               "--export-gguf OUT.gguf\n",
               why.c_str());
  std::exit(2);
}

int64_t number(const std::string& flag, const std::string& v) {
  int64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size())
    usage(flag + " expects an integer, got \"" + v + "\"");
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  cbq::blas::use_best_blas_kernels(argc, argv);
  std::string model_path, ids_path, tokenizer, protocol = "llamacpp", export_path;
  int64_t ctx = 512, threads = 0, chunks = 0, bos = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--ids")
      ids_path = value();
    else if (a == "--ctx")
      ctx = number(a, value());
    else if (a == "--threads")
      threads = number(a, value());
    else if (a == "--chunks")
      chunks = number(a, value());
    else if (a == "--protocol")
      protocol = value();
    else if (a == "--bos")
      bos = number(a, value());
    else if (a == "--tokenizer")
      tokenizer = value();
    else if (a == "--export-gguf")
      export_path = value();
    else if (!a.empty() && a[0] == '-')
      usage("unknown option " + a);
    else if (model_path.empty())
      model_path = a;
    else
      usage("more than one model");
  }
  if (model_path.empty()) usage("no model given");
  if (protocol != "llamacpp" && protocol != "gptq") usage("--protocol must be llamacpp or gptq");
  try {
    if (threads > 0) cbq::set_num_threads(static_cast<int>(threads));
    cbq::AnyModel model = cbq::load_model(model_path, tokenizer);
    if (!export_path.empty()) {
      const auto report =
          cbq::io::export_gguf(export_path, model.llama(), model.tokenizer().get(), nullptr);
      std::printf("%s\n", report.summary().c_str());
      return 0;
    }
    if (ids_path.empty()) usage("--ids is required");
    std::vector<int32_t> ids = cbq::bench::read_token_ids(ids_path);
    if (chunks > 0 && static_cast<int64_t>(ids.size()) > chunks * ctx)
      ids.resize(static_cast<std::size_t>(chunks * ctx));
    const cbq::eval::PerplexityResult r = model.visit([&](auto& m) {
      return protocol == "gptq"
                 ? cbq::eval::perplexity_gptq(m, ids, ctx)
                 : cbq::eval::perplexity_llamacpp(m, ids, ctx, static_cast<int32_t>(bos));
    });
    std::printf(
        "cbq %s protocol: perplexity %.4f over %lld windows of %lld (%lld tokens scored), %.2f s, "
        "%.1f tokens/s\n",
        protocol.c_str(), r.perplexity, static_cast<long long>(r.windows),
        static_cast<long long>(ctx), static_cast<long long>(r.scored_tokens), r.seconds,
        r.tokens_per_second);
    std::printf("threads %d, %s, peak RSS %.0f MiB\n", cbq::num_threads(),
                cbq::blas::blas_core_summary().c_str(), cbq::bench::peak_rss_mib());
    std::printf("tokens_per_second=%.2f perplexity=%.6f\n", r.tokens_per_second, r.perplexity);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eval_throughput: %s\n", e.what());
    return 1;
  }
  return 0;
}
