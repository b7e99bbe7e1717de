#pragma once
// A whole decoder-only model: token (and, for OPT, learned position) embeddings, a stack of
// blocks of one family, the final norm and the LM head (tied to the embedding or not).
// to(Device::cuda) moves every parameter to the GPU; the evaluation helpers (embed_tensor,
// run_block, logits, head_logits) then compute there and return device tensors, and accept
// inputs on either device.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "cbq/model/block.hpp"
#include "cbq/model/inference.hpp"
#include "cbq/model/weights.hpp"
#include "cbq/ops/add.hpp"
#include "cbq/ops/cross_entropy.hpp"
#include "cbq/ops/embedding.hpp"
#include "cbq/ops/layernorm.hpp"
#include "cbq/ops/linear.hpp"
#include "cbq/ops/rmsnorm.hpp"

namespace cbq {

class Tokenizer;

template <TransformerBlock Block>
class Transformer {
 public:
  using T = typename Block::scalar_type;
  using block_type = Block;

  ModelConfig config;
  Parameter<T> embed_tokens;     // (V, d)
  Parameter<T> embed_positions;  // OPT: (max_seq_len + offset, d); undefined for LLaMA
  std::vector<Block> blocks;
  Parameter<T> final_norm_weight;  // (d,)
  Parameter<T> final_norm_bias;    // (d,), OPT only
  Parameter<T> lm_head;            // (V, d); undefined when tied to embed_tokens
  std::shared_ptr<const Tokenizer> tokenizer;

  Transformer(const ModelConfig& cfg, const WeightMap& weights) : config(cfg) {
    const int64_t V = cfg.vocab_size, d = cfg.dim;
    const bool opt = cfg.family == Family::opt;
    const std::string root = opt ? "model.decoder." : "model.";
    embed_tokens =
        Parameter<T>(root + "embed_tokens.weight",
                     take_weight<T>(weights, root + "embed_tokens.weight", {V, d}), false);
    if (opt) {
      const std::string n = root + "embed_positions.weight";
      embed_positions = Parameter<T>(
          n, take_weight<T>(weights, n, {cfg.max_seq_len + cfg.opt_position_offset, d}), false);
      final_norm_weight =
          Parameter<T>(root + "final_layer_norm.weight",
                       take_weight<T>(weights, root + "final_layer_norm.weight", {d}), false);
      final_norm_bias =
          Parameter<T>(root + "final_layer_norm.bias",
                       take_weight<T>(weights, root + "final_layer_norm.bias", {d}), false);
    } else {
      final_norm_weight = Parameter<T>("model.norm.weight",
                                       take_weight<T>(weights, "model.norm.weight", {d}), false);
    }
    if (!cfg.tied_embeddings)
      lm_head =
          Parameter<T>("lm_head.weight", take_weight<T>(weights, "lm_head.weight", {V, d}), false);
    blocks.reserve(static_cast<size_t>(cfg.n_layers));
    for (int64_t i = 0; i < cfg.n_layers; ++i) blocks.emplace_back(cfg, i, weights);
    eval_tape_ = std::make_unique<Tape<T>>();
  }

  int64_t num_blocks() const { return static_cast<int64_t>(blocks.size()); }
  Device device() const { return device_; }

  // Moves every parameter (embeddings, each block's linear layers and other parameters, the
  // final norm and the head) to `device`, in place. Quantization transforms hold tensors of
  // their own, so a model with one installed cannot move: move it before quantizing.
  Transformer& to(Device device) {
    if (device == device_) return *this;
    if (device == Device::cuda) require_cuda("Transformer::to");
    for (Block& b : blocks)
      for (LinearLayer<T>* l : b.linears())
        CBQ_CHECK(!l->transform,
                  "Transformer::to({}): layer {} of block {} has a quantization transform "
                  "installed; move the model before quantizing it",
                  device_name(device), l->name, b.index());
    auto move = [device](Parameter<T>& p) {
      if (p.value.defined()) p.value = p.value.to(device);
      if (p.grad.defined()) p.grad = p.grad.to(device);
    };
    move(embed_tokens);
    move(embed_positions);
    for (Block& b : blocks) {
      for (LinearLayer<T>* l : b.linears()) {
        move(l->weight);
        move(l->bias);
      }
      for (Parameter<T>* p : b.other_parameters()) move(*p);
    }
    move(final_norm_weight);
    move(final_norm_bias);
    move(lm_head);
    device_ = device;
    eval_tape_ = std::make_unique<Tape<T>>(device);
    return *this;
  }

  // ---- pieces on a tape ----
  // tokens at positions pos0, pos0+1, … → (T, d)
  Var<T> embed(Tape<T>& tape, const std::vector<int32_t>& tokens, int64_t pos0 = 0) {
    CBQ_CHECK(!tokens.empty(), "model: empty token sequence");
    CBQ_CHECK(pos0 + static_cast<int64_t>(tokens.size()) <= config.max_seq_len,
              "model: positions {}..{} exceed the context length {}", pos0,
              pos0 + static_cast<int64_t>(tokens.size()) - 1, config.max_seq_len);
    Var<T> x = ops::embedding(tape.param(embed_tokens), tokens);
    if (config.family == Family::opt) {
      std::vector<int32_t> positions(tokens.size());
      for (size_t i = 0; i < tokens.size(); ++i)
        positions[i] =
            static_cast<int32_t>(pos0 + static_cast<int64_t>(i) + config.opt_position_offset);
      x = ops::add(x, ops::embedding(tape.param(embed_positions), positions));
    }
    return x;
  }
  // hidden (T, d) → logits (T, V)
  Var<T> head(Tape<T>& tape, Var<T> hidden) {
    Var<T> n = config.family == Family::opt
                   ? ops::layernorm(hidden, tape.param(final_norm_weight),
                                    tape.param(final_norm_bias), config.norm_eps)
                   : ops::rmsnorm(hidden, tape.param(final_norm_weight), config.norm_eps);
    return ops::linear(n, tape.param(config.tied_embeddings ? embed_tokens : lm_head));
  }

  // ---- evaluation (no gradients; a reusable tape, so repeated calls do not allocate) ----
  // Logits (T, V) of a token sequence starting at position 0. `block_inputs`, if given, receives
  // a copy of each block's input and finally the last block's output (n_layers + 1 tensors).
  Tensor<T> logits(const std::vector<int32_t>& tokens,
                   std::vector<Tensor<T>>* block_inputs = nullptr) {
    Tape<T>& tape = *eval_tape_;
    tape.clear();
    NoGrad<T> no_grad(tape);
    Var<T> x = embed(tape, tokens);
    BlockContext<T> ctx;
    if (block_inputs) block_inputs->clear();
    for (Block& b : blocks) {
      if (block_inputs) block_inputs->push_back(x.value().clone());
      x = b.forward(tape, x, ctx);
    }
    if (block_inputs) block_inputs->push_back(x.value().clone());
    return head(tape, x).value();  // valid until the next evaluation call
  }

  // The hidden state after embedding, as an owned tensor (the input of block 0).
  Tensor<T> embed_tensor(const std::vector<int32_t>& tokens) {
    Tape<T>& tape = *eval_tape_;
    tape.clear();
    NoGrad<T> no_grad(tape);
    return embed(tape, tokens).value().clone();
  }
  // Block i applied to x (T, d), as an owned tensor.
  Tensor<T> run_block(int64_t i, const Tensor<T>& x, const BlockContext<T>& ctx = {}) {
    Tape<T>& tape = *eval_tape_;
    tape.clear();
    NoGrad<T> no_grad(tape);
    return blocks.at(static_cast<size_t>(i))
        .forward(tape, tape.constant(on_device(x)), ctx)
        .value()
        .clone();
  }
  // One part of block i (model/block.hpp: the whole block, or its attention or FFN half)
  // applied to x (T, d), as an owned tensor.
  Tensor<T> run_block_part(int64_t i, BlockPart part, const Tensor<T>& x,
                           const BlockContext<T>& ctx = {}) {
    if (part == BlockPart::whole) return run_block(i, x, ctx);
    Tape<T>& tape = *eval_tape_;
    tape.clear();
    NoGrad<T> no_grad(tape);
    return forward_part(blocks.at(static_cast<size_t>(i)), part, tape, tape.constant(on_device(x)),
                        ctx)
        .value()
        .clone();
  }
  // Final norm and LM head applied to hidden states (T, d); valid until the next call.
  Tensor<T> head_logits(const Tensor<T>& hidden) {
    Tape<T>& tape = *eval_tape_;
    tape.clear();
    NoGrad<T> no_grad(tape);
    return head(tape, tape.constant(on_device(hidden))).value();
  }

  // ---- evaluation without a tape (model/inference.hpp) ----
  // Negative log-likelihoods (in double) of tokens[j + 1] given tokens[0 .. j], for j in
  // [first, last], 0 ≤ first ≤ last ≤ T − 2: one batched forward of the whole sequence through
  // the blocks' infer() into reused buffers, then the final norm and the LM head on the scored
  // rows only, in blocks of rows (ws.head_block_bytes of logits at a time), each block's
  // log-softmax taken row by row and dropped. The same values as ops::token_nll on rows first..last
  // of logits(tokens) (tests/test_inference.cpp gives the tolerance). On the GPU, or for a block
  // family without infer(), it is computed that way.
  std::vector<double> token_nll(const std::vector<int32_t>& tokens, int64_t first, int64_t last) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    CBQ_CHECK(0 <= first && first <= last && last + 1 < n,
              "token_nll: scored rows {}..{} must lie in 0..{} (a sequence of {} tokens)", first,
              last, n - 2, n);
    std::vector<int32_t> targets(tokens.begin() + first + 1, tokens.begin() + last + 2);
    if (!kCanInfer || device_ != Device::cpu) {
      const Tensor<T> l = logits(tokens);
      return ops::token_nll(l.slice(0, first, last + 1), targets);
    }
    if constexpr (kCanInfer) return infer_token_nll(tokens, targets, first, last);
    return {};
  }

  // Rows first..last of logits(tokens), as an owned CPU tensor (rows, V). On the CPU it is
  // computed as token_nll is (no tape, the LM head on those rows only), so a caller comparing
  // two models' distributions (eval::kl_divergence) holds two (rows, V) tensors and no taped
  // activations (at SmolLM2's T = 2048 a taped forward keeps gigabytes of them).
  Tensor<T> scored_logits(const std::vector<int32_t>& tokens, int64_t first, int64_t last) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    CBQ_CHECK(0 <= first && first <= last && last < n,
              "scored_logits: rows {}..{} must lie in 0..{} (a sequence of {} tokens)", first, last,
              n - 1, n);
    if (!kCanInfer || device_ != Device::cpu) {
      Tensor<T> rows = logits(tokens).slice(0, first, last + 1);
      if (!rows.is_cpu()) rows = rows.to(Device::cpu);
      return rows.contiguous().clone();
    }
    if constexpr (kCanInfer) {
      InferenceWorkspace<T>& ws = workspace();
      const Tensor<T> normed = infer_normed_rows(ws, tokens, first, last);
      const int64_t d = config.dim, V = config.vocab_size, rows = last - first + 1;
      Tensor<T> out = Tensor<T>::empty(Shape{rows, V});
      blas::gemm<T>(false, true, rows, V, d, T(1), normed.data(), d, head_weight(), d, T(0),
                    out.data(), V);
      return out;
    }
    return {};
  }

 private:
  static constexpr bool kCanInfer = requires(Block & b, InferenceWorkspace<T>& w, Tensor<T>& x) {
    b.infer(w, x, int64_t{0});
  };

  // The LM head's (V, d) weights (the token embedding when tied).
  const T* head_weight() const {
    return (config.tied_embeddings ? embed_tokens : lm_head).value.data();
  }

  std::vector<double> infer_token_nll(const std::vector<int32_t>& tokens,
                                      const std::vector<int32_t>& targets, int64_t first,
                                      int64_t last) {
    InferenceWorkspace<T>& ws = workspace();
    const Tensor<T> normed = infer_normed_rows(ws, tokens, first, last);
    const int64_t d = config.dim, V = config.vocab_size, rows = last - first + 1;
    const T* head = head_weight();  // (V, d)
    const int64_t block = std::max<int64_t>(
        16, static_cast<int64_t>(ws.head_block_bytes / (sizeof(T) * static_cast<std::size_t>(V))));
    std::vector<double> nll(static_cast<std::size_t>(rows));
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t nb = std::min(block, rows - r0);
      Tensor<T> lg = ws.matrix(InferenceWorkspace<T>::kLogits, nb, V);
      blas::gemm<T>(false, true, nb, V, d, T(1), normed.data() + r0 * d, d, head, d, T(0),
                    lg.data(), V);
      const T* lp = lg.data();
      parallel_for(nb, ops::detail::row_grain(V), [&](int64_t a, int64_t b) {
        ops::detail::nll_rows(nll.data() + r0, lp, targets.data() + r0, a, b, V);
      });
    }
    return nll;
  }

  // The final norm of rows first..last of the last block's output, in `ws` (valid until its
  // next use).
  Tensor<T> infer_normed_rows(InferenceWorkspace<T>& ws, const std::vector<int32_t>& tokens,
                              int64_t first, int64_t last) {
    Tensor<T> x = infer_hidden(ws, tokens);
    const int64_t d = config.dim, rows = last - first + 1;
    Tensor<T> normed = ws.matrix(InferenceWorkspace<T>::kHeadIn, rows, d);
    const T* xs = x.data() + first * d;
    if (config.family == Family::opt)
      ops::CpuLayerNorm<T>::forward(normed.data(), nullptr, nullptr, xs,
                                    final_norm_weight.value.data(), final_norm_bias.value.data(),
                                    rows, d, config.norm_eps);
    else
      ops::CpuRmsNorm<T>::forward(normed.data(), nullptr, xs, final_norm_weight.value.data(), rows,
                                  d, config.norm_eps);
    return normed;
  }

 public:
  // The last block's output (T, d) for `tokens` from position 0, computed without a tape into
  // `ws` (valid until its next use); CPU only.
  Tensor<T> infer_hidden(InferenceWorkspace<T>& ws, const std::vector<int32_t>& tokens) {
    CBQ_CHECK(device_ == Device::cpu, "Transformer::infer_hidden: the model is on {}",
              device_name(device_));
    CBQ_CHECK(!tokens.empty(), "model: empty token sequence");
    const int64_t n = static_cast<int64_t>(tokens.size()), d = config.dim, V = config.vocab_size;
    CBQ_CHECK(n <= config.max_seq_len, "model: positions 0..{} exceed the context length {}", n - 1,
              config.max_seq_len);
    for (int64_t t = 0; t < n; ++t)
      CBQ_CHECK(tokens[t] >= 0 && tokens[t] < V,
                "embedding: id {} at position {} is out of range for a table of {} rows", tokens[t],
                t, V);
    Tensor<T> x = ws.matrix(InferenceWorkspace<T>::kHidden, n, d);
    T* xp = x.data();
    const T* table = embed_tokens.value.data();
    const T* pos = config.family == Family::opt ? embed_positions.value.data() : nullptr;
    const int64_t offset = config.opt_position_offset;
    parallel_for(n, ops::detail::row_grain(d), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        std::copy_n(table + tokens[t] * d, d, xp + t * d);
        if (pos)  // the learned position t + offset, added as ops::add does
          for (int64_t j = 0; j < d; ++j) xp[t * d + j] = xp[t * d + j] + pos[(t + offset) * d + j];
      }
    });
    for (Block& b : blocks) b.infer(ws, x, 0);
    return x;
  }

  // The buffers of the tape-free evaluation (created on first use).
  InferenceWorkspace<T>& workspace() {
    if (!workspace_) workspace_ = std::make_unique<InferenceWorkspace<T>>();
    return *workspace_;
  }

  // Greedy decoding as llama2.c's `run -t 0`: from `prompt` (e.g. {bos}) generate until the
  // sequence fed to the model holds `steps` positions (clamped to the context length) or the
  // argmax is one of `stop_ids` (llama2.c stops at BOS). Returns the generated ids.
  std::vector<int32_t> generate_greedy(std::vector<int32_t> prompt, int64_t steps,
                                       const std::vector<int32_t>& stop_ids) {
    CBQ_CHECK(!prompt.empty(), "generate: the prompt must hold at least one token (BOS)");
    const int64_t limit = std::min<int64_t>(steps, config.max_seq_len);
    std::vector<int32_t> out;
    while (static_cast<int64_t>(prompt.size()) <= limit) {
      Tensor<T> l = logits(prompt);
      if (!l.is_cpu()) l = l.slice(0, l.size(0) - 1, l.size(0)).to(Device::cpu);  // the last row
      const int64_t V = l.size(1), last = l.size(0) - 1;
      int32_t best = 0;
      for (int64_t j = 1; j < V; ++j)
        if (l[last * V + j] > l[last * V + best]) best = static_cast<int32_t>(j);
      if (std::find(stop_ids.begin(), stop_ids.end(), best) != stop_ids.end()) break;
      out.push_back(best);
      prompt.push_back(best);
    }
    return out;
  }

 private:
  // `x` on the model's device (a copy when it lives elsewhere).
  Tensor<T> on_device(const Tensor<T>& x) const {
    return x.device() == device_ ? x : x.to(device_);
  }

  std::unique_ptr<Tape<T>> eval_tape_;
  std::unique_ptr<InferenceWorkspace<T>> workspace_;
  Device device_ = Device::cpu;
};

}  // namespace cbq
