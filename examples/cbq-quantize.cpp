// cbq-quantize: load a model, calibrate, quantize with CBQ (and/or the RTN and GPTQ baselines),
// evaluate perplexity before and after, print a table and save the quantized model.
//
//   cbq-quantize                                   # stories260K from data/ (shipped), W4A16 g32
//   cbq-quantize MODEL --tokenizer TOK --calib TXT --eval TXT --wbits 3 --group 32 --method all
//   cbq-quantize --help
//   cbq-quantize MODEL ... --device cuda           # CBQ and the evaluations on the GPU
#include <sys/resource.h>

#ifdef __CUDACC__  // built as CUDA (CBQ_ENABLE_CUDA): the backend registers itself
#include <cbq/cuda.cuh>
#endif
#include <cbq/cbq.hpp>
#include <cbq/eval/perplexity.hpp>
#include <cbq/io/mmap.hpp>
#include <cbq/io/native.hpp>
#include <cbq/model/load.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/estimate.hpp>
#include <cbq/pass/pass.hpp>
#include <cstdio>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_variant.hpp"

namespace fs = std::filesystem;

namespace {

const char* kUsage = R"(usage: cbq-quantize [MODEL] [options]

MODEL is a llama2.c checkpoint (.bin) or a Hugging Face folder (config.json + safetensors).
Without arguments: stories260K + tok512 and the TinyStories texts shipped in data/.

model and data
  --tokenizer PATH      llama2.c tokenizer.bin (default: tokenizer.bin beside the model)
  --calib PATH          calibration text (default: tinystories_train_excerpt.txt)
  --eval PATH           evaluation text (default: tinystories_valid_200k.txt)
  --samples N           calibration segments (default 128)
  --seq-len L           tokens per segment (default: min(2048, the model's context))
  --ctx N               evaluation context (default: the model's context)
  --seed S              calibration and initialisation seed (default 0)
method
  --method LIST         comma list of cbq, rtn, gptq, or all (default cbq)
  --wbits B             weight bits 2, 3, 4, 8 (default 4)
  --group G             group size, 0 = per-channel (default 32)
  --sym                 symmetric weight grid
  --abits B             activation bits 4, 6, 8 or 16 = none (default 16)
  --act-per-tensor | --act-per-token   activation granularity (default: per-tensor at 8 bits)
  --act-layers LIST     quantize only these linear layers' inputs (e.g. q_proj,k_proj,v_proj;
                        default: all)
cbq
  --window B --overlap O          sliding window (default 2, 1)
  --rounding lora|nearest|full    rounding (default lora), --rank R (default 5)
  --epochs E                      (default 3)
  --lr-step X --lr-act X --lr-round X   learning rates (defaults 1e-2 relative, 1e-2, 1e-2)
  --gamma X                       rounding regulariser weight (default 0.01)
  --preset paper                  the paper's learning rates and V = 0 start
  --start half|adaround           LoRA-Rounding start (default adaround)
  --frozen-v0                     keep V0 at its initial value (default: tracks the step)
  --init rtn|gptq                 where steps and rounding start: round-to-nearest (default) or
                                  GPTQ's solution (--gptq-damp X, default 0.01)
  --output-kld X                  the last window also minimises X · KL of the model's output
                                  distribution (final norm + LM head; default 0 = off)
  --learn-norms                   also learn the window's norm weights (--lr-norm X, default 1e-3)
  --soft                          train on soft h(V) weights (default: hard, straight-through)
  --no-l2 --no-kld --no-hom --no-fp   switch loss terms off
  --cfp | --smoothquant           activation outlier scaling; --cfp-weights truncates weights
  --max-steps N                   cap the steps per window (smoke runs)
  --checkpoint DIR                write a checkpoint after every window (atomic)
  --resume DIR                    continue from DIR's checkpoint if there is one (same model,
                                  data and options; else refused), and keep checkpointing there
  --offload-dir DIR               keep the calibration activations in file mappings in DIR
                                  (paged to disk when they do not fit in memory)
device
  --device cpu|cuda     where CBQ and the perplexity evaluations run (default cpu); RTN and
                        GPTQ run on the CPU. cuda needs a build with CBQ_ENABLE_CUDA
  --tf32                cuda: float GEMMs on TF32 tensor cores (faster, ~1e-3 relative error)
  --activations auto|gpu|host   cuda: where the calibration activations live (default auto:
                        GPU memory when they fit)
output
  --out PATH            save the quantized model (native safetensors; with several methods the
                        method name is appended)
  --export gguf|gptq PATH   also write it for other tools: a llama.cpp GGUF file (Q4_0/Q4_1/Q8_0
                        blocks; W4 or W8 sym, groups of a multiple of 32) or a GPTQ-format
                        Hugging Face folder; scales are rounded to fp16 first and the perplexity
                        of exactly what is exported is printed
  --threads N           CPU threads (default: all)
  --quiet               no per-window progress
)";

struct Args {
  std::string model, tokenizer, calib, eval, out;
  std::vector<std::string> methods{"cbq"};
  int64_t samples = 128, seq_len = 0, ctx = 0, threads = 0;
  cbq::PassSpec spec;
  cbq::PassOptions options;
  bool act_granularity_set = false;
  std::string export_format, export_path;
  bool tf32 = false;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "cbq-quantize: %s\n\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

// The value of `option` among named choices; anything else is a usage error that lists them.
template <class E>
E choice(const std::string& option, const std::string& v,
         std::initializer_list<std::pair<const char*, E>> choices) {
  std::string names;
  for (const auto& [name, e] : choices) {
    if (v == name) return e;
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  usage_error(option + ": unknown value '" + v + "' (" + names + ")");
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

Args parse(int argc, char** argv) {
  Args a;
  a.spec.weight.bits = 4;
  a.spec.weight.group_size = 32;
  a.spec.weight.granularity = cbq::quant::Granularity::per_group;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(k + " needs a value");
      return argv[++i];
    };
    auto number = [&]() -> double {
      const std::string v = value();
      try {
        size_t used = 0;
        double d = std::stod(v, &used);
        if (used != v.size()) throw std::invalid_argument(v);
        return d;
      } catch (const std::exception&) {
        usage_error(k + " expects a number, got '" + v + "'");
      }
    };
    if (k == "--help" || k == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (k == "--tokenizer")
      a.tokenizer = value();
    else if (k == "--calib")
      a.calib = value();
    else if (k == "--eval")
      a.eval = value();
    else if (k == "--export") {
      a.export_format = value();
      a.export_path = value();
      if (a.export_format != "gguf" && a.export_format != "gptq")
        usage_error("--export takes gguf or gptq, got '" + a.export_format + "'");
    } else if (k == "--out")
      a.out = value();
    else if (k == "--samples")
      a.samples = static_cast<int64_t>(number());
    else if (k == "--seq-len")
      a.seq_len = static_cast<int64_t>(number());
    else if (k == "--ctx")
      a.ctx = static_cast<int64_t>(number());
    else if (k == "--seed")
      a.options.seed = static_cast<uint64_t>(number());
    else if (k == "--threads")
      a.threads = static_cast<int64_t>(number());
    else if (k == "--method") {
      a.methods = split(value(), ',');
      if (a.methods.size() == 1 && a.methods[0] == "all") a.methods = {"rtn", "gptq", "cbq"};
      for (const auto& m : a.methods)
        if (m != "cbq" && m != "rtn" && m != "gptq") usage_error("unknown method '" + m + "'");
    } else if (k == "--wbits")
      a.spec.weight.bits = static_cast<int>(number());
    else if (k == "--group") {
      const int64_t g = static_cast<int64_t>(number());
      a.spec.weight.granularity =
          g == 0 ? cbq::quant::Granularity::per_channel : cbq::quant::Granularity::per_group;
      a.spec.weight.group_size = g == 0 ? 128 : g;
    } else if (k == "--sym")
      a.spec.weight.symmetric = true;
    else if (k == "--abits")
      a.spec.act_bits = static_cast<int>(number());
    else if (k == "--act-per-token") {
      a.spec.act_per_token = true;
      a.act_granularity_set = true;
    } else if (k == "--act-per-tensor") {
      a.spec.act_per_token = false;
      a.act_granularity_set = true;
    } else if (k == "--window")
      a.spec.window_blocks = static_cast<int64_t>(number());
    else if (k == "--overlap")
      a.spec.window_overlap = static_cast<int64_t>(number());
    else if (k == "--rounding")
      a.spec.rounding = choice<cbq::RoundingKind>(k, value(),
                                                  {{"lora", cbq::RoundingKind::lora},
                                                   {"nearest", cbq::RoundingKind::nearest},
                                                   {"full", cbq::RoundingKind::full}});
    else if (k == "--rank")
      a.spec.rank = static_cast<int64_t>(number());
    else if (k == "--epochs")
      a.options.epochs = static_cast<int64_t>(number());
    else if (k == "--lr-step")
      a.options.lr_weight_step = number();
    else if (k == "--lr-act")
      a.options.lr_act_step = number();
    else if (k == "--lr-round")
      a.options.lr_rounding = number();
    else if (k == "--gamma")
      a.options.gamma_round = number();
    else if (k == "--preset") {
      const std::string p = value();
      if (p != "paper") usage_error("unknown preset '" + p + "'");
      const auto keep = a.options;
      a.options = cbq::PassOptions::paper();
      a.options.epochs = keep.epochs;
      a.options.seed = keep.seed;
    } else if (k == "--start")
      a.options.lora_start = choice<cbq::quant::LoraStart>(
          k, value(),
          {{"half", cbq::quant::LoraStart::half}, {"adaround", cbq::quant::LoraStart::adaround}});
    else if (k == "--init")
      a.options.weight_init = choice<cbq::WeightInit>(
          k, value(), {{"rtn", cbq::WeightInit::rtn}, {"gptq", cbq::WeightInit::gptq}});
    else if (k == "--output-kld")
      a.options.output_kld = number();
    else if (k == "--output-kld-all")
      a.options.output_kld_all = true;
    else if (k == "--learn-norms")
      a.options.learn_norms = true;
    else if (k == "--lr-norm")
      a.options.lr_norm = number();
    else if (k == "--gptq-damp")
      a.options.gptq_percdamp = number();
    else if (k == "--frozen-v0")
      a.options.v0_tracks_step = false;
    else if (k == "--hard")
      a.options.rounding_mode = cbq::quant::RoundingMode::hard_ste;
    else if (k == "--soft")
      a.options.rounding_mode = cbq::quant::RoundingMode::soft;
    else if (k == "--no-l2")
      a.options.loss_l2 = false;
    else if (k == "--no-kld")
      a.options.loss_kld = false;
    else if (k == "--no-hom")
      a.options.loss_homologous = false;
    else if (k == "--no-fp")
      a.options.loss_full_precision = false;
    else if (k == "--cfp")
      a.options.activation_scaling = cbq::ActivationScaling::cfp;
    else if (k == "--smoothquant")
      a.options.activation_scaling = cbq::ActivationScaling::smoothquant;
    else if (k == "--cfp-weights")
      a.options.cfp_weights = true;
    else if (k == "--max-steps")
      a.options.max_steps = static_cast<int64_t>(number());
    else if (k == "--quiet")
      a.options.verbose = false;
    else if (k == "--act-layers")
      a.spec.act_layers = split(value(), ',');
    else if (k == "--offload-dir")
      a.options.activation_dir = value();
    else if (k == "--checkpoint")
      a.options.checkpoint_dir = value();
    else if (k == "--resume") {
      a.options.checkpoint_dir = value();
      a.options.resume = true;
    } else if (k == "--device")
      a.options.device =
          choice<cbq::Device>(k, value(), {{"cpu", cbq::Device::cpu}, {"cuda", cbq::Device::cuda}});
    else if (k == "--tf32")
      a.tf32 = true;
    else if (k == "--activations")
      a.options.activation_placement =
          choice<cbq::ActivationPlacement>(k, value(),
                                           {{"auto", cbq::ActivationPlacement::automatic},
                                            {"gpu", cbq::ActivationPlacement::device},
                                            {"host", cbq::ActivationPlacement::host}});
    else if (!k.empty() && k[0] == '-')
      usage_error("unknown option " + k);
    else
      positional.push_back(k);
  }
  if (positional.size() > 1) usage_error("more than one model path");
  if (!a.act_granularity_set) a.spec.act_per_token = a.spec.act_bits < 8;
#if defined(CBQ_CUDA_VARIANT) && !defined(__CUDACC__)
  if (a.options.device == cbq::Device::cuda)  // the GPU backend lives in cbq-quantize-cuda
    cbq_tools::exec_cuda_variant(CBQ_CUDA_VARIANT, argv);
#endif
  if (a.options.device == cbq::Device::cuda && !cbq::cuda_available()) {
    std::fprintf(stderr,
                 "cbq-quantize: --device cuda: this build has no CUDA backend (configure with "
                 "-DCBQ_ENABLE_CUDA=ON on a machine with the CUDA toolkit)\n");
    std::exit(2);
  }
  if (a.tf32 && a.options.device != cbq::Device::cuda) usage_error("--tf32 needs --device cuda");
  const fs::path data = CBQ_DATA_DIR;
  if (positional.empty()) {
    const fs::path m = data / "models" / "stories260K.bin";
    if (!fs::exists(m)) {
      std::fprintf(stderr,
                   "cbq-quantize: no model given and the default %s does not exist.\n"
                   "Pass a llama2.c checkpoint or a Hugging Face folder, e.g.\n"
                   "  cbq-quantize stories15M.bin --tokenizer tokenizer.bin --calib train.txt "
                   "--eval valid.txt\n\n%s",
                   m.string().c_str(), kUsage);
      std::exit(2);
    }
    a.model = m.string();
    if (a.tokenizer.empty()) a.tokenizer = (data / "models" / "tok512.bin").string();
  } else {
    a.model = positional[0];
  }
  if (a.calib.empty()) a.calib = (data / "text" / "tinystories_train_excerpt.txt").string();
  if (a.eval.empty()) a.eval = (data / "text" / "tinystories_valid_200k.txt").string();
  return a;
}

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

// Writes `result` for other tools (--export) and prints the perplexity of exactly what was
// written: both formats store fp16 scales, so the result's scales are rounded first (GPTQ: the
// nearest fp16; GGUF: the nearest fp16 that keeps Q4_1's minimum exact, docs/GGUF.md).
template <class Model>
void export_model(const Args& args, Model& model, cbq::QuantizationResult& result,
                  const std::string& path, const std::vector<int32_t>& eval_tokens, int64_t ctx) {
  if (args.export_format == "gptq") {
    const auto snap = cbq::io::snap_scales_to_f16(model, result);
    cbq::io::GptqExportOptions o;
    if (fs::is_directory(args.model)) o.source_dir = args.model;
    o.tokenizer_file = args.tokenizer;
    const auto s = cbq::io::save_gptq(path, model, result, o);
    std::printf("export: wrote GPTQ folder %s (checkpoint_format %s)\n", path.c_str(),
                s.checkpoint_format.c_str());
    for (const auto& note : s.notes) std::printf("export: %s\n", note.c_str());
    const double ppl = cbq::eval::perplexity_gptq(model, eval_tokens, ctx).perplexity;
    std::printf(
        "export: perplexity with the exported fp16 scales %.4f (largest scale change %.2e)\n", ppl,
        snap.max_relative_change);
    return;
  }
  if constexpr (std::is_same_v<Model, cbq::Transformer<cbq::LlamaBlock<float>>>) {
    const auto report = cbq::io::export_gguf(path, model, model.tokenizer.get(), &result);
    std::printf("export: %s\n", report.summary().c_str());
    auto back = cbq::io::load_gguf_llama(path);
    const double ppl = cbq::eval::perplexity_gptq(back, eval_tokens, ctx).perplexity;
    std::printf("export: perplexity of %s read back %.4f\n", path.c_str(), ppl);
  } else {
    cbq::fail(
        "--export gguf: llama.cpp's GGUF export is for LLaMA-family models; use --export "
        "gptq for {}",
        model.config.architecture);
  }
}

struct Row {
  std::string method, config;
  double ppl = 0, seconds = 0, rss = 0;
};

}  // namespace

int main(int argc, char** argv) {
  cbq::blas::use_best_blas_kernels(argc, argv);  // OpenBLAS on a generic fallback: restart
  Args args = parse(argc, argv);
  try {
    if (args.threads > 0) cbq::set_num_threads(static_cast<int>(args.threads));
    const cbq::Device device = args.options.device;
#ifdef __CUDACC__
    if (device == cbq::Device::cuda) {
      int gpu = 0;
      cudaDeviceProp prop{};
      CBQ_CUDA_CHECK(cudaGetDevice(&gpu));
      CBQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, gpu));
      if (args.tf32) cbq::cuda::default_context().set_math_mode(cbq::cuda::MathMode::tf32);
      std::printf("device: %s (%.1f GiB), %s GEMMs\n", prop.name,
                  static_cast<double>(prop.totalGlobalMem) / (1 << 30),
                  args.tf32 ? "TF32" : "fp32");
    }
#endif
    cbq::AnyModel any = cbq::load_model(args.model, args.tokenizer);
    std::printf("%s\n", cbq::describe(any).c_str());
    CBQ_CHECK(any.tokenizer(), "cbq-quantize: {} has no tokenizer; pass --tokenizer", args.model);
    const cbq::Tokenizer& tok = *any.tokenizer();
    const cbq::ModelConfig cfg = any.config();
    if (args.export_format == "gguf") {  // refuse before hours of work, not after
      cbq::io::gguf_weight_type(args.spec.weight, "(all layers, --export gguf)");
      CBQ_CHECK(cfg.family == cbq::Family::llama,
                "--export gguf: llama.cpp's GGUF export is for LLaMA-family models; use --export "
                "gptq for {}",
                cfg.architecture);
    }
    const int64_t ctx = args.ctx > 0 ? args.ctx : cfg.max_seq_len;
    const int64_t seq_len =
        args.seq_len > 0 ? args.seq_len : std::min<int64_t>(2048, cfg.max_seq_len);
    CBQ_CHECK(ctx <= cfg.max_seq_len && seq_len <= cfg.max_seq_len,
              "cbq-quantize: context {} / segment length {} exceed the model's context {}", ctx,
              seq_len, cfg.max_seq_len);

    const std::string calib_text = cbq::io::read_text_file(args.calib);
    const std::string eval_text = cbq::io::read_text_file(args.eval);
    const auto calib_tokens = tok.encode(calib_text, true, false);
    const auto eval_tokens = tok.encode(eval_text, true, false);
    const cbq::Calibration calib =
        cbq::sample_calibration(calib_tokens, args.samples, seq_len, args.options.seed);
    std::printf(
        "calibration: %lld × %lld tokens from %s (%zu tokens); evaluation: %s (%zu tokens, "
        "ctx %lld)\n",
        static_cast<long long>(args.samples), static_cast<long long>(seq_len), args.calib.c_str(),
        calib_tokens.size(), args.eval.c_str(), eval_tokens.size(), static_cast<long long>(ctx));
    const int act_sets = cbq::pass_activation_sets(args.options);
    const double act_mib = static_cast<double>(cbq::pass_activation_bytes(
                               args.samples, seq_len, cfg.dim, sizeof(float), act_sets)) /
                           (1 << 20);
    std::printf(
        "memory: the CBQ pass holds %d activation sets of %lld × %lld × %lld floats "
        "(%.1f MiB) beside the model\n",
        act_sets, static_cast<long long>(args.samples), static_cast<long long>(seq_len),
        static_cast<long long>(cfg.dim), act_mib);
    if (std::find(args.methods.begin(), args.methods.end(), "cbq") != args.methods.end()) {
      try {  // a few measured window steps at this run's shapes (pass/estimate.hpp)
        any.visit([&](auto& m) {
          const auto e = cbq::estimate_pass(m, args.spec, args.options, args.samples, seq_len);
          std::printf("estimate: CBQ pass %s\n", e.summary().c_str());
        });
      } catch (const std::exception& e) {
        std::printf("estimate: unavailable (%s)\n", e.what());
      }
    }

    std::vector<Row> rows;
    if (device != cbq::Device::cpu) any.visit([&](auto& m) { m.to(device); });
    const auto fp =
        any.visit([&](auto& m) { return cbq::eval::perplexity_gptq(m, eval_tokens, ctx); });
    rows.push_back({"fp32", "full precision", fp.perplexity, fp.seconds, peak_rss_mib()});
    std::printf("FP perplexity %.4f (%lld windows × %lld, %.0f tokens/s)\n", fp.perplexity,
                static_cast<long long>(fp.windows), static_cast<long long>(ctx),
                fp.tokens_per_second);

    for (const std::string& method : args.methods) {
      cbq::AnyModel m = method == args.methods.front()
                            ? std::move(any)
                            : cbq::load_model(args.model, args.tokenizer);
      Row row;
      row.method = method;
      // CBQ moves the model to args.options.device itself; the baselines run on the CPU.
      if (method != "cbq") m.visit([](auto& model) { model.to(cbq::Device::cpu); });
      cbq::QuantizationResult result = m.visit([&](auto& model) {
        if (method == "cbq") {
          cbq::CbqPass pass(args.spec, args.options);
          return pass.run(model, calib);
        }
        std::vector<cbq::Tensor<float>> x;
        for (const auto& s : calib.samples) x.push_back(model.embed_tensor(s));
        return cbq::quantize_baseline(model,
                                      method == "rtn" ? cbq::Baseline::rtn : cbq::Baseline::gptq,
                                      args.spec, std::move(x), {}, args.options.verbose);
      });
      row.config = result.config;
      row.seconds = result.seconds;
      row.ppl = m.visit([&](auto& model) {
        return cbq::eval::perplexity_gptq(model, eval_tokens, ctx).perplexity;
      });
      row.rss = peak_rss_mib();
      std::printf("%s: perplexity %.4f (%.1fs)\n", method.c_str(), row.ppl, row.seconds);
      if (method == "cbq") {
        const auto [change, flips] = result.learning_summary();
        std::printf(
            "cbq: weight steps moved %.3f%% from RTN on average; %.3f%% of the codes differ "
            "from round-to-nearest\n",
            100 * change, 100 * flips);
      }
      rows.push_back(row);
      if (!args.out.empty()) {
        std::string out = args.out;
        if (args.methods.size() > 1) {
          const fs::path p(args.out);
          out = (p.parent_path() / (p.stem().string() + "-" + method + p.extension().string()))
                    .string();
        }
        m.visit([&](auto& model) { cbq::io::save_native(out, model, result); });
        std::printf("saved %s\n", out.c_str());
      }
      if (!args.export_format.empty()) {
        std::string path = args.export_path;
        if (args.methods.size() > 1) {
          const fs::path p(args.export_path);
          path = (p.parent_path() / (p.stem().string() + "-" + method + p.extension().string()))
                     .string();
        }
        m.visit([&](auto& model) { export_model(args, model, result, path, eval_tokens, ctx); });
      }
    }

    std::printf("\n| method | configuration | perplexity | vs FP | time | peak RSS |\n");
    std::printf("|---|---|---|---|---|---|\n");
    for (const Row& r : rows)
      std::printf("| %s | %s | %.4f | %+.2f%% | %.1fs | %.0f MiB |\n", r.method.c_str(),
                  r.config.c_str(), r.ppl, 100.0 * (r.ppl / fp.perplexity - 1.0), r.seconds, r.rss);
#ifdef __CUDACC__
    if (device == cbq::Device::cuda)
      std::printf(
          "peak GPU memory: %.0f MiB (cbq's allocator)\n",
          static_cast<double>(cbq::cuda::allocator().stats().peak_bytes_in_use) / (1 << 20));
#endif
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbq-quantize: %s\n", e.what());
    return 1;
  }
}
