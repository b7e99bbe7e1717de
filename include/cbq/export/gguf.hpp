#pragma once
// A LLaMA-family Transformer (optionally with the QuantizationResult of RTN, GPTQ or CBQ) as a
// llama.cpp GGUF file. Reading one back: formats/gguf_llama.hpp (bytes) and model/load.hpp
// (io::load_gguf_llama). See docs/GGUF.md.
//
//   auto result = Pass{options}.run(m, calib);
//   auto report = cbq::io::export_gguf("model-q4_0.gguf", m, m.tokenizer.get(), &result);
//   auto back = cbq::io::load_gguf_llama("model-q4_0.gguf");   // scores like the file
//
// What is written:
//  * metadata for architecture "llama" (dimensions, heads, RoPE, norm epsilon, context) and the
//    vocabulary (tokenizer.ggml.*, as llama.cpp's llama2.c converter writes it);
//  * tensors under llama.cpp's names (token_embd, blk.N.attn_q, …, output_norm, output);
//    q/k rows of Hugging Face models (rotate-half RoPE) permuted to llama.cpp's interleaved
//    layout, so the file computes the same function;
//  * the FFN hidden size padded with zeros to a multiple of 32 (gate/up zero rows, down zero
//    columns), so every matrix has whole 32-element blocks (stories260K: 172 → 192);
//  * quantized layers as Q4_0 (4-bit symmetric), Q4_1 (4-bit asymmetric) or Q8_0 (8-bit
//    symmetric), one block per 32 columns, with scales rounded to fp16 by snap_result_for_gguf
//    (the file then holds exactly the snapped result); everything else F32 (or F16).
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cbq/formats/gguf.hpp"
#include "cbq/model/llama_block.hpp"
#include "cbq/model/transformer.hpp"
#include "cbq/quant/result.hpp"
#include "cbq/tokenizer/byte_level_bpe.hpp"
#include "cbq/tokenizer/hf_tokenizer.hpp"
#include "cbq/tokenizer/llama2c_tokenizer.hpp"

namespace cbq::io {

// llama.cpp's llama_token_type.
using GgufTokenType = TokenType;

// ---- quantized weights → llama.cpp block types ----

// The block type holding `spec`, or a cbq::Error naming `layer` and the setting.
inline GgmlType gguf_weight_type(const quant::GridSpec& spec, const std::string& layer) {
  std::string why;
  if (spec.granularity == quant::Granularity::per_tensor)
    why = "one step for the whole matrix has no GGUF block type";
  else if (spec.granularity == quant::Granularity::per_group && spec.group_size % 32 != 0)
    why = fmt::format("group size {} is not a multiple of 32", spec.group_size);
  else if (spec.bits == 4)
    return spec.symmetric ? GgmlType::q4_0 : GgmlType::q4_1;
  else if (spec.bits == 8 && spec.symmetric)
    return GgmlType::q8_0;
  else if (spec.bits == 8)
    why = "8-bit asymmetric has no GGUF block type (Q8_0 is symmetric)";
  else
    why = fmt::format("{}-bit weights have no GGUF block type of this layout", spec.bits);
  const char* gran = spec.granularity == quant::Granularity::per_group     ? "per-group"
                     : spec.granularity == quant::Granularity::per_channel ? "per-channel"
                                                                           : "per-tensor";
  fail(
      "GGUF export: layer '{}' is quantized W{} {}{} {}: {}. GGUF's Q4_0 / Q4_1 / Q8_0 hold "
      "4-bit symmetric, 4-bit asymmetric and 8-bit symmetric weights with groups of a multiple "
      "of 32 columns or one step per row; export this result with cbq::io::save_native (cbq's "
      "own format) or a GPTQ export instead",
      layer, spec.bits, gran,
      spec.granularity == quant::Granularity::per_group ? fmt::format(" g{}", spec.group_size)
                                                        : std::string(),
      spec.symmetric ? "symmetric" : "asymmetric", why);
}

// ---- fp16 steps ----

struct GgufSnapStats {
  int64_t steps = 0;                               // (s, z) pairs seen
  int64_t changed = 0;                             // steps that were not fp16 values already
  double max_rel_change = 0, mean_rel_change = 0;  // |s' − s| / s
};

namespace detail {

inline bool fp16_exact(float x) { return f16_to_float(float_to_f16(x)) == x; }

// The fp16 step d nearest to s such that the block holds the grid exactly: d > 0 and, for
// Q4_1, m = −d·z is an fp16 value too (so d·q + m = d·(q − z) in float for every code q).
inline uint16_t snap_step(float s, float z, bool asymmetric, const std::string& where) {
  CBQ_CHECK(std::isfinite(s) && s > 0, "GGUF export: {}: step {} is not positive and finite", where,
            s);
  CBQ_CHECK(s <= 65504.0f, "GGUF export: {}: step {} exceeds the fp16 range (65504)", where, s);
  uint16_t h0 = float_to_f16(s);
  if (h0 == 0) h0 = 1;  // keep the step positive: 2^-24, fp16's smallest subnormal
  if (!asymmetric || z == 0) return h0;
  auto ok = [&](int h) {
    if (h < 1 || h > 0x7BFF) return false;
    const float m = f16_to_float(static_cast<uint16_t>(h)) * z;  // exact: ≤ 15 significant bits
    return m <= 65504.0f && fp16_exact(m);
  };
  int best = -1;
  float best_err = 0;
  for (int delta = 0; delta <= 64; ++delta)
    for (int h : {h0 - delta, h0 + delta}) {
      if (!ok(h)) continue;
      const float err = std::abs(f16_to_float(static_cast<uint16_t>(h)) - s);
      if (best < 0 || err < best_err || (err == best_err && h < best)) {
        best = h;
        best_err = err;
      }
    }
  CBQ_CHECK(best >= 0,
            "GGUF export: {}: no fp16 step near {} makes the Q4_1 minimum −step·{} an fp16 value",
            where, s, z);
  return static_cast<uint16_t>(best);
}

}  // namespace detail

// A copy of `w` whose steps are fp16 values (nearest, and for asymmetric weights such that
// −s·z is an fp16 value as well); codes and zero-points are kept. Its dequantized weight is
// exactly what the GGUF file holds. Throws for settings GGUF cannot hold (gguf_weight_type).
inline quant::QuantizedWeight snap_weight_for_gguf(const quant::QuantizedWeight& w,
                                                   const std::string& layer,
                                                   GgufSnapStats* stats = nullptr) {
  gguf_weight_type(w.spec, layer);
  quant::QuantizedWeight out = w;
  out.scale = w.scale.clone();
  const bool asym = !w.spec.symmetric;
  double sum = 0;
  for (int64_t i = 0; i < w.scale.numel(); ++i) {
    const float s = w.scale[i], z = asym ? w.zero[i] : 0.0f;
    if (asym)
      CBQ_CHECK(z == std::nearbyint(z) && z >= 0 && z <= static_cast<float>(w.spec.qmax()),
                "GGUF export: layer '{}': zero-point {} at {} is not an integer in [0, {}]", layer,
                z, i, w.spec.qmax());
    const float d =
        f16_to_float(detail::snap_step(s, z, asym, fmt::format("layer '{}' step {}", layer, i)));
    out.scale[i] = d;
    const double rel = std::abs(static_cast<double>(d) - s) / s;
    sum += rel;
    if (stats) {
      stats->max_rel_change = std::max(stats->max_rel_change, rel);
      if (d != s) ++stats->changed;
    }
  }
  if (stats) {
    const double n = static_cast<double>(stats->steps);
    const double k = static_cast<double>(w.scale.numel());
    stats->mean_rel_change = (stats->mean_rel_change * n + sum) / std::max(1.0, n + k);
    stats->steps += w.scale.numel();
  }
  return out;
}

// Every layer of `r` snapped with snap_weight_for_gguf.
inline QuantizationResult snap_result_for_gguf(const QuantizationResult& r,
                                               GgufSnapStats* stats = nullptr) {
  QuantizationResult out = r;
  for (LayerResult& l : out.layers) l.weight = snap_weight_for_gguf(l.weight, l.name, stats);
  return out;
}

// ---- vocabulary ----

struct GgufVocab {
  std::string model = "llama";  // tokenizer.ggml.model
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;  // GgufTokenType
  int32_t bos = -1, eos = -1, unk = -1, pad = -1;
  // Byte-level ("gpt2") vocabularies: merges "a b" in rank order and the pre-tokenizer name;
  // they have no scores.
  std::vector<std::string> merges;
  std::string pre;
  bool add_bos = true, add_eos = false;
};

// GGUF's view of a tokenizer, padded with unused "[PAD{id}]" tokens to `model_vocab_size`.
//  * llama2.c tokenizer.bin: as llama.cpp's convert-llama2c-to-ggml: id 0 "<unk>" unknown, 1
//    "<s>" and 2 "</s>" control, empty pieces control, "<0xXX>" byte, the rest normal; spaces
//    written as "▁" (U+2581); scores as stored.
//  * Hugging Face SentencePiece-style BPE (LLaMA-2 tokenizer.json): pieces as stored (they use
//    "▁"), score −(rank + 1) of the merge that makes a token (0 for base tokens), so llama.cpp's
//    highest-score-first merging follows the merge ranks; "<0xXX>" byte, special added tokens
//    control, "<unk>" unknown.
//  * byte-level BPE (a GGUF "gpt2" vocabulary read back, or a byte-level tokenizer.json whose
//    pre-tokenizer llama.cpp has a name for): model "gpt2", tokens as stored, token types,
//    merges, pre-tokenizer name, BOS/EOS/UNK/PAD and add_bos/add_eos, no scores; other
//    byte-level tokenizer.json files are a cbq::Error naming what has no llama.cpp equivalent.
inline GgufVocab gguf_vocab(const Tokenizer& tok, int64_t model_vocab_size) {
  GgufVocab v;
  const int32_t n = tok.vocab_size();
  CBQ_CHECK(n <= model_vocab_size,
            "GGUF export: the tokenizer has {} tokens but the model's vocabulary only {}", n,
            model_vocab_size);
  auto from_bpe = [&](const BpeVocabulary& b) {
    v.model = "gpt2";
    v.tokens = b.tokens;
    v.types = b.types;
    if (v.types.empty()) v.types.assign(v.tokens.size(), static_cast<int32_t>(TokenType::normal));
    v.merges = b.merges;
    v.pre = b.pre.empty() ? "default" : b.pre;
    v.bos = b.bos;
    v.eos = b.eos;
    v.unk = b.unk;
    v.pad = b.pad;
    v.add_bos = b.add_bos;
    v.add_eos = b.add_eos;
  };
  const auto* hf_tok = dynamic_cast<const HfTokenizer*>(&tok);
  if (const auto* bl = dynamic_cast<const ByteLevelBpeTokenizer*>(&tok)) {
    from_bpe(bl->vocabulary());
  } else if (hf_tok && hf_tok->kind() == HfTokenizer::Kind::byte_level) {
    try {
      from_bpe(hf_tok->gguf_vocabulary());
    } catch (const Error& e) {
      fail("GGUF export: {}", e.what());
    }
  }
  if (v.model == "gpt2") {
    for (int64_t id = n; id < model_vocab_size; ++id) {
      v.tokens.push_back(fmt::format("[PAD{}]", id));
      v.types.push_back(static_cast<int32_t>(GgufTokenType::unused));
    }
    return v;
  }
  static const std::string kSpace = "\xE2\x96\x81";  // ▁
  auto escape = [&](const std::string& s) {
    std::string out;
    for (char c : s) {
      if (c == ' ')
        out += kSpace;
      else
        out += c;
    }
    return out;
  };
  if (dynamic_cast<const Llama2cTokenizer*>(&tok)) {
    for (int32_t id = 0; id < n; ++id) {
      std::string text = tok.piece(id);
      GgufTokenType type = GgufTokenType::normal;
      if (id == 0) {
        text = "<unk>";
        type = GgufTokenType::unknown;
      } else if (id == Llama2cTokenizer::kBos) {
        text = "<s>";
        type = GgufTokenType::control;
      } else if (id == Llama2cTokenizer::kEos) {
        text = "</s>";
        type = GgufTokenType::control;
      } else if (text.empty()) {
        type = GgufTokenType::control;
      } else if (utf8::parse_byte_piece(text) >= 0) {
        type = GgufTokenType::byte;
      }
      v.tokens.push_back(escape(text));
      v.scores.push_back(tok.score(id));
      v.types.push_back(static_cast<int32_t>(type));
    }
    v.bos = Llama2cTokenizer::kBos;
    v.eos = Llama2cTokenizer::kEos;
    v.unk = 0;
  } else if (const auto* hf = dynamic_cast<const HfTokenizer*>(&tok)) {
    v.unk = hf->find("<unk>");
    // Decoded after a token that is not BOS, so a lone "▁" keeps its space.
    const int32_t not_bos = hf->bos_id() == 0 && n > 1 ? 1 : 0;
    for (int32_t id = 0; id < n; ++id) {
      const std::string& text = hf->piece(id);
      GgufTokenType type = GgufTokenType::normal;
      std::string out = text;
      if (text.empty()) {
        out = fmt::format("[PAD{}]", id);
        type = GgufTokenType::unused;
      } else if (id == v.unk) {
        type = GgufTokenType::unknown;
      } else if (utf8::parse_byte_piece(text) >= 0) {
        type = GgufTokenType::byte;
      } else if (hf->decode_piece(not_bos, id).empty()) {
        type = GgufTokenType::control;  // special added tokens decode to nothing
      }
      v.tokens.push_back(out);
      v.scores.push_back(hf->score(id));
      v.types.push_back(static_cast<int32_t>(type));
    }
    v.bos = hf->bos_id();
    v.eos = hf->eos_id();
  } else {
    fail(
        "GGUF export: unknown tokenizer type (cbq exports llama2.c, Hugging Face and GGUF "
        "byte-level BPE vocabularies)");
  }
  for (int64_t id = n; id < model_vocab_size; ++id) {
    v.tokens.push_back(fmt::format("[PAD{}]", id));
    v.scores.push_back(0.0f);
    v.types.push_back(static_cast<int32_t>(GgufTokenType::unused));
  }
  return v;
}

// ---- export ----

struct GgufExportOptions {
  std::string name;                     // general.name; default: the model's architecture
  GgmlType float_type = GgmlType::f32;  // matrices that are not quantized: F32 or F16
  uint32_t alignment = kGgufDefaultAlignment;
  // Pad the FFN hidden size to a multiple of this (0: never). Needed for quantized FFN layers
  // whose hidden size is not a multiple of 32; on by default so the file can also be requantized
  // by llama-quantize.
  int64_t pad_ffn_to = 32;
};

struct GgufExportReport {
  std::string path;
  uint64_t bytes = 0;
  int64_t tensors = 0;
  int64_t ffn_length = 0, ffn_padded = 0;
  std::map<std::string, int64_t> tensor_types;  // "Q4_0" → number of tensors
  GgufSnapStats snap;
  std::vector<std::string> notes;

  std::string summary() const {
    std::string types;
    for (const auto& [t, k] : tensor_types)
      types += fmt::format("{}{} {}", types.empty() ? "" : ", ", k, t);
    std::string s = fmt::format("{}: {} tensors ({}), {} bytes", path, tensors, types, bytes);
    if (ffn_padded != ffn_length) s += fmt::format("; FFN {} padded to {}", ffn_length, ffn_padded);
    if (snap.steps > 0)
      s += fmt::format("; {} of {} steps rounded to fp16 (max relative change {:.3g})",
                       snap.changed, snap.steps, snap.max_rel_change);
    for (const std::string& n : notes) s += "; " + n;
    return s;
  }
};

namespace detail {

// Source row of each destination row when HF rotate-half q/k rows become llama.cpp's interleaved
// pairs: dst h·hd + 2i + p ← src h·hd + p·hd/2 + i (convert_hf_to_gguf.py's permute).
inline std::vector<int64_t> interleave_rows(int64_t heads, int64_t head_dim) {
  std::vector<int64_t> src(static_cast<std::size_t>(heads * head_dim));
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t p = 0; p < 2; ++p)
        src[static_cast<std::size_t>(h * head_dim + 2 * i + p)] = h * head_dim + p * half + i;
  return src;
}
inline std::vector<int64_t> identity_rows(int64_t n) {
  std::vector<int64_t> v(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i;
  return v;
}

// One matrix (or vector) to write: rows × cols of the file from a source of src_rows × src_cols
// (rows[r] = source row or −1 for a zero row; columns past src_cols are zero).
struct GgufMatrix {
  std::string name;
  Tensor<float> values;                       // (src_rows, src_cols); a vector as (1, n)
  const quant::QuantizedWeight* q = nullptr;  // quantized source instead of values
  std::vector<int64_t> rows;
  int64_t cols = 0;
  GgmlType type = GgmlType::f32;
  bool is_vector = false;  // written with ne = {cols}

  std::vector<int64_t> ne() const {
    if (is_vector) return {cols};
    return {cols, static_cast<int64_t>(rows.size())};
  }
};

inline void fill_float(const GgufMatrix& m, std::span<std::byte> out) {
  const int64_t sc = m.values.size(1);
  const float* p = m.values.data();
  int64_t k = 0;
  for (int64_t src : m.rows)
    for (int64_t c = 0; c < m.cols; ++c, ++k) {
      const float x = src >= 0 && c < sc ? p[src * sc + c] : 0.0f;
      if (m.type == GgmlType::f32) {
        std::memcpy(out.data() + 4 * k, &x, 4);
      } else {
        const uint16_t h = float_to_f16(x);
        std::memcpy(out.data() + 2 * k, &h, 2);
      }
    }
}

inline void fill_quantized(const GgufMatrix& m, std::span<std::byte> out) {
  const quant::QuantizedWeight& w = *m.q;
  const int64_t C = w.cols(), blocks = m.cols / 32;
  std::byte* dst = out.data();
  uint8_t codes[32];
  for (int64_t src : m.rows)
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t c0 = 32 * k;
      float s = 0, z = 0;
      if (src >= 0) {
        const int64_t p = w.param_index(src, c0);
        s = w.scale[p];
        z = w.zero[p];
      }
      // Padding: the stored code whose value is exactly 0 (q = 0 symmetric, q = z asymmetric).
      const uint8_t zero_code = static_cast<uint8_t>(w.spec.symmetric ? -w.spec.qmin() : z);
      for (int64_t j = 0; j < 32; ++j)
        codes[j] = src >= 0 && c0 + j < C ? w.codes[src * C + c0 + j] : zero_code;
      const uint16_t d = float_to_f16(s);
      CBQ_CHECK(f16_to_float(d) == s,
                "GGUF export: {}: step {} is not an fp16 value (snap the result with "
                "snap_result_for_gguf)",
                m.name, s);
      if (m.type == GgmlType::q4_0) {
        const BlockQ4_0 b = make_block_q4_0(d, codes);
        std::memcpy(dst, &b, sizeof b);
        dst += sizeof b;
      } else if (m.type == GgmlType::q4_1) {
        const float mf = 0.0f - f16_to_float(d) * z;  // +0 (not −0) when z = 0
        const uint16_t mh = float_to_f16(mf);
        CBQ_CHECK(f16_to_float(mh) == mf,
                  "GGUF export: {}: minimum −{}·{} is not an fp16 value (snap the result with "
                  "snap_result_for_gguf)",
                  m.name, s, z);
        const BlockQ4_1 b = make_block_q4_1(d, mh, codes);
        std::memcpy(dst, &b, sizeof b);
        dst += sizeof b;
      } else {
        int8_t q[32];
        for (int j = 0; j < 32; ++j) q[j] = static_cast<int8_t>(static_cast<int>(codes[j]) - 128);
        const BlockQ8_0 b = make_block_q8_0(d, q);
        std::memcpy(dst, &b, sizeof b);
        dst += sizeof b;
      }
    }
}

inline uint32_t to_u32(int64_t v, const char* what) {
  CBQ_CHECK(v >= 0 && v <= static_cast<int64_t>(UINT32_MAX),
            "GGUF export: {} = {} does not fit u32", what, v);
  return static_cast<uint32_t>(v);
}

}  // namespace detail

// Writes `model` (and, if given, the quantized layers of `result`) as a GGUF file for llama.cpp.
// `tokenizer` is written as the vocabulary (nullptr: none, tokenizer.ggml.model = "no_vocab").
// Quantized layers are snapped to fp16 steps first (snap_result_for_gguf; a result that is
// snapped already is written unchanged). Activation quantizers are not stored.
template <class T>
GgufExportReport export_gguf(const std::string& path, Transformer<LlamaBlock<T>>& model,
                             const Tokenizer* tokenizer, const QuantizationResult* result,
                             const GgufExportOptions& options = {}) {
  const ModelConfig& c = model.config;
  CBQ_CHECK(c.family == Family::llama, "GGUF export: {}: only LLaMA-family models", path);
  CBQ_CHECK(options.float_type == GgmlType::f32 || options.float_type == GgmlType::f16,
            "GGUF export: float_type must be F32 or F16, not {}",
            ggml_type_name(options.float_type));
  CBQ_CHECK(c.head_dim % 2 == 0, "GGUF export: head_dim {} must be even for RoPE", c.head_dim);
  GgufExportReport report;
  report.path = path;
  report.ffn_length = c.hidden_dim;

  // Quantized layers, snapped, by name; anything else in the result is an error.
  std::map<std::string, quant::QuantizedWeight> quantized;
  bool dropped_act = false;
  if (result) {
    for (const LayerResult& l : result->layers) {
      quantized[l.name] = snap_weight_for_gguf(l.weight, l.name, &report.snap);
      dropped_act = dropped_act || l.act_scale != 0 || l.act_clip_logit != 0;
    }
  }
  bool quantized_ffn = false;
  for (const auto& [name, w] : quantized)
    if (name.find(".down_proj") != std::string::npos) quantized_ffn = true;
  const int64_t pad = options.pad_ffn_to;
  const int64_t F = c.hidden_dim;
  const int64_t Fp = pad > 0 ? (F + pad - 1) / pad * pad : F;
  CBQ_CHECK(!quantized_ffn || Fp % 32 == 0,
            "GGUF export: FFN hidden size {} (padded to {}) is not a multiple of 32, which the "
            "quantized down_proj needs; set pad_ffn_to = 32",
            F, Fp);
  report.ffn_padded = Fp;

  GgufWriter w;
  const std::string arch = "llama";
  w.set_string("general.architecture", arch);
  w.set_string("general.name", options.name.empty() ? c.architecture : options.name);
  if (options.alignment != kGgufDefaultAlignment) w.set_alignment(options.alignment);
  GgmlType main_type = GgmlType::f32;
  if (!quantized.empty()) main_type = gguf_weight_type(quantized.begin()->second.spec, "");
  const uint32_t file_type = main_type == GgmlType::q4_0           ? 2
                             : main_type == GgmlType::q4_1         ? 3
                             : main_type == GgmlType::q8_0         ? 7
                             : options.float_type == GgmlType::f16 ? 1
                                                                   : 0;
  w.set_scalar<uint32_t>("general.file_type", file_type);
  if (!quantized.empty()) w.set_scalar<uint32_t>("general.quantization_version", 2);
  auto u32 = [&](const std::string& key, int64_t v) {
    w.set_scalar<uint32_t>(key, detail::to_u32(v, key.c_str()));
  };
  u32(arch + ".vocab_size", c.vocab_size);
  u32(arch + ".context_length", c.max_seq_len);
  u32(arch + ".embedding_length", c.dim);
  u32(arch + ".block_count", c.n_layers);
  u32(arch + ".feed_forward_length", Fp);
  u32(arch + ".attention.head_count", c.n_heads);
  u32(arch + ".attention.head_count_kv", c.n_kv_heads);
  u32(arch + ".rope.dimension_count", c.head_dim);
  if (c.head_dim * c.n_heads != c.dim) {
    u32(arch + ".attention.key_length", c.head_dim);
    u32(arch + ".attention.value_length", c.head_dim);
  }
  w.set_scalar<float>(arch + ".attention.layer_norm_rms_epsilon", static_cast<float>(c.norm_eps));
  w.set_scalar<float>(arch + ".rope.freq_base", static_cast<float>(c.rope_theta));

  if (tokenizer) {
    GgufVocab v = gguf_vocab(*tokenizer, c.vocab_size);
    w.set_string("tokenizer.ggml.model", v.model);
    if (!v.pre.empty()) w.set_string("tokenizer.ggml.pre", v.pre);
    w.set("tokenizer.ggml.tokens", GgufValue::array_of(v.tokens));
    if (!v.scores.empty()) w.set("tokenizer.ggml.scores", GgufValue::array_of(v.scores));
    w.set("tokenizer.ggml.token_type", GgufValue::array_of(v.types));
    if (v.model == "gpt2") w.set("tokenizer.ggml.merges", GgufValue::array_of(v.merges));
    if (v.bos >= 0) u32("tokenizer.ggml.bos_token_id", v.bos);
    if (v.eos >= 0) u32("tokenizer.ggml.eos_token_id", v.eos);
    if (v.unk >= 0) u32("tokenizer.ggml.unknown_token_id", v.unk);
    if (v.pad >= 0) u32("tokenizer.ggml.padding_token_id", v.pad);
    w.set_scalar<bool>("tokenizer.ggml.add_bos_token", v.add_bos);
    w.set_scalar<bool>("tokenizer.ggml.add_eos_token", v.add_eos);
  } else {
    w.set_string("tokenizer.ggml.model", "no_vocab");
    report.notes.push_back("no vocabulary written");
  }
  // cbq's own keys (llama.cpp ignores them): what the loader needs to give back the original.
  w.set_string("cbq.architecture", c.architecture);
  if (Fp != F) u32("cbq.feed_forward_length_unpadded", F);
  if (result) {
    w.set_string("cbq.method", result->method);
    w.set_string("cbq.config", result->config);
  }
  if (dropped_act)
    report.notes.push_back(
        "activation quantizers are not stored (llama.cpp quantizes activations its own way)");

  // Tensors in llama.cpp's order.
  std::vector<detail::GgufMatrix> mats;
  auto as_float = [](const Tensor<T>& t) -> Tensor<float> {
    if constexpr (std::is_same_v<T, float>) {
      return t.to(Device::cpu).contiguous();
    } else {
      return t.to(Device::cpu).contiguous().template cast<float>();
    }
  };
  // A vector (norm weight, bias), rows[i] = source index or −1 for a zero entry.
  auto vector_tensor = [&](const std::string& name, const Tensor<T>& t,
                           const std::vector<int64_t>& rows) {
    const Tensor<float> src = as_float(t);
    Tensor<float> v = Tensor<float>::empty(Shape{1, static_cast<int64_t>(rows.size())});
    for (std::size_t i = 0; i < rows.size(); ++i)
      v[static_cast<int64_t>(i)] = rows[i] >= 0 ? src[rows[i]] : 0.0f;
    mats.push_back({name, v, nullptr, {0}, static_cast<int64_t>(rows.size()), GgmlType::f32, true});
  };
  auto matrix = [&](const std::string& name, const Tensor<T>& t, std::vector<int64_t> rows,
                    int64_t cols) {
    mats.push_back({name, as_float(t), nullptr, std::move(rows), cols, options.float_type, false});
  };
  const bool permute_qk = c.rope_layout == RopeLayout::rotate_half;
  const int64_t q_rows = c.n_heads * c.head_dim, kv_rows = c.n_kv_heads * c.head_dim;
  const std::vector<int64_t> rq =
      permute_qk ? detail::interleave_rows(c.n_heads, c.head_dim) : detail::identity_rows(q_rows);
  const std::vector<int64_t> rk = permute_qk ? detail::interleave_rows(c.n_kv_heads, c.head_dim)
                                             : detail::identity_rows(kv_rows);
  const std::vector<int64_t> rv = detail::identity_rows(kv_rows);
  const std::vector<int64_t> rd = detail::identity_rows(c.dim);
  std::vector<int64_t> rf = detail::identity_rows(F);
  rf.resize(static_cast<std::size_t>(Fp), -1);
  std::map<std::string, bool> consumed;

  matrix("token_embd.weight", model.embed_tokens.value, detail::identity_rows(c.vocab_size), c.dim);
  for (int64_t b = 0; b < model.num_blocks(); ++b) {
    auto& blk = model.blocks[static_cast<std::size_t>(b)];
    const std::string p = fmt::format("blk.{}.", b);
    vector_tensor(p + "attn_norm.weight", blk.input_layernorm.value, rd);
    struct Lin {
      LinearLayer<T>* layer;
      const char* gguf;
      const std::vector<int64_t>* rows;
      int64_t cols;
    };
    const Lin lins[] = {
        {&blk.q_proj, "attn_q", &rq, c.dim},      {&blk.k_proj, "attn_k", &rk, c.dim},
        {&blk.v_proj, "attn_v", &rv, c.dim},      {&blk.o_proj, "attn_output", &rd, q_rows},
        {&blk.gate_proj, "ffn_gate", &rf, c.dim}, {&blk.down_proj, "ffn_down", &rd, Fp},
        {&blk.up_proj, "ffn_up", &rf, c.dim},
    };
    for (const Lin& l : lins) {
      const std::string name = p + l.gguf + ".weight";
      const std::string layer = fmt::format("layers.{}.{}", b, l.layer->name);
      auto it = quantized.find(layer);
      if (it == quantized.end()) {
        matrix(name, l.layer->weight.value, *l.rows, l.cols);
      } else {
        const quant::QuantizedWeight& q = it->second;
        CBQ_CHECK(q.rows() == l.layer->out_features() && q.cols() == l.layer->in_features(),
                  "GGUF export: layer '{}' of the result is ({}, {}), the model's is ({}, {})",
                  layer, q.rows(), q.cols(), l.layer->out_features(), l.layer->in_features());
        CBQ_CHECK(l.cols % 32 == 0,
                  "GGUF export: layer '{}' has {} input columns, not a multiple of 32: GGUF "
                  "blocks cannot hold it quantized; export it with cbq::io::save_native instead",
                  layer, l.cols);
        if (!q.group_index.empty())
          for (int64_t c0 = 0; c0 < q.cols(); c0 += 32)
            for (int64_t j = c0; j < std::min(c0 + 32, q.cols()); ++j)
              CBQ_CHECK(q.group_index[static_cast<std::size_t>(j)] ==
                            q.group_index[static_cast<std::size_t>(c0)],
                        "GGUF export: layer '{}' uses act-order groups (g_idx) that split the "
                        "32-column block at column {}; GGUF cannot hold them. Quantize without "
                        "act_order, or use cbq::io::save_native / a GPTQ export",
                        layer, c0);
        mats.push_back(
            {name, Tensor<float>(), &q, *l.rows, l.cols, gguf_weight_type(q.spec, layer), false});
        consumed[layer] = true;
      }
      // Biases (Qwen2-style q/k/v, MLP) in F32, permuted and padded like the rows.
      if (l.layer->has_bias()) vector_tensor(p + l.gguf + ".bias", l.layer->bias.value, *l.rows);
    }
    vector_tensor(p + "ffn_norm.weight", blk.post_attention_layernorm.value, rd);
  }
  vector_tensor("output_norm.weight", model.final_norm_weight.value, rd);
  if (!c.tied_embeddings)
    matrix("output.weight", model.lm_head.value, detail::identity_rows(c.vocab_size), c.dim);
  for (const auto& [layer, q] : quantized)
    CBQ_CHECK(consumed.count(layer),
              "GGUF export: the result has layer '{}', which the model does not have", layer);

  for (const detail::GgufMatrix& m : mats) {
    if (m.type == GgmlType::f16) {
      const float* v = m.values.data();
      for (int64_t i = 0; i < m.values.numel(); ++i)
        CBQ_CHECK(std::abs(v[i]) <= 65504.0f,
                  "GGUF export: tensor '{}' holds {} beyond the fp16 range; export it as F32",
                  m.name, v[i]);
    }
    const detail::GgufMatrix* mp = &m;
    if (m.q)
      w.add_tensor(m.name, m.type, m.ne(),
                   [mp](std::span<std::byte> out) { detail::fill_quantized(*mp, out); });
    else
      w.add_tensor(m.name, m.type, m.ne(),
                   [mp](std::span<std::byte> out) { detail::fill_float(*mp, out); });
    report.tensor_types[ggml_type_name(m.type)] += 1;
  }
  report.tensors = static_cast<int64_t>(mats.size());
  report.bytes = w.write(path);
  return report;
}

}  // namespace cbq::io
