// cbq-balance: runs the CBQ pass on any model from token ids (or text) and prints the balance of
// the window loss terms: at the start and end of every window the L2 and KL terms and γ·L_round,
// the change the final hard rounding makes, and the start-vs-trained decision
// (docs/RESULTS.md, "Loss balance"). For models cbq cannot tokenize yet, the ids come from
// another tokenizer, e.g.
//
//   scripts/llama-cpp.sh llama-tokenize -m MODEL.gguf -f TEXT --ids --log-disable > ids.txt
//   cbq-balance MODEL.gguf --ids ids.txt --samples 16 --seq-len 512 --epochs 1 --wbits 4 --group
//   128
//
// With a model cbq can tokenize (llama2.c, GGUF, Hugging Face), real text works directly, e.g.
// calibration from the first 40 % of WikiText-2 and perplexity on the next 8 × 512 tokens:
//
//   cbq-balance SmolLM2.gguf --text wikitext2_test.txt --head 0.4 --eval-tokens 4096
//
// Options: --ids FILE | --text FILE (--tokenizer TOK; encoded as the tokenizer does by default,
// add_bos included), --head F (calibrate on the first fraction F of the text, cut at a line
// break; --eval-tokens N then evaluates on the first N tokens of the rest), --eval-ids FILE
// --eval-tokens N (FP and CBQ perplexity on the first N ids), --samples N, --seq-len L,
// --seed S, --epochs E, --wbits B,
// --group G (0 per-channel), --rounding lora|full|nearest, --loss-scale token|window|absolute,
// --gamma X, --no-kld, --no-keep-better, --init gptq, --soft, --preset paper|classic,
// --max-steps N, --threads N, --report DIR, --quiet, --activations (first print the FP residual
// stream's statistics after every block on the calibration samples).
// `cbq-balance --from-report FILE.json` prints the balance table of every CBQ run in a saved
// report (cbq-quantize --report) without running anything; `cbq-balance --render DIR` renders
// the charts of every report in DIR again.
#include <algorithm>
#include <cbq/cbq.hpp>
#include <cbq/core/mmap.hpp>
#include <cbq/eval/perplexity.hpp>
#include <cbq/model/load.hpp>
#include <cbq/pass/pass.hpp>
#include <cbq/report/report.hpp>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

namespace {

// Integers in a file, whatever separates them ("[1, 2, 3]" as llama-tokenize --ids prints).
std::vector<int32_t> read_ids(const std::string& path) {
  std::ifstream f(path);
  CBQ_CHECK(f.good(), "cbq-balance: cannot read {}", path);
  const std::string s((std::istreambuf_iterator<char>(f)), {});
  std::vector<int32_t> ids;
  std::string cur;
  for (char c : s + " ") {
    if (std::isdigit(static_cast<unsigned char>(c))) {
      cur += c;
    } else if (!cur.empty()) {
      ids.push_back(static_cast<int32_t>(std::stol(cur)));
      cur.clear();
    }
  }
  CBQ_CHECK(!ids.empty(), "cbq-balance: no token ids in {}", path);
  return ids;
}

// The full-precision residual stream after every block on the calibration samples: the mean and
// largest token energy ‖h_t‖², the share of all energy in each sample's first token, the share
// in the 4 channels with most energy, and the largest |h|.
template <class Model>
void print_activations(Model& model, const cbq::Calibration& calib) {
  const int64_t d = model.config.dim;
  std::vector<cbq::Tensor<float>> x;
  for (const auto& s : calib.samples) x.push_back(model.embed_tensor(s));
  std::printf(
      "\n| block | mean ‖h_t‖² | median | max | first-token share | top-4-channel share | max |h| "
      "|\n"
      "|---|---|---|---|---|---|---|\n");
  cbq::BlockContext<float> fp;
  fp.full_precision = true;
  for (int64_t b = 0; b < model.num_blocks(); ++b) {
    std::vector<double> channel(static_cast<size_t>(d), 0), token;
    double total = 0, first = 0, largest = 0;
    for (auto& t : x) {
      t = model.run_block(b, t, fp);
      for (int64_t r = 0; r < t.size(0); ++r) {
        double e = 0;
        for (int64_t c = 0; c < d; ++c) {
          const double v = t(r, c);
          e += v * v;
          channel[static_cast<size_t>(c)] += v * v;
          largest = std::max(largest, std::abs(v));
        }
        token.push_back(e);
        total += e;
        if (r == 0) first += e;
      }
    }
    std::sort(channel.rbegin(), channel.rend());
    auto top4 = [](const std::vector<double>& v) {
      double sum = 0;
      for (size_t i = 0; i < v.size() && i < 4; ++i) sum += v[i];
      return sum;
    };
    std::vector<double> sorted = token;
    std::sort(sorted.begin(), sorted.end());
    std::printf("| %lld | %.4g | %.4g | %.4g | %.3f | %.3f | %.4g |\n", static_cast<long long>(b),
                total / static_cast<double>(token.size()), sorted[sorted.size() / 2], sorted.back(),
                first / total, top4(channel) / total, largest);
  }
  std::printf("\n");
}

[[noreturn]] void usage(const std::string& msg) {
  std::fprintf(stderr, "cbq-balance: %s (see the comment at the top of examples/cbq-balance.cpp)\n",
               msg.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, ids_path, text_path, tokenizer, eval_ids_path, report_dir;
  bool activations = false;
  double head = 1.0;
  int64_t samples = 16, seq_len = 512, eval_tokens = 0, threads = 0;
  cbq::PassSpec spec;
  spec.weight = cbq::quant::GridSpec{4, false, cbq::quant::Granularity::per_group, 128};
  cbq::PassOptions o;
  o.epochs = 1;
  if (argc == 3 && std::string(argv[1]) == "--render") {
    try {
      for (const std::string& f : cbq::report::render_dir(argv[2]))
        std::printf("report: wrote %s\n", f.c_str());
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cbq-balance: %s\n", e.what());
      return 1;
    }
  }
  if (argc == 3 && std::string(argv[1]) == "--from-report") {
    try {
      std::ifstream in(argv[2]);
      CBQ_CHECK(in.good(), "cbq-balance: cannot read {}", argv[2]);
      const nlohmann::json run = nlohmann::json::parse(in);
      for (const auto& m : run.at("methods"))
        if (!m.at("windows").empty())
          std::printf("%s (%s, perplexity %s)\n\n%s\n", m.at("method").get<std::string>().c_str(),
                      m.at("config").get<std::string>().c_str(), m.at("perplexity").dump().c_str(),
                      cbq::report::balance_table(m).c_str());
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cbq-balance: %s\n", e.what());
      return 1;
    }
  }
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(k + " needs a value");
      return argv[++i];
    };
    auto number = [&] { return std::stod(value()); };
    if (k == "--ids")
      ids_path = value();
    else if (k == "--text")
      text_path = value();
    else if (k == "--tokenizer")
      tokenizer = value();
    else if (k == "--head")
      head = number();
    else if (k == "--activations")
      activations = true;
    else if (k == "--eval-ids")
      eval_ids_path = value();
    else if (k == "--eval-tokens")
      eval_tokens = static_cast<int64_t>(number());
    else if (k == "--samples")
      samples = static_cast<int64_t>(number());
    else if (k == "--seq-len")
      seq_len = static_cast<int64_t>(number());
    else if (k == "--seed")
      o.seed = static_cast<uint64_t>(number());
    else if (k == "--epochs")
      o.epochs = static_cast<int64_t>(number());
    else if (k == "--wbits")
      spec.weight.bits = static_cast<int>(number());
    else if (k == "--group") {
      const auto g = static_cast<int64_t>(number());
      spec.weight.granularity =
          g == 0 ? cbq::quant::Granularity::per_channel : cbq::quant::Granularity::per_group;
      spec.weight.group_size = g == 0 ? 128 : g;
    } else if (k == "--rounding") {
      const std::string r = value();
      spec.rounding = r == "full"      ? cbq::RoundingKind::full
                      : r == "nearest" ? cbq::RoundingKind::nearest
                                       : cbq::RoundingKind::lora;
    } else if (k == "--loss-scale") {
      const std::string v = value();
      if (v != "token" && v != "window" && v != "absolute") usage("--loss-scale " + v);
      o.loss_scale = v == "token"    ? cbq::LossScale::token
                     : v == "window" ? cbq::LossScale::window
                                     : cbq::LossScale::absolute;
    } else if (k == "--gamma")
      o.gamma_round = number();
    else if (k == "--no-kld")
      o.loss_kld = false;
    else if (k == "--no-keep-better")
      o.keep_better = false;
    else if (k == "--init")
      o.weight_init = value() == "gptq" ? cbq::WeightInit::gptq : cbq::WeightInit::rtn;
    else if (k == "--soft")
      o.rounding_mode = cbq::quant::RoundingMode::soft;
    else if (k == "--preset") {
      const std::string p = value();
      const auto keep = o;
      o = p == "paper" ? cbq::PassOptions::paper() : cbq::PassOptions::classic();
      o.epochs = keep.epochs;
      o.seed = keep.seed;
    } else if (k == "--max-steps")
      o.max_steps = static_cast<int64_t>(number());
    else if (k == "--threads")
      threads = static_cast<int64_t>(number());
    else if (k == "--report")
      report_dir = value();
    else if (k == "--quiet")
      o.verbose = false;
    else if (!k.empty() && k[0] == '-')
      usage("unknown option " + k);
    else
      model_path = k;
  }
  if (model_path.empty() || (ids_path.empty() && text_path.empty()))
    usage("needs a model and --ids FILE or --text FILE");
  o.balance_all_samples = true;  // this tool's purpose: the balance over every sample
  try {
    if (threads > 0) cbq::set_num_threads(static_cast<int>(threads));
    cbq::AnyModel any = cbq::load_model(model_path, tokenizer);
    std::printf("%s\n", cbq::describe(any).c_str());
    std::vector<int32_t> ids, eval;
    if (!ids_path.empty()) {
      ids = read_ids(ids_path);
    } else {
      CBQ_CHECK(any.tokenizer(), "cbq-balance: {} has no tokenizer; pass --tokenizer or --ids",
                model_path);
      CBQ_CHECK(head > 0 && head <= 1, "cbq-balance: --head {} is not in (0, 1]", head);
      const std::string text = cbq::io::read_text_file(text_path);
      size_t cut = text.size();
      if (head < 1) {
        cut = text.find('\n', static_cast<size_t>(head * static_cast<double>(text.size())));
        cut = cut == std::string::npos ? text.size() : cut + 1;
      }
      ids = any.tokenizer()->encode(std::string_view(text).substr(0, cut));
      if (cut < text.size() && eval_tokens > 0 && eval_ids_path.empty())
        eval = any.tokenizer()->encode(std::string_view(text).substr(cut));
      std::printf("text: %s, calibration from its first %zu of %zu bytes (%zu tokens)\n",
                  text_path.c_str(), cut, text.size(), ids.size());
    }
    const cbq::Calibration calib = cbq::sample_calibration(ids, samples, seq_len, o.seed);
    if (!eval_ids_path.empty()) eval = read_ids(eval_ids_path);
    if (eval_tokens > 0 && static_cast<int64_t>(eval.size()) > eval_tokens)
      eval.resize(eval_tokens);
    std::printf("calibration: %lld × %lld tokens of %zu; %s\n", static_cast<long long>(samples),
                static_cast<long long>(seq_len), ids.size(), spec.describe().c_str());
    std::optional<cbq::report::RunReport> report;
    if (!report_dir.empty()) {
      report.emplace(report_dir,
                     std::filesystem::path(model_path).stem().string() + "-" +
                         spec.describe_quantizer() + "-seed" + std::to_string(o.seed),
                     std::filesystem::path(model_path).filename().string());
      report->set_settings(spec, o.seed, samples, seq_len);
    }
    any.visit([&](auto& model) {
      if (activations) print_activations(model, calib);
      if (report) report->capture_fp(model, calib);
      double fp_ppl = 0;
      if (!eval.empty()) {
        fp_ppl = cbq::eval::perplexity_gptq(model, eval, seq_len).perplexity;
        std::printf("FP perplexity %.4f (%zu tokens, ctx %lld)\n", fp_ppl, eval.size(),
                    static_cast<long long>(seq_len));
        if (report) report->set_fp(fp_ppl);
      }
      cbq::CbqPass pass(spec, o);
      const cbq::QuantizationResult r = pass.run(model, calib);
      double ppl = 0;
      if (!eval.empty()) {
        ppl = cbq::eval::perplexity_gptq(model, eval, seq_len).perplexity;
        std::printf("CBQ perplexity %.4f (%+.2f%%)\n", ppl, 100 * (ppl / fp_ppl - 1));
      }
      std::printf("\n%s",
                  cbq::report::balance_table(cbq::report::method_json("cbq", r, ppl)).c_str());
      const auto [change, flips] = r.learning_summary();
      std::printf(
          "\nsteps moved %.3f%%, codes differing from round-to-nearest %.3f%%, %lld of %zu "
          "windows kept their start, %.1fs\n",
          100 * change, 100 * flips, static_cast<long long>(r.windows_kept_start()),
          r.windows.size(), r.seconds);
      if (report) {
        report->add("cbq", r, eval.empty() ? std::nan("") : ppl, model);
        for (const std::string& f : report->write()) std::printf("report: wrote %s\n", f.c_str());
      }
    });
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbq-balance: %s\n", e.what());
    return 1;
  }
}
