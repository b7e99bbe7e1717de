// cbq-eval: load a model (llama2.c .bin, Hugging Face folder or GGUF), print its summary, its
// perplexity on a text in the GPTQ protocol and in the llama.cpp protocol, and optionally a
// greedy generation.
//
//   cbq-eval                                  # stories260K + tok512 on TinyStories (CBQ_DATA_DIR)
//   cbq-eval llama-7b/ --text wikitext2_test.txt --ctx 2048
//   cbq-eval stories15M.bin --tokenizer tokenizer32k.bin --generate 256
//
// Options, inputs (regular, non-empty files: a FIFO would block) and memory are checked before
// the model is loaded; a perplexity that is not a number is an error naming the parameter that
// holds a NaN, never a printed "-nan" with exit status 0.
#include <cbq/core/atomic_file.hpp>
#include <cbq/core/mmap.hpp>
#include <cbq/core/resources.hpp>
#include <cbq/eval/kl_divergence.hpp>
#include <cbq/eval/perplexity.hpp>
#include <cbq/model/load.hpp>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli.hpp"

#ifndef CBQ_DATA_DIR
#define CBQ_DATA_DIR "data"
#endif

namespace fs = std::filesystem;
using cbq::cli::usage_error;

namespace {

const char* kTool = "cbq-eval";

struct Options {
  std::string model, tokenizer, text;
  std::optional<int64_t> ctx;
  int64_t generate = 0, threads = 0;
  std::optional<std::string> prompt;
  bool text_given = false;
  std::string kl_base;  // --kl-base: the model the KL divergence is measured from
};

// Every option, once: the declaration parses, checks and documents it (cli.hpp).
Options parse_args(int argc, char** argv) {
  Options o;
  const std::string data = CBQ_DATA_DIR;
  cbq::cli::Options cli(
      kTool,
      "Print a model's summary, its perplexity on a text in the GPTQ protocol (whole text with "
      "BOS, non-overlapping windows of N tokens, every token but a window's first scored) and "
      "in the llama.cpp protocol (llama-perplexity -c N: chunks of N tokens, first set to BOS "
      "when the tokenizer adds one, second half scored), and optionally a greedy generation.");
  cli.positional("MODEL", o.model,
                 "a llama2.c checkpoint (.bin), a Hugging Face folder or a GGUF LLaMA; default: " +
                     data + "/models/stories260K.bin with tok512.bin");
  int64_t ctx = 0;
  std::string prompt;
  cli.text("--tokenizer", o.tokenizer,
           "tokenizer.bin (llama2.c) or tokenizer.json; default: the one beside the model");
  cli.text("--text", o.text,
           "text for perplexity; default: " + data + "/text/tinystories_valid_200k.txt");
  cli.integer<int64_t>("--ctx", ctx, "window length for both protocols", 2, 1 << 20,
                       "the model's context, at most 2048");
  cli.integer<int64_t>("--generate", o.generate, "greedy generation of up to N tokens (0 = none)",
                       0, 1 << 20);
  cli.text("--prompt", prompt, "prompt for the generation (default: BOS only)", "TEXT");
  cli.text("--kl-base", o.kl_base,
           "also the KL divergence of MODEL's next-token distribution from this base model's "
           "(llama-perplexity --kl-divergence: mean, median, percentiles, same top p, RMS dp; "
           "llama.cpp protocol)",
           "MODEL");
  cli.integer<int64_t>("--threads", o.threads, "CPU threads", 1,
                       4 * std::max<int64_t>(1, std::thread::hardware_concurrency()), "all cores");
  cli.parse(argc, argv);
  if (cli.given("--ctx")) o.ctx = ctx;
  if (cli.given("--prompt")) o.prompt = prompt;
  o.text_given = cli.given("--text");
  return o;
}

// A perplexity must be a number: a NaN or Inf names the parameter that holds one.
template <class Model>
void require_finite(const cbq::eval::PerplexityResult& r, const char* protocol, Model& m) {
  if (std::isfinite(r.perplexity) && std::isfinite(r.mean_nll)) return;
  const std::string p = cbq::find_non_finite_parameter(m);
  cbq::fail("the perplexity ({}) is {}: {}", protocol, r.perplexity,
            p.empty() ? std::string("every parameter is finite, so the forward pass overflowed")
                      : "the parameter " + p);
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

// llama-perplexity --kl-divergence's summary of the model against the base.
void print_kl(const cbq::eval::KlDivergenceResult& r, const std::string& base, int64_t ctx) {
  std::printf(
      "KL divergence from %s (llama.cpp protocol, ctx %lld, %lld positions, %.2f s):\n"
      "  PPL(Q) %.6f  PPL(base) %.6f\n"
      "  Mean KLD %.6f ± %.6f  Maximum %.6f  99.9%% %.6f  99.0%% %.6f  95.0%% %.6f  90.0%% "
      "%.6f  Median %.6f  Minimum %.6f\n"
      "  RMS dp %.3f %%  Mean dp %.3f %%  Same top p %.3f %%\n",
      base.c_str(), static_cast<long long>(ctx), static_cast<long long>(r.positions), r.seconds,
      r.ppl, r.ppl_base, r.mean, r.mean_error, r.max, r.p999, r.p99, r.p95, r.p90, r.median, r.min,
      100 * r.rms_dp, 100 * r.mean_dp, 100 * r.same_top);
}

// The text's tokens (BOS first when the tokenizer adds one), checked to fill one window.
std::vector<int32_t> tokenize(const cbq::Tokenizer& tok, const std::string& text_path,
                              int64_t ctx) {
  const std::string text = cbq::io::read_text_file(text_path);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> tokens = tok.encode(text);
  const double tok_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CBQ_CHECK(static_cast<int64_t>(tokens.size()) >= ctx,
            "--text {}: {} tokens, fewer than one window of {} (--ctx); pass a longer text or a "
            "smaller --ctx",
            text_path, tokens.size(), ctx);
  std::printf("text: %s (%zu bytes, %zu tokens%s, tokenized in %.2f s)\n", text_path.c_str(),
              text.size(), tokens.size(), tok.add_bos() ? " with BOS" : "", tok_s);
  return tokens;
}

template <class Model>
void run(Model& m, const Options& o, const std::string& text_path, int64_t ctx,
         std::vector<int32_t> tokens, cbq::AnyModel* kl_base) {
  const cbq::Tokenizer* tok = m.tokenizer.get();
  const int32_t bos = tok ? tok->bos_id() : m.config.bos_id;
  const int32_t eos = tok ? tok->eos_id() : m.config.eos_id;

  if (!text_path.empty()) {
    if (!tok) {
      CBQ_CHECK(!o.text_given, "--text {}: {} has no tokenizer; pass --tokenizer", text_path,
                o.model);
      std::printf("no tokenizer: perplexity skipped (pass --tokenizer)\n");
    } else {
      if (tokens.empty()) tokens = tokenize(*tok, text_path, ctx);
      const auto gptq = cbq::eval::perplexity_gptq(m, tokens, ctx);
      require_finite(gptq, "GPTQ protocol", m);
      print_ppl("GPTQ protocol", "windows", ctx, gptq);
      const auto lcpp =
          cbq::eval::perplexity_llamacpp(m, tokens, ctx, cbq::eval::llamacpp_chunk_bos(*tok));
      require_finite(lcpp, "llama.cpp protocol", m);
      print_ppl("llama.cpp protocol", "chunks", ctx, lcpp);
      if (kl_base) {
        cbq::eval::KlOptions kl;
        kl.ctx = ctx;
        kl.bos = bos;
        print_kl(
            kl_base->visit([&](auto& b) { return cbq::eval::kl_divergence(b, m, tokens, kl); }),
            o.kl_base, ctx);
      }
    }
  }

  if (o.generate > 0) {
    std::vector<int32_t> prompt{bos};
    if (o.prompt && !o.prompt->empty()) {
      if (!tok) cbq::fail("--prompt needs a tokenizer (pass --tokenizer)");
      prompt = tok->encode(*o.prompt);
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

int run_eval(int argc, char** argv, std::string& phase) {
  Options o = parse_args(argc, argv);
  if (o.threads > 0) cbq::set_num_threads(static_cast<int>(o.threads));
  const fs::path data(CBQ_DATA_DIR);
  const fs::path default_text = data / "text" / "tinystories_valid_200k.txt";
  if (o.model.empty()) {
    const fs::path model = data / "models" / "stories260K.bin",
                   tok = data / "models" / "tok512.bin";
    if (!fs::exists(model) || !fs::exists(tok))
      usage_error(fmt::format("no MODEL given and the default model {} (with {}) is not there",
                              model.string(), tok.string()));
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

  // Before loading: the inputs, the options against the model's header, memory.
  phase = "checking the inputs";
  cbq::io::check_input_path(o.model, "MODEL", /*folder_ok=*/true, /*empty_ok=*/false);
  if (!o.tokenizer.empty()) cbq::io::check_input_path(o.tokenizer, "--tokenizer", true, false);
  if (!text.empty()) cbq::io::check_input_path(text, "--text", false, false);
  if (!o.kl_base.empty()) cbq::io::check_input_path(o.kl_base, "--kl-base", true, false);
  const cbq::ModelProbe probe = cbq::probe_model(o.model);
  const int64_t context = probe.config.max_seq_len;
  const int64_t ctx = o.ctx.value_or(std::min<int64_t>(context, 2048));
  if (ctx > context)
    usage_error(
        fmt::format("--ctx {} exceeds the model's context length {} ({})", ctx, context, o.model));
  const uint64_t P4 = probe.parameter_bytes();
  const uint64_t logits = 3 * static_cast<uint64_t>(ctx) *
                          static_cast<uint64_t>(probe.config.vocab_size) * sizeof(float);
  // --kl-base: the base model and its window of logits are alive beside the model's.
  const uint64_t base_bytes =
      o.kl_base.empty() ? 0 : cbq::probe_model(o.kl_base).parameter_bytes() + logits;
  const uint64_t need = std::max(2 * P4, P4 + logits) + base_bytes;
  const cbq::MemoryLimits limits = cbq::memory_limits();
  CBQ_CHECK(need <= limits.usable(),
            "not enough memory for {}: it needs at least {} (the {} parameters as float32, {}, "
            "twice while the model is built, or beside the logits of a window, {}), but {} is "
            "usable ({})",
            o.model, cbq::format_size(need), probe.parameters, cbq::format_size(P4),
            cbq::format_size(logits), cbq::format_size(limits.usable()), limits.describe());
  const uint64_t blas = static_cast<uint64_t>(cbq::num_threads()) * cbq::kBlasBufferBytes;
  const uint64_t address_space = std::max(probe.file_bytes + P4, need) + blas;
  CBQ_CHECK(!limits.address_space_left || address_space <= *limits.address_space_left,
            "the address-space limit (ulimit -v) {} leaves {} beside the {} already mapped, but "
            "this run needs at least {} (data {}, the model file mapped while it loads {}, "
            "OpenBLAS's GEMM buffers {}); raise the limit or use fewer --threads",
            cbq::format_size(limits.address_space_limit),
            cbq::format_size(limits.address_space_left.value_or(0)),
            cbq::format_size(limits.vm_size), cbq::format_size(address_space),
            cbq::format_size(need), cbq::format_size(probe.file_bytes), cbq::format_size(blas));
  // The text, tokenized before the weights are read when the tokenizer is a file of its own.
  std::vector<int32_t> tokens;
  if (!text.empty()) {
    phase = "tokenizing the text";
    if (const auto tok = cbq::load_tokenizer_for(o.model, o.tokenizer, probe))
      tokens = tokenize(*tok, text, ctx);
  }
  phase = "reserving OpenBLAS's GEMM buffers";
  cbq::reserve_blas_buffers();

  phase = "loading the model";
  const auto t0 = std::chrono::steady_clock::now();
  cbq::AnyModel model = cbq::load_model(o.model, o.tokenizer);
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s\n(loaded in %.2f s)\n", cbq::describe(model).c_str(), load_s);
  std::optional<cbq::AnyModel> base;
  if (!o.kl_base.empty()) {
    phase = "loading the --kl-base model";
    base.emplace(cbq::load_model(o.kl_base, o.tokenizer));
  }
  phase = "evaluating the model";
  model.visit([&](auto& m) { run(m, o, text, ctx, std::move(tokens), base ? &*base : nullptr); });
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  cbq::cli::start_tool(argc, argv);
  std::string phase;
  return cbq::cli::run_tool(kTool, &phase, [&] { return run_eval(argc, argv, phase); });
}
