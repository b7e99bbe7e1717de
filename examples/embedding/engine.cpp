// "Another engine" using cbq as a library: the engine keeps its own weights and its own forward
// pass; a few lines adapt its block to cbq::TransformerBlock, a pass configured at compile time
// quantizes the weights (cbq::quantize on synthetic calibration activations), and the engine takes
// the quantized weights back into its own storage. Prints the reconstruction error of the block
// stack before (round-to-nearest) and after CBQ; exits non-zero when the quantized engine is not
// close to the full-precision one. Built standalone: see CMakeLists.txt and docs/EMBEDDING.md.
#include <cbq/cbq.hpp>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

// ---------------------------------------------------------------------------------------------
// The engine: plain arrays and loops; nothing here knows about cbq.
namespace engine {

constexpr float kNormEps = 1e-5f;

// y = x + W_down · relu(W_up · rmsnorm(x)), weights row-major (out, in).
struct MlpBlock {
  int64_t dim = 0, hidden = 0;
  std::vector<float> norm, w_up, w_down;
};

struct Model {
  std::vector<MlpBlock> blocks;

  // x: (tokens, dim) row-major → the output of the whole stack.
  std::vector<float> forward(std::vector<float> x, int64_t tokens) const {
    for (const MlpBlock& b : blocks) {
      std::vector<float> n(static_cast<size_t>(b.dim)), h(static_cast<size_t>(b.hidden));
      for (int64_t t = 0; t < tokens; ++t) {
        float* row = x.data() + t * b.dim;
        double ss = 0;
        for (int64_t j = 0; j < b.dim; ++j) ss += double(row[j]) * row[j];
        const float r = 1.f / std::sqrt(static_cast<float>(ss / b.dim) + kNormEps);
        for (int64_t j = 0; j < b.dim; ++j) n[j] = row[j] * r * b.norm[j];
        for (int64_t o = 0; o < b.hidden; ++o) {
          float acc = 0;
          for (int64_t j = 0; j < b.dim; ++j) acc += b.w_up[o * b.dim + j] * n[j];
          h[o] = acc > 0 ? acc : 0;
        }
        for (int64_t o = 0; o < b.dim; ++o) {
          float acc = 0;
          for (int64_t j = 0; j < b.hidden; ++j) acc += b.w_down[o * b.hidden + j] * h[j];
          row[o] += acc;
        }
      }
    }
    return x;
  }
};

Model random_model(int64_t layers, int64_t dim, int64_t hidden, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  Model m;
  for (int64_t l = 0; l < layers; ++l) {
    MlpBlock b;
    b.dim = dim;
    b.hidden = hidden;
    b.norm.resize(dim);
    for (float& v : b.norm) v = 1.f + 0.1f * normal(rng);
    b.w_up.resize(hidden * dim);
    for (float& v : b.w_up) v = normal(rng) / std::sqrt(float(dim));
    b.w_down.resize(dim * hidden);
    for (float& v : b.w_down) v = 0.5f * normal(rng) / std::sqrt(float(hidden));
    m.blocks.push_back(std::move(b));
  }
  return m;
}

}  // namespace engine

// ---------------------------------------------------------------------------------------------
// The adapter: the engine's block as a cbq::TransformerBlock. cbq builds it from a WeightMap
// (names chosen here) and runs every linear through run_linear, so quantizers plug in.
template <class T>
class EngineBlock {
 public:
  using scalar_type = T;
  cbq::Parameter<T> norm;
  cbq::LinearLayer<T> up_proj, down_proj;

  EngineBlock(const cbq::ModelConfig& c, int64_t index, const cbq::WeightMap& w)
      : config_(c), index_(index) {
    const std::string p = "model.layers." + std::to_string(index) + ".";
    norm = cbq::Parameter<T>(p + "norm", cbq::take_weight<T>(w, p + "norm", {c.dim}), false);
    up_proj = {"up_proj", cbq::take_weight<T>(w, p + "up_proj", {c.hidden_dim, c.dim})};
    down_proj = {"down_proj", cbq::take_weight<T>(w, p + "down_proj", {c.dim, c.hidden_dim})};
  }
  cbq::Var<T> forward(cbq::Tape<T>& tape, cbq::Var<T> x, const cbq::BlockContext<T>& ctx) {
    cbq::Var<T> n = cbq::ops::rmsnorm(x, tape.param(norm), config_.norm_eps);
    cbq::Var<T> h = cbq::ops::relu(cbq::run_linear(tape, up_proj, n, ctx));
    return cbq::ops::add(x, cbq::run_linear(tape, down_proj, h, ctx));
  }
  std::vector<cbq::LinearLayer<T>*> linears() { return {&up_proj, &down_proj}; }
  std::vector<cbq::Parameter<T>*> other_parameters() { return {&norm}; }
  // Where a per-channel activation scale can be folded (only used by CFP pre-processing).
  std::vector<cbq::ActivationSite<T>> activation_sites() {
    return {{"mlp_in",
             {&up_proj},
             config_.dim,
             {},
             [this](const std::vector<T>& s) { cbq::divide_rows<T>(norm.value, nullptr, s); }},
            {"down_in",
             {&down_proj},
             config_.hidden_dim,
             {},
             [this](const std::vector<T>& s) {  // relu(u / s) = relu(u) / s for s > 0
               cbq::divide_rows(up_proj.weight.value, &up_proj.bias.value, s);
             }}};
  }
  const cbq::ModelConfig& config() const { return config_; }
  int64_t index() const { return index_; }

 private:
  cbq::ModelConfig config_;
  int64_t index_ = 0;
};
static_assert(cbq::TransformerBlock<EngineBlock<float>>);

// The pass, fixed at compile time: 4-bit weights in groups of 32, no activation quantization,
// windows of 2 blocks overlapping by 1, LoRA-Rounding of rank 5.
using Pass = cbq::Pass<cbq::Quantizer<4, cbq::PerGroup<32>>, cbq::ActQuant<16>,
                       cbq::SlidingWindow<2, 1>, cbq::LoraRounding<5>>;
using CbqModel = cbq::Transformer<EngineBlock<float>>;

// The engine's weights under the adapter's names. cbq's Transformer also wants a token
// embedding and a final norm; the engine feeds hidden states directly, so they are placeholders.
cbq::WeightMap export_weights(const engine::Model& m, cbq::ModelConfig& c) {
  c.family = cbq::Family::llama;
  c.architecture = "engine-mlp";
  c.dim = m.blocks[0].dim;
  c.hidden_dim = m.blocks[0].hidden;
  c.n_layers = static_cast<int64_t>(m.blocks.size());
  c.n_heads = c.n_kv_heads = 1;
  c.head_dim = c.dim;
  c.vocab_size = 1;
  c.max_seq_len = 4096;
  c.norm_eps = engine::kNormEps;
  c.tied_embeddings = true;
  cbq::WeightMap w;
  auto put = [&](const std::string& name, const std::vector<float>& v, cbq::Shape s) {
    w[name] = cbq::Tensor<float>::from(v, s);
  };
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const engine::MlpBlock& b = m.blocks[static_cast<size_t>(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    put(p + "norm", b.norm, {c.dim});
    put(p + "up_proj", b.w_up, {c.hidden_dim, c.dim});
    put(p + "down_proj", b.w_down, {c.dim, c.hidden_dim});
  }
  w["model.embed_tokens.weight"] = cbq::Tensor<float>(cbq::Shape{1, c.dim});
  w["model.norm.weight"] = cbq::Tensor<float>::full(cbq::Shape{c.dim}, 1.f);
  return w;
}

// The quantized weights back into the engine's storage, in place ("layers.3.up_proj").
void import_quantized(engine::Model& m, const cbq::QuantizationResult& r) {
  for (const cbq::LayerResult& l : r.layers) {
    const size_t dot = l.name.find('.', 7);
    engine::MlpBlock& b = m.blocks[std::stoul(l.name.substr(7, dot - 7))];
    const cbq::Tensor<float> w = l.weight.dequantize();
    std::vector<float>& dst = l.name.substr(dot + 1) == "up_proj" ? b.w_up : b.w_down;
    std::copy(w.data(), w.data() + w.numel(), dst.begin());
  }
}

std::vector<float> random_hidden(int64_t tokens, int64_t dim, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(tokens * dim));
  for (float& v : x) v = normal(rng);
  return x;
}

// ‖y − y_fp‖ / ‖y_fp − x‖: the error relative to what the blocks add to their input.
double relative_error(const std::vector<float>& y, const std::vector<float>& y_fp,
                      const std::vector<float>& x) {
  double num = 0, den = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    num += (double(y[i]) - y_fp[i]) * (double(y[i]) - y_fp[i]);
    den += (double(y_fp[i]) - x[i]) * (double(y_fp[i]) - x[i]);
  }
  return std::sqrt(num / den);
}

int main() {
  try {
    const int64_t layers = 4, dim = 64, hidden = 256, samples = 16, tokens = 32;
    engine::Model fp = engine::random_model(layers, dim, hidden, 1);
    std::mt19937_64 rng(2);
    std::vector<std::vector<float>> calib, held_out;
    for (int64_t n = 0; n < samples; ++n) calib.push_back(random_hidden(tokens, dim, rng));
    for (int64_t n = 0; n < 4; ++n) held_out.push_back(random_hidden(tokens, dim, rng));

    auto quantize = [&](bool cbq_pass, engine::Model& target) {
      cbq::ModelConfig c;
      const cbq::WeightMap w = export_weights(target, c);
      CbqModel model(c, w);
      std::vector<cbq::Tensor<float>> x;
      for (const auto& s : calib) x.push_back(cbq::Tensor<float>::from(s, cbq::Shape{tokens, dim}));
      cbq::PassOptions o;
      o.epochs = 2;
      o.verbose = false;
      const cbq::QuantizationResult r =
          cbq::quantize(model, cbq_pass ? cbq::Method::cbq : cbq::Method::rtn, Pass::make_spec(), o,
                        std::move(x));
      import_quantized(target, r);
      // The engine's own forward with the imported weights must equal cbq's quantized model.
      const cbq::Tensor<float> probe =
          cbq::Tensor<float>::from(held_out[0], cbq::Shape{tokens, dim});
      cbq::Tensor<float> h = probe;
      for (int64_t b = 0; b < layers; ++b) h = model.run_block(b, h);
      const std::vector<float> mine = target.forward(held_out[0], tokens);
      double worst = 0;
      for (int64_t i = 0; i < h.numel(); ++i)
        worst = std::max(worst, std::abs(double(h[i]) - mine[static_cast<size_t>(i)]));
      std::printf(
          "%s: %zu layers quantized (%s) in %.2fs; engine vs cbq forward: max |diff| %.2e\n",
          cbq_pass ? "CBQ" : "RTN", r.layers.size(), r.config.c_str(), r.seconds, worst);
      return worst;
    };
    engine::Model rtn = fp, cbq_model = fp;
    const double rtn_mismatch = quantize(false, rtn);
    const double cbq_mismatch = quantize(true, cbq_model);

    double before = 0, after = 0;
    for (const auto& x : held_out) {
      const auto y_fp = fp.forward(x, tokens);
      before += relative_error(rtn.forward(x, tokens), y_fp, x) / double(held_out.size());
      after += relative_error(cbq_model.forward(x, tokens), y_fp, x) / double(held_out.size());
    }
    std::printf(
        "reconstruction error of the %lld-block stack on held-out inputs (relative to "
        "what the blocks add):\n  before (round-to-nearest) %.4f\n  after  (CBQ)              "
        "%.4f\n",
        static_cast<long long>(layers), before, after);
    const bool consistent = rtn_mismatch < 1e-4 && cbq_mismatch < 1e-4;
    // At 4 bits in groups of 32 a weight's rounding error is about range/15/sqrt(12) ≈ 12 % of
    // its spread, so RTN's 0.12 is the expected size; CBQ must not be worse, and not far off.
    const bool close = after < 0.2 && after <= before;
    std::printf("%s\n", consistent && close
                            ? "OK: the quantized engine is close to the full-precision one"
                            : "FAILED: the quantized engine is not close");
    return consistent && close ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "engine: %s\n", e.what());
    return 1;
  }
}
