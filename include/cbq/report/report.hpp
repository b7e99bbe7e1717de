#pragma once
// Run reports: what a quantization run did, as JSON, and charts rendered from it as SVG
// (report/svg.hpp). `cbq-quantize --report DIR` uses it:
//
//   cbq::report::RunReport rep(dir, label, model_description);
//   rep.set_settings(spec, seed, samples, seq_len);
//   rep.capture_fp(model, calibration);      // the FP model's block outputs on a few samples
//   rep.set_fp(fp_perplexity);
//   rep.add(method, result, perplexity, model);  // per method, after it quantized `model`
//   rep.write();  // DIR/<label>.json, DIR/<label>-loss.svg, DIR/<label>-blocks.svg and
//                 // DIR/perplexity-vs-bits.svg and, with KL statistics, DIR/kl-vs-bits.svg
//                 // (over every report in DIR)
//
// JSON layout (format "cbq-report-1"): label, model, settings {wbits, group, abits, act, seed,
// samples, seq_len}, fp {perplexity}, methods [{method, config, perplexity, seconds, kl (null
// until the KL statistics are filled in with set_kl), block_error, block_error_energy, layers
// [{name, step_change, rounding_flips, codes_changed, output_error_start, output_error}],
// windows [{first, last, units, steps, seconds, energy [fp, hom], before, after, hard,
// balance_samples (how many samples before/after/hard are means over), judged,
// heldout, heldout_start, heldout_trained, kept_start, diverged (why training stopped, or
// empty), curve {total, l2_fp, kld_fp, l2_hom,
// kld_hom, round, output_kld, attention_kl, boundary}}]}]. Loss terms are objects with the keys of
// the curve.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cbq/core/error.hpp"
#include "cbq/eval/kl_divergence.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/pass/calibration.hpp"
#include "cbq/pass/pass.hpp"
#include "cbq/quant/result.hpp"
#include "cbq/report/svg.hpp"

namespace cbq::report {

inline constexpr const char* kReportFormat = "cbq-report-1";

inline nlohmann::json loss_json(const LossTerms& l) {
  return {{"total", l.total},           {"l2_fp", l.l2_fp},
          {"kld_fp", l.kld_fp},         {"l2_hom", l.l2_hom},
          {"kld_hom", l.kld_hom},       {"round", l.round},
          {"output_kld", l.output_kld}, {"attention_kl", l.attention_kl},
          {"boundary", l.boundary}};
}

inline nlohmann::json window_json(const WindowStats& w) {
  nlohmann::json curve = nlohmann::json::object();
  for (const char* key : {"total", "l2_fp", "kld_fp", "l2_hom", "kld_hom", "round", "output_kld",
                          "attention_kl", "boundary"})
    curve[key] = nlohmann::json::array();
  for (const LossTerms& t : w.curve) {
    const nlohmann::json j = loss_json(t);
    for (auto& [key, values] : curve.items()) values.push_back(j.at(key));
  }
  return {{"first", w.first_block},
          {"last", w.last_block},
          {"units", w.units},
          {"steps", w.steps},
          {"seconds", w.seconds},
          {"energy", {w.energy_fp, w.energy_hom}},
          {"before", loss_json(w.loss_before)},
          {"after", loss_json(w.loss_after)},
          {"hard", loss_json(w.loss_hard)},
          {"balance_samples", w.balance_samples},
          {"judged", w.judged},
          {"heldout", w.heldout},
          {"heldout_start", loss_json(w.heldout_start)},
          {"heldout_trained", loss_json(w.heldout_trained)},
          {"kept_start", w.kept_start},
          {"diverged", w.diverged},
          {"curve", curve}};
}

// The KL-divergence statistics of a method's evaluation (eval::kl_divergence), for set_kl.
inline nlohmann::json kl_json(const eval::KlDivergenceResult& r) {
  return {{"mean", r.mean},         {"mean_error", r.mean_error},
          {"median", r.median},     {"p90", r.p90},
          {"p99", r.p99},           {"max", r.max},
          {"same_top", r.same_top}, {"rms_dp", r.rms_dp},
          {"mean_dp", r.mean_dp},   {"positions", r.positions}};
}

// A file-name-safe form of `s` ("W4A16 g32" → "W4A16-g32").
inline std::string slug(const std::string& s) {
  std::string out;
  for (char c : s) {
    const bool ok = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_';
    if (ok)
      out += c;
    else if (!out.empty() && out.back() != '-')
      out += '-';
  }
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out.empty() ? "run" : out;
}

// The relative error of every block's output on the quantized model's own path against the
// full-precision model's, over a few calibration samples: per token, ‖h_q − h_fp‖² / ‖h_fp‖²
// averaged over tokens (what the next block's norm sees), and the same over the samples'
// energy, Σ‖h_q − h_fp‖² / Σ‖h_fp‖².
class BlockErrors {
 public:
  // Keeps the FP model's block outputs for up to `max_samples` samples, fewer if they would
  // exceed `max_floats` floats.
  template <class Model>
  void capture(Model& model, const Calibration& calib, int64_t max_samples = 4,
               int64_t max_floats = int64_t{64} << 20) {
    const int64_t K = model.num_blocks(), d = model.config.dim;
    const int64_t per_sample = std::max<int64_t>(1, K * calib.seq_len * d);
    const int64_t n = std::max<int64_t>(
        1, std::min<int64_t>({max_samples, calib.size(), max_floats / per_sample}));
    inputs_.assign(calib.samples.begin(), calib.samples.begin() + n);
    outputs_.assign(static_cast<size_t>(K), {});
    for (const auto& tokens : inputs_) {
      Tensor<float> x = to_float(model.embed_tensor(tokens));
      for (int64_t b = 0; b < K; ++b) {
        BlockContext<typename Model::T> fp;
        fp.full_precision = true;
        x = to_float(model.run_block(b, from_float<typename Model::T>(x, model.device()), fp));
        outputs_[static_cast<size_t>(b)].push_back(x);
      }
    }
  }
  bool captured() const { return !outputs_.empty(); }
  int64_t samples() const { return static_cast<int64_t>(inputs_.size()); }

  // Per block: (per-token relative error, energy-relative error) of `model` now.
  template <class Model>
  std::pair<std::vector<double>, std::vector<double>> measure(Model& model) const {
    const size_t K = outputs_.size();
    std::vector<double> token(K, 0), err(K, 0), energy(K, 0);
    int64_t tokens = 0;
    for (size_t n = 0; n < inputs_.size(); ++n) {
      Tensor<float> x = to_float(model.embed_tensor(inputs_[n]));
      for (size_t b = 0; b < K; ++b) {
        x = to_float(model.run_block(static_cast<int64_t>(b),
                                     from_float<typename Model::T>(x, model.device())));
        const Tensor<float>& ref = outputs_[b][n];
        const int64_t L = ref.size(0), d = ref.size(1);
        for (int64_t r = 0; r < L; ++r) {
          double e = 0, a = 0;
          for (int64_t c = 0; c < d; ++c) {
            const double diff = static_cast<double>(x(r, c)) - ref(r, c);
            e += diff * diff;
            a += static_cast<double>(ref(r, c)) * ref(r, c);
          }
          token[b] += e / std::max(a, 1e-30);
          err[b] += e;
          energy[b] += a;
        }
        if (b == 0) tokens += L;
      }
    }
    for (size_t b = 0; b < K; ++b) {
      token[b] /= static_cast<double>(std::max<int64_t>(tokens, 1));
      err[b] /= std::max(energy[b], 1e-30);
    }
    return {token, err};
  }

 private:
  template <class T>
  static Tensor<float> to_float(const Tensor<T>& t) {
    const Tensor<T> h = t.is_cpu() ? t : t.to(Device::cpu);
    if constexpr (std::is_same_v<T, float>) {
      return h.clone();
    } else {
      return h.template cast<float>();
    }
  }
  template <class T>
  static Tensor<T> from_float(const Tensor<float>& t, Device device) {
    Tensor<T> c;
    if constexpr (std::is_same_v<T, float>) {
      c = t;
    } else {
      c = t.template cast<T>();
    }
    return device == Device::cpu ? c : c.to(device);
  }
  std::vector<std::vector<int32_t>> inputs_;
  std::vector<std::vector<Tensor<float>>> outputs_;  // [block][sample]
};

// A method's entry of the report without the block errors (RunReport::add measures those).
inline nlohmann::json method_json(const std::string& method, const QuantizationResult& r,
                                  double perplexity) {
  nlohmann::json m = {
      {"method", method},     {"config", r.config}, {"perplexity", perplexity},
      {"seconds", r.seconds}, {"kl", nullptr},      {"windows_kept_start", r.windows_kept_start()}};
  m["block_error"] = nlohmann::json::array();
  m["block_error_energy"] = nlohmann::json::array();
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerResult& l : r.layers)
    layers.push_back({{"name", l.name},
                      {"step_change", l.step_change},
                      {"rounding_flips", l.rounding_flips},
                      {"codes_changed", l.codes_changed},
                      {"output_error_start", l.output_error_start},
                      {"output_error", l.output_error}});
  m["layers"] = layers;
  nlohmann::json windows = nlohmann::json::array();
  for (const WindowStats& w : r.windows) windows.push_back(window_json(w));
  m["windows"] = windows;
  if (!r.dependencies.empty()) m["dependencies"] = r.dependencies;
  if (!r.groups.empty()) {
    nlohmann::json groups = nlohmann::json::array();
    for (const auto& g : r.groups)
      groups.push_back({{"first", g.first}, {"last", g.last}, {"units", g.label}});
    m["groups"] = groups;
  }
  return m;
}

// The balance of a CBQ run's window loss terms as a Markdown table: per window the targets'
// energy, the L2 and KL terms (both targets summed) and γ·L_round at the start and end, the
// change the hard rounding makes, and the start-vs-trained decision.
inline std::string balance_table(const nlohmann::json& method) {
  std::string s =
      "| window | blocks | energy | start l2 | start kld | start γ·round | end l2 | end kld | "
      "end γ·round | Δ hard | judged on | start → trained | keeps |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  int index = 0;
  for (const auto& w : method.at("windows")) {
    auto term = [&](const char* when, const char* a, const char* b) {
      return w.at(when).at(a).get<double>() + w.at(when).at(b).get<double>();
    };
    auto reconstruction = [&](const char* when) {
      const auto& l = w.at(when);
      return l.at("l2_fp").get<double>() + l.at("kld_fp").get<double>() +
             l.at("l2_hom").get<double>() + l.at("kld_hom").get<double>() +
             l.at("output_kld").get<double>() + l.value("attention_kl", 0.0) +
             l.value("boundary", 0.0);
    };
    const bool judged = w.at("judged").get<bool>();
    const int64_t heldout = w.at("heldout").get<int64_t>();
    s += fmt::format(
        "| {} | {}..{} | {:.4g} | {:.4g} | {:.4g} | {:.4g} | {:.4g} | {:.4g} | {:.4g} | {:+.2g} | "
        "{} | "
        "{} | {} |\n",
        ++index, w.at("first").get<int64_t>(), w.at("last").get<int64_t>(),
        w.at("energy").at(0).get<double>(), term("before", "l2_fp", "l2_hom"),
        term("before", "kld_fp", "kld_hom"), w.at("before").at("round").get<double>(),
        term("after", "l2_fp", "l2_hom"), term("after", "kld_fp", "kld_hom"),
        w.at("after").at("round").get<double>(), reconstruction("hard") - reconstruction("after"),
        judged ? (heldout > 0 ? fmt::format("{} held out", heldout) : std::string("training"))
               : std::string("—"),
        judged ? fmt::format("{:.4g} → {:.4g}", reconstruction("heldout_start"),
                             reconstruction("heldout_trained"))
               : std::string("—"),
        judged && w.at("kept_start").get<bool>()
            ? (w.value("diverged", std::string()).empty() ? "start" : "start (diverged)")
            : "trained");
  }
  return s;
}

// The charts of one report (its JSON), and the perplexity-vs-bits chart over several.
inline std::string loss_curves_svg(const nlohmann::json& run) {
  std::vector<LineChart> charts;
  for (const auto& m : run.at("methods")) {
    if (m.at("windows").empty()) continue;
    int index = 0;
    for (const auto& w : m.at("windows")) {
      ++index;
      LineChart c;
      c.title = fmt::format("{} window {} [{}..{}]{}", m.at("method").get<std::string>(), index,
                            w.at("first").get<int64_t>(), w.at("last").get<int64_t>(),
                            w.at("judged").get<bool>()
                                ? (w.at("kept_start").get<bool>() ? ": kept start" : ": trained")
                                : "");
      c.x_label = "step";
      c.y_label = "loss term";
      c.log_y = true;
      const auto& curve = w.at("curve");
      auto sum = [&](const char* a, const char* b) {
        std::vector<double> v = curve.at(a).get<std::vector<double>>();
        const std::vector<double> u = curve.at(b).get<std::vector<double>>();
        for (size_t i = 0; i < v.size() && i < u.size(); ++i) v[i] += u[i];
        return v;
      };
      auto add = [&](const std::string& name, std::vector<double> y, bool dashed = false) {
        bool any = false;
        for (double v : y) any = any || v > 0;
        if (!any) return;
        Series s;
        s.name = name;
        s.y = std::move(y);
        for (size_t i = 0; i < s.y.size(); ++i) s.x.push_back(static_cast<double>(i));
        s.dashed = dashed;
        s.color = series_color(c.series.size() + (name == "γ·round" ? 4 : 0));
        c.series.push_back(std::move(s));
      };
      add("total", curve.at("total").get<std::vector<double>>());
      add("l2", sum("l2_fp", "l2_hom"));
      add("kld", sum("kld_fp", "kld_hom"));
      add("output kld", curve.at("output_kld").get<std::vector<double>>());
      add("γ·round", curve.at("round").get<std::vector<double>>(), true);
      charts.push_back(std::move(c));
    }
  }
  if (charts.empty()) return "";
  return svg_grid(charts, std::min<int>(4, static_cast<int>(charts.size())), 380, 260);
}

inline std::string block_errors_svg(const nlohmann::json& run) {
  BarChart c;
  c.title = fmt::format("{}: block output error", run.value("label", std::string()));
  c.x_label = fmt::format("block (per-token relative error over {} calibration samples)",
                          run.value("error_samples", 0));
  c.y_label = "mean_t ‖h_q − h_fp‖² / ‖h_fp‖²";
  c.log_y = true;
  size_t blocks = 0;
  for (const auto& m : run.at("methods")) {
    Series s;
    s.name = m.at("method").get<std::string>();
    s.y = m.at("block_error").get<std::vector<double>>();
    blocks = std::max(blocks, s.y.size());
    if (!s.y.empty()) c.series.push_back(std::move(s));
  }
  if (c.series.empty()) return "";
  for (size_t b = 0; b < blocks; ++b) c.categories.push_back(std::to_string(b));
  const double width = std::max({480.0, 60.0 + 26.0 * static_cast<double>(blocks * c.series.size()),
                                 7.5 * static_cast<double>(c.title.size())});
  return svg(c, width, 360);
}

// Every CBQ layer's output error ‖x(Ŵ − W)ᵀ‖² / ‖xWᵀ‖² on its quantized-path inputs, for the
// start's weight (RTN or GPTQ) and the final one, one panel per block (layer names
// "layers.B.NAME"); each layer's label carries the fraction of its codes that changed from the
// start's.
inline std::string layer_errors_svg(const nlohmann::json& run) {
  std::vector<BarChart> charts;
  for (const auto& m : run.at("methods")) {
    if (m.at("layers").empty() || m.at("windows").empty()) continue;
    std::map<int64_t, BarChart> blocks;
    for (const auto& l : m.at("layers")) {
      const std::string name = l.at("name").get<std::string>();
      int64_t block = -1;
      std::string shortname = name;
      if (const auto dot = name.find('.'); dot != std::string::npos) {
        const auto dot2 = name.find('.', dot + 1);
        const std::string num = name.substr(dot + 1, dot2 - dot - 1);
        if (!num.empty() &&
            std::all_of(
                num.begin(), num.end(),
                [](char ch) { return std::isdigit(static_cast<unsigned char>(ch)) != 0; }) &&
            dot2 != std::string::npos) {
          block = std::stoll(num);
          shortname = name.substr(dot2 + 1);
        }
      }
      for (const char* suffix : {"_proj", "fc"})
        if (const auto at = shortname.rfind(suffix);
            at != std::string::npos && at + std::strlen(suffix) == shortname.size() && at > 0)
          shortname = shortname.substr(0, at);
      BarChart& c = blocks[block];
      if (c.series.empty()) {
        c.title = fmt::format("{} block {}", m.at("method").get<std::string>(), block);
        c.y_label = "layer output error";
        c.x_label = "layer, codes changed from the start";
        c.log_y = true;
        c.series.resize(2);
        c.series[0].name = "start";
        c.series[0].color = "#999999";
        c.series[1].name = "final";
        c.series[1].color = series_color(1);
      }
      c.categories.push_back(
          fmt::format("{} {:.0f}%", shortname, 100 * l.at("codes_changed").get<double>()));
      c.series[0].y.push_back(l.at("output_error_start").get<double>());
      c.series[1].y.push_back(l.at("output_error").get<double>());
    }
    for (auto& [block, c] : blocks) charts.push_back(std::move(c));
  }
  if (charts.empty()) return "";
  return svg_grid(charts, std::min<int>(5, static_cast<int>(charts.size())), 460, 260);
}

// Perplexity (metric "perplexity") or mean KL divergence from FP (metric "kl") against weight
// bits, one series per method × granularity × activation bits (× model, when the reports hold
// several), the mean over the reports (seeds) at each bit width with min–max bars; FP dashed
// (perplexity only: its KL is 0).
inline std::string metric_vs_bits_svg(const std::vector<nlohmann::json>& runs,
                                      const std::string& metric) {
  const bool kl = metric == "kl";
  auto value_of = [&](const nlohmann::json& m) -> std::optional<double> {
    const char* key = kl ? "kl" : "perplexity";
    if (!m.contains(key)) return std::nullopt;
    const nlohmann::json& v =
        kl && m.at(key).is_object() ? m.at(key).value("mean", nlohmann::json()) : m.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>())) return std::nullopt;
    return v.get<double>();
  };
  std::set<std::string> models;
  for (const auto& r : runs) models.insert(r.value("model", std::string()));
  std::map<std::string, std::map<int, std::vector<double>>> points;  // series → bits → values
  std::vector<double> fp;
  std::set<int> all_bits;
  for (const auto& r : runs) {
    const auto& st = r.at("settings");
    const int bits = st.at("wbits").get<int>();
    const int64_t group = st.at("group").get<int64_t>();
    const int abits = st.at("abits").get<int>();
    const std::string suffix =
        fmt::format(" {}{}{}", group > 0 ? fmt::format("g{}", group) : "per-channel",
                    abits < 16 ? fmt::format(" A{}", abits) : "",
                    models.size() > 1 ? " " + r.value("model", std::string()) : "");
    if (!kl && r.contains("fp") && r.at("fp").contains("perplexity"))
      fp.push_back(r.at("fp").at("perplexity").get<double>());
    all_bits.insert(bits);
    for (const auto& m : r.at("methods"))
      if (const auto v = value_of(m); v && m.at("method") != "fp32")
        points[m.at("method").get<std::string>() + suffix][bits].push_back(*v);
  }
  if (points.empty()) return "";
  LineChart c;
  c.title = std::string(kl ? "KL divergence from FP" : "perplexity") + " vs weight bits" +
            (models.size() == 1 && !models.begin()->empty() ? " (" + *models.begin() + ")" : "");
  c.x_label = "weight bits";
  c.y_label = kl ? "mean KL(FP ‖ quantized), nats per token" : "perplexity";
  c.log_y = true;
  for (int b : all_bits) c.x_ticks.emplace_back(b, std::to_string(b));
  for (const auto& [name, by_bits] : points) {
    Series s;
    s.name = name;
    s.markers = true;
    for (const auto& [bits, v] : by_bits) {
      double mean = 0;
      for (double x : v) mean += x / static_cast<double>(v.size());
      s.x.push_back(bits);
      s.y.push_back(mean);
      s.y_low.push_back(*std::min_element(v.begin(), v.end()));
      s.y_high.push_back(*std::max_element(v.begin(), v.end()));
    }
    c.series.push_back(std::move(s));
  }
  if (!fp.empty() && !all_bits.empty() && models.size() == 1) {
    Series s;
    s.name = "fp32";
    s.color = "#000000";
    s.dashed = true;
    double mean = 0;
    for (double x : fp) mean += x / static_cast<double>(fp.size());
    s.x = {static_cast<double>(*all_bits.begin()), static_cast<double>(*all_bits.rbegin())};
    s.y = {mean, mean};
    c.series.push_back(std::move(s));
  }
  return svg(c, 640, 420);
}
inline std::string perplexity_vs_bits_svg(const std::vector<nlohmann::json>& runs) {
  return metric_vs_bits_svg(runs, "perplexity");
}

inline void write_text(const std::filesystem::path& path, const std::string& text) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    CBQ_CHECK(out.good(), "report: cannot write {}", tmp.string());
    out << text;
    out.flush();
    CBQ_CHECK(out.good(), "report: writing {} failed", tmp.string());
  }
  std::filesystem::rename(tmp, path);
}

// Every report JSON in `dir` (files carrying format cbq-report-1).
inline std::vector<nlohmann::json> read_reports(const std::string& dir) {
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".json") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  std::vector<nlohmann::json> out;
  for (const auto& f : files) {
    std::ifstream in(f);
    nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.value("format", std::string()) == kReportFormat)
      out.push_back(std::move(j));
  }
  return out;
}

// Renders the charts of every report in `dir` (and the chart across them); returns the files.
inline std::vector<std::string> render_dir(const std::string& dir) {
  std::vector<std::string> written;
  const std::vector<nlohmann::json> runs = read_reports(dir);
  for (const auto& r : runs) {
    const std::string label = slug(r.value("label", std::string("run")));
    for (const auto& [suffix, text] :
         {std::pair<std::string, std::string>{"-loss.svg", loss_curves_svg(r)},
          {"-blocks.svg", block_errors_svg(r)},
          {"-layers.svg", layer_errors_svg(r)}}) {
      if (text.empty()) continue;
      const auto path = std::filesystem::path(dir) / (label + suffix);
      write_text(path, text);
      written.push_back(path.string());
    }
  }
  for (const char* metric : {"perplexity", "kl"}) {
    const std::string chart = metric_vs_bits_svg(runs, metric);
    if (chart.empty()) continue;
    const auto path = std::filesystem::path(dir) / (std::string(metric) + "-vs-bits.svg");
    write_text(path, chart);
    written.push_back(path.string());
  }
  return written;
}

class RunReport {
 public:
  RunReport(std::string dir, std::string label, std::string model)
      : dir_(std::move(dir)), label_(slug(label)) {
    CBQ_CHECK(!dir_.empty(), "report: empty directory");
    std::error_code ec;
    std::filesystem::create_directories(dir_, ec);
    CBQ_CHECK(!ec, "report: cannot create directory {}: {}", dir_, ec.message());
    json_ = {{"format", kReportFormat},
             {"label", label_},
             {"model", std::move(model)},
             {"methods", nlohmann::json::array()}};
  }
  void set_settings(const PassSpec& spec, uint64_t seed, int64_t samples, int64_t seq_len) {
    json_["settings"] = {
        {"wbits", spec.weight.bits},
        {"group", spec.weight.granularity == quant::Granularity::per_group ? spec.weight.group_size
                                                                           : int64_t{0}},
        {"abits", spec.act_bits},
        {"act", spec.act_bits >= 16 ? "none" : (spec.act_per_token ? "per-token" : "per-tensor")},
        {"quantizer", spec.describe_quantizer()},
        {"seed", seed},
        {"samples", samples},
        {"seq_len", seq_len}};
  }
  void set_fp(double perplexity) { json_["fp"] = {{"perplexity", perplexity}}; }
  template <class Model>
  void capture_fp(Model& model, const Calibration& calib, int64_t max_samples = 4) {
    errors_.capture(model, calib, max_samples);
    json_["error_samples"] = errors_.samples();
  }
  // Adds a method's run; `model` is the model it quantized (computing with its results).
  template <class Model>
  void add(const std::string& method, const QuantizationResult& r, double perplexity,
           Model& model) {
    nlohmann::json m = method_json(method, r, perplexity);
    std::vector<double> token, energy;
    if (errors_.captured()) std::tie(token, energy) = errors_.measure(model);
    m["block_error"] = token;
    m["block_error_energy"] = energy;
    json_["methods"].push_back(std::move(m));
  }
  // The KL-divergence statistics of a method (mean, median, p99, top-1 agreement, RMS Δp…),
  // filled in by the evaluation that measures them.
  void set_kl(const std::string& method, nlohmann::json kl) {
    for (auto& m : json_["methods"])
      if (m.at("method") == method) m["kl"] = std::move(kl);
  }
  const nlohmann::json& json() const { return json_; }
  std::string json_path() const {
    return (std::filesystem::path(dir_) / (label_ + ".json")).string();
  }
  // Writes the JSON and renders every chart in the directory; returns the files written.
  std::vector<std::string> write() const {
    write_text(json_path(), json_.dump(1) + "\n");
    std::vector<std::string> files{json_path()};
    for (const std::string& f : render_dir(dir_)) files.push_back(f);
    return files;
  }

 private:
  std::string dir_, label_;
  nlohmann::json json_;
  BlockErrors errors_;
};

}  // namespace cbq::report
