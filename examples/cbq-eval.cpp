// cbq-eval: load a model (llama2.c .bin or Hugging Face folder), print its summary, its perplexity
// on a text in the GPTQ protocol and in the llama.cpp protocol, and optionally a greedy
// generation.
//
//   cbq-eval                                  # stories260K + tok512 on TinyStories (CBQ_DATA_DIR)
//   cbq-eval llama-7b/ --text wikitext2_test.txt --ctx 2048
//   cbq-eval stories15M.bin --tokenizer tokenizer32k.bin --generate 256
#include <cbq/eval/perplexity.hpp>
#include <cbq/model/load.hpp>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#ifndef CBQ_DATA_DIR
#define CBQ_DATA_DIR "data"
#endif

namespace fs = std::filesystem;

namespace {

constexpr int kUsageError = 2;

void print_usage(std::FILE* out) {
  std::fprintf(
      out,
      "usage: cbq-eval [MODEL] [--tokenizer PATH] [--text PATH] [--ctx N] [--generate N]\n"
      "                [--prompt TEXT]\n"
      "\n"
      "  MODEL            a llama2.c checkpoint (.bin) or a Hugging Face folder\n"
      "                   (config.json + safetensors). Default: %s/models/stories260K.bin\n"
      "                   with tok512.bin\n"
      "  --tokenizer PATH tokenizer.bin (llama2.c) or tokenizer.json; default: the one\n"
      "                   beside the model (tokenizer.bin / tokenizer.json)\n"
      "  --text PATH      text for perplexity; default: %s/text/tinystories_valid_200k.txt\n"
      "  --ctx N          window length for both protocols; default: the model's context,\n"
      "                   at most 2048\n"
      "  --generate N     greedy generation of up to N tokens (0 = none, the default)\n"
      "  --prompt TEXT    prompt for the generation (default: BOS only)\n"
      "  -h, --help       this text\n"
      "\n"
      "Perplexity protocols: GPTQ (whole text tokenized with BOS, non-overlapping windows\n"
      "of N tokens, every token but the first of a window scored) and llama.cpp\n"
      "(llama-perplexity -c N: chunks of N tokens, first token set to BOS when the\n"
      "tokenizer adds one, second half scored).\n",
      CBQ_DATA_DIR, CBQ_DATA_DIR);
}

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "cbq-eval: %s\n\n", msg.c_str());
  print_usage(stderr);
  std::exit(kUsageError);
}

struct Options {
  std::string model, tokenizer, text;
  std::optional<int64_t> ctx;
  int64_t generate = 0;
  std::optional<std::string> prompt;
};

int64_t parse_count(std::string_view flag, std::string_view v, int64_t min) {
  int64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size())
    usage_error(fmt::format("{} expects an integer, got \"{}\"", flag, v));
  if (n < min) usage_error(fmt::format("{} must be at least {}, got {}", flag, min, n));
  return n;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  bool only_positional = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (only_positional || arg.empty() || arg[0] != '-' || arg == "-") {
      positional.push_back(arg);
      continue;
    }
    if (arg == "--") {
      only_positional = true;
      continue;
    }
    if (arg == "-h" || arg == "--help") {
      print_usage(stdout);
      std::exit(0);
    }
    // --flag VALUE or --flag=VALUE
    std::string flag = arg, value;
    bool inline_value = false;
    if (auto eq = arg.find('='); eq != std::string::npos && arg.rfind("--", 0) == 0) {
      flag = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      inline_value = true;
    }
    const bool known = flag == "--tokenizer" || flag == "--text" || flag == "--ctx" ||
                       flag == "--generate" || flag == "--prompt";
    if (!known) usage_error(fmt::format("unknown option \"{}\"", arg));
    if (!inline_value) {
      if (i + 1 >= argc) usage_error(fmt::format("{} needs a value", flag));
      value = argv[++i];
    }
    if (flag == "--tokenizer") {
      o.tokenizer = value;
    } else if (flag == "--text") {
      o.text = value;
    } else if (flag == "--ctx") {
      o.ctx = parse_count(flag, value, 4);
    } else if (flag == "--generate") {
      o.generate = parse_count(flag, value, 0);
    } else {
      o.prompt = value;
    }
    if ((flag == "--tokenizer" || flag == "--text") && value.empty())
      usage_error(fmt::format("{} needs a non-empty path", flag));
  }
  if (positional.size() > 1)
    usage_error(fmt::format("expected at most one MODEL, got {} (\"{}\", \"{}\"…)",
                            positional.size(), positional[0], positional[1]));
  if (!positional.empty()) o.model = positional[0];
  return o;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) cbq::fail("{}: cannot open the text file", path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void print_ppl(const char* name, const char* unit, int64_t ctx,
               const cbq::eval::PerplexityResult& r) {
  std::printf(
      "perplexity (%s, ctx %lld): %.4f   [%lld %s, %lld tokens scored, mean NLL %.5f, %.2f s, "
      "%.0f tok/s]\n",
      name, static_cast<long long>(ctx), r.perplexity, static_cast<long long>(r.windows), unit,
      static_cast<long long>(r.scored_tokens), r.mean_nll, r.seconds, r.tokens_per_second);
}

// llama2.c's safe_printf: skip single bytes that are neither printable nor whitespace.
void print_piece(const std::string& piece) {
  if (piece.size() == 1 && !std::isprint(static_cast<unsigned char>(piece[0])) &&
      !std::isspace(static_cast<unsigned char>(piece[0])))
    return;
  std::fwrite(piece.data(), 1, piece.size(), stdout);
}

template <class Model>
void run(Model& m, const Options& o, const std::string& text_path) {
  const cbq::Tokenizer* tok = m.tokenizer.get();
  const int32_t bos = tok ? tok->bos_id() : m.config.bos_id;
  const int32_t eos = tok ? tok->eos_id() : m.config.eos_id;

  const int64_t ctx = o.ctx.value_or(std::min<int64_t>(m.config.max_seq_len, 2048));
  if (ctx > m.config.max_seq_len)
    cbq::fail("--ctx {} exceeds the model's context length {}", ctx, m.config.max_seq_len);

  if (!text_path.empty()) {
    if (!tok) {
      std::printf("no tokenizer: perplexity skipped (pass --tokenizer)\n");
    } else {
      const std::string text = read_text(text_path);
      const auto t0 = std::chrono::steady_clock::now();
      const std::vector<int32_t> tokens = tok->encode(text);  // BOS as the tokenizer adds it
      const double tok_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("text: %s (%zu bytes, %zu tokens%s, tokenized in %.2f s)\n", text_path.c_str(),
                  text.size(), tokens.size(), tok->add_bos() ? " with BOS" : "", tok_s);
      if (static_cast<int64_t>(tokens.size()) < ctx) {
        std::printf("the text has fewer tokens than one window of %lld: perplexity skipped\n",
                    static_cast<long long>(ctx));
      } else {
        print_ppl("GPTQ protocol", "windows", ctx, cbq::eval::perplexity_gptq(m, tokens, ctx));
        print_ppl(
            "llama.cpp protocol", "chunks", ctx,
            cbq::eval::perplexity_llamacpp(m, tokens, ctx, cbq::eval::llamacpp_chunk_bos(*tok)));
      }
    }
  }

  if (o.generate > 0) {
    std::vector<int32_t> prompt{bos};
    if (o.prompt && !o.prompt->empty()) {
      if (!tok) cbq::fail("--prompt needs a tokenizer (pass --tokenizer)");
      prompt = tok->encode(*o.prompt, true, false);
    }
    // llama2.c stops only at BOS; Hugging Face models end a text with EOS.
    std::vector<int32_t> stop{bos};
    if (m.config.architecture != "llama2.c") stop.push_back(eos);
    const int64_t steps = static_cast<int64_t>(prompt.size()) - 1 + o.generate;
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = m.generate_greedy(prompt, steps, stop);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("greedy generation (%zu tokens, %.2f s, %.1f tok/s, no KV cache):\n", ids.size(),
                secs, static_cast<double>(ids.size()) / std::max(secs, 1e-9));
    if (!tok) {
      for (int32_t id : ids) std::printf("%d ", id);
    } else {
      int32_t prev = prompt.back();
      if (prompt.size() > 1)
        std::printf("%s", tok->decode(std::vector<int32_t>(prompt.begin(), prompt.end())).c_str());
      for (int32_t id : ids) {
        print_piece(tok->decode_piece(prev, id));
        prev = id;
      }
    }
    std::printf("\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  cbq::blas::use_best_blas_kernels(argc, argv);  // OpenBLAS on a generic fallback: restart
  Options o = parse_args(argc, argv);
  const fs::path data(CBQ_DATA_DIR);
  const fs::path default_text = data / "text" / "tinystories_valid_200k.txt";
  if (o.model.empty()) {
    const fs::path model = data / "models" / "stories260K.bin",
                   tok = data / "models" / "tok512.bin";
    if (!fs::exists(model) || !fs::exists(tok)) {
      std::fprintf(stderr,
                   "cbq-eval: no MODEL given and the default model %s (with %s) is not there\n\n",
                   model.string().c_str(), tok.string().c_str());
      print_usage(stderr);
      return kUsageError;
    }
    o.model = model.string();
    if (o.tokenizer.empty()) o.tokenizer = tok.string();
  }
  std::string text = o.text;
  if (text.empty()) {
    if (fs::exists(default_text))
      text = default_text.string();
    else
      std::printf("no --text given and %s not found: perplexity skipped\n",
                  default_text.string().c_str());
  }
  try {
    const auto t0 = std::chrono::steady_clock::now();
    cbq::AnyModel model = cbq::load_model(o.model, o.tokenizer);
    const double load_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s\n(loaded in %.2f s)\n", cbq::describe(model).c_str(), load_s);
    model.visit([&](auto& m) { run(m, o, text); });
  } catch (const cbq::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "cbq-eval: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
