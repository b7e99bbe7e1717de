#pragma once
// cbq::quantize: one call for CBQ and the baselines it is compared with (RTN, GPTQ), on any
// model load_model returns. Every method installs its quantizers in the model (which then
// evaluates the quantized weights) and returns the QuantizationResult every exporter takes.
//
//   auto model = cbq::load_model("stories260K.bin", "tok512.bin");
//   auto calib = cbq::sample_calibration(tokens, 128, 512, /*seed=*/0);
//   auto result = cbq::quantize(model, cbq::Method::cbq, spec, options, calib);
//   model.visit([&](auto& m) { cbq::export_model(cbq::ExportFormat::gguf, "w4.gguf", m, result);
//   });
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cbq/model/load.hpp"
#include "cbq/pass/baselines.hpp"
#include "cbq/pass/calibration.hpp"
#include "cbq/pass/pass.hpp"
#include "cbq/quant/result.hpp"

namespace cbq {

// acbq is the CBQ pass over sub-block units in adaptive groups (docs/ACBQ.md): its spec comes
// from cbq::acbq_spec, its options from PassOptions::acbq().
enum class Method { cbq, rtn, gptq, acbq };

inline const char* method_name(Method m) {
  switch (m) {
    case Method::cbq:
      return "cbq";
    case Method::rtn:
      return "rtn";
    case Method::acbq:
      return "acbq";
    default:
      return "gptq";
  }
}

// "cbq", "rtn", "gptq" or "acbq"; nullopt for anything else.
inline std::optional<Method> parse_method(std::string_view name) {
  for (Method m : {Method::cbq, Method::rtn, Method::gptq, Method::acbq})
    if (name == method_name(m)) return m;
  return std::nullopt;
}

namespace detail {
// ACBQ needs sub-block units; a spec without them is a caller's mistake, not a silent CBQ.
inline const PassSpec& spec_for(Method method, const PassSpec& spec) {
  CBQ_CHECK(method != Method::acbq || spec.units == UnitKind::sub_blocks,
            "acbq: the spec must use sub-block units (build it with cbq::acbq_spec)");
  return spec;
}
}  // namespace detail

// Quantizes `model` with `method` under `spec` (bits, grid, activation bits; for CBQ also the
// window, rounding and rank), calibrated on `calibration`.
//  * cbq: the CBQ pass (pass/pass.hpp) with `options`; it moves the model to options.device.
//  * acbq: the same pass with an ACBQ spec (sub-block units: acbq_spec); the result says acbq.
//  * rtn, gptq: the baselines (pass/baselines.hpp) on the CPU, block by block from the embedded
//    calibration samples. GPTQ's dampening is options.gptq_percdamp, the same knob as the CBQ
//    pass's GPTQ start (gptq.layer.percdamp is not read); the rest of `gptq` (act-order, static
//    groups, true-sequential) is the baseline's own.
// options.verbose prints progress for every method.
template <TransformerBlock Block>
QuantizationResult quantize(Transformer<Block>& model, Method method, const PassSpec& spec,
                            const PassOptions& options,
                            std::vector<Tensor<typename Block::scalar_type>> hidden,
                            const GptqBaselineOptions& gptq = {});

template <TransformerBlock Block>
QuantizationResult quantize(Transformer<Block>& model, Method method, const PassSpec& spec,
                            const PassOptions& options, const Calibration& calibration,
                            const GptqBaselineOptions& gptq = {}) {
  if (method == Method::cbq || method == Method::acbq) {
    CbqPass pass(detail::spec_for(method, spec), options);
    QuantizationResult r = pass.run(model, calibration);
    r.method = method_name(method);
    return r;
  }
  model.to(Device::cpu);
  std::vector<Tensor<typename Block::scalar_type>> x;
  x.reserve(calibration.samples.size());
  for (const auto& s : calibration.samples) x.push_back(model.embed_tensor(s));
  return quantize(model, method, spec, options, std::move(x), gptq);
}

// The same from the first block's inputs (one (tokens, d) tensor per calibration sample), for an
// engine that feeds hidden states itself (examples/embedding). RTN needs none unless activations
// are quantized statically.
template <TransformerBlock Block>
QuantizationResult quantize(Transformer<Block>& model, Method method, const PassSpec& spec,
                            const PassOptions& options,
                            std::vector<Tensor<typename Block::scalar_type>> hidden,
                            const GptqBaselineOptions& gptq) {
  if (method == Method::cbq || method == Method::acbq) {
    CbqPass pass(detail::spec_for(method, spec), options);
    QuantizationResult r = pass.run_from_hidden(model, std::move(hidden));
    r.method = method_name(method);
    return r;
  }
  model.to(Device::cpu);
  GptqBaselineOptions g = gptq;
  g.layer.percdamp = options.gptq_percdamp;
  return quantize_baseline(model, method == Method::rtn ? Baseline::rtn : Baseline::gptq, spec,
                           std::move(hidden), g, options.verbose);
}

inline QuantizationResult quantize(AnyModel& model, Method method, const PassSpec& spec,
                                   const PassOptions& options, const Calibration& calibration,
                                   const GptqBaselineOptions& gptq = {}) {
  return model.visit(
      [&](auto& m) { return quantize(m, method, spec, options, calibration, gptq); });
}

}  // namespace cbq
