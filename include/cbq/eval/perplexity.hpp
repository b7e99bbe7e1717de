#pragma once
// Perplexity in the two protocols users compare against.
//
// GPTQ / CBQ protocol (Frantar et al., used by GPTQ, OmniQuant, CBQ): the whole text tokenized
// once (with the tokenizer's BOS at the very start, when it adds one), cut into non-overlapping
// windows of `ctx` tokens (a trailing partial window is dropped), and in each window every token
// but the first is scored from its prefix: ppl = exp(mean NLL over all scored tokens).
//
// llama.cpp protocol (`llama-perplexity -c n_ctx`): the text tokenized as the model's tokenizer
// does by default (one BOS prepended when it adds one), cut into chunks of n_ctx tokens; the first
// token of each chunk is replaced by BOS when the tokenizer adds one and left alone when it does
// not (SmolLM2: add_bos_token false; pass kKeepFirstToken, or llamacpp_chunk_bos(tokenizer));
// only the second half is scored: logits at positions n_ctx/2 … n_ctx−2 predict the next token.
//
// On the CPU each window is one batched forward without a tape (Transformer::token_nll,
// model/inference.hpp): buffers reused from window to window, the LM head computed only for the
// scored rows and fused with the log-softmax per block of rows, never the whole (T, V) logits.
// For a model moved to the GPU the logits stay there and ops::token_nll computes the negative
// log-likelihoods with its CUDA kernel (the same double log-sum-exp), so only one double per
// scored token comes back to the host.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/ops/cross_entropy.hpp"
#include "cbq/tokenizer/tokenizer.hpp"

namespace cbq::eval {

struct PerplexityResult {
  double perplexity = 0;
  double mean_nll = 0;
  int64_t windows = 0;
  int64_t scored_tokens = 0;
  double seconds = 0;
  double tokens_per_second = 0;  // tokens run through the model per second
};

namespace detail {
// Scores logits rows [first, last] of `window` predicting window[j + 1]; returns the NLL sum.
template <class Model>
double score_window(Model& model, const std::vector<int32_t>& window, int64_t first, int64_t last) {
  if constexpr (requires { model.token_nll(window, first, last); }) {
    // Transformer: the tape-free forward with the LM head fused with the log-softmax per block
    // of rows (model/inference.hpp); on the GPU it falls back to the logits below.
    double sum = 0;
    for (double v : model.token_nll(window, first, last)) sum += v;
    return sum;
  }
  auto logits = model.logits(window);  // (n, V)
  const int64_t V = logits.size(1);
  std::vector<int32_t> targets;
  for (int64_t j = first; j <= last; ++j) targets.push_back(window[static_cast<size_t>(j + 1)]);
  auto rows = logits.slice(0, first, last + 1).reshape(Shape{last - first + 1, V});
  double sum = 0;
  for (double v : ops::token_nll(rows, targets)) sum += v;
  return sum;
}
inline PerplexityResult finish(double nll_sum, int64_t scored, int64_t windows, int64_t fed,
                               std::chrono::steady_clock::time_point start) {
  PerplexityResult r;
  r.windows = windows;
  r.scored_tokens = scored;
  r.mean_nll = nll_sum / static_cast<double>(scored);
  r.perplexity = std::exp(r.mean_nll);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.tokens_per_second = static_cast<double>(fed) / std::max(r.seconds, 1e-9);
  return r;
}
}  // namespace detail

// `tokens`: the whole text tokenized as the model's tokenizer does by default (Tokenizer::encode:
// BOS at the start when it adds one).
template <class Model>
PerplexityResult perplexity_gptq(Model& model, const std::vector<int32_t>& tokens, int64_t ctx) {
  CBQ_CHECK(ctx >= 2, "perplexity: context length must be at least 2, got {}", ctx);
  const int64_t windows = static_cast<int64_t>(tokens.size()) / ctx;
  CBQ_CHECK(windows >= 1, "perplexity: the text has {} tokens, fewer than one window of {}",
            tokens.size(), ctx);
  const auto start = std::chrono::steady_clock::now();
  double nll = 0;
  for (int64_t w = 0; w < windows; ++w) {
    std::vector<int32_t> window(tokens.begin() + w * ctx, tokens.begin() + (w + 1) * ctx);
    nll += detail::score_window(model, window, 0, ctx - 2);
  }
  return detail::finish(nll, windows * (ctx - 1), windows, windows * ctx, start);
}

// perplexity_llamacpp's `bos` for a model whose tokenizer adds no BOS: each chunk's first token is
// kept, as llama-perplexity does when the GGUF says add_bos_token = false (SmolLM2).
inline constexpr int32_t kKeepFirstToken = -1;

// The `bos` that makes perplexity_llamacpp do what llama-perplexity does with this tokenizer:
// its BOS id when it adds one (then pass tokenizer.encode(text), which starts with it), else
// kKeepFirstToken.
inline int32_t llamacpp_chunk_bos(const Tokenizer& tokenizer) {
  return tokenizer.add_bos() ? tokenizer.bos_id() : kKeepFirstToken;
}

// `tokens`: the whole text as the model's tokenizer encodes it by default (Tokenizer::encode(text):
// one BOS prepended when it adds one, as llama.cpp does). `bos`: the id that replaces each chunk's
// first token, or kKeepFirstToken (any negative value) to keep it (llamacpp_chunk_bos).
template <class Model>
PerplexityResult perplexity_llamacpp(Model& model, const std::vector<int32_t>& tokens,
                                     int64_t n_ctx, int32_t bos) {
  CBQ_CHECK(n_ctx >= 4, "perplexity: n_ctx must be at least 4, got {}", n_ctx);
  const int64_t chunks = static_cast<int64_t>(tokens.size()) / n_ctx;
  CBQ_CHECK(chunks >= 1, "perplexity: the text has {} tokens, fewer than one chunk of {}",
            tokens.size(), n_ctx);
  const auto start = std::chrono::steady_clock::now();
  const int64_t first = n_ctx / 2;
  double nll = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    std::vector<int32_t> chunk(tokens.begin() + c * n_ctx, tokens.begin() + (c + 1) * n_ctx);
    if (bos >= 0) chunk[0] = bos;
    nll += detail::score_window(model, chunk, first, n_ctx - 2);
  }
  return detail::finish(nll, chunks * (n_ctx - 1 - first), chunks, chunks * n_ctx, start);
}

}  // namespace cbq::eval
