#pragma once
// One call for every format a quantized model is written to: cbq's own (native safetensors with
// codes, steps and zero-points), llama.cpp's GGUF and a GPTQ-format Hugging Face folder.
// check_exportable refuses, before any work, a setting the format cannot hold; export_model
// writes a model and its QuantizationResult, rounding the result's scales to what the format
// stores (fp16 for GGUF and GPTQ) itself.
//
//   cbq::check_exportable(cbq::ExportFormat::gguf, model.config, spec.weight, spec.act_bits);
//   auto result = cbq::quantize(model, cbq::Method::cbq, spec, options, calib);
//   auto summary = cbq::export_model(cbq::ExportFormat::gguf, "w4.gguf", model, result);
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "cbq/core/error.hpp"
#include "cbq/core/model_config.hpp"
#include "cbq/export/gguf.hpp"
#include "cbq/export/gptq.hpp"
#include "cbq/export/native.hpp"
#include "cbq/model/llama_block.hpp"
#include "cbq/model/rotation.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/quant/result.hpp"

namespace cbq {

enum class ExportFormat { native, gguf, gptq };

inline const char* export_format_name(ExportFormat f) {
  return f == ExportFormat::native ? "native" : f == ExportFormat::gguf ? "gguf" : "gptq";
}

// "native", "gguf" or "gptq"; nullopt for anything else.
inline std::optional<ExportFormat> parse_export_format(std::string_view name) {
  for (ExportFormat f : {ExportFormat::native, ExportFormat::gguf, ExportFormat::gptq})
    if (name == export_format_name(f)) return f;
  return std::nullopt;
}

struct ExportOptions {
  // gptq: the Hugging Face folder the model came from (its config.json is the base of the
  // written one, its tokenizer files are copied) and a tokenizer file to copy when there is none.
  std::string source_dir, tokenizer_file;
  double gptq_damp_percent = 0.01;  // gptq: written into quantization_config (informational)
};

struct ExportSummary {
  ExportFormat format = ExportFormat::native;
  std::string path;
  std::vector<std::string> lines;  // what was written, one line each, for the user
  // The largest relative change of a scale rounded to what the format stores (0: unchanged).
  double max_scale_change = 0;
};

// Throws a cbq::Error naming the format and the setting when `format` cannot hold a model of
// `config` quantized with `weight` and `act_bits` (16 = none): GGUF holds LLaMA-family models
// with llama.cpp's block types (gguf_weight_type); GPTQ holds 2, 3, 4 or 8-bit weights and no
// activation quantizers. Native holds everything.
inline void check_exportable(ExportFormat format, const ModelConfig& config,
                             const quant::GridSpec& weight, int act_bits) {
  if (format == ExportFormat::gguf) {
    io::gguf_weight_type(weight, "(all layers)");
    CBQ_CHECK(config.family == Family::llama,
              "llama.cpp's GGUF export is for LLaMA-family models; export {} as gptq instead",
              config.architecture);
  }
  if (format == ExportFormat::gptq) {
    const int bits = weight.bits;
    CBQ_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
              "GPTQ checkpoints hold 2, 3, 4 or 8-bit weights, not {}-bit ones (export it as "
              "native instead)",
              bits);
    CBQ_CHECK(act_bits >= 16,
              "GPTQ checkpoints are weight-only; {}-bit activations would be lost (export it as "
              "native instead)",
              act_bits);
  }
}

// Writes `model` quantized by `result` to `path` (a file; a folder for gptq).
//  * native: codes, steps and zero-points exactly as the result holds them.
//  * gguf: scales rounded to the nearest fp16 that keeps Q4_1's minimum exact (docs/GGUF.md);
//    `model` is unchanged: read the file back (io::load_gguf_llama) to evaluate what it holds.
//  * gptq: scales rounded to the nearest fp16 in `result` and in the model's installed
//    quantizers, so evaluating `model` afterwards measures exactly what the folder holds.
// A model with an online rotation (R4, model/rotation.hpp) is refused in every format.
template <TransformerBlock Block>
ExportSummary export_model(ExportFormat format, const std::string& path, Transformer<Block>& model,
                           QuantizationResult& result, const ExportOptions& options = {}) {
  ExportSummary s;
  s.format = format;
  s.path = path;
  // An online rotation is an op no format here stores: the file would compute another function.
  if (const std::string online = online_rotations(model); !online.empty())
    fail(
        "{} export to {}: the model needs {} at run time, which the format cannot express (a "
        "reader would compute a different function); export a model rotated with R1/R2 only",
        export_format_name(format), path, online);
  if (format == ExportFormat::native) {
    io::save_native(path, model, result);
    s.lines.push_back(fmt::format("wrote {}", path));
    return s;
  }
  const quant::GridSpec spec =
      result.layers.empty() ? quant::GridSpec{} : result.layers.front().weight.spec;
  if (format == ExportFormat::gptq) {
    check_exportable(format, model.config, spec, 16);
    s.max_scale_change = io::snap_scales_to_f16(model, result).max_relative_change;
    io::GptqExportOptions o;
    o.source_dir = options.source_dir;
    o.tokenizer_file = options.tokenizer_file;
    o.damp_percent = options.gptq_damp_percent;
    const io::GptqExportSummary g = io::save_gptq(path, model, result, o);
    s.lines.push_back(
        fmt::format("wrote GPTQ folder {} (checkpoint_format {})", path, g.checkpoint_format));
    for (const std::string& note : g.notes) s.lines.push_back(note);
    return s;
  }
  using T = typename Block::scalar_type;
  if constexpr (std::is_same_v<Block, LlamaBlock<T>>) {
    const io::GgufExportReport r = io::export_gguf(path, model, model.tokenizer.get(), &result);
    s.max_scale_change = r.snap.max_rel_change;
    s.lines.push_back(r.summary());
  } else {
    check_exportable(format, model.config, spec, 16);  // refuses: not a LLaMA-family model
    fail("GGUF export: {} has no LLaMA block", path);
  }
  return s;
}

}  // namespace cbq
