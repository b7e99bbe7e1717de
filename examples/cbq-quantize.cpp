// cbq-quantize: load a model, calibrate, quantize with CBQ (and/or the RTN and GPTQ baselines),
// evaluate perplexity before and after, print a table and save the quantized model.
//
//   cbq-quantize                                   # stories260K from data/ (shipped), W4A16 g32
//   cbq-quantize MODEL --tokenizer TOK --calib TXT --eval TXT --wbits 3 --group 32 --method all
//   cbq-quantize --help
//   cbq-quantize MODEL ... --device cuda           # CBQ and the evaluations on the GPU
//   cbq-quantize MODEL ... --dry-run               # every check, then stop before loading
//
// Before any work (docs/RELIABILITY.md, "Hostile and careless input"): every option is parsed
// with its type and range; the inputs must be readable regular files; the model's config is read
// from its header to check the options against it; the outputs may not be inputs, devices or
// someone's folder; memory, address space and disk must hold what the run needs. Results are
// checked for NaN before they are printed or saved.
#include <signal.h>
#include <sys/resource.h>

#ifdef __CUDACC__  // built as CUDA (CBQ_ENABLE_CUDA): the backend registers itself
#include <cbq/cuda.cuh>
#endif
#include <algorithm>
#include <cbq/cbq.hpp>
#include <cbq/core/atomic_file.hpp>
#include <cbq/core/mmap.hpp>
#include <cbq/core/resources.hpp>
#include <cbq/eval/kl_divergence.hpp>
#include <cbq/eval/perplexity.hpp>
#include <cbq/export/export.hpp>
#include <cbq/model/load.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/estimate.hpp>
#include <cbq/pass/pass.hpp>
#include <cbq/quantize.hpp>
#include <cbq/report/report.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "cli.hpp"
#include "cuda_variant.hpp"

namespace fs = std::filesystem;
using cbq::cli::usage_error;

namespace {

const char* kTool = "cbq-quantize";

struct Args {
  std::string model, tokenizer, calib, eval, out;
  std::vector<std::string> methods{"cbq"};
  int64_t samples = 128, seq_len = 0, ctx = 0, threads = 0;
  cbq::PassSpec spec;
  cbq::PassOptions options;
  int64_t group = 32;
  bool act_per_token = false, act_per_tensor = false;
  std::string checkpoint, resume;
  std::string export_format, export_path;
  bool tf32 = false, force = false, dry_run = false;
  std::string report_dir;
  bool gptq_sampler = false, kl = true;
  cbq::quant::GptqOptions gptq;  // --method gptq: act-order, static groups, dampening
  // Raw values turned into the fields above after parsing.
  std::string method_list = "cbq", act_layer_list, preset, rotate_list, fit_list;
  bool soft = false, hard = false, cfp = false, smoothquant = false;
  cbq::FitOptions fit{.down = false, .mlp_in = false};         // --fit-online: nothing unless asked
  cbq::RotationOptions rotation = cbq::Rotation<>::options();  // --rotate: none unless asked
  // ACBQ and its ablations (docs/ACBQ.md): --max-group, --attention-kl (< 0: the method's
  // default, 0 for cbq and PassOptions::acbq()'s for acbq).
  int64_t max_group = 2, group_overlap = 1;
  double attention_kl = -1;
  double boundary_loss = -1;  // --boundary-loss (< 0: the method's default, as attention_kl)
  // --min-window, --half-block-steps (< 0: the method's default, PassOptions::acbq()'s for acbq)
  int64_t min_window = -1;
  double half_block_steps = -1;
};

bool is_pass_method(const std::string& m) { return m == "cbq" || m == "acbq"; }

// The pass configuration of `method` (cbq or acbq): acbq is the CBQ pass over sub-block units in
// adaptive groups of up to --max-group units, with the attention-map term.
std::pair<cbq::PassSpec, cbq::PassOptions> pass_config(const Args& a, const std::string& method) {
  cbq::PassSpec spec = a.spec;
  cbq::PassOptions options = a.options;
  if (method == "acbq") {
    spec = cbq::acbq_spec(spec, a.max_group, a.group_overlap);
    options.attention_kl =
        a.attention_kl >= 0 ? a.attention_kl : cbq::PassOptions::acbq().attention_kl;
    options.boundary_loss =
        a.boundary_loss >= 0 ? a.boundary_loss : cbq::PassOptions::acbq().boundary_loss;
    options.min_window_units =
        a.min_window >= 0 ? a.min_window : cbq::PassOptions::acbq().min_window_units;
    options.half_block_steps =
        a.half_block_steps > 0 ? a.half_block_steps : cbq::PassOptions::acbq().half_block_steps;
  } else {
    options.attention_kl = std::max(0.0, a.attention_kl);
    options.boundary_loss = std::max(0.0, a.boundary_loss);
    options.min_window_units = std::max<int64_t>(0, a.min_window);
    if (a.half_block_steps > 0) options.half_block_steps = a.half_block_steps;
    if (spec.schedule == cbq::WindowKind::adaptive) {
      spec.window_blocks = a.max_group;
      spec.window_overlap = a.group_overlap;
    }
  }
  return {spec, options};
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

// --method: a comma list of cbq, acbq, rtn, gptq (or all: rtn, gptq, cbq), each at most once.
std::vector<std::string> parse_methods(const std::string& v) {
  if (v == "all") return {"rtn", "gptq", "cbq"};
  std::vector<std::string> out;
  for (const std::string& m : split(v, ',')) {
    if (m != "cbq" && m != "acbq" && m != "rtn" && m != "gptq")
      usage_error(
          fmt::format("--method: unknown method '{}' in '{}' (cbq, acbq, rtn, gptq or all)", m, v));
    for (const std::string& seen : out)
      if (seen == m)
        usage_error(fmt::format(
            "--method: '{}' is listed twice in '{}' (a method gives the same result every time; "
            "list each once)",
            m, v));
    out.push_back(m);
  }
  if (out.empty()) usage_error("--method: no method given");
  return out;
}

// --rotate: a comma list of r1, r2, r4 (each once), or none.
void parse_rotations(const std::string& v, cbq::RotationOptions& r) {
  r.r1 = r.r2 = r.r4 = false;
  if (v == "none") return;
  for (const std::string& name : split(v, ',')) {
    bool* flag = name == "r1" ? &r.r1 : name == "r2" ? &r.r2 : name == "r4" ? &r.r4 : nullptr;
    if (name == "r3")
      usage_error(fmt::format(
          "--rotate: '{}' asks for r3 (q/k after RoPE), which only changes a quantized KV cache; "
          "cbq has none (use r1, r2, r4)",
          v));
    if (!flag)
      usage_error(
          fmt::format("--rotate: unknown rotation '{}' in '{}' (r1, r2, r4 or none)", name, v));
    if (*flag) usage_error(fmt::format("--rotate: '{}' is listed twice in '{}'", name, v));
    *flag = true;
  }
  if (!r.any()) usage_error("--rotate: no rotation given");
}

// --fit-online: a comma list of down and mlp (each once).
void parse_fit(const std::string& v, cbq::FitOptions& f) {
  f.down = f.mlp_in = false;
  for (const std::string& name : split(v, ',')) {
    bool* flag = name == "down" ? &f.down : name == "mlp" ? &f.mlp_in : nullptr;
    if (!flag)
      usage_error(fmt::format("--fit-online: unknown site '{}' in '{}' (down, mlp)", name, v));
    if (*flag) usage_error(fmt::format("--fit-online: '{}' is listed twice in '{}'", name, v));
    *flag = true;
  }
  if (!f.any()) usage_error("--fit-online: no site given");
}

// Every option, once: the declaration parses, checks and documents it (cli.hpp).
void declare(cbq::cli::Options& o, Args& a) {
  const int64_t max_threads = 4 * std::max<int64_t>(1, std::thread::hardware_concurrency());
  o.positional("MODEL", a.model,
               "a llama2.c checkpoint (.bin), a Hugging Face folder (config.json + safetensors) "
               "or a GGUF LLaMA; default: stories260K + tok512 and the TinyStories texts "
               "shipped in data/");
  o.group("model and data");
  o.text("--tokenizer", a.tokenizer,
         "llama2.c tokenizer.bin or tokenizer.json (default: the one beside the model)");
  o.text("--calib", a.calib, "calibration text (default: tinystories_train_excerpt.txt)");
  o.text("--eval", a.eval, "evaluation text (default: tinystories_valid_200k.txt)");
  o.integer<int64_t>("--samples", a.samples, "calibration segments", 1, 10'000'000);
  o.integer<int64_t>("--seq-len", a.seq_len, "tokens per calibration segment", 2, 1 << 20,
                     "min(2048, the model's context)");
  o.integer<int64_t>("--ctx", a.ctx, "evaluation context", 2, 1 << 20, "the model's context");
  o.integer<uint64_t>("--seed", a.options.seed, "calibration and initialisation seed", 0,
                      UINT64_MAX);
  o.choice<bool>("--calib-sampler", a.gptq_sampler,
                 "segment start offsets: cbq's (mt19937_64) or the reference GPTQ's (Python "
                 "random.seed(S), randint: the reference's segments)",
                 {{"cbq", false}, {"gptq", true}});

  o.group("method");
  o.text("--method", a.method_list,
         "comma list of cbq, acbq (sub-block units in adaptive groups, docs/ACBQ.md), rtn, gptq "
         "(each once), or all (rtn, gptq, cbq)",
         "LIST", [](const std::string& v) { parse_methods(v); })
      ->default_str("cbq");
  o.integer<int>("--wbits", a.spec.weight.bits, "weight bits (GPTQ export: 2, 3, 4, 8; GGUF: 4, 8)",
                 2, 8);
  o.integer<int64_t>("--group", a.group, "group size, 0 = one step per output channel", 0, 1 << 20);
  o.flag("--sym", a.spec.weight.symmetric, "symmetric weight grid");
  o.integer<int>("--abits", a.spec.act_bits, "activation bits: 2 to 8, or 16 = none", 2, 16);
  auto* per_token = o.flag("--act-per-token", a.act_per_token,
                           "dynamic per-token activation steps (default below 8 bits)");
  auto* per_tensor = o.flag("--act-per-tensor", a.act_per_tensor,
                            "static per-tensor activation steps (default at 8 bits)");
  per_token->excludes(per_tensor);
  o.text("--act-layers", a.act_layer_list,
         "quantize only these linear layers' inputs (e.g. q_proj,k_proj,v_proj; default: all)",
         "LIST");

  o.group("cbq");
  // Declared before the options it sets: CLI11 runs the callbacks in declaration order, so
  // those given explicitly override the preset wherever they stand on the command line.
  o.text("--preset", a.preset,
         "paper: the paper's learning rates, V = 0 start and LoRA-Rounding r5; classic: cbq's "
         "defaults before the loss balance (unscaled terms, no held-out check, RTN start, "
         "LoRA-Rounding r5); a4: full-matrix rounding "
         "and the output KL, the better CBQ at 4-bit activations (docs/ROTATION.md)",
         "paper|classic|a4", [&a](const std::string& v) {
           if (v != "paper" && v != "classic" && v != "a4")
             usage_error(fmt::format("--preset: unknown preset '{}' (paper, classic or a4)", v));
           const auto keep = a.options;
           a.options = v == "paper"     ? cbq::PassOptions::paper()
                       : v == "classic" ? cbq::PassOptions::classic()
                                        : cbq::PassOptions::low_bit_activations();
           // The paper's and the former defaults use LoRA-Rounding r5 (the default is full).
           a.spec.rounding = v == "a4" ? cbq::RoundingKind::full : cbq::RoundingKind::lora;
           a.options.epochs = keep.epochs;
           a.options.seed = keep.seed;
         });
  o.integer<int64_t>("--window", a.spec.window_blocks, "blocks per sliding window", 1, 1 << 20);
  o.integer<int64_t>("--overlap", a.spec.window_overlap, "blocks shared by adjacent windows", 0,
                     1 << 20);
  o.choice<cbq::RoundingKind>("--rounding", a.spec.rounding, "rounding",
                              {{"lora", cbq::RoundingKind::lora},
                               {"nearest", cbq::RoundingKind::nearest},
                               {"full", cbq::RoundingKind::full}});
  o.integer<int64_t>("--rank", a.spec.rank, "LoRA-Rounding rank (with --rounding lora)", 1,
                     1 << 20);
  o.integer<int64_t>("--epochs", a.options.epochs, "epochs per window", 1, 1'000'000);
  o.real("--lr-step", a.options.lr_weight_step, "weight-step learning rate (relative)", 0, 10);
  o.real("--lr-act", a.options.lr_act_step, "activation-step learning rate", 0, 10);
  o.real("--lr-round", a.options.lr_rounding, "rounding learning rate", 0, 10);
  o.real("--gamma", a.options.gamma_round, "rounding regulariser weight", 0, 1e6);
  o.choice<cbq::quant::LoraStart>(
      "--start", a.options.lora_start, "LoRA-Rounding start",
      {{"adaround", cbq::quant::LoraStart::adaround}, {"half", cbq::quant::LoraStart::half}});
  o.flag("--frozen-v0", a.options.v0_tracks_step, "keep V0 at its initial value", false);
  o.choice<cbq::WeightInit>("--init", a.options.weight_init,
                            "where steps and rounding start: GPTQ's solution (the default) or "
                            "round-to-nearest (the presets' start)",
                            {{"gptq", cbq::WeightInit::gptq}, {"rtn", cbq::WeightInit::rtn}});
  o.choice<cbq::LossScale>("--loss-scale", a.options.loss_scale,
                           "reconstruction terms relative to each token's target energy, to the "
                           "window's, or unscaled (the paper)",
                           {{"token", cbq::LossScale::token},
                            {"window", cbq::LossScale::window},
                            {"absolute", cbq::LossScale::absolute}});
  o.flag("--no-keep-better", a.options.keep_better,
         "keep every window's trained state (default: the better of start and trained on "
         "held-out samples)",
         false);
  o.flag("--balance-all-samples", a.options.balance_all_samples,
         "measure each window's loss balance (report, progress line) on every calibration sample "
         "(default: on the held-out ones; slower)",
         true);
  o.flag("--keep-denormals", a.options.flush_denormals,
         "compute with subnormal floats on the CPU (default: flushed to zero while the pass runs, "
         "about 1.5x faster steps; docs/PASS.md)",
         false);
  o.integer<int64_t>("--holdout", a.options.holdout_min,
                     "calibration samples held out to judge start vs trained (at least; 10 % of "
                     "the samples when more)",
                     0, 1 << 20);
  o.choice<cbq::GridMode>("--grid", a.options.grid,
                          "whether learned steps re-round the weights (auto: fixed for the GPTQ "
                          "start)",
                          {{"auto", cbq::GridMode::automatic},
                           {"fixed", cbq::GridMode::fixed},
                           {"learned", cbq::GridMode::learned}});
  o.real("--gptq-damp", a.options.gptq_percdamp,
         "GPTQ dampening, λ = X · mean(diag H) (--method gptq and --init gptq)", 0, 1, true);
  o.real("--output-kld", a.options.output_kld,
         "the last window also minimises X · KL of the model's output distribution (0 = off)", 0,
         1e6);
  o.flag("--output-kld-all", a.options.output_kld_all, "the output KL in every window");
  o.flag("--learn-norms", a.options.learn_norms, "also learn the window's norm weights");
  o.real("--lr-norm", a.options.lr_norm, "learning rate of the norm weights", 0, 10);
  auto* soft =
      o.flag("--soft", a.soft, "train on soft h(V) weights (default: hard, straight-through)");
  auto* hard = o.flag("--hard", a.hard, "train on the integer weights (straight-through)");
  soft->excludes(hard);
  o.choice<cbq::UnitKind>(
      "--units", a.spec.units,
      "cbq's window units: whole blocks, or each block's attention and FFN "
      "halves (acbq always uses halves)",
      {{"block", cbq::UnitKind::blocks}, {"sub-block", cbq::UnitKind::sub_blocks}});
  o.choice<cbq::WindowKind>(
      "--schedule", a.spec.schedule,
      "cbq's windows: sliding (--window/--overlap) or adaptive groups of "
      "up to --max-group units (acbq always adaptive)",
      {{"sliding", cbq::WindowKind::sliding}, {"adaptive", cbq::WindowKind::adaptive}});
  o.integer<int64_t>("--max-group", a.max_group, "units per adaptive group, at most", 1, 1 << 20);
  o.integer<int64_t>("--group-overlap", a.group_overlap,
                     "adaptive groups: each window holds a group and the N groups after it", 0,
                     1 << 20);
  o.real("--attention-kl", a.attention_kl,
         "weight λ of the KL between the FP and quantized attention maps (default 0; "
         "docs/ACBQ.md)",
         0, 1e6)
      ->default_str("0");
  o.integer<int64_t>("--min-window", a.min_window,
                     "adaptive groups: extend each window to at least N units (0: its groups only)",
                     0, 1 << 20,
                     fmt::format("cbq 0, acbq {}", cbq::PassOptions::acbq().min_window_units));
  o.real("--half-block-steps", a.half_block_steps,
         "sub-block units: a window that freezes half a block trains this fraction of the steps", 0,
         1, true)
      ->default_str(fmt::format("cbq 1, acbq {:g}", cbq::PassOptions::acbq().half_block_steps));
  o.real("--boundary-loss", a.boundary_loss,
         "weight of the L2 + KL of the units a window freezes, at their output (measured: no "
         "gain; docs/ACBQ.md)",
         0, 1e6)
      ->default_str("0");
  o.flag("--attention-kl-homologous", a.options.attention_kl_homologous,
         "the attention maps to match: FP weights on the quantized path's input (default: the FP "
         "path's maps)");
  o.choice<cbq::DependencyMeasure>("--dependency", a.options.dependency,
                                   "adaptive groups: the dependency of adjacent units",
                                   {{"error-gain", cbq::DependencyMeasure::error_gain},
                                    {"entropy", cbq::DependencyMeasure::entropy}});
  o.real("--group-threshold", a.options.group_threshold,
         "adaptive groups: a group grows while its mean dependency, relative to the model's "
         "mean, is at least X",
         -1e6, 1e6);
  o.flag("--no-l2", a.options.loss_l2, "switch the L2 loss term off", false);
  o.flag("--no-kld", a.options.loss_kld, "switch the KLD loss term off", false);
  o.flag("--no-hom", a.options.loss_homologous, "switch the homologous term off", false);
  o.flag("--no-fp", a.options.loss_full_precision, "switch the full-precision term off", false);
  o.text("--rotate", a.rotate_list,
         "Hadamard rotations before quantizing (docs/ROTATION.md): comma list of r1 "
         "(residual stream), r2 (value/output heads), r4 (online, before down_proj / fc2; no "
         "export), or none",
         "LIST", [&a](const std::string& v) { parse_rotations(v, a.rotation); })
      ->default_str("none");
  o.integer<uint64_t>("--rotate-seed", a.rotation.seed, "seed of the rotations' random signs", 0,
                      UINT64_MAX);
  o.flag("--rotate-fallback", a.rotation.allow_random_orthogonal,
         "a seeded random orthogonal kernel for sizes without a Hadamard matrix (e.g. 172)");
  o.text("--fit-online", a.fit_list,
         "online transforms fitted to the calibration data so that the inputs' activation "
         "quantization costs the least output error (docs/ROTATION.md): comma list of down (R4 "
         "refitted: needs --rotate with r4) and mlp (a new op before gate/up / fc1); no export",
         "LIST", [&a](const std::string& v) { parse_fit(v, a.fit); });
  auto* cfp_flag = o.flag("--cfp", a.cfp, "CFP activation outlier scaling");
  auto* sq_flag = o.flag("--smoothquant", a.smoothquant, "SmoothQuant activation scaling");
  cfp_flag->excludes(sq_flag);
  o.flag("--cfp-weights", a.options.cfp_weights, "CFP truncates weight outliers too");
  o.integer<int64_t>("--max-steps", a.options.max_steps,
                     "cap the steps per window (smoke runs; 0 = no cap)", 0, 1'000'000'000);
  auto* ck =
      o.text("--checkpoint", a.checkpoint, "write a checkpoint after every window (atomic)", "DIR");
  auto* resume = o.text("--resume", a.resume,
                        "continue from DIR's checkpoint if there is one (same model, data and "
                        "options; else refused), and keep checkpointing there",
                        "DIR");
  ck->excludes(resume);
  o.text("--offload-dir", a.options.activation_dir,
         "keep the calibration activations in file mappings in DIR (paged to disk)", "DIR");

  o.group("gptq (--method gptq; the reference's options, off by default)");
  o.flag("--act-order", a.gptq.act_order, "columns in order of decreasing Hessian diagonal");
  o.flag("--static-groups", a.gptq.static_groups, "group parameters fixed before the column loop");

  o.group("device");
  o.choice<cbq::Device>("--device", a.options.device,
                        "where CBQ and the evaluations run (RTN and GPTQ: the CPU)",
                        {{"cpu", cbq::Device::cpu}, {"cuda", cbq::Device::cuda}});
  o.flag("--tf32", a.tf32, "cuda: float GEMMs on TF32 tensor cores (~1e-3 relative error)");
  o.choice<cbq::ActivationPlacement>("--activations", a.options.activation_placement,
                                     "cuda: where the calibration activations live",
                                     {{"auto", cbq::ActivationPlacement::automatic},
                                      {"gpu", cbq::ActivationPlacement::device},
                                      {"host", cbq::ActivationPlacement::host}});

  o.group("output");
  o.text("--out", a.out,
         "save the quantized model (native safetensors; with several methods the method name "
         "is appended)");
  o.pair(
      "--export",
      [&a](const std::string& format, const std::string& path) {
        if (format != "gguf" && format != "gptq")
          usage_error(fmt::format("--export: format '{}' is not gguf or gptq", format));
        if (path.empty()) usage_error("--export: empty path");
        a.export_format = format;
        a.export_path = path;
      },
      "also write a llama.cpp GGUF file (W4, or W8 sym; groups of a multiple of 32) or a "
      "GPTQ-format Hugging Face folder; prints the perplexity of exactly what is exported",
      "gguf|gptq PATH");
  o.flag("--force", a.force,
         "replace an existing output that is not a model file (or a non-empty folder that is "
         "not an earlier export); inputs and devices are never replaced");
  o.text("--report", a.report_dir,
         "write the run as JSON (loss terms per window and step, decisions, per-layer and "
         "per-block errors, perplexity, KL divergence from FP) and SVG charts into DIR",
         "DIR");
  o.flag("--no-kl-eval", a.kl,
         "skip the KL divergence from FP (llama.cpp protocol: mean, median, 99 %, same top p, "
         "RMS dp) measured for every method",
         false);
  o.integer<int64_t>("--threads", a.threads, "CPU threads", 1, max_threads, "all cores");
  o.flag("--quiet", a.options.verbose, "no per-window progress", false);
  o.flag("--dry-run", a.dry_run, "run every check (options, files, memory, disk), then stop");
}

Args parse(int argc, char** argv) {
  Args a;
  a.spec.weight.bits = 4;
  a.spec.weight.group_size = 32;
  a.spec.weight.granularity = cbq::quant::Granularity::per_group;
  cbq::cli::Options o(kTool,
                      "Quantize a model with CBQ (cross-block quantization) and/or the RTN and "
                      "GPTQ baselines, print the perplexities and save the result.");
  declare(o, a);
  o.parse(argc, argv);
  a.methods = parse_methods(a.method_list);
  if (!a.act_layer_list.empty()) a.spec.act_layers = split(a.act_layer_list, ',');
  if (a.spec.act_bits > 8 && a.spec.act_bits < 16)
    usage_error(
        fmt::format("--abits {}: activations use 2 to 8 bits, or 16 = none", a.spec.act_bits));
  if (a.soft) a.options.rounding_mode = cbq::quant::RoundingMode::soft;
  if (a.hard) a.options.rounding_mode = cbq::quant::RoundingMode::hard_ste;
  if (a.cfp) a.options.activation_scaling = cbq::ActivationScaling::cfp;
  if (a.smoothquant) a.options.activation_scaling = cbq::ActivationScaling::smoothquant;
  a.spec.weight.granularity =
      a.group == 0 ? cbq::quant::Granularity::per_channel : cbq::quant::Granularity::per_group;
  a.spec.weight.group_size = a.group == 0 ? 128 : a.group;
  a.spec.act_per_token = a.act_per_token || (!a.act_per_tensor && a.spec.act_bits < 8);
  if (!a.checkpoint.empty()) a.options.checkpoint_dir = a.checkpoint;
  if (!a.resume.empty()) {
    a.options.checkpoint_dir = a.resume;
    a.options.resume = true;
  }
#if defined(CBQ_CUDA_VARIANT) && !defined(__CUDACC__)
  if (a.options.device == cbq::Device::cuda)  // the GPU backend lives in cbq-quantize-cuda
    cbq_tools::exec_cuda_variant(CBQ_CUDA_VARIANT, argv);
#endif
#if defined(CBQ_CUDA_VARIANT) && !defined(__CUDACC__)
  if (a.options.device == cbq::Device::cuda)
    usage_error(fmt::format(
        "--device cuda: the GPU variant {} is not built beside this program (build it with "
        "`cmake --build BUILD --target {}`)",
        CBQ_CUDA_VARIANT, CBQ_CUDA_VARIANT));
#endif
  if (a.options.device == cbq::Device::cuda && !cbq::cuda_available())
    usage_error(
        "--device cuda: this build has no CUDA backend (configure with -DCBQ_ENABLE_CUDA=ON on "
        "a machine with the CUDA toolkit)");
  if (a.tf32 && a.options.device != cbq::Device::cuda) usage_error("--tf32 needs --device cuda");
  for (const std::string& name : a.spec.act_layers)
    if (name.empty()) usage_error("--act-layers: empty layer name in the list");
  if (!a.options.activation_dir.empty() && a.options.device == cbq::Device::cuda &&
      a.options.activation_placement == cbq::ActivationPlacement::device)
    usage_error("--offload-dir keeps activations on the host; it cannot go with --activations gpu");
  const fs::path data = CBQ_DATA_DIR;
  if (a.model.empty()) {
    const fs::path m = data / "models" / "stories260K.bin";
    if (!fs::exists(m))
      usage_error(fmt::format(
          "no model given and the default {} does not exist; pass a llama2.c checkpoint, a "
          "Hugging Face folder or a GGUF file",
          m.string()));
    a.model = m.string();
    if (a.tokenizer.empty()) a.tokenizer = (data / "models" / "tok512.bin").string();
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

// The file a method's model is saved to: PATH, or PATH's stem + "-METHOD" with several methods.
std::string method_path(const Args& a, const std::string& path, const std::string& method) {
  if (a.methods.size() == 1) return path;
  const fs::path p(path);
  return (p.parent_path() / (p.stem().string() + "-" + method + p.extension().string())).string();
}

// The linear layers of a block of `family`, by cbq's names.
std::vector<std::string> linear_names(cbq::Family family) {
  if (family == cbq::Family::llama)
    return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"};
}

// What the run will hold and write, from the model's header (the first second; no weights).
struct Plan {
  cbq::ModelProbe probe;
  int64_t ctx = 0, seq_len = 0;
  uint64_t memory_needed = 0, address_space_needed = 0;
  std::string memory_breakdown;
  cbq::MemoryLimits limits;
  std::vector<std::string> notes;
};

uint64_t quantized_parameters(const cbq::ModelConfig& c) {
  uint64_t n = 0;
  for (const auto& [name, shape] : cbq::io::expected_weight_shapes(c))
    if (shape.ndim() == 2 && name.find("embed") == std::string::npos &&
        name.rfind("lm_head", 0) != 0)
      n += static_cast<uint64_t>(shape.numel());
  return n;
}

// Disk a folder's file system must hold, by file system.
struct DiskNeed {
  std::string folder, what;
  uint64_t bytes = 0, largest_file = 0;
};

void check_disk(const std::vector<DiskNeed>& needs) {
  // A file-size limit (ulimit -f) would make the largest file fail half-way.
  rlimit fsize{};
  if (::getrlimit(RLIMIT_FSIZE, &fsize) == 0 && fsize.rlim_cur != RLIM_INFINITY)
    for (const DiskNeed& n : needs)
      CBQ_CHECK(n.largest_file <= fsize.rlim_cur,
                "the file-size limit (ulimit -f) {} is below the {} of a file of {} in {}; raise "
                "the limit",
                cbq::format_size(fsize.rlim_cur), cbq::format_size(n.largest_file), n.what,
                n.folder);
  std::map<dev_t, std::pair<uint64_t, std::string>> by_fs;
  std::map<dev_t, std::string> folder_of;
  for (const DiskNeed& n : needs) {
    const std::string folder = cbq::io::existing_ancestor(n.folder);
    const auto st = cbq::io::stat_path(folder);
    if (!st) continue;
    auto& [bytes, what] = by_fs[st->st_dev];
    bytes += n.bytes;
    what += (what.empty() ? "" : " + ") + fmt::format("{} {}", n.what, cbq::format_size(n.bytes));
    folder_of[st->st_dev] = folder;
  }
  for (const auto& [dev, need] : by_fs) {
    const uint64_t free = cbq::io::free_disk_bytes(folder_of[dev]);
    CBQ_CHECK(free >= need.first,
              "not enough disk space: {} needs at least {} ({}) but its file system has {} "
              "free",
              folder_of[dev], cbq::format_size(need.first), need.second, cbq::format_size(free));
  }
}

// Every check that needs no weights: inputs, the model's config against the options, outputs,
// memory, address space and disk. Refusals name the option, the file and the numbers.
Plan preflight(Args& a) {
  namespace io = cbq::io;
  io::check_input_path(a.model, "MODEL", /*folder_ok=*/true, /*empty_ok=*/false);
  if (!a.tokenizer.empty())
    io::check_input_path(a.tokenizer, "--tokenizer", /*folder_ok=*/true, /*empty_ok=*/false);
  io::check_input_path(a.calib, "--calib", false, false);
  io::check_input_path(a.eval, "--eval", false, false);

  Plan plan;
  plan.probe = cbq::probe_model(a.model);
  const cbq::ModelConfig& c = plan.probe.config;
  const int64_t context = c.max_seq_len;
  plan.ctx = a.ctx > 0 ? a.ctx : context;
  plan.seq_len = a.seq_len > 0 ? a.seq_len : std::min<int64_t>(2048, context);
  if (plan.ctx > context)
    usage_error(
        fmt::format("--ctx {} exceeds the model's context {} ({})", plan.ctx, context, a.model));
  if (plan.seq_len > context)
    usage_error(fmt::format("--seq-len {} exceeds the model's context {} ({})", plan.seq_len,
                            context, a.model));

  // The options against the model.
  const bool has_cbq = [&] {
    for (const auto& m : a.methods)
      if (is_pass_method(m)) return true;
    return false;
  }();
  for (const auto& m : a.methods) {
    if (!is_pass_method(m)) continue;
    const cbq::PassSpec spec = pass_config(a, m).first;
    const int64_t units = spec.units == cbq::UnitKind::sub_blocks ? 2 * c.n_layers : c.n_layers;
    if (spec.schedule == cbq::WindowKind::adaptive && spec.window_blocks > units)
      usage_error(fmt::format("--max-group {}: the model has only {} {} units", spec.window_blocks,
                              units, cbq::unit_kind_name(spec.units)));
  }
  const int64_t cbq_units = a.spec.units == cbq::UnitKind::sub_blocks ? 2 * c.n_layers : c.n_layers;
  if (has_cbq) {
    if (a.spec.schedule == cbq::WindowKind::sliding && a.spec.window_blocks > cbq_units)
      usage_error(
          fmt::format("--window {}: the model has only {} {}", a.spec.window_blocks, cbq_units,
                      a.spec.units == cbq::UnitKind::sub_blocks ? "sub-block units" : "blocks"));
    if (a.spec.window_overlap >= a.spec.window_blocks)
      usage_error(fmt::format("--overlap {} must be smaller than --window {}",
                              a.spec.window_overlap, a.spec.window_blocks));
    if (a.spec.rounding != cbq::RoundingKind::lora && a.spec.rank != cbq::PassSpec{}.rank)
      usage_error(
          fmt::format("--rank {} applies to LoRA-Rounding: add --rounding lora (the default "
                      "rounding is full-matrix)",
                      a.spec.rank));
    if (a.spec.rounding == cbq::RoundingKind::lora) {
      const int64_t smallest =
          std::min({c.dim, c.hidden_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim});
      if (a.spec.rank > smallest)
        usage_error(
            fmt::format("--rank {} exceeds the smallest dimension of the model's linear "
                        "layers ({}; dim {}, hidden {}, KV {})",
                        a.spec.rank, smallest, c.dim, c.hidden_dim, c.n_kv_heads * c.head_dim));
    }
  }
  if (a.fit.down && !a.rotation.r4)
    usage_error(
        fmt::format("--fit-online down refits the R4 rotation, but --rotate is '{}'; add r4",
                    a.rotation.describe()));
  if (a.fit.any() && (!a.out.empty() || !a.export_format.empty()))
    usage_error(
        "--fit-online adds ops at run time that no file format here stores; --out and "
        "--export need a model without them");
  a.fit.seed = a.rotation.seed;
  a.fit.allow_random_orthogonal = a.rotation.allow_random_orthogonal;
  if (a.rotation.any()) {
    try {
      cbq::check_rotation(c, a.rotation);
    } catch (const cbq::Error& e) {
      usage_error(fmt::format("--rotate {}: {}{}", a.rotation.describe(), e.what(),
                              a.rotation.allow_random_orthogonal
                                  ? ""
                                  : "; --rotate-fallback uses a random orthogonal kernel instead"));
    }
    if (a.rotation.r4 && (!a.out.empty() || !a.export_format.empty()))
      usage_error(fmt::format(
          "--rotate {}: r4 is an op at run time that no file format here stores; --out and "
          "--export need a model rotated with r1/r2 only",
          a.rotation.describe()));
  }
  const auto names = linear_names(c.family);
  for (const std::string& l : a.spec.act_layers)
    if (std::find(names.begin(), names.end(), l) == names.end())
      usage_error(fmt::format("--act-layers: no linear layer named '{}' in a {} block (it has {})",
                              l, cbq::family_name(c.family), fmt::join(names, ", ")));
  if (!a.export_format.empty()) {
    try {
      cbq::check_exportable(*cbq::parse_export_format(a.export_format), c, a.spec.weight,
                            a.spec.act_bits);
    } catch (const cbq::Error& e) {
      usage_error(fmt::format("--export {}: {}", a.export_format, e.what()));
    }
  }
  const int bits = a.spec.weight.bits;
  // Outputs: never an input, a device or someone's folder; not two outputs on one path.
  std::vector<io::InputPath> inputs = {
      {a.model, "MODEL"}, {a.tokenizer, "--tokenizer"}, {a.calib, "--calib"}, {a.eval, "--eval"}};
  if (!fs::is_directory(a.model) && a.tokenizer.empty())
    inputs.push_back({(fs::path(a.model).parent_path() / "tokenizer.bin").string(), "tokenizer"});
  if (!a.options.checkpoint_dir.empty())
    inputs.push_back({cbq::checkpoint_path(a.options.checkpoint_dir),
                      a.options.resume ? "--resume" : "--checkpoint"});
  std::vector<std::pair<std::string, std::string>> files;  // resolved path, option
  std::string export_folder;
  for (const std::string& m : a.methods) {
    if (!a.out.empty())
      files.emplace_back(io::check_output_file(method_path(a, a.out, m), inputs, a.force, "--out"),
                         "--out");
    if (a.export_format == "gguf")
      files.emplace_back(
          io::check_output_file(method_path(a, a.export_path, m), inputs, a.force, "--export gguf"),
          "--export gguf");
    if (a.export_format == "gptq") {
      export_folder = io::check_output_folder(method_path(a, a.export_path, m), inputs, a.force,
                                              "--export gptq");
      files.emplace_back(export_folder, "--export gptq");
      if (a.options.checkpoint_dir.empty()) continue;
      if (io::detail::path_within(a.options.checkpoint_dir, export_folder) ||
          io::detail::path_within(export_folder, a.options.checkpoint_dir))
        usage_error(fmt::format("--export gptq {} and the checkpoint folder {} overlap",
                                a.export_path, a.options.checkpoint_dir));
    }
  }
  for (size_t i = 0; i < files.size(); ++i)
    for (size_t j = 0; j < files.size(); ++j) {
      if (i == j) continue;
      const bool folder_j = files[j].second == "--export gptq";
      if (files[i].first == files[j].first ||
          (folder_j && io::detail::path_within(files[i].first, files[j].first)))
        usage_error(fmt::format("{} {} and {} {} would write the same place", files[i].second,
                                files[i].first, files[j].second, files[j].first));
    }
  if (!a.options.checkpoint_dir.empty())
    io::check_writable_folder(a.options.checkpoint_dir,
                              a.options.resume ? "--resume" : "--checkpoint");
  if (!a.options.activation_dir.empty())
    io::check_writable_folder(a.options.activation_dir, "--offload-dir");
  // A checkpoint to resume from: its configuration, every tensor's checksum and range, now.
  if (a.options.resume && has_cbq) {
    const std::string first = *std::find_if(a.methods.begin(), a.methods.end(), is_pass_method);
    const auto [spec, options] = pass_config(a, first);
    if (cbq::validate_pass_checkpoint(a.options.checkpoint_dir,
                                      cbq::config_fingerprint(spec.describe(), options),
                                      a.spec.weight.bits))
      plan.notes.push_back("resuming from " + cbq::checkpoint_path(a.options.checkpoint_dir));
  }

  // Memory: the peak of loading (the weights read, then copied into the model), or the model
  // beside the largest method's data and an evaluation's logits.
  const uint64_t P4 = plan.probe.parameter_bytes();
  const uint64_t N = static_cast<uint64_t>(a.samples), L = static_cast<uint64_t>(plan.seq_len),
                 d = static_cast<uint64_t>(c.dim);
  const uint64_t eval_bytes =
      3 * static_cast<uint64_t>(plan.ctx) * static_cast<uint64_t>(c.vocab_size) * sizeof(float);
  uint64_t method_bytes = 0;
  std::string method_what;
  for (const std::string& m : a.methods) {
    uint64_t b = 0;
    std::string what;
    if (is_pass_method(m)) {
      const int sets = cbq::pass_activation_sets(a.options);
      const bool on_host = a.options.device == cbq::Device::cpu;
      b = a.options.activation_dir.empty() && on_host
              ? cbq::pass_activation_bytes(a.samples, plan.seq_len, c.dim, sizeof(float), sets)
              : 0;
      what = fmt::format("the CBQ pass's {} activation sets of {} × {} × {} floats", sets, N, L, d);
    } else {
      b = N * L * d * sizeof(float);
      what = fmt::format("{}'s {} × {} × {} calibration inputs", m, N, L, d);
    }
    if (b >= method_bytes) {
      method_bytes = b;
      method_what = fmt::format("{} {}", what, cbq::format_size(b));
    }
  }
  // The KL divergence keeps the full-precision model beside the quantized one (--no-kl-eval).
  const uint64_t kl_bytes = a.kl ? P4 : 0;
  // R1 unties a tied head: one more (V, d) matrix.
  const uint64_t untied = a.rotation.r1 && c.tied_embeddings
                              ? static_cast<uint64_t>(c.vocab_size) * d * sizeof(float)
                              : 0;
  const uint64_t steady = P4 + untied + kl_bytes + method_bytes + eval_bytes;
  plan.memory_needed = std::max(2 * P4 + kl_bytes, steady);
  plan.memory_breakdown =
      2 * P4 + kl_bytes >= steady
          ? fmt::format("the {} parameters as float32, {}, twice while the model is built{}",
                        plan.probe.parameters, cbq::format_size(P4),
                        a.kl ? " and once more for the KL divergence from FP" : "")
          : fmt::format("the model {}{} + {} + evaluation logits {}", cbq::format_size(P4),
                        a.kl ? " (twice: the FP copy for the KL divergence)" : "", method_what,
                        cbq::format_size(eval_bytes));
  plan.limits = cbq::memory_limits();
  if (plan.memory_needed > plan.limits.usable())
    cbq::fail("not enough memory for {}: this run needs at least {} ({}), but {} is usable ({}){}",
              a.model, cbq::format_size(plan.memory_needed), plan.memory_breakdown,
              cbq::format_size(plan.limits.usable()), plan.limits.describe(),
              method_bytes > P4 && a.options.activation_dir.empty()
                  ? "; lower --samples or --seq-len, or keep the activations on disk with "
                    "--offload-dir DIR"
                  : "");
  // Address space (ulimit -v): the model file is mapped while its weights are copied out.
  const int threads = a.threads > 0 ? static_cast<int>(a.threads) : cbq::num_threads();
  const uint64_t blas = static_cast<uint64_t>(threads) * cbq::kBlasBufferBytes;
  plan.address_space_needed = std::max(plan.probe.file_bytes + P4, plan.memory_needed) + blas;
  if (plan.limits.address_space_left && plan.address_space_needed > *plan.limits.address_space_left)
    cbq::fail(
        "the address-space limit (ulimit -v) {} leaves {} beside the {} already mapped, but "
        "this run needs at least {}: {} of data ({}), the model file mapped while it loads {}, "
        "and OpenBLAS's GEMM buffers {} ({} threads × {}); raise the limit or use fewer "
        "--threads",
        cbq::format_size(plan.limits.address_space_limit),
        cbq::format_size(*plan.limits.address_space_left), cbq::format_size(plan.limits.vm_size),
        cbq::format_size(plan.address_space_needed), cbq::format_size(plan.memory_needed),
        plan.memory_breakdown, cbq::format_size(plan.probe.file_bytes), cbq::format_size(blas),
        threads, cbq::format_size(cbq::kBlasBufferBytes));

  // Disk: each output (an upper estimate), the checkpoint, the offloaded activations.
  const uint64_t qp = quantized_parameters(c);
  const uint64_t dense = P4 - std::min(P4, qp * sizeof(float));
  const uint64_t groups = a.group > 0 ? qp / static_cast<uint64_t>(a.group) + 1 : qp / d + 1;
  // Headers and metadata: a few hundred bytes per tensor, the vocabulary (GGUF, tokenizer).
  const uint64_t header = (uint64_t{64} << 10) + static_cast<uint64_t>(c.n_layers) * (16 << 10);
  const uint64_t vocab = static_cast<uint64_t>(c.vocab_size) * 64 + (uint64_t{4} << 20);
  const uint64_t native = qp * static_cast<uint64_t>(bits) / 8 + groups * 8 + dense + header;
  const uint64_t gguf = qp * static_cast<uint64_t>(bits + 1) / 8 + dense + header + vocab;
  const uint64_t gptq =
      qp * static_cast<uint64_t>(bits) / 8 + groups * 6 + dense / 2 + qp / d * 4 + header + vocab;
  std::vector<DiskNeed> disk;
  for (const auto& [path, option] : files) {
    const std::string folder = io::parent_folder(path);
    const uint64_t bytes = option == "--out" ? native : option == "--export gguf" ? gguf : gptq;
    disk.push_back({folder, option, bytes, bytes});
  }
  if (!a.options.checkpoint_dir.empty()) {
    const uint64_t ck = 2 * N * L * d * sizeof(float) + 2 * qp * sizeof(float);
    disk.push_back({a.options.checkpoint_dir, "the checkpoint", ck, ck});
  }
  if (!a.options.activation_dir.empty()) {
    const int sets = cbq::pass_activation_sets(a.options);
    const uint64_t act =
        cbq::pass_activation_bytes(a.samples, plan.seq_len, c.dim, sizeof(float), sets);
    disk.push_back({a.options.activation_dir, "the offloaded activations", act,
                    act / static_cast<uint64_t>(sets)});
  }
  check_disk(disk);
  // What killed runs left beside the outputs.
  for (const auto& [path, option] : files) io::remove_stale_temporaries(path);
  return plan;
}

// A perplexity must be a number: a NaN or Inf names the parameter that holds one, or says that
// every parameter is finite (an overflow in the forward pass).
template <class Model>
double require_finite(double ppl, const std::string& what, Model& model) {
  if (std::isfinite(ppl)) return ppl;
  const std::string p = cbq::find_non_finite_parameter(model);
  cbq::fail("{} is {}: {}", what, ppl,
            p.empty() ? std::string("every parameter is finite, so the forward pass overflowed")
                      : "the parameter " + p);
}

// Writes `result` for other tools (--export) and prints the perplexity of exactly what was
// written: the GPTQ export rounds the model's scales to fp16 as the folder holds them; a GGUF file
// is read back.
template <class Model>
void export_model(const Args& args, Model& model, cbq::QuantizationResult& result,
                  const std::string& path, const std::vector<int32_t>& eval_tokens, int64_t ctx) {
  const cbq::ExportFormat format = *cbq::parse_export_format(args.export_format);
  cbq::ExportOptions o;
  if (fs::is_directory(args.model)) o.source_dir = args.model;
  o.tokenizer_file = args.tokenizer;
  o.gptq_damp_percent = args.options.gptq_percdamp;
  const cbq::ExportSummary s = cbq::export_model(format, path, model, result, o);
  for (const std::string& line : s.lines) std::printf("export: %s\n", line.c_str());
  if (format == cbq::ExportFormat::gptq) {
    const double ppl =
        require_finite(cbq::eval::perplexity_gptq(model, eval_tokens, ctx).perplexity,
                       "the perplexity with the exported fp16 scales", model);
    std::printf(
        "export: perplexity with the exported fp16 scales %.4f (largest scale change %.2e)\n", ppl,
        s.max_scale_change);
    return;
  }
  auto back = cbq::io::load_gguf_llama(path);
  const double ppl = require_finite(cbq::eval::perplexity_gptq(back, eval_tokens, ctx).perplexity,
                                    fmt::format("the perplexity of {} read back", path), back);
  std::printf("export: perplexity of %s read back %.4f\n", path.c_str(), ppl);
}

struct Row {
  std::string method, config;
  double ppl = 0, seconds = 0, rss = 0;
  std::optional<double> kl;  // mean KL divergence from FP
};

// KL divergence of a method's model from the full-precision one (llama-perplexity's protocol).
std::optional<cbq::eval::KlDivergenceResult> print_kl(const std::string& method,
                                                      std::optional<cbq::AnyModel>& base,
                                                      cbq::AnyModel& m,
                                                      const std::vector<int32_t>& tokens,
                                                      int64_t ctx, int32_t bos) {
  if (!base) return std::nullopt;
  cbq::eval::KlOptions o;
  o.ctx = ctx;
  o.bos = bos;
  const cbq::eval::KlDivergenceResult r = base->visit([&](auto& b) {
    return m.visit([&](auto& q) { return cbq::eval::kl_divergence(b, q, tokens, o); });
  });
  std::printf(
      "%s: KL divergence from FP %.6f ± %.6f (median %.6f, 99%% %.6f, max %.4f), same top p "
      "%.3f%%, RMS dp %.3f%% [llama.cpp protocol, ctx %lld, %lld positions, %.1fs]\n",
      method.c_str(), r.mean, r.mean_error, r.median, r.p99, r.max, 100 * r.same_top,
      100 * r.rms_dp, static_cast<long long>(ctx), static_cast<long long>(r.positions), r.seconds);
  return r;
}

// The model the methods quantize: loaded, and rotated when --rotate asks (the rotated model
// computes the same function; the KL divergence is still measured from the original).
cbq::AnyModel load_for_quantizing(const Args& a, bool print) {
  cbq::AnyModel m = cbq::load_model(a.model, a.tokenizer);
  if (a.rotation.any()) {
    const cbq::RotationReport r =
        m.visit([&](auto& model) { return cbq::rotate_model(model, a.rotation); });
    if (print)
      std::printf("rotation: %s (seed %llu)\n", r.summary().c_str(),
                  static_cast<unsigned long long>(a.rotation.seed));
  }
  return m;
}

// " + fitted down, mlp" after a rotation, "fitted mlp" alone, "" without --fit-online.
std::string fit_label(const cbq::FitOptions& f, bool after_rotation) {
  if (!f.any()) return "";
  return std::string(after_rotation ? " + fitted " : "fitted ") + (f.down && f.mlp_in ? "down, mlp"
                                                                   : f.down           ? "down"
                                                                                      : "mlp");
}

// --fit-online: transforms fitted to the calibration samples (the same for every method).
void fit_for_quantizing(cbq::AnyModel& m, const Args& a, const cbq::Calibration& calib,
                        bool print) {
  if (!a.fit.any()) return;
  const cbq::FittedTransformReport r =
      m.visit([&](auto& model) { return cbq::fit_online_transforms(model, calib.samples, a.fit); });
  if (print) std::printf("fitted: %s\n", r.summary().c_str());
}

int run(int argc, char** argv, std::string& phase) {
  Args args = parse(argc, argv);
  // A file-size limit (ulimit -f) makes writes fail with EFBIG instead of killing the process.
  ::signal(SIGXFSZ, SIG_IGN);
  if (args.threads > 0) cbq::set_num_threads(static_cast<int>(args.threads));
  phase = "checking the inputs";
  const Plan plan = preflight(args);
  const cbq::ModelConfig& pc = plan.probe.config;
  for (const std::string& note : plan.notes) std::printf("checks: %s\n", note.c_str());
  std::printf(
      "checks: %s %s, %lld parameters (%s as float32); needs at least %s of memory, %s usable\n",
      plan.probe.format.c_str(), args.model.c_str(), static_cast<long long>(plan.probe.parameters),
      cbq::format_size(plan.probe.parameter_bytes()).c_str(),
      cbq::format_size(plan.memory_needed).c_str(), cbq::format_size(plan.limits.usable()).c_str());
  const int64_t ctx = plan.ctx, seq_len = plan.seq_len;
  // The texts, tokenized before the weights are read when the tokenizer is a file of its own
  // (a text shorter than one window is refused before a large model is loaded).
  phase = "reading and tokenizing the texts";
  std::vector<int32_t> calib_tokens, eval_tokens;
  auto tokenize = [&](const cbq::Tokenizer& tok) {
    calib_tokens = tok.encode(cbq::io::read_text_file(args.calib));
    eval_tokens = tok.encode(cbq::io::read_text_file(args.eval));
    CBQ_CHECK(static_cast<int64_t>(eval_tokens.size()) >= ctx,
              "--eval {}: {} tokens, fewer than one evaluation window of {} (--ctx)", args.eval,
              eval_tokens.size(), ctx);
    CBQ_CHECK(static_cast<int64_t>(calib_tokens.size()) >= seq_len,
              "--calib {}: {} tokens, fewer than one calibration segment of {} (--seq-len)",
              args.calib, calib_tokens.size(), seq_len);
  };
  if (const auto tok = cbq::load_tokenizer_for(args.model, args.tokenizer, plan.probe))
    tokenize(*tok);
  if (args.dry_run) {
    std::printf("dry run: %s, %lld blocks, context %lld; every check passed, weights not loaded\n",
                pc.architecture.c_str(), static_cast<long long>(pc.n_layers),
                static_cast<long long>(pc.max_seq_len));
    return 0;
  }
  // OpenBLAS's per-thread buffers, mapped now while the address space is known to hold them.
  phase = "reserving OpenBLAS's GEMM buffers";
  cbq::reserve_blas_buffers();

  const cbq::Device device = args.options.device;
#ifdef __CUDACC__
  if (device == cbq::Device::cuda) {
    int gpu = 0;
    cudaDeviceProp prop{};
    CBQ_CUDA_CHECK(cudaGetDevice(&gpu));
    CBQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, gpu));
    if (args.tf32) cbq::cuda::default_context().set_math_mode(cbq::cuda::MathMode::tf32);
    std::printf("device: %s (%.1f GiB), %s GEMMs\n", prop.name,
                static_cast<double>(prop.totalGlobalMem) / (1 << 30), args.tf32 ? "TF32" : "fp32");
  }
#endif
  phase = "loading the model";
  cbq::AnyModel any = load_for_quantizing(args, true);
  std::printf("%s\n", cbq::describe(any).c_str());
  CBQ_CHECK(any.tokenizer(), "{} has no tokenizer; pass --tokenizer", args.model);
  const cbq::Tokenizer& tok = *any.tokenizer();
  const cbq::ModelConfig cfg = any.config();
  if (eval_tokens.empty()) {  // the tokenizer came with the model (GGUF)
    phase = "reading and tokenizing the texts";
    tokenize(tok);
  }
  const int32_t bos = tok.bos_id();  // `tok` dies with the first method's model
  const cbq::Calibration calib =
      args.gptq_sampler
          ? cbq::sample_calibration_gptq(calib_tokens, args.samples, seq_len, args.options.seed)
          : cbq::sample_calibration(calib_tokens, args.samples, seq_len, args.options.seed);
  std::printf(
      "calibration: %lld × %lld tokens from %s (%zu tokens); evaluation: %s (%zu tokens, "
      "ctx %lld)\n",
      static_cast<long long>(args.samples), static_cast<long long>(seq_len), args.calib.c_str(),
      calib_tokens.size(), args.eval.c_str(), eval_tokens.size(), static_cast<long long>(ctx));
  phase = "fitting the online transforms";
  fit_for_quantizing(any, args, calib, true);
  const int act_sets = cbq::pass_activation_sets(args.options);
  const double act_mib = static_cast<double>(cbq::pass_activation_bytes(
                             args.samples, seq_len, cfg.dim, sizeof(float), act_sets)) /
                         (1 << 20);
  std::printf(
      "memory: the CBQ pass holds %d activation sets of %lld × %lld × %lld floats "
      "(%.1f MiB) beside the model\n",
      act_sets, static_cast<long long>(args.samples), static_cast<long long>(seq_len),
      static_cast<long long>(cfg.dim), act_mib);
  for (const std::string& method : args.methods) {
    if (!is_pass_method(method)) continue;
    try {  // a few measured window steps at this run's shapes (pass/estimate.hpp)
      const auto [spec, options] = pass_config(args, method);
      any.visit([&](auto& m) {
        const auto e = cbq::estimate_pass(m, spec, options, args.samples, seq_len);
        std::printf("estimate: %s pass %s\n", method == "acbq" ? "ACBQ" : "CBQ",
                    e.summary().c_str());
      });
    } catch (const std::exception& e) {
      std::printf("estimate: unavailable (%s)\n", e.what());
    }
  }

  std::vector<Row> rows;
  std::optional<cbq::report::RunReport> report;
  if (!args.report_dir.empty()) {
    phase = "capturing the full-precision block outputs for --report";
    report.emplace(args.report_dir,
                   fmt::format("{}-{}-seed{}", fs::path(args.model).stem().string(),
                               args.spec.describe_quantizer(), args.options.seed),
                   fs::path(args.model).filename().string());
    report->set_settings(args.spec, args.options.seed, args.samples, seq_len);
    any.visit([&](auto& m) { report->capture_fp(m, calib); });
  }
  // The full-precision model each method's KL divergence is measured from.
  std::optional<cbq::AnyModel> base;
  if (args.kl) {
    phase = "loading the full-precision model for the KL divergence";
    base.emplace(cbq::load_model(args.model, args.tokenizer));
  }
  if (device != cbq::Device::cpu) any.visit([&](auto& m) { m.to(device); });
  if (base && device != cbq::Device::cpu) base->visit([&](auto& m) { m.to(device); });
  phase = "evaluating the full-precision model";
  const auto fp =
      any.visit([&](auto& m) { return cbq::eval::perplexity_gptq(m, eval_tokens, ctx); });
  any.visit([&](auto& m) { require_finite(fp.perplexity, "the full-precision perplexity", m); });
  rows.push_back({"fp32", "full precision", fp.perplexity, fp.seconds, peak_rss_mib()});
  if (report) report->set_fp(fp.perplexity);
  std::printf("FP perplexity %.4f (%lld windows × %lld, %.0f tokens/s)\n", fp.perplexity,
              static_cast<long long>(fp.windows), static_cast<long long>(ctx),
              fp.tokens_per_second);

  for (size_t mi = 0; mi < args.methods.size(); ++mi) {
    const std::string& method = args.methods[mi];
    // The first method quantizes the model already loaded (moved out of `any`, by position:
    // a moved-from model has no evaluation tape); the others load it afresh.
    phase = "loading the model for " + method;
    cbq::AnyModel m = mi == 0 ? std::move(any) : load_for_quantizing(args, false);
    if (mi > 0) fit_for_quantizing(m, args, calib, false);
    Row row;
    row.method = method;
    phase = "quantizing with " + method;
    const auto [spec, options] = pass_config(args, method);
    cbq::QuantizationResult result =
        cbq::quantize(m, *cbq::parse_method(method), spec, options, calib, args.gptq);
    if (args.rotation.any() || args.fit.any())  // the seed also seeds the fitted mlp site's Q
      result.config += fmt::format(", {}{} (seed {})",
                                   args.rotation.any() ? "rotated " + args.rotation.describe() : "",
                                   fit_label(args.fit, args.rotation.any()), args.rotation.seed);
    row.config = result.config;
    row.seconds = result.seconds;
    phase = "evaluating the " + method + " model";
    row.ppl = m.visit([&](auto& model) {
      return require_finite(cbq::eval::perplexity_gptq(model, eval_tokens, ctx).perplexity,
                            "the " + method + " perplexity", model);
    });
    row.rss = peak_rss_mib();
    if (report) m.visit([&](auto& model) { report->add(method, result, row.ppl, model); });
    std::printf("%s: perplexity %.4f (%.1fs)\n", method.c_str(), row.ppl, row.seconds);
    phase = "measuring the KL divergence of the " + method + " model from FP";
    if (const auto kl = print_kl(method, base, m, eval_tokens, ctx, bos)) {
      row.kl = kl->mean;
      if (report) report->set_kl(method, cbq::report::kl_json(*kl));
    }
    if (is_pass_method(method)) {
      const auto [change, flips] = result.learning_summary();
      std::printf(
          "%s: weight steps moved %.3f%% from RTN on average; %.3f%% of the codes differ "
          "from round-to-nearest; %lld of %zu windows kept their start\n",
          method.c_str(), 100 * change, 100 * flips,
          static_cast<long long>(result.windows_kept_start()), result.windows.size());
    }
    rows.push_back(row);
    if (!args.out.empty()) {
      phase = "saving the " + method + " model";
      const std::string out = method_path(args, args.out, method);
      m.visit(
          [&](auto& model) { cbq::export_model(cbq::ExportFormat::native, out, model, result); });
      std::printf("saved %s\n", out.c_str());
    }
    if (!args.export_format.empty()) {
      phase = "exporting the " + method + " model";
      const std::string path = method_path(args, args.export_path, method);
      m.visit([&](auto& model) { export_model(args, model, result, path, eval_tokens, ctx); });
    }
  }

  std::printf("\n| method | configuration | perplexity | vs FP | KL from FP | time | peak RSS |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows)
    std::printf("| %s | %s | %.4f | %+.2f%% | %s | %.1fs | %.0f MiB |\n", r.method.c_str(),
                r.config.c_str(), r.ppl, 100.0 * (r.ppl / fp.perplexity - 1.0),
                r.kl ? fmt::format("{:.6f}", *r.kl).c_str() : "–", r.seconds, r.rss);
  if (report) {
    phase = "writing the report";
    for (const std::string& f : report->write()) std::printf("report: wrote %s\n", f.c_str());
  }
#ifdef __CUDACC__
  if (device == cbq::Device::cuda)
    std::printf("peak GPU memory: %.0f MiB (cbq's allocator)\n",
                static_cast<double>(cbq::cuda::allocator().stats().peak_bytes_in_use) / (1 << 20));
#endif
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  cbq::cli::start_tool(argc, argv);
  std::string phase;
  return cbq::cli::run_tool(kTool, &phase, [&] { return run(argc, argv, phase); });
}
