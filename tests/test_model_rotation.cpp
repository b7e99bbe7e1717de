#include <cbq/core/mmap.hpp>
#include <cbq/export/export.hpp>
#include <cbq/formats/llama2c.hpp>
#include <cbq/model/load.hpp>
#include <cbq/model/opt_block.hpp>
#include <cbq/model/random.hpp>
#include <cbq/model/rotation.hpp>
#include <cbq/pass/pass.hpp>
#include <filesystem>
#include <optional>
#include <string>

#include "support/fixtures.hpp"
#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::max_abs;
using cbq::testing::max_abs_diff;
using cbq::testing::quiet_options;
using cbq::testing::random_hidden;
using cbq::testing::random_tokens;

namespace {

// stories260K and the first 256 tokens of the TinyStories excerpt; nullopt, with a message, when
// the model is not shipped.
struct StoriesProbe {
  AnyModel model;
  std::vector<int32_t> probe;
  std::string path;            // the llama2.c file
  std::vector<int32_t> after;  // the tokens after the probe (calibration text for fits)
};
std::optional<StoriesProbe> load_stories_probe() {
  namespace fs = std::filesystem;
  const fs::path data = cbq::testing::data_dir();
  const fs::path bin = data / "models" / "stories260K.bin";
  if (!fs::exists(bin)) {
    MESSAGE("skipped: stories260K.bin not found under " << data.string());
    return std::nullopt;
  }
  StoriesProbe s{
      load_model(bin.string(), (data / "models" / "tok512.bin").string()), {}, bin.string()};
  const std::string text =
      io::read_text_file((data / "text" / "tinystories_train_excerpt.txt").string());
  const auto all = s.model.llama().tokenizer->encode(text, true, false);
  REQUIRE(all.size() > 400);
  s.probe.assign(all.begin(), all.begin() + 256);
  s.after.assign(all.begin() + 256, all.end());
  return s;
}

// Largest |logit change| of rotating `model` with `opt` (the tape path, logits()) and largest
// |NLL change| (the tape-free path, token_nll()), after checking that the weights did change (an
// identity "rotation" would pass trivially).
struct Change {
  double logits = 0, nll = 0;
};

// Norm parameters not at their folded value (weights 1; OPT's block biases 0) after R1.
template <class T>
int64_t unfolded_norm_entries(Transformer<LlamaBlock<T>>& model) {
  int64_t left = 0;
  for (auto& b : model.blocks)
    for (int64_t i = 0; i < model.config.dim; ++i)
      left += (b.input_layernorm.value[i] != T(1)) + (b.post_attention_layernorm.value[i] != T(1));
  for (int64_t i = 0; i < model.config.dim; ++i) left += model.final_norm_weight.value[i] != T(1);
  return left;
}
template <class T>
int64_t unfolded_norm_entries(Transformer<OptBlock<T>>& model) {
  int64_t left = 0;
  for (auto& b : model.blocks)
    for (int64_t i = 0; i < model.config.dim; ++i)
      left += (b.self_attn_layer_norm_weight.value[i] != T(1)) +
              (b.final_layer_norm_weight.value[i] != T(1)) +
              (b.self_attn_layer_norm_bias.value[i] != T(0)) +
              (b.final_layer_norm_bias.value[i] != T(0));
  for (int64_t i = 0; i < model.config.dim; ++i) left += model.final_norm_weight.value[i] != T(1);
  return left;  // the final norm keeps a bias (β/γ, rotated)
}

template <class Block>
Change rotation_change(Transformer<Block>& model, const RotationOptions& opt,
                       const std::vector<int32_t>& tokens, RotationReport* report) {
  using T = typename Block::scalar_type;
  using Sites = detail::RotationSites<Block>;
  const int64_t last = static_cast<int64_t>(tokens.size()) - 2;
  const std::vector<double> nll_before = model.token_nll(tokens, 0, last);
  const Tensor<T> before = model.logits(tokens).clone();
  const Tensor<T> embed0 = model.embed_tokens.value.clone(),
                  v0 = model.blocks[0].v_proj.weight.value.clone(),
                  o0 = Sites::attention_out(model.blocks[0]).weight.value.clone(),
                  mlp_out0 = Sites::mlp_out(model.blocks[1]).weight.value.clone();
  Tensor<T> pos0;
  if constexpr (Sites::layer_norm) pos0 = model.embed_positions.value.clone();
  *report = rotate_model(model, opt);
  CHECK((max_abs_diff(model.embed_tokens.value, embed0) > 1e-3) == opt.r1);
  if constexpr (Sites::layer_norm)  // OPT's positions are residual vectors too
    CHECK((max_abs_diff(model.embed_positions.value, pos0) > 1e-3) == opt.r1);
  CHECK((max_abs_diff(Sites::mlp_out(model.blocks[1]).weight.value, mlp_out0) > 1e-3) ==
        (opt.r1 || opt.r4));
  if (opt.r1 || opt.r2) {
    CHECK(max_abs_diff(model.blocks[0].v_proj.weight.value, v0) > 1e-3);
    CHECK(max_abs_diff(Sites::attention_out(model.blocks[0]).weight.value, o0) > 1e-3);
  }
  if (opt.r1) {
    CHECK(report->folded_norms);
    CHECK_FALSE(model.config.tied_embeddings);
    CHECK(unfolded_norm_entries(model) == 0);
  }
  const Tensor<T> after = model.logits(tokens);
  Change change{max_abs_diff(after, before), 0};
  const std::vector<double> nll_after = model.token_nll(tokens, 0, last);
  REQUIRE(nll_after.size() == nll_before.size());
  for (size_t i = 0; i < nll_after.size(); ++i) {
    const double d = std::abs(nll_after[i] - nll_before[i]);
    change.nll = std::isnan(d) ? d : std::max(change.nll, d);  // a NaN must fail the check
  }
  return change;
}

// Beside tiny_llama_config (d 16, 4 query / 2 KV heads of 4, MLP 28 = Paley I q = 27): d 48 = 4·12
// (Paley I kernel), 6 / 2 heads of 8, MLP 40 = 2·20, biases on q/k/v and the MLP, a tied head.
ModelConfig wide_gqa_config() {
  ModelConfig wide = tiny_llama_config();
  wide.dim = 48;
  wide.hidden_dim = 40;
  wide.n_heads = 6;
  wide.n_kv_heads = 2;
  wide.head_dim = 8;
  wide.attention_bias = true;
  wide.mlp_bias = true;
  wide.tied_embeddings = true;
  return wide;
}

}  // namespace

TEST_CASE("rotation: a tiny GQA LLaMA computes the same logits after R1, R2 and both (double)") {
  for (ModelConfig cfg : {tiny_llama_config(), wide_gqa_config()}) {
    for (RotationOptions opt :
         {RotationOptions{true, false}, RotationOptions{false, true}, RotationOptions{true, true},
          RotationOptions{true, true, false, 9}}) {
      CAPTURE(cfg.dim);
      CAPTURE(opt.r1);
      CAPTURE(opt.r2);
      CAPTURE(opt.random_signs);
      Transformer<LlamaBlock<double>> model(cfg, random_weights(cfg, 42));
      RotationReport report;
      const auto tokens = random_tokens(11, cfg.vocab_size, 3);
      const double scale = max_abs(model.logits(tokens).clone());
      const Change change = rotation_change(model, opt, tokens, &report);
      MESSAGE("d " << cfg.dim << " R1 '" << report.r1 << "' R2 '" << report.r2
                   << "': max logit change " << change.logits << " (logits up to " << scale
                   << "), max NLL change " << change.nll);
      CHECK(change.logits < 1e-12 * std::max(1.0, scale));
      CHECK(change.nll < 1e-12);
      CHECK(report.untied_head == (opt.r1 && cfg.tied_embeddings));
    }
  }
}

// Float: the rotated and the original model round differently; the bound is 1e-5 of the largest
// |logit| (about 80 float ulps of it), for the logits and the NLLs alike.
TEST_CASE("rotation: the same tiny model in float keeps its logits within float rounding") {
  ModelConfig cfg = tiny_llama_config();
  cfg.tied_embeddings = true;
  Transformer<LlamaBlock<float>> model(cfg, random_weights(cfg, 7));
  const auto tokens = random_tokens(20, cfg.vocab_size, 5);
  Tensor<float> l = model.logits(tokens).clone();
  const double scale = max_abs(l.template cast<double>());
  RotationReport report;
  const Change change = rotation_change(model, RotationOptions{}, tokens, &report);
  MESSAGE("float tiny: max logit change " << change.logits << " (logits up to " << scale
                                          << "), max NLL change " << change.nll);
  CHECK(change.logits < 1e-5 * std::max(1.0, scale));
  CHECK(change.nll < 1e-5 * std::max(1.0, scale));
}

TEST_CASE("rotation: stories260K keeps its logits after R1 + R2, in float and in double") {
  std::optional<StoriesProbe> stories = load_stories_probe();
  if (!stories) return;
  LlamaModel& m = stories->model.llama();
  const std::vector<int32_t>& probe = stories->probe;
  const double scale = max_abs(m.logits(probe).clone().template cast<double>());
  RotationReport report;
  const Change f = rotation_change(m, RotationOptions{}, probe, &report);
  MESSAGE("stories260K float: R1 " << report.r1 << ", R2 " << report.r2 << "; max logit change "
                                   << f.logits << " (logits up to " << scale << "), max NLL change "
                                   << f.nll);
  CHECK(f.logits < 1e-5 * std::max(1.0, scale));
  CHECK(f.nll < 1e-5 * std::max(1.0, scale));

  io::Llama2cModel raw = io::load_llama2c(stories->path);
  Transformer<LlamaBlock<double>> md(raw.config, raw.weights);
  const Change d = rotation_change(md, RotationOptions{}, probe, &report);
  MESSAGE("stories260K double: max logit change " << d.logits << ", max NLL change " << d.nll);
  CHECK(d.logits < 1e-12 * std::max(1.0, scale));
  CHECK(d.nll < 1e-12);
}

TEST_CASE("rotation: unsupported sizes are refused naming the size, the model untouched") {
  // d 10 = 2·5 (R1) and head_dim 6 = 2·3 (R2, with d 16 fine) have no Hadamard construction.
  for (auto [dim, head_dim] : {std::pair<int64_t, int64_t>{10, 4}, {16, 6}}) {
    CAPTURE(dim);
    CAPTURE(head_dim);
    ModelConfig cfg = tiny_llama_config();
    cfg.dim = dim;
    cfg.head_dim = head_dim;
    cfg.tied_embeddings = true;
    Transformer<LlamaBlock<double>> model(cfg, random_weights(cfg, 1));
    const Tensor<double> norm0 = model.blocks[0].input_layernorm.value.clone();
    const Tensor<double> v0 = model.blocks[0].v_proj.weight.value.clone();
    const int64_t bad = dim == 10 ? dim : head_dim;
    try {
      rotate_model(model);
      FAIL("no error");
    } catch (const Error& e) {
      CAPTURE(e.what());
      CHECK(std::string(e.what()).find("size " + std::to_string(bad) + " ") != std::string::npos);
    }
    CHECK(max_abs_diff(model.blocks[0].input_layernorm.value, norm0) == 0);
    CHECK(max_abs_diff(model.blocks[0].v_proj.weight.value, v0) == 0);
    CHECK(model.config.tied_embeddings);
  }
}

namespace {
// Stands in for a quantization pass's transform (rotate_model must refuse a model that has one).
struct IdentityTransform final : LinearTransform<double> {
  Var<double> forward(Tape<double>& tape, LinearLayer<double>& layer, Var<double> x,
                      TransformLosses<double>*) override {
    return ops::linear(x, tape.param(layer.weight), Var<double>{});
  }
};

// Largest |x_ij| / rms(x_i) over the rows of the block inputs: how far a channel stands out.
double peak_to_rms(const std::vector<Tensor<float>>& hidden) {
  double worst = 0;
  for (const Tensor<float>& t : hidden) {
    const int64_t d = t.size(1);
    for (int64_t r = 0; r < t.size(0); ++r) {
      double ss = 0, peak = 0;
      for (int64_t j = 0; j < d; ++j) {
        ss += double(t[r * d + j]) * t[r * d + j];
        peak = std::max(peak, std::abs(double(t[r * d + j])));
      }
      worst = std::max(worst, peak / std::sqrt(ss / d));
    }
  }
  return worst;
}
}  // namespace

TEST_CASE("rotation: refused on a model with a quantization transform installed") {
  ModelConfig cfg = tiny_llama_config();
  Transformer<LlamaBlock<double>> model(cfg, random_weights(cfg, 2));
  model.blocks[1].down_proj.transform = std::make_shared<IdentityTransform>();
  CHECK_THROWS_WITH_AS(rotate_model(model), doctest::Contains("down_proj of block 1"), Error);
}

TEST_CASE("rotation: R1 flattens stories260K's residual stream (peak / rms per token)") {
  std::optional<StoriesProbe> stories = load_stories_probe();
  if (!stories) return;
  LlamaModel& m = stories->model.llama();
  const std::vector<int32_t>& probe = stories->probe;
  std::vector<Tensor<float>> before, after;
  m.logits(probe, &before);
  rotate_model(m);
  m.logits(probe, &after);
  const double pb = peak_to_rms(before), pa = peak_to_rms(after);
  MESSAGE("stories260K block inputs: largest peak/rms " << pb << " before, " << pa
                                                        << " after R1 (sqrt(64) = 8 is the bound)");
  CHECK(pa < pb);
}

TEST_CASE("rotation: fold_rms_norms alone keeps the logits and unties a tied head (double)") {
  ModelConfig cfg = tiny_llama_config();
  cfg.tied_embeddings = true;
  Transformer<LlamaBlock<double>> model(cfg, random_weights(cfg, 11));
  const auto tokens = random_tokens(9, cfg.vocab_size, 8);
  const Tensor<double> before = model.logits(tokens).clone();
  const Tensor<double> q0 = model.blocks[2].q_proj.weight.value.clone();
  CHECK(fold_rms_norms(model));
  CHECK_FALSE(model.config.tied_embeddings);
  REQUIRE(model.lm_head.value.defined());
  CHECK(max_abs_diff(model.blocks[2].q_proj.weight.value, q0) > 1e-3);  // the norm went in
  CHECK(max_abs_diff(model.logits(tokens), before) < 1e-13 * std::max(1.0, max_abs(before)));
  CHECK_FALSE(fold_rms_norms(model));  // untied now; folding unit norms again changes nothing
  CHECK(max_abs_diff(model.logits(tokens), before) < 1e-13 * std::max(1.0, max_abs(before)));
}

// R4: the MLP activation rotated online before down_proj (LlamaBlock::down_proj_rotation) with
// Q₄ folded into down_proj. Both evaluation paths apply it: logits() (the tape, ops::hadamard) and
// token_nll() (the tape-free infer(), HadamardTransform::apply).
TEST_CASE("rotation: R4 alone and with R1 + R2 keeps the logits (double, both paths)") {
  // hidden 28 = H_1 ⊗ Paley I (q = 27); the wide config's 40 = H_2 ⊗ Paley I (q = 19).
  for (ModelConfig cfg : {tiny_llama_config(), wide_gqa_config()}) {
    for (bool with_r12 : {false, true}) {
      CAPTURE(cfg.hidden_dim);
      CAPTURE(with_r12);
      RotationOptions opt;
      opt.r1 = opt.r2 = with_r12;
      opt.r4 = true;
      opt.seed = 5;
      Transformer<LlamaBlock<double>> model(cfg, random_weights(cfg, 21));
      const Tensor<double> down0 = model.blocks[1].down_proj.weight.value.clone();
      const auto tokens = random_tokens(13, cfg.vocab_size, 4);
      const double scale = max_abs(model.logits(tokens).clone());
      RotationReport report;
      const Change change = rotation_change(model, opt, tokens, &report);
      MESSAGE("hidden " << cfg.hidden_dim << " R4 '" << report.r4 << "': max logit change "
                        << change.logits << ", max NLL change " << change.nll);
      CHECK(!report.r4.empty());
      CHECK(report.r1.empty() != with_r12);
      CHECK(max_abs_diff(model.blocks[1].down_proj.weight.value, down0) > 1e-3);
      for (auto& b : model.blocks) {
        REQUIRE(b.down_proj_rotation != nullptr);
        CHECK(b.down_proj_rotation->size() == cfg.hidden_dim);
      }
      CHECK(change.logits < 1e-12 * std::max(1.0, scale));
      CHECK(change.nll < 1e-12);
      // The rotated activation is what down_proj reads: CFP/SmoothQuant have no site there.
      for (const auto& site : model.blocks[0].activation_sites())
        CHECK(site.name != "down_proj_in");
      CHECK(online_rotations(model).find("R4") != std::string::npos);
      // Once only.
      CHECK_THROWS_WITH_AS(rotate_model(model, opt), doctest::Contains("already has an R4"), Error);
    }
  }
}

TEST_CASE("rotation: stories260K's MLP size 172 needs the random orthogonal kernel for R4") {
  std::optional<StoriesProbe> stories = load_stories_probe();
  if (!stories) return;
  LlamaModel& m = stories->model.llama();
  REQUIRE(m.config.hidden_dim == 172);
  const Tensor<float> down0 = m.blocks[0].down_proj.weight.value.clone();
  RotationOptions opt;
  opt.r4 = true;
  // Refused by default, naming the size, before any weight changes (R1 and R2 included).
  const Tensor<float> embed0 = m.embed_tokens.value.clone();
  CHECK_THROWS_WITH_AS(rotate_model(m, opt), doctest::Contains("R4 (the MLP dimension, 172)"),
                       Error);
  CHECK_THROWS_WITH_AS(check_rotation(m.config, opt), doctest::Contains("size 172"), Error);
  CHECK(max_abs_diff(m.embed_tokens.value, embed0) == 0);
  CHECK(max_abs_diff(m.blocks[0].down_proj.weight.value, down0) == 0);
  CHECK(m.blocks[0].down_proj_rotation == nullptr);
  // Allowed: H_4 ⊗ a random orthogonal 43 × 43, and the same function in float.
  opt.allow_random_orthogonal = true;
  const double scale = max_abs(m.logits(stories->probe).clone().template cast<double>());
  RotationReport report;
  const Change f = rotation_change(m, opt, stories->probe, &report);
  MESSAGE("stories260K R1 + R2 + R4 (" << report.r4 << "): max logit change " << f.logits
                                       << " (logits up to " << scale << "), max NLL change "
                                       << f.nll);
  CHECK(report.r4.find("random orthogonal 43") != std::string::npos);
  CHECK(f.logits < 1e-5 * std::max(1.0, scale));
  CHECK(f.nll < 1e-5 * std::max(1.0, scale));
}

TEST_CASE("rotation: compile-time Rotation<...>") {
  const RotationOptions a = Rotation<R1, R4>::options(7);
  CHECK(a.r1);
  CHECK_FALSE(a.r2);
  CHECK(a.r4);
  CHECK(a.seed == 7);
  CHECK(a.describe() == "R1+R4");
  CHECK(Rotation<R2>::options().describe() == "R2");
  ModelConfig cfg = tiny_llama_config();
  Transformer<LlamaBlock<double>> x(cfg, random_weights(cfg, 3)), y(cfg, random_weights(cfg, 3));
  rotate_model(x, Rotation<R1, R2, R4>{}, 4);
  RotationOptions o;
  o.r4 = true;
  o.seed = 4;
  rotate_model(y, o);
  const auto tokens = random_tokens(6, cfg.vocab_size, 2);
  CHECK(max_abs_diff(x.logits(tokens).clone(), y.logits(tokens)) == 0);  // the same rotations
  CHECK_NOTHROW(check_rotation(tiny_opt_config(), Rotation<R1, R2, R4>::options()));
  CHECK_NOTHROW(check_rotation(cfg, Rotation<>::options()));  // nothing asked: nothing to refuse
  CHECK_NOTHROW(check_rotation(cfg, Rotation<R1, R2, R4>::options()));
}

TEST_CASE("rotation: every export refuses a model with R4, writing nothing") {
  namespace fs = std::filesystem;
  ModelConfig cfg = tiny_llama_config();
  cfg.dim = 32;  // GGUF needs rows of a multiple of 32
  cfg.hidden_dim = 64;
  cfg.head_dim = 8;
  const fs::path dir = fs::temp_directory_path() / "cbq_test_rotation_export";
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (ExportFormat f : {ExportFormat::native, ExportFormat::gguf, ExportFormat::gptq}) {
    CAPTURE(export_format_name(f));
    Transformer<LlamaBlock<float>> model(cfg, random_weights(cfg, 8));
    RotationOptions opt;
    opt.r4 = true;
    rotate_model(model, opt);
    QuantizationResult r;
    const fs::path out = dir / (std::string("m.") + export_format_name(f));
    CHECK_THROWS_WITH_AS(export_model(f, out.string(), model, r),
                         doctest::Contains("R4 rotation of the MLP activation"), Error);
    CHECK_FALSE(fs::exists(out));
  }
  fs::remove_all(dir);
}

namespace {
// A W3A4 CBQ pass over a rotated model: every window's loss falls (ops::hadamard's backward
// carries R4's gradient), the rotation stays in place, and the logits after are finite.
template <class Block>
void check_pass_through_rotation(const ModelConfig& c, const RotationOptions& rotation) {
  const auto x = random_hidden(4, 10, c.dim, 40);
  Transformer<Block> model(c, random_weights(c, 17));
  rotate_model(model, rotation);
  PassOptions o = quiet_options(2);
  o.keep_better = false;
  using APass = Pass<Quantizer<3, PerGroup<4>>, ActQuant<4>, SlidingWindow<2, 1>, LoraRounding<2>>;
  const QuantizationResult r = APass(o).run_from_hidden(model, x);
  REQUIRE(r.windows.size() == 2);
  for (const auto& w : r.windows) {
    CHECK(std::isfinite(w.loss_after.total));
    CHECK(w.loss_after.total < w.loss_before.total);
  }
  CHECK(online_rotations(model).empty() != rotation.r4);
  const Tensor<float> l = model.logits(random_tokens(8, c.vocab_size, 1));
  CHECK(std::isfinite(max_abs(l.template cast<double>())));
}
}  // namespace

TEST_CASE("rotation: the CBQ pass trains through R4 (ops::hadamard's backward), LLaMA and OPT") {
  check_pass_through_rotation<LlamaBlock<float>>(tiny_llama_config(), Rotation<R4>::options());
  check_pass_through_rotation<OptBlock<float>>(tiny_opt_config(), Rotation<R1, R2, R4>::options(1));
}

// ---- OPT: LayerNorms folded (γ, β into the readers), R1 kept to the mean direction ----

namespace {

// d 48 = 4·12 (Paley I), 6 heads of 8, FFN 40 = 2·20, an untied head.
ModelConfig wide_opt_config() {
  ModelConfig c = tiny_opt_config();
  c.dim = 48;
  c.hidden_dim = 40;
  c.n_heads = c.n_kv_heads = 6;
  c.head_dim = 8;
  c.tied_embeddings = false;
  return c;
}

}  // namespace

TEST_CASE(
    "rotation: the mean-keeping R1 of OPT keeps the all-ones direction and commutes with "
    "centring") {
  for (int64_t n : {16, 48, 64}) {
    CAPTURE(n);
    const auto h = ops::HadamardTransform::make(n, 5, true);
    const detail::RowRotation q = detail::mean_preserving(h);
    REQUIRE_FALSE(q.householder.empty());  // a randomised Hadamard moves the ones direction
    for (bool transpose : {false, true}) {
      std::vector<double> ones(static_cast<size_t>(n), 1.0);
      q.apply(ones.data(), 1, transpose);
      double worst = 0;
      for (double v : ones) worst = std::isnan(v) ? v : std::max(worst, std::abs(v - 1.0));
      CHECK(worst < 1e-12);
    }
    // centre(x·Q) = centre(x)·Q and Q is orthogonal (‖x·Q‖ = ‖x‖).
    std::vector<double> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x[i] = std::sin(1.7 * i) + 0.3;
    auto centre = [](std::vector<double> v) {
      double m = 0;
      for (double e : v) m += e;
      m /= v.size();
      for (double& e : v) e -= m;
      return v;
    };
    auto norm = [](const std::vector<double>& v) {
      double s = 0;
      for (double e : v) s += e * e;
      return std::sqrt(s);
    };
    std::vector<double> xq = x;
    q.apply(xq.data(), 1, false);
    CHECK(std::abs(norm(xq) - norm(x)) < 1e-12);
    std::vector<double> a = centre(xq), b = centre(x);
    q.apply(b.data(), 1, false);
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
    CHECK(worst < 1e-12);
  }
}

TEST_CASE(
    "rotation: a tiny OPT computes the same logits after R1, R2, R4 and all (double, both "
    "paths)") {
  for (ModelConfig cfg : {tiny_opt_config(), wide_opt_config()}) {
    for (RotationOptions opt :
         {RotationOptions{true, false}, RotationOptions{false, true}, RotationOptions{true, true},
          RotationOptions{true, true, false, 9}, RotationOptions{false, false, true, 2, true},
          RotationOptions{true, true, true, 4, true}}) {
      CAPTURE(cfg.dim);
      CAPTURE(opt.describe());
      CAPTURE(opt.random_signs);
      Transformer<OptBlock<double>> model(cfg, random_weights(cfg, 42));
      const auto tokens = random_tokens(11, cfg.vocab_size, 3);
      const double scale = max_abs(model.logits(tokens).clone());
      RotationReport report;
      const Change change = rotation_change(model, opt, tokens, &report);
      MESSAGE("OPT d " << cfg.dim << " " << report.summary() << ": max logit change "
                       << change.logits << " (logits up to " << scale << "), max NLL change "
                       << change.nll);
      CHECK(change.logits < 1e-12 * std::max(1.0, scale));
      CHECK(change.nll < 1e-12);
      CHECK(report.untied_head == (opt.r1 && cfg.tied_embeddings));
      CHECK((report.r1.find("mean-keeping reflection") != std::string::npos) == opt.r1);
      if (opt.r4) {
        for (auto& b : model.blocks) REQUIRE(b.fc2_rotation != nullptr);
        for (const auto& site : model.blocks[0].activation_sites()) CHECK(site.name != "fc2_in");
        CHECK(online_rotations(model).find("before fc2") != std::string::npos);
        CHECK_THROWS_WITH_AS(rotate_model(model, opt), doctest::Contains("already has an R4"),
                             Error);
      } else {
        CHECK(online_rotations(model).empty());
      }
    }
  }
}

TEST_CASE(
    "rotation: fold_layer_norms alone keeps OPT's logits; a zero final γ with a bias is "
    "refused, the model untouched") {
  ModelConfig cfg = tiny_opt_config();
  Transformer<OptBlock<double>> model(cfg, random_weights(cfg, 13));
  const auto tokens = random_tokens(9, cfg.vocab_size, 8);
  const Tensor<double> before = model.logits(tokens).clone();
  const Tensor<double> fc1 = model.blocks[1].fc1.bias.value.clone();
  CHECK(fold_layer_norms(model));
  CHECK(max_abs_diff(model.blocks[1].fc1.bias.value, fc1) > 1e-3);  // β went into the bias
  CHECK(max_abs_diff(model.logits(tokens), before) < 1e-13 * std::max(1.0, max_abs(before)));
  CHECK_FALSE(fold_layer_norms(model));  // folding unit norms again changes nothing
  CHECK(max_abs_diff(model.logits(tokens), before) < 1e-13 * std::max(1.0, max_abs(before)));

  Transformer<OptBlock<double>> bad(cfg, random_weights(cfg, 13));
  bad.final_norm_weight.value[3] = 0;
  const Tensor<double> q0 = bad.blocks[0].q_proj.weight.value.clone();
  CHECK_THROWS_WITH_AS(rotate_model(bad), doctest::Contains("final_layer_norm.weight[3] is 0"),
                       Error);
  CHECK(max_abs_diff(bad.blocks[0].q_proj.weight.value, q0) == 0);
  CHECK(bad.config.tied_embeddings);
  // A zero γ with a zero β is fine (that channel carries nothing to the head).
  bad.final_norm_bias.value[3] = 0;
  const Tensor<double> b0 = bad.logits(tokens).clone();
  rotate_model(bad);
  CHECK(max_abs_diff(bad.logits(tokens), b0) < 1e-12 * std::max(1.0, max_abs(b0)));
}

// The Hugging Face fixture (OPTForCausalLM, d 64, FFN 172, tied head) in float: R1 + R2, and R4
// with the random orthogonal kernel for 172.
TEST_CASE("rotation: the tiny-opt Hugging Face fixture keeps its logits in float") {
  const std::filesystem::path dir =
      std::filesystem::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / "tiny-opt";
  for (bool r4 : {false, true}) {
    CAPTURE(r4);
    AnyModel any = load_model(dir.string());
    REQUIRE(any.is_opt());
    auto& m = any.opt();
    const auto tokens =
        m.tokenizer->encode("Once upon a time, a little dog ran home.", true, false);
    REQUIRE(tokens.size() > 5);
    const double scale = max_abs(m.logits(tokens).clone().template cast<double>());
    RotationOptions opt;
    opt.r4 = r4;
    opt.allow_random_orthogonal = true;
    RotationReport report;
    const Change f = rotation_change(m, opt, tokens, &report);
    MESSAGE("tiny-opt float " << report.summary() << ": max logit change " << f.logits
                              << " (logits up to " << scale << "), max NLL change " << f.nll);
    CHECK(f.logits < 1e-5 * std::max(1.0, scale));
    CHECK(f.nll < 1e-5 * std::max(1.0, scale));
  }
}

// ---- Fitted online transforms (fit_online_transforms; docs/ROTATION.md) ----

namespace {

// Fits `fit` on a few random sequences and returns the largest logit and NLL change on `tokens`.
template <class Model>
Change fit_change(Model& model, const FitOptions& fit, const std::vector<int32_t>& tokens,
                  FittedTransformReport* report) {
  const auto before = model.logits(tokens).clone();
  const int64_t last = static_cast<int64_t>(tokens.size()) - 2;
  const std::vector<double> nll_before = model.token_nll(tokens, 0, last);
  std::vector<std::vector<int32_t>> samples;
  for (uint64_t s = 0; s < 3; ++s)
    samples.push_back(random_tokens(9, model.config.vocab_size, 60 + s));
  *report = fit_online_transforms(model, samples, fit);
  Change change{max_abs_diff(model.logits(tokens), before), 0};
  const std::vector<double> nll_after = model.token_nll(tokens, 0, last);
  REQUIRE(nll_after.size() == nll_before.size());
  for (size_t i = 0; i < nll_after.size(); ++i) {
    const double d = std::abs(nll_after[i] - nll_before[i]);
    change.nll = std::isnan(d) ? d : std::max(change.nll, d);
  }
  return change;
}

// The checks shared by LLaMA and OPT: same function, gains in (0, 1], the slots set, refusals.
template <class Block>
void check_fitted(const ModelConfig& cfg) {
  using Sites = detail::RotationSites<Block>;
  const auto tokens = random_tokens(12, cfg.vocab_size, 5);
  for (auto [down, mlp] : {std::pair{true, false}, std::pair{false, true}, std::pair{true, true}}) {
    CAPTURE(cfg.dim);
    CAPTURE(down);
    CAPTURE(mlp);
    Transformer<Block> model(cfg, random_weights(cfg, 77));
    RotationOptions rot;
    rot.r4 = true;
    rot.allow_random_orthogonal = true;
    rotate_model(model, rot);
    const double scale = max_abs(model.logits(tokens).clone());
    FitOptions fit{.down = down, .mlp_in = mlp, .seed = 3, .allow_random_orthogonal = true};
    FittedTransformReport report;
    const Change change = fit_change(model, fit, tokens, &report);
    MESSAGE("d " << cfg.dim << " " << report.summary() << ": max logit change " << change.logits
                 << ", max NLL change " << change.nll);
    CHECK(change.logits < 1e-9 * std::max(1.0, scale));
    CHECK(change.nll < 1e-9);
    CHECK(report.down_gain.size() == (down ? cfg.n_layers : 0u));
    CHECK(report.mlp_in_gain.size() == (mlp ? cfg.n_layers : 0u));
    for (const auto* gains : {&report.down_gain, &report.mlp_in_gain})
      for (double g : *gains) {
        CHECK(g > 0);
        CHECK(g <= 1 + 1e-12);  // Cauchy–Schwarz: never worse than the plain transform
      }
    for (Block& b : model.blocks) {
      REQUIRE(Sites::mlp_rotation(b) != nullptr);
      CHECK((Sites::mlp_rotation(b)->kernel_kind() == ops::HadamardTransform::KernelKind::dense) ==
            down);
      CHECK((Sites::mlp_input_transform(b) != nullptr) == mlp);
      bool mlp_site = false;  // CFP/SmoothQuant cannot scale through a fitted transform
      for (const auto& site : b.activation_sites())
        mlp_site = mlp_site || site.name == "mlp_in" || site.name == "fc1_in";
      CHECK(mlp_site != mlp);
    }
    std::vector<std::vector<int32_t>> one{random_tokens(5, cfg.vocab_size, 1)};
    CHECK_THROWS_WITH_AS(fit_online_transforms(model, one, fit),
                         doctest::Contains("already has a fitted transform"), Error);
    if (mlp)
      CHECK_THROWS_WITH_AS(rotate_model(model, RotationOptions{}),
                           doctest::Contains("rotate before fitting"), Error);
  }
  // Fitting R4 needs R4; no samples is an error; neither changes the model.
  Transformer<Block> plain(cfg, random_weights(cfg, 78));
  const auto w0 = Sites::mlp_out(plain.blocks[0]).weight.value.clone();
  std::vector<std::vector<int32_t>> one{random_tokens(5, cfg.vocab_size, 1)};
  CHECK_THROWS_WITH_AS(fit_online_transforms(plain, one, FitOptions{.mlp_in = false}),
                       doctest::Contains("has no R4"), Error);
  CHECK_THROWS_WITH_AS(fit_online_transforms(plain, {}, FitOptions{}),
                       doctest::Contains("no calibration samples"), Error);
  CHECK(max_abs_diff(Sites::mlp_out(plain.blocks[0]).weight.value, w0) == 0);
  CHECK(Sites::mlp_input_transform(plain.blocks[0]) == nullptr);
  // The mlp site alone needs no R4, and is then what online_rotations names (exports refuse it).
  CHECK(online_rotations(plain).empty());
  fit_online_transforms(plain, one,
                        FitOptions{.down = false, .seed = 1, .allow_random_orthogonal = true});
  CHECK(online_rotations(plain).find("fitted transform of the MLP input") != std::string::npos);
}

}  // namespace

TEST_CASE(
    "fitted online transforms: LLaMA and OPT keep their logits, down, mlp and both (double)") {
  for (const ModelConfig& cfg : {tiny_llama_config(), wide_gqa_config()})
    check_fitted<LlamaBlock<double>>(cfg);
  for (const ModelConfig& cfg : {tiny_opt_config(), wide_opt_config()})
    check_fitted<OptBlock<double>>(cfg);
}

TEST_CASE("fitted online transforms: P·Pᵀ is the geometric mean of C⁻¹ and G (M·C·M = G)") {
  const int64_t n = 7;
  auto spd = [n](uint64_t seed) {  // A·Aᵀ + 0.1·I, far from isotropic
    const Tensor<double> a = cbq::testing::randn<double>(Shape{n, n}, seed);
    std::vector<double> s(static_cast<size_t>(n * n));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double v = i == j ? 0.1 : 0.0;
        for (int64_t k = 0; k < n; ++k) v += a[i * n + k] * a[j * n + k] * (1 + 3 * k);
        s[i * n + j] = v;
      }
    return s;
  };
  const std::vector<double> c = spd(11), g = spd(12);
  auto [p, ratio] = detail::fit_noise_shaping(c, g, n, 0.0, "test");
  auto mul = [n](const std::vector<double>& a, const std::vector<double>& b, bool tb) {
    std::vector<double> o(static_cast<size_t>(n * n), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < n; ++k)
          o[i * n + j] += a[i * n + k] * (tb ? b[j * n + k] : b[k * n + j]);
    return o;
  };
  const std::vector<double> m = mul(p, p, true);  // M = P·Pᵀ
  const std::vector<double> mcm = mul(mul(m, c, false), m, false);
  double err = 0, scale = 0, tr_c = 0, tr_g = 0, tr_cm = 0;
  for (int64_t i = 0; i < n * n; ++i) {
    err = std::max(err, std::abs(mcm[i] - g[i]));
    scale = std::max(scale, std::abs(g[i]));
  }
  CHECK(err < 1e-9 * scale);
  for (int64_t i = 0; i < n; ++i) tr_c += c[i * n + i], tr_g += g[i * n + i];
  const std::vector<double> cm = mul(c, m, false);
  for (int64_t i = 0; i < n; ++i) tr_cm += cm[i * n + i];
  // At the optimum tr(C·M) = tr(G·M⁻¹), so the ratio is tr(C·M)² / (tr C · tr G).
  CHECK(ratio == doctest::Approx(tr_cm * tr_cm / (tr_c * tr_g)).epsilon(1e-9));
  CHECK(ratio < 0.99);
  // Isotropic C and G: nothing to gain, P = I up to scale.
  std::vector<double> eye(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) eye[i * n + i] = 1.0;
  auto [pi, ri] = detail::fit_noise_shaping(eye, eye, n, 0.0, "identity");
  CHECK(ri == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(max_abs_diff(Tensor<double>::from(pi, Shape{n, n}),
                     Tensor<double>::from(eye, Shape{n, n})) < 1e-12);
  // Not positive definite: a clear error naming the site.
  std::vector<double> zero(static_cast<size_t>(n * n), 0.0);
  CHECK_THROWS_WITH_AS(detail::fit_noise_shaping(zero, g, n, 0.0, "block 3 (down_proj input)"),
                       doctest::Contains("block 3 (down_proj input)"), Error);
}

TEST_CASE(
    "fitted online transforms: stories260K — the A4 output error at gate/down falls on held-out "
    "text") {
  std::optional<StoriesProbe> stories = load_stories_probe();
  if (!stories) return;
  LlamaModel& m = stories->model.llama();
  RotationOptions rot;
  rot.r4 = true;
  rot.allow_random_orthogonal = true;
  rotate_model(m, rot);
  // The fitted transforms' output error of per-token 4-bit quantization of their inputs, on
  // text the fit did not see, against the plain R4 model's, block by block (FP weights).
  REQUIRE(stories->after.size() >= 512);
  std::vector<std::vector<int32_t>> samples;
  for (int64_t s = 0; s < 4; ++s)
    samples.emplace_back(stories->after.begin() + s * 128, stories->after.begin() + (s + 1) * 128);
  auto output_error = [&](LlamaModel& model) {
    double err = 0, ref = 0;
    Tensor<float> x = model.embed_tensor(stories->probe);
    for (int64_t b = 0; b < model.num_blocks(); ++b) {
      BlockContext<float> ctx;
      ctx.full_precision = true;
      auto& blk = model.blocks[static_cast<size_t>(b)];
      ctx.on_linear_input = [&](const LinearLayer<float>& layer, const Tensor<float>& in) {
        if (&layer != &blk.down_proj && &layer != &blk.gate_proj) return;
        const int64_t d = in.size(-1), rows = in.numel() / d;
        // cbq's per-token asymmetric 4-bit quantizer, no clipping (α = 1).
        std::vector<float> q(static_cast<size_t>(in.numel()));
        quant::CpuActQuant<float>::per_token_forward(q.data(), nullptr, nullptr, nullptr, in.data(),
                                                     rows, d, 1.0f, quant::GridSpec{.bits = 4});
        const Tensor<float>& w = layer.weight.value;  // (out, d)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t o = 0; o < w.size(0); ++o) {
            double y = 0, yq = 0;
            for (int64_t i = 0; i < d; ++i) {
              y += double(in[r * d + i]) * w[o * d + i];
              yq += double(q[r * d + i]) * w[o * d + i];
            }
            err += (yq - y) * (yq - y);
            ref += y * y;
          }
      };
      x = model.run_block(b, x, ctx);
    }
    return err / ref;
  };
  const double before = output_error(m);
  const FittedTransformReport r =
      fit_online_transforms(m, samples, FitOptions{.seed = 0, .allow_random_orthogonal = true});
  const double after = output_error(m);
  MESSAGE("stories260K: " << r.summary() << "; relative output error of A4 at gate/down " << before
                          << " -> " << after);
  CHECK(after < 0.6 * before);
}
