// Run reports (report/report.hpp) and their SVG charts (report/svg.hpp).
#include <cbq/model/llama_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/report/report.hpp>
#include <cmath>

#include "support/files.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;

namespace {
// Counts of `needle` in `hay`.
size_t count(const std::string& hay, const std::string& needle) {
  size_t n = 0;
  for (size_t p = hay.find(needle); p != std::string::npos; p = hay.find(needle, p + 1)) ++n;
  return n;
}
Calibration tiny_calibration(int64_t vocab, int64_t n, int64_t L) {
  std::vector<int32_t> tokens;
  for (int64_t i = 0; i < 400; ++i) tokens.push_back(static_cast<int32_t>((i * 7 + i / 3) % vocab));
  return sample_calibration(tokens, n, L, 3);
}
}  // namespace

TEST_CASE("svg: charts are well-formed and place their data") {
  report::LineChart c;
  c.title = "a <title> & more";
  c.log_y = true;
  report::Series s;
  s.name = "loss";
  s.x = {0, 1, 2, 3};
  s.y = {1, 0.1, 0.01, std::nan("")};  // a NaN point is skipped, not drawn as "nan"
  c.series.push_back(s);
  const std::string svg = report::svg(c);
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
  CHECK(svg.find("a &lt;title&gt; &amp; more") != std::string::npos);
  CHECK(svg.find("nan") == std::string::npos);
  CHECK(svg.find("inf") == std::string::npos);
  CHECK(count(svg, "<polyline") == 1);
  // Three finite points: the polyline has three coordinate pairs, decreasing y values going up.
  const size_t p = svg.find("points=\"");
  REQUIRE(p != std::string::npos);
  const std::string points = svg.substr(p + 8, svg.find('"', p + 8) - p - 8);
  CHECK(count(points, ",") == 3);
  // Log axis: ticks at the decades 0.01, 0.1, 1.
  CHECK(svg.find(">0.01<") != std::string::npos);
  CHECK(svg.find(">1<") != std::string::npos);

  report::BarChart b;
  b.categories = {"0", "1", "2"};
  report::Series r;
  r.name = "rtn";
  r.y = {3, 2, 1};
  report::Series q;
  q.name = "cbq";
  q.y = {1, 0.5, 0.25};
  b.series = {r, q};
  const std::string bars = report::svg(b);
  CHECK(count(bars, "</title></rect>") == 6);            // six bars (besides the frame)
  CHECK(bars.find("cbq 2: 0.25") != std::string::npos);  // each bar carries its value
  // Taller value, taller bar: the rtn bar of category 0 is three times category 2's.
  auto height_of = [&](const std::string& key) {
    const size_t at = bars.find(key);
    REQUIRE(at != std::string::npos);
    const size_t rect = bars.rfind("<rect", at);
    const size_t h = bars.find("height=\"", rect);
    return std::stod(bars.substr(h + 8));
  };
  CHECK(height_of("rtn 0: 3") == doctest::Approx(3 * height_of("rtn 2: 1")).epsilon(0.01));
}

TEST_CASE("report: JSON of RTN and CBQ runs, block errors, charts in the directory") {
  cbq::testing::TempDir dir("report");
  ModelConfig c = tiny_llama_config();
  const Calibration calib = tiny_calibration(c.vocab_size, 6, 12);
  PassSpec spec;
  spec.weight = quant::GridSpec{3, false, quant::Granularity::per_group, 8};
  spec.rank = 2;
  for (uint64_t seed : {0, 1}) {
    report::RunReport rep(dir.path.string(), fmt::format("tiny W3 seed{}", seed), "tiny");
    rep.set_settings(spec, seed, calib.size(), calib.seq_len);
    Transformer<LlamaBlock<float>> fp(c, random_weights(c, 5));
    rep.capture_fp(fp, calib);
    rep.set_fp(10.0);
    // An unquantized model has no block error.
    rep.add("fp32", QuantizationResult{}, 10.0, fp);
    Transformer<LlamaBlock<float>> rtn(c, random_weights(c, 5));
    std::vector<Tensor<float>> x;
    for (const auto& s : calib.samples) x.push_back(rtn.embed_tensor(s));
    const QuantizationResult r = quantize_baseline(rtn, Baseline::rtn, spec, x, {}, false);
    rep.add("rtn", r, 12.0 + static_cast<double>(seed), rtn);
    Transformer<LlamaBlock<float>> cbq_model(c, random_weights(c, 5));
    PassOptions o;
    o.verbose = false;
    o.epochs = 2;
    o.seed = seed;
    const QuantizationResult q = CbqPass(spec, o).run(cbq_model, calib);
    rep.add("cbq", q, 11.0, cbq_model);
    // KL of the CBQ model from the FP one on a short text, as cbq-quantize --report records it.
    std::vector<int32_t> text;
    for (int i = 0; i < 48; ++i) text.push_back(static_cast<int32_t>((i * 5 + 1) % c.vocab_size));
    eval::KlOptions ko;
    ko.ctx = 12;
    const eval::KlDivergenceResult kl = eval::kl_divergence(fp, cbq_model, text, ko);
    REQUIRE(std::isfinite(kl.mean));
    CHECK(kl.mean > 0);  // 3-bit weights change the output distribution
    rep.set_kl("cbq", report::kl_json(kl));
    const auto files = rep.write();
    const nlohmann::json& j = rep.json();
    CHECK(j.at("format") == report::kReportFormat);
    CHECK(j.at("settings").at("wbits") == 3);
    CHECK(j.at("settings").at("group") == 8);
    REQUIRE(j.at("methods").size() == 3);
    const auto& fpm = j.at("methods")[0];
    for (double e : fpm.at("block_error").get<std::vector<double>>()) CHECK(e == 0);
    const auto& rtnm = j.at("methods")[1];
    const auto& cbqm = j.at("methods")[2];
    const auto rtn_err = rtnm.at("block_error").get<std::vector<double>>();
    REQUIRE(rtn_err.size() == static_cast<size_t>(c.n_layers));
    for (double e : rtn_err) CHECK((std::isfinite(e) && e > 0));
    CHECK(cbqm.at("kl").at("mean") == kl.mean);
    CHECK(cbqm.at("kl").at("positions") == kl.positions);
    CHECK(rtnm.at("kl").is_null());
    REQUIRE(cbqm.at("windows").size() == q.windows.size());
    const auto& w0 = cbqm.at("windows")[0];
    CHECK(w0.at("curve").at("total").size() == static_cast<size_t>(q.windows[0].steps));
    CHECK(w0.at("kept_start") == q.windows[0].kept_start);
    CHECK(w0.at("heldout") == q.windows[0].heldout);
    CHECK(cbqm.at("layers").size() == q.layers.size());
    CHECK(cbqm.at("layers")[0].at("output_error") == q.layers[0].output_error);
    // The balance table: a header, a separator and one row per window, with its decision.
    const std::string table = report::balance_table(cbqm);
    CHECK(count(table, "\n") == q.windows.size() + 2);
    CHECK(count(table, " held out |") == q.windows.size());
    CHECK(table.find(q.windows[0].kept_start ? "| start |" : "| trained |") != std::string::npos);
    // Written: the JSON, the loss curves and block errors of this run, the chart across runs.
    const std::string label = report::slug(fmt::format("tiny W3 seed{}", seed));
    CHECK(std::filesystem::exists(dir.file(label + ".json")));
    const std::string loss = cbq::testing::read_all(dir.file(label + "-loss.svg"));
    CHECK(count(loss, "window ") == q.windows.size());
    CHECK(std::filesystem::exists(dir.file(label + "-blocks.svg")));
    // One panel per block of the CBQ layers, each layer with its start and final error.
    const std::string layers = cbq::testing::read_all(dir.file(label + "-layers.svg"));
    CHECK(count(layers, "cbq block ") == static_cast<size_t>(c.n_layers));
    CHECK(count(layers, "</title></rect>") == 2 * q.layers.size());
    CHECK(layers.find("nan") == std::string::npos);
    CHECK(files.size() >= 4);
  }
  // The chart across runs has the mean of the two seeds' RTN perplexities (12, 13) at 3 bits.
  const auto runs = report::read_reports(dir.path.string());
  REQUIRE(runs.size() == 2);
  const std::string bits = cbq::testing::read_all(dir.file("perplexity-vs-bits.svg"));
  CHECK(bits.find("rtn g8") != std::string::npos);
  CHECK(bits.find("cbq g8") != std::string::npos);
  CHECK(bits.find("fp32") != std::string::npos);
  CHECK(bits.find("</svg>") != std::string::npos);
  // Only CBQ has KL statistics: the KL chart has its series and no RTN or FP line.
  const std::string kl_chart = cbq::testing::read_all(dir.file("kl-vs-bits.svg"));
  CHECK(kl_chart.find("cbq g8") != std::string::npos);
  CHECK(kl_chart.find("rtn g8") == std::string::npos);
  CHECK(kl_chart.find("fp32") == std::string::npos);
  CHECK(kl_chart.find("nan") == std::string::npos);
}

TEST_CASE("report: an adaptive-groups run records its dependencies and groups") {
  QuantizationResult r;
  CHECK_FALSE(report::method_json("cbq", r, 5.0).contains("groups"));
  r.dependencies = {0.5, 1.25};
  r.groups = {{0, 0, "unit 0.attention"}, {1, 2, "units 0.ffn..1.attention"}};
  const nlohmann::json m = report::method_json("acbq", r, 5.0);
  CHECK(m.at("dependencies").get<std::vector<double>>() == r.dependencies);
  REQUIRE(m.at("groups").size() == 2);
  CHECK(m.at("groups")[1].at("first") == 1);
  CHECK(m.at("groups")[1].at("last") == 2);
  CHECK(m.at("groups")[1].at("units") == "units 0.ffn..1.attention");
}
