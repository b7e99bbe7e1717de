#pragma once
// Offline rotation of a LLaMA model (QuaRot / SpinQuant R1 and R2; docs/ROTATION.md): the
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
// R3 (q/k after RoPE) is not offered: it only changes what a quantized KV cache sees, and cbq
// quantizes no KV cache (docs/ROTATION.md).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cbq/model/llama_block.hpp"
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
    if (folded_norms) s += "RMSNorm weights folded";
    if (untied_head) s += ", LM head untied";
    for (auto [d, name] : {std::pair{&r1, "R1"}, std::pair{&r2, "R2"}, std::pair{&r4, "R4"}})
      if (!d->empty()) s += fmt::format("{}{}: {}", s.empty() ? "" : "; ", name, *d);
    return s.empty() ? "no rotation" : s;
  }
};

// Which online rotations a model needs at run time ("" when none): exports refuse such a model.
template <class Block>
std::string online_rotations(Transformer<Block>& m) {
  if constexpr (std::is_same_v<Block, LlamaBlock<typename Block::scalar_type>>) {
    for (Block& b : m.blocks)
      if (b.down_proj_rotation)
        return fmt::format("an R4 rotation of the MLP activation before down_proj (block {}: {})",
                           b.index(), b.down_proj_rotation->description());
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

// data (rows, C), C a multiple of h.size(): every chunk x ← x·M (transpose: x·Mᵀ), computed in
// double and rounded once.
template <class T>
void rotate_rows(T* data, int64_t rows, int64_t cols, const ops::HadamardTransform& h,
                 bool transpose) {
  CBQ_CHECK(cols % h.size() == 0, "rotate: rows of {} values are not chunks of {}", cols, h.size());
  const int64_t chunks_per_row = cols / h.size();
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 16) / cols);
  std::vector<double> buf;
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t nr = std::min(block, rows - r0);
    buf.assign(data + r0 * cols, data + (r0 + nr) * cols);
    h.apply<double>(buf.data(), buf.data(), nr * chunks_per_row, transpose, false);
    std::transform(buf.begin(), buf.end(), data + r0 * cols,
                   [](double v) { return static_cast<T>(v); });
  }
}

// W (out, in) ← Mᵀ·W chunk-wise along `out`: the transposed rows (columns of W) rotated.
template <class T>
void rotate_output_side(Tensor<T>& w, const ops::HadamardTransform& h) {
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
void rotate_input_side(Tensor<T>& w, const ops::HadamardTransform& h) {  // W ← W·M
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

template <class T>
void check_rotatable(Transformer<LlamaBlock<T>>& m, const char* what) {
  CBQ_CHECK(m.device() == Device::cpu, "{}: the model is on {}; rotate it on the CPU, then move it",
            what, device_name(m.device()));
  for (LlamaBlock<T>& b : m.blocks)
    for (LinearLayer<T>* l : b.linears())
      CBQ_CHECK(!l->transform,
                "{}: layer {} of block {} has a quantization transform installed; rotate the "
                "full-precision model before quantizing it",
                what, l->name, b.index());
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
  const bool untie = m.config.tied_embeddings;
  if (untie) {
    m.lm_head = Parameter<T>("lm_head.weight", m.embed_tokens.value.clone(), false);
    m.config.tied_embeddings = false;
  }
  detail::scale_columns(m.lm_head.value, m.final_norm_weight.value);
  detail::set_ones(m.final_norm_weight.value);
  return untie;
}

// Throws a cbq::Error, before any work, when `opt` cannot rotate a model of `c`: a family other
// than LLaMA (OPT's LayerNorm subtracts the mean, which the residual rotation needs removed
// first; not built), or a size without a transform (unless the random orthogonal fallback is on).
inline void check_rotation(const ModelConfig& c, const RotationOptions& opt) {
  if (!opt.any()) return;
  CBQ_CHECK(c.family == Family::llama,
            "rotate_model: rotations ({}) are built for LLaMA-family models; {} ({} blocks) is "
            "not supported (LayerNorm subtracts the mean, which the residual rotation needs "
            "removed first)",
            opt.describe(), c.architecture, family_name(c.family));
  detail::make_rotations(c, opt);
}

// Applies the rotations `opt` asks for, in place; the logits stay the same up to rounding
// (tests/test_model_rotation.cpp gives the tolerances).
template <class T>
RotationReport rotate_model(Transformer<LlamaBlock<T>>& m, const RotationOptions& opt = {}) {
  detail::check_rotatable(m, "rotate_model");
  const ModelConfig& c = m.config;
  RotationReport report;
  if (opt.r4)
    for (LlamaBlock<T>& b : m.blocks)
      CBQ_CHECK(!b.down_proj_rotation,
                "rotate_model: block {} already has an R4 rotation ({}); rotate a model once",
                b.index(), b.down_proj_rotation->description());
  // Every transform first, so an unsupported size changes nothing.
  auto [r1, r2, r4] = detail::make_rotations(c, opt);
  if (r1) {
    report.untied_head = fold_rms_norms(m);
    report.folded_norms = true;
    detail::rotate_input_side(m.embed_tokens.value, *r1);  // E ← E·Q: rows are residual vectors
    for (LlamaBlock<T>& b : m.blocks) {
      for (LinearLayer<T>* l : {&b.q_proj, &b.k_proj, &b.v_proj, &b.gate_proj, &b.up_proj})
        detail::rotate_input_side(l->weight.value, *r1);
      for (LinearLayer<T>* l : {&b.o_proj, &b.down_proj}) {
        detail::rotate_output_side(l->weight.value, *r1);
        if (l->has_bias()) detail::rotate_rows(l->bias.value.data(), 1, c.dim, *r1, false);
      }
    }
    detail::rotate_input_side(m.lm_head.value, *r1);
    report.r1 = r1->description();
  }
  if (r2) {
    for (LlamaBlock<T>& b : m.blocks) {
      detail::rotate_output_side(b.v_proj.weight.value, *r2);
      if (b.v_proj.has_bias())
        detail::rotate_rows(b.v_proj.bias.value.data(), 1, c.n_kv_heads * c.head_dim, *r2, false);
      detail::rotate_input_side(b.o_proj.weight.value, *r2);
    }
    report.r2 = r2->description();
  }
  if (r4) {
    for (LlamaBlock<T>& b : m.blocks) {
      detail::rotate_input_side(b.down_proj.weight.value, *r4);  // W ← W·Q₄
      b.down_proj_rotation = r4;
    }
    report.r4 = r4->description();
  }
  return report;
}

// The same for a loaded model of either family: OPT is refused (its LayerNorm subtracts the
// mean, which R1 needs removed from the residual first; not built, docs/ROTATION.md).
template <class Block>
RotationReport rotate_model(Transformer<Block>& m, const RotationOptions& opt) {
  check_rotation(m.config, opt);
  fail("rotate_model: {} is not a LLaMA-family model", m.config.architecture);
}

// The rotations chosen at compile time: rotate_model(model, Rotation<R1, R2>{}, seed).
template <class Block, class... Rs>
RotationReport rotate_model(Transformer<Block>& m, Rotation<Rs...>, uint64_t seed = 0) {
  return rotate_model(m, Rotation<Rs...>::options(seed));
}

}  // namespace cbq
