#pragma once
// Offline rotation of a LLaMA or OPT model (QuaRot / SpinQuant R1 and R2; docs/ROTATION.md): the
// rotated model computes the same function in exact arithmetic, with weights and residual
// activations whose outliers are spread over all channels.
//
//   fold_rms_norms   every RMSNorm weight w into the linears that read the norm's output
//                    (q/k/v, gate/up, the LM head: W ← W·diag(w)), the norm's weight set to 1;
//                    a head tied to the embedding is untied first (the head then differs).
//   R1 (size d)      the residual stream x ← x·Q: embeddings E ← E·Q; the readers of the
//                    residual (q/k/v, gate/up, head) W ← W·Q; its writers (o_proj, down_proj)
//                    W ← Qᵀ·W, b ← b·Q. rmsnorm(x·Q) = rmsnorm(x)·Q once the weight is 1,
//                    since Q keeps ‖x‖.
//   R2 (head_dim)    every value head v_h ← v_h·Q₂: v_proj's rows of head h W ← Q₂ᵀ·W (b ← b·Q₂),
//                    o_proj's columns of every query head W ← W·Q₂. One Q₂ for all heads, so
//                    grouped-query heads sharing a value head stay consistent.
//   R4 (hidden)      online: the MLP activation g ← g·Q₄ before down_proj, an op of the block at
//                    run time (LlamaBlock::down_proj_rotation), with down_proj W ← W·Q₄ folded.
// Q, Q₂ and Q₄ are randomised Hadamard transforms (ops::HadamardTransform with random signs);
// sizes without a Hadamard construction are refused (cbq::Error naming the size) unless the
// caller allows the seeded random orthogonal kernel.
// R1 and R2 are folded into the weights (no run-time op; every format holds the result); R4
// needs the op at run time, so exports refuse a model that has it.
// OPT (LayerNorm: centre, scale, then weight and bias):
//   fold_layer_norms every LayerNorm's weight γ and bias β into its readers (q/k/v, fc1:
//                    b ← b + W·β, W ← W·diag(γ)); the final norm's γ into the head and its bias
//                    kept as β/γ (the head has no bias), then rotated with the residual.
//   R1               Q = H·G with G a Householder reflection that maps the image of the all-ones
//                    direction back onto it, so Q keeps the mean direction. Centring then
//                    commutes with Q (layernorm(x·Q) = layernorm(x)·Q for γ = 1, β = 0), and the
//                    model keeps its LayerNorms: no graph change, exports unchanged. The
//                    position embeddings rotate with the token embeddings. Q is H plus a rank-one
//                    change, so it spreads outliers as H does.
//   R2, R4           as for LLaMA (v_proj / out_proj per head; online before fc2,
//                    OptBlock::fc2_rotation).
// Fitted online transforms (fit_online_transforms, after rotate_model; docs/ROTATION.md,
// "Fitted online transforms"): where an input u is quantized at run time, u ← u·P·Q with the
// readers' W ← W·P⁻ᵀ·Q folded (Q orthogonal), P fitted to calibration data so that per-token
// quantization noise of the input (about isotropic after Q, its power ∝ ‖u‖²) costs the least
// output error: P·Pᵀ = C⁻¹ # G, the geometric mean of the inverse input covariance C and
// G = Σ WᵀW over the readers.
//   down   R4's site: g·Q₄ ← g·Q₄·P·Q₄ before down_proj / fc2 (needs R4).
//   mlp    new online op: n2 ← n2·P·Q before gate/up (fc1), Q a randomised Hadamard of size d.
// R3 (q/k after RoPE) is not offered: it only changes what a quantized KV cache sees, and cbq
// quantizes no KV cache (docs/ROTATION.md).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cbq/core/blas.hpp"
#include "cbq/core/linalg.hpp"
#include "cbq/model/llama_block.hpp"
#include "cbq/model/opt_block.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/ops/hadamard.hpp"

namespace cbq {

struct RotationOptions {
  bool r1 = true;            // residual stream (needs the norms folded: done whenever r1 is)
  bool r2 = true;            // value/output per head
  bool random_signs = true;  // QuaRot's randomised Hadamard D·H; false: the plain H
  uint64_t seed = 0;         // R1 uses seed, R2 seed + 1, R4 seed + 2
  bool r4 = false;           // online, before down_proj (a run-time op)
  // Sizes without a Hadamard construction (e.g. 172 = 4·43) use a seeded random orthogonal
  // kernel instead of being refused.
  bool allow_random_orthogonal = false;

  bool any() const { return r1 || r2 || r4; }
  // "R1+R2+R4" ("none" when nothing is rotated).
  std::string describe() const {
    std::string s;
    for (auto [on, name] : {std::pair{r1, "R1"}, std::pair{r2, "R2"}, std::pair{r4, "R4"}})
      if (on) s += (s.empty() ? "" : "+") + std::string(name);
    return s.empty() ? "none" : s;
  }
};

// Compile-time selection of the rotations: rotate_model(model, Rotation<R1, R2, R4>{}, seed).
struct R1 {};
struct R2 {};
struct R4 {};
template <class... Rs>
struct Rotation {
  static_assert(((std::is_same_v<Rs, R1> || std::is_same_v<Rs, R2> || std::is_same_v<Rs, R4>)&&...),
                "cbq::Rotation takes cbq::R1, cbq::R2 and cbq::R4 (R3 is not offered: cbq "
                "quantizes no KV cache)");
  static RotationOptions options(uint64_t seed = 0) {
    RotationOptions o;
    o.r1 = (std::is_same_v<Rs, R1> || ...);
    o.r2 = (std::is_same_v<Rs, R2> || ...);
    o.r4 = (std::is_same_v<Rs, R4> || ...);
    o.seed = seed;
    return o;
  }
};

struct RotationReport {
  bool folded_norms = false;
  bool untied_head = false;
  std::string r1, r2, r4;  // the transforms' descriptions ("" when not applied)

  std::string summary() const {
    std::string s;
    if (folded_norms) s += "norms folded into the linears";
    if (untied_head) s += ", LM head untied";
    for (auto [d, name] : {std::pair{&r1, "R1"}, std::pair{&r2, "R2"}, std::pair{&r4, "R4"}})
      if (!d->empty()) s += fmt::format("{}{}: {}", s.empty() ? "" : "; ", name, *d);
    return s.empty() ? "no rotation" : s;
  }
};

namespace detail {

// What the rotations touch in a block of each family: the readers of the residual stream (their
// input side rotates with R1), its writers (output side), the projection after attention (R2's
// other side), the MLP's last linear and the slot of its online R4.
template <class Block>
struct RotationSites;
template <class T>
struct RotationSites<LlamaBlock<T>> {
  static constexpr bool layer_norm = false;  // RMSNorm: any orthogonal R1 commutes with it
  static std::vector<LinearLayer<T>*> readers(LlamaBlock<T>& b) {
    return {&b.q_proj, &b.k_proj, &b.v_proj, &b.gate_proj, &b.up_proj};
  }
  static std::vector<LinearLayer<T>*> writers(LlamaBlock<T>& b) {
    return {&b.o_proj, &b.down_proj};
  }
  static LinearLayer<T>& attention_out(LlamaBlock<T>& b) { return b.o_proj; }
  static LinearLayer<T>& mlp_out(LlamaBlock<T>& b) { return b.down_proj; }
  static auto& mlp_rotation(LlamaBlock<T>& b) { return b.down_proj_rotation; }
  static std::vector<LinearLayer<T>*> mlp_in(LlamaBlock<T>& b) {
    return {&b.gate_proj, &b.up_proj};
  }
  static auto& mlp_input_transform(LlamaBlock<T>& b) { return b.mlp_input_transform; }
};
template <class T>
struct RotationSites<OptBlock<T>> {
  static constexpr bool layer_norm = true;  // centring: R1 must keep the all-ones direction
  static std::vector<LinearLayer<T>*> readers(OptBlock<T>& b) {
    return {&b.q_proj, &b.k_proj, &b.v_proj, &b.fc1};
  }
  static std::vector<LinearLayer<T>*> writers(OptBlock<T>& b) { return {&b.out_proj, &b.fc2}; }
  static LinearLayer<T>& attention_out(OptBlock<T>& b) { return b.out_proj; }
  static LinearLayer<T>& mlp_out(OptBlock<T>& b) { return b.fc2; }
  static auto& mlp_rotation(OptBlock<T>& b) { return b.fc2_rotation; }
  static std::vector<LinearLayer<T>*> mlp_in(OptBlock<T>& b) { return {&b.fc1}; }
  static auto& mlp_input_transform(OptBlock<T>& b) { return b.fc1_input_transform; }
};

}  // namespace detail

// Which online rotations a model needs at run time ("" when none): exports refuse such a model.
template <class Block>
std::string online_rotations(Transformer<Block>& m) {
  using Sites = detail::RotationSites<Block>;
  for (Block& b : m.blocks) {
    if (const auto& r4 = Sites::mlp_rotation(b))
      return fmt::format("an R4 rotation of the MLP activation before {} (block {}: {})",
                         Sites::mlp_out(b).name, b.index(), r4->description());
    if (const auto& t = Sites::mlp_input_transform(b))
      return fmt::format("a fitted transform of the MLP input before {} (block {}: {})",
                         Sites::mlp_in(b).front()->name, b.index(), t->description());
  }
  return "";
}

namespace detail {

// The transforms `opt` asks for (null where not asked), built for the sizes of `c`; an
// unsupported size is a cbq::Error naming the rotation, the dimension and the size.
struct RotationTransforms {
  std::unique_ptr<ops::HadamardTransform> r1, r2;
  std::shared_ptr<const ops::HadamardTransform> r4;
};
inline RotationTransforms make_rotations(const ModelConfig& c, const RotationOptions& opt) {
  auto make = [&](bool on, const char* name, const char* what, int64_t n, uint64_t seed) {
    std::unique_ptr<ops::HadamardTransform> h;
    if (!on) return h;
    try {
      h = std::make_unique<ops::HadamardTransform>(
          ops::HadamardTransform::make(n, seed, opt.random_signs, opt.allow_random_orthogonal));
    } catch (const Error& e) {
      fail("rotation {} (the {}, {}): {}", name, what, n, e.what());
    }
    return h;
  };
  RotationTransforms t;
  t.r1 = make(opt.r1, "R1", "model dimension", c.dim, opt.seed);
  t.r2 = make(opt.r2, "R2", "head dimension", c.head_dim, opt.seed + 1);
  t.r4 = make(opt.r4, "R4", "MLP dimension", c.hidden_dim, opt.seed + 2);
  return t;
}

// M = H·G: a Hadamard transform H, then (when `householder` holds a unit w) the reflection
// G = I − 2·w·wᵀ. G is empty for LLaMA; OPT's R1 uses it to keep the mean direction.
struct RowRotation {
  const ops::HadamardTransform* h = nullptr;
  std::vector<double> householder;

  RowRotation(const ops::HadamardTransform& transform,  // NOLINT: a plain H converts
              std::vector<double> w = {})
      : h(&transform), householder(std::move(w)) {}
  int64_t size() const { return h->size(); }
  // x (rows, n) ← x·M (transpose: x·Mᵀ = x·G·Hᵀ), in place.
  void apply(double* x, int64_t rows, bool transpose) const {
    if (!transpose) h->apply<double>(x, x, rows, false, false);
    if (!householder.empty()) {
      const int64_t n = size();
      for (int64_t r = 0; r < rows; ++r) {
        double* v = x + r * n;
        double dot = 0;
        for (int64_t i = 0; i < n; ++i) dot += v[i] * householder[static_cast<size_t>(i)];
        for (int64_t i = 0; i < n; ++i) v[i] -= 2 * dot * householder[static_cast<size_t>(i)];
      }
    }
    if (transpose) h->apply<double>(x, x, rows, true, false);
  }
};

// H·G with a·H·G = a for a = 1/√n (the all-ones direction): G reflects b = a·H onto a
// (w = (b − a)/‖b − a‖), so M and Mᵀ both keep a and M commutes with centring x ← x − mean(x).
inline RowRotation mean_preserving(const ops::HadamardTransform& h) {
  const int64_t n = h.size();
  const double a = 1.0 / std::sqrt(static_cast<double>(n));
  std::vector<double> w(static_cast<size_t>(n), a);
  h.apply<double>(w.data(), w.data(), 1, false, false);  // b
  double norm = 0;
  for (double& v : w) {
    v -= a;
    norm += v * v;
  }
  norm = std::sqrt(norm);
  if (norm < 1e-12) return RowRotation(h);  // H keeps a already
  for (double& v : w) v /= norm;
  return RowRotation(h, std::move(w));
}

// data (rows, C), C a multiple of h.size(): every chunk x ← x·M (transpose: x·Mᵀ), computed in
// double and rounded once.
template <class T>
void rotate_rows(T* data, int64_t rows, int64_t cols, const RowRotation& h, bool transpose) {
  CBQ_CHECK(cols % h.size() == 0, "rotate: rows of {} values are not chunks of {}", cols, h.size());
  const int64_t chunks_per_row = cols / h.size();
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 16) / cols);
  std::vector<double> buf;
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t nr = std::min(block, rows - r0);
    buf.assign(data + r0 * cols, data + (r0 + nr) * cols);
    h.apply(buf.data(), nr * chunks_per_row, transpose);
    std::transform(buf.begin(), buf.end(), data + r0 * cols,
                   [](double v) { return static_cast<T>(v); });
  }
}

// W (out, in) ← Mᵀ·W chunk-wise along `out`: the transposed rows (columns of W) rotated.
template <class T>
void rotate_output_side(Tensor<T>& w, const RowRotation& h) {
  const int64_t out = w.size(0), in = w.size(1);
  std::vector<T> t(static_cast<size_t>(out * in));
  const T* p = w.data();
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) t[static_cast<size_t>(i * out + o)] = p[o * in + i];
  rotate_rows(t.data(), in, out, h, false);  // (Wᵀ·M)ᵀ = Mᵀ·W
  T* q = w.data();
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) q[o * in + i] = t[static_cast<size_t>(i * out + o)];
}

template <class T>
void rotate_input_side(Tensor<T>& w, const RowRotation& h) {  // W ← W·M
  rotate_rows(w.data(), w.size(0), w.size(1), h, false);
}

// W (out, in) ← W·diag(s)
template <class T>
void scale_columns(Tensor<T>& w, const Tensor<T>& s) {
  const int64_t out = w.size(0), in = w.size(1);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) w[o * in + i] *= s[i];
}

template <class T>
void set_ones(Tensor<T>& w) {
  for (int64_t i = 0; i < w.numel(); ++i) w[i] = T(1);
}

template <class Block>
void check_rotatable(Transformer<Block>& m, const char* what) {
  using T = typename Block::scalar_type;
  CBQ_CHECK(m.device() == Device::cpu, "{}: the model is on {}; rotate it on the CPU, then move it",
            what, device_name(m.device()));
  for (Block& b : m.blocks)
    for (LinearLayer<T>* l : b.linears())
      CBQ_CHECK(!l->transform,
                "{}: layer {} of block {} has a quantization transform installed; rotate the "
                "full-precision model before quantizing it",
                what, l->name, b.index());
}

// A LayerNorm's weight γ and bias β into a linear that reads its output: b ← b + W·β (in double),
// then W ← W·diag(γ).
template <class T>
void fold_layer_norm_into(LinearLayer<T>& l, const Tensor<T>& gamma, const Tensor<T>& beta) {
  const int64_t out = l.weight.value.size(0), in = l.weight.value.size(1);
  T* w = l.weight.value.data();
  T* b = l.bias.value.data();
  for (int64_t o = 0; o < out; ++o) {
    double acc = b[o];
    for (int64_t i = 0; i < in; ++i) {
      acc += static_cast<double>(w[o * in + i]) * static_cast<double>(beta[i]);
      w[o * in + i] *= gamma[i];
    }
    b[o] = static_cast<T>(acc);
  }
}

// The head tied to the embedding becomes a copy of it (the rotation changes the two differently).
template <class Block>
bool untie_head(Transformer<Block>& m) {
  if (!m.config.tied_embeddings) return false;
  m.lm_head =
      Parameter<typename Block::scalar_type>("lm_head.weight", m.embed_tokens.value.clone(), false);
  m.config.tied_embeddings = false;
  return true;
}

// R1 on a writer of the residual stream and R2 on v_proj: W ← Mᵀ·W, b ← b·M (chunk-wise).
template <class T>
void rotate_writer(LinearLayer<T>& l, const RowRotation& r) {
  rotate_output_side(l.weight.value, r);
  if (l.has_bias()) rotate_rows(l.bias.value.data(), 1, l.bias.value.numel(), r, false);
}

}  // namespace detail

// Folds every RMSNorm weight into the linears that read it (the head is untied when tied).
// Returns whether it untied the head.
template <class T>
bool fold_rms_norms(Transformer<LlamaBlock<T>>& m) {
  detail::check_rotatable(m, "fold_rms_norms");
  for (LlamaBlock<T>& b : m.blocks) {
    for (LinearLayer<T>* l : {&b.q_proj, &b.k_proj, &b.v_proj})
      detail::scale_columns(l->weight.value, b.input_layernorm.value);
    detail::set_ones(b.input_layernorm.value);
    for (LinearLayer<T>* l : {&b.gate_proj, &b.up_proj})
      detail::scale_columns(l->weight.value, b.post_attention_layernorm.value);
    detail::set_ones(b.post_attention_layernorm.value);
  }
  const bool untie = detail::untie_head(m);
  detail::scale_columns(m.lm_head.value, m.final_norm_weight.value);
  detail::set_ones(m.final_norm_weight.value);
  return untie;
}

// Folds every LayerNorm's weight and bias of an OPT model into the linears that read it (q/k/v,
// fc1: exact, the norms become γ = 1, β = 0) and the final norm's weight into the LM head
// (untied when tied); the final norm keeps β/γ as its bias, since the head has no bias. Checks
// everything before it changes anything. Returns whether it untied the head.
template <class T>
bool fold_layer_norms(Transformer<OptBlock<T>>& m) {
  detail::check_rotatable(m, "fold_layer_norms");
  Tensor<T>& gf = m.final_norm_weight.value;
  Tensor<T>& bf = m.final_norm_bias.value;
  for (int64_t i = 0; i < m.config.dim; ++i)
    CBQ_CHECK(gf[i] != T(0) || bf[i] == T(0),
              "fold_layer_norms: {}[{}] is 0 while {}[{}] is {}: that bias cannot move behind the "
              "LM head (it has none)",
              m.final_norm_weight.name, i, m.final_norm_bias.name, i, static_cast<double>(bf[i]));
  for (OptBlock<T>& b : m.blocks)
    for (LinearLayer<T>* l : {&b.q_proj, &b.k_proj, &b.v_proj, &b.fc1})
      CBQ_CHECK(l->has_bias(),
                "fold_layer_norms: {} of block {} has no bias to take its LayerNorm's bias "
                "(enable_bias = false is not supported)",
                l->name, b.index());
  for (OptBlock<T>& b : m.blocks) {
    for (LinearLayer<T>* l : {&b.q_proj, &b.k_proj, &b.v_proj})
      detail::fold_layer_norm_into(*l, b.self_attn_layer_norm_weight.value,
                                   b.self_attn_layer_norm_bias.value);
    detail::fold_layer_norm_into(b.fc1, b.final_layer_norm_weight.value,
                                 b.final_layer_norm_bias.value);
    for (Parameter<T>* p : {&b.self_attn_layer_norm_weight, &b.final_layer_norm_weight})
      detail::set_ones(p->value);
    for (Parameter<T>* p : {&b.self_attn_layer_norm_bias, &b.final_layer_norm_bias})
      p->value.zero();
  }
  const bool untied = detail::untie_head(m);
  detail::scale_columns(m.lm_head.value, gf);
  for (int64_t i = 0; i < m.config.dim; ++i) bf[i] = gf[i] == T(0) ? T(0) : bf[i] / gf[i];
  detail::set_ones(gf);
  return untied;
}

// Throws a cbq::Error, before any work, when `opt` cannot rotate a model of `c`: a size without
// a transform (unless the random orthogonal fallback is on).
inline void check_rotation(const ModelConfig& c, const RotationOptions& opt) {
  if (!opt.any()) return;
  detail::make_rotations(c, opt);
}

// Applies the rotations `opt` asks for, in place; the logits stay the same up to rounding
// (tests/test_model_rotation.cpp gives the tolerances).
template <class Block>
RotationReport rotate_model(Transformer<Block>& m, const RotationOptions& opt = {}) {
  using T = typename Block::scalar_type;
  using Sites = detail::RotationSites<Block>;
  detail::check_rotatable(m, "rotate_model");
  RotationReport report;
  for (Block& b : m.blocks)
    CBQ_CHECK(!Sites::mlp_input_transform(b),
              "rotate_model: block {} has a fitted MLP input transform; rotate before fitting",
              b.index());
  if (opt.r4)
    for (Block& b : m.blocks)
      CBQ_CHECK(!Sites::mlp_rotation(b),
                "rotate_model: block {} already has an R4 rotation ({}); rotate a model once",
                b.index(), Sites::mlp_rotation(b)->description());
  // Every transform first, so an unsupported size changes nothing.
  auto [r1, r2, r4] = detail::make_rotations(m.config, opt);
  if (r1) {
    const detail::RowRotation q =
        Sites::layer_norm ? detail::mean_preserving(*r1) : detail::RowRotation(*r1);
    if constexpr (Sites::layer_norm)
      report.untied_head = fold_layer_norms(m);
    else
      report.untied_head = fold_rms_norms(m);
    report.folded_norms = true;
    detail::rotate_input_side(m.embed_tokens.value, q);  // E ← E·Q: rows are residual vectors
    if constexpr (Sites::layer_norm) detail::rotate_input_side(m.embed_positions.value, q);
    for (Block& b : m.blocks) {
      for (LinearLayer<T>* l : Sites::readers(b)) detail::rotate_input_side(l->weight.value, q);
      for (LinearLayer<T>* l : Sites::writers(b)) detail::rotate_writer(*l, q);
    }
    detail::rotate_input_side(m.lm_head.value, q);
    // OPT's final norm keeps a bias (fold_layer_norms): it lives in the residual's basis.
    if constexpr (Sites::layer_norm)
      detail::rotate_rows(m.final_norm_bias.value.data(), 1, m.config.dim, q, false);
    report.r1 = r1->description() + (q.householder.empty() ? "" : " · mean-keeping reflection");
  }
  if (r2) {
    for (Block& b : m.blocks) {
      detail::rotate_writer(b.v_proj, *r2);  // v_h ← v_h·Q₂, every value head
      detail::rotate_input_side(Sites::attention_out(b).weight.value, *r2);
    }
    report.r2 = r2->description();
  }
  if (r4) {
    for (Block& b : m.blocks) {
      detail::rotate_input_side(Sites::mlp_out(b).weight.value, *r4);  // W ← W·Q₄
      Sites::mlp_rotation(b) = r4;
    }
    report.r4 = r4->description();
  }
  return report;
}

// The rotations chosen at compile time: rotate_model(model, Rotation<R1, R2>{}, seed).
template <class Block, class... Rs>
RotationReport rotate_model(Transformer<Block>& m, Rotation<Rs...>, uint64_t seed = 0) {
  return rotate_model(m, Rotation<Rs...>::options(seed));
}
// ---- Fitted online transforms ----

struct FitOptions {
  bool down = true;                      // fit R4 before down_proj / fc2 (the model must have R4)
  bool mlp_in = true;                    // add a fitted transform before gate/up (fc1)
  uint64_t seed = 0;                     // the mlp_in transform's randomised Hadamard: seed + 3
  bool allow_random_orthogonal = false;  // for d without a Hadamard construction
  double damp = 1e-4;  // added to both fitted matrices' diagonals, relative to their mean
  bool any() const { return down || mlp_in; }
};

struct FittedTransformReport {
  // Per block: the predicted output-noise power of the input's quantization, fitted / before.
  std::vector<double> down_gain, mlp_in_gain;
  std::string mlp_in_rotation;  // Q of the mlp_in transform
  std::string summary() const {
    std::string s;
    for (auto [gains, name] :
         {std::pair{&down_gain, "R4 (down)"}, std::pair{&mlp_in_gain, "MLP input"}}) {
      if (gains->empty()) continue;
      const auto [lo, hi] = std::minmax_element(gains->begin(), gains->end());
      s += fmt::format("{}{} fitted in {} blocks (predicted output noise ×{:.2f}–{:.2f})",
                       s.empty() ? "" : "; ", name, gains->size(), *lo, *hi);
    }
    return s.empty() ? std::string("nothing fitted") : s;
  }
};

namespace detail {

// A host tensor's values in double.
template <class T>
std::vector<double> to_double(const Tensor<T>& t) {
  return std::vector<double>(t.data(), t.data() + t.numel());
}

// out (rows × n) = op(a)·op(b) in double, op(b) n × n, row-major (rows = a's row count).
inline void multiply(bool trans_a, bool trans_b, int64_t n, const std::vector<double>& a,
                     const std::vector<double>& b, std::vector<double>& out) {
  const int64_t rows = static_cast<int64_t>(a.size()) / n;
  out.resize(a.size());
  blas::gemm<double>(trans_a, trans_b, rows, n, n, 1.0, a.data(), n, b.data(), n, 0.0, out.data(),
                     n);
}

// P (lower triangular, n × n) with P·Pᵀ = C⁻¹ # G = L⁻ᵀ·(Lᵀ·G·L)^½·L⁻¹ (C = L·Lᵀ), both damped by
// damp · their mean diagonal; and the predicted noise ratio (tr (LᵀGL)^½)² / (tr C · tr G), the
// ratio of tr(C·M)·tr(G·M⁻¹) at M = P·Pᵀ to its value at M = I.
inline std::pair<std::vector<double>, double> fit_noise_shaping(std::vector<double> c,
                                                                std::vector<double> g, int64_t n,
                                                                double damp,
                                                                const std::string& where) {
  const auto at = [n](std::vector<double>& a, int64_t i, int64_t j) -> double& {
    return a[static_cast<size_t>(i * n + j)];
  };
  double tr_c = 0, tr_g = 0;
  for (int64_t i = 0; i < n; ++i) tr_c += at(c, i, i), tr_g += at(g, i, i);
  CBQ_CHECK(tr_c > 0 && tr_g > 0 && std::isfinite(tr_c) && std::isfinite(tr_g),
            "fit_online_transforms: {}: the input covariance (trace {}) or the readers' Gram "
            "matrix (trace {}) is not positive and finite",
            where, tr_c, tr_g);
  for (int64_t i = 0; i < n; ++i) at(c, i, i) += damp * tr_c / n, at(g, i, i) += damp * tr_g / n;
  tr_c *= 1 + damp, tr_g *= 1 + damp;
  const linalg::PivotFailure fc = linalg::cholesky_lower(c.data(), n, n);  // c ← L
  CBQ_CHECK(!fc.failed(),
            "fit_online_transforms: {}: the input covariance is not positive definite (pivot {} "
            "at column {})",
            where, fc.pivot, fc.column);
  std::vector<double> tmp(static_cast<size_t>(n * n)), s(tmp.size());
  multiply(false, false, n, g, c, tmp);  // G·L
  multiply(true, false, n, c, tmp, s);   // S = Lᵀ·G·L
  std::vector<double> w, v;
  const int info = linalg::symmetric_eigen(s.data(), n, w, v);
  CBQ_CHECK(info == 0, "fit_online_transforms: {}: the eigendecomposition failed (LAPACK info {})",
            where, info);
  double tr_root = 0;
  for (int64_t j = 0; j < n; ++j) {  // tmp = V·diag(√w)
    const double r = std::sqrt(std::max(w[static_cast<size_t>(j)], 0.0));
    tr_root += r;
    for (int64_t i = 0; i < n; ++i) at(tmp, i, j) = at(v, i, j) * r;
  }
  multiply(false, true, n, tmp, v, s);  // S^½
  std::vector<double> linv;
  linalg::invert_lower(c.data(), n, linv);
  multiply(false, false, n, s, linv, tmp);  // S^½·L⁻¹
  multiply(true, false, n, linv, tmp, s);   // M = L⁻ᵀ·S^½·L⁻¹
  for (int64_t i = 0; i < n; ++i)           // exact symmetry for the factorisation
    for (int64_t j = 0; j < i; ++j) at(s, i, j) = at(s, j, i) = 0.5 * (at(s, i, j) + at(s, j, i));
  const linalg::PivotFailure fm = linalg::cholesky_lower(s.data(), n, n);  // s ← P
  CBQ_CHECK(!fm.failed(),
            "fit_online_transforms: {}: the fitted scaling is not positive definite (pivot {} at "
            "column {})",
            where, fm.pivot, fm.column);
  return {std::move(s), tr_root * tr_root / (tr_c * tr_g)};
}

// Σ uᵀu over the rows of `in` (n columns) into the lower triangle of c.
template <class T>
void add_gram_rows(std::vector<double>& c, const Tensor<T>& in, int64_t n, int64_t& count) {
  const std::vector<double> rows = to_double(in.device() == Device::cpu ? in : in.to(Device::cpu));
  const int64_t r = static_cast<int64_t>(rows.size()) / n;
  cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, static_cast<int>(n), static_cast<int>(r), 1.0,
              rows.data(), static_cast<int>(n), 1.0, c.data(), static_cast<int>(n));
  count += r;
}

// Fits the transform of one input site: `base` (n × n, or empty for I) is what the readers'
// input already went through; the new online op is base·P·Q and every reader W ← W·P⁻ᵀ·Q.
// Returns the op and the predicted noise ratio.
template <class T>
std::pair<std::shared_ptr<const ops::HadamardTransform>, double> fit_site(
    std::vector<double> c, int64_t count, const std::vector<LinearLayer<T>*>& readers,
    const std::vector<double>& base, const std::vector<double>& q, double damp,
    const std::string& where, std::string description) {
  const int64_t n = readers.front()->in_features();
  CBQ_CHECK(count > 0, "fit_online_transforms: {} saw no input", where);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) c[i * n + j] = c[j * n + i] = c[i * n + j] / count;
  std::vector<double> g(static_cast<size_t>(n * n), 0.0);
  std::vector<std::vector<double>> weights;  // (out, n) each
  for (LinearLayer<T>* l : readers) {
    weights.push_back(to_double(l->weight.value.to(Device::cpu)));
    blas::gemm<double>(true, false, n, n, l->out_features(), 1.0, weights.back().data(), n,
                       weights.back().data(), n, 1.0, g.data(), n);  // G += WᵀW
  }
  auto [p, gain] = fit_noise_shaping(std::move(c), std::move(g), n, damp, where);
  std::vector<double> pq, k, pinv, piq, folded;
  multiply(false, false, n, p, q, pq);  // P·Q
  if (base.empty())
    k = pq;
  else
    multiply(false, false, n, base, pq, k);  // base·P·Q
  linalg::invert_lower(p.data(), n, pinv);
  multiply(true, false, n, pinv, q, piq);  // P⁻ᵀ·Q
  for (size_t li = 0; li < readers.size(); ++li) {
    multiply(false, false, n, weights[li], piq, folded);  // W·P⁻ᵀ·Q
    Tensor<T>& w = readers[li]->weight.value;
    w.copy_from(Tensor<double>::from(folded, w.shape()).template cast<T>());
  }
  return {std::make_shared<const ops::HadamardTransform>(
              ops::HadamardTransform::dense(n, std::move(k), std::move(description))),
          gain};
}

}  // namespace detail

// Fits the online transforms `opt` asks for (see the top of this file) to the inputs of the
// full-precision model on `samples` (token ids, each a sequence from position 0), in place; the
// model computes the same function up to rounding. `down` needs R4 on every block; each site is
// fitted once.
template <class Block>
FittedTransformReport fit_online_transforms(Transformer<Block>& m,
                                            const std::vector<std::vector<int32_t>>& samples,
                                            const FitOptions& opt = {}) {
  using T = typename Block::scalar_type;
  using Sites = detail::RotationSites<Block>;
  CBQ_CHECK(!samples.empty(), "fit_online_transforms: no calibration samples");
  CBQ_CHECK(opt.damp >= 0 && std::isfinite(opt.damp),
            "fit_online_transforms: damping {} must be ≥ 0", opt.damp);
  for (Block& b : m.blocks) {
    if (opt.down)
      CBQ_CHECK(Sites::mlp_rotation(b) && Sites::mlp_rotation(b)->kernel_kind() !=
                                              ops::HadamardTransform::KernelKind::dense,
                "fit_online_transforms: block {} {} before {}; fitting R4 needs a model rotated "
                "with R4, fitted once",
                b.index(), Sites::mlp_rotation(b) ? "already has a fitted transform" : "has no R4",
                Sites::mlp_out(b).name);
    if (opt.mlp_in)
      CBQ_CHECK(!Sites::mlp_input_transform(b),
                "fit_online_transforms: block {} already has a fitted transform before {}",
                b.index(), Sites::mlp_in(b).front()->name);
  }
  FittedTransformReport report;
  if (!opt.any()) return report;
  const int64_t d = m.config.dim;
  std::vector<double> q_in;
  if (opt.mlp_in) {  // made first: an unsupported size changes nothing
    const ops::HadamardTransform h =
        ops::HadamardTransform::make(d, opt.seed + 3, true, opt.allow_random_orthogonal);
    q_in = h.dense();
    report.mlp_in_rotation = h.description();
  }
  std::vector<Tensor<T>> x;
  for (const auto& s : samples) x.push_back(m.embed_tensor(s));
  for (int64_t bi = 0; bi < m.num_blocks(); ++bi) {
    Block& b = m.blocks[static_cast<size_t>(bi)];
    LinearLayer<T>& down = Sites::mlp_out(b);
    const std::vector<LinearLayer<T>*> in_readers = Sites::mlp_in(b);
    const int64_t f = down.in_features();
    std::vector<double> c_down(opt.down ? static_cast<size_t>(f * f) : 0, 0.0),
        c_in(opt.mlp_in ? static_cast<size_t>(d * d) : 0, 0.0);
    int64_t n_down = 0, n_in = 0;
    BlockContext<T> ctx;
    ctx.full_precision = true;
    ctx.on_linear_input = [&](const LinearLayer<T>& layer, const Tensor<T>& in) {
      if (opt.down && &layer == &down) detail::add_gram_rows(c_down, in, f, n_down);
      if (opt.mlp_in && &layer == in_readers.front()) detail::add_gram_rows(c_in, in, d, n_in);
    };
    for (Tensor<T>& xs : x) xs = m.run_block(bi, xs, ctx);
    if (opt.down) {
      auto& r4 = Sites::mlp_rotation(b);
      const std::vector<double> r = r4->dense();
      auto [t, gain] =
          detail::fit_site<T>(std::move(c_down), n_down, {&down}, r, r, opt.damp,
                              fmt::format("block {} ({} input)", bi, down.name),
                              fmt::format("{} · fitted scaling · the same", r4->description()));
      r4 = std::move(t);
      report.down_gain.push_back(gain);
    }
    if (opt.mlp_in) {
      auto [t, gain] =
          detail::fit_site<T>(std::move(c_in), n_in, in_readers, {}, q_in, opt.damp,
                              fmt::format("block {} ({} input)", bi, in_readers.front()->name),
                              fmt::format("fitted scaling · {}", report.mlp_in_rotation));
      Sites::mlp_input_transform(b) = std::move(t);
      report.mlp_in_gain.push_back(gain);
    }
  }
  return report;
}

}  // namespace cbq
