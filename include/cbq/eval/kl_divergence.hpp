#pragma once
// Fidelity of a (quantized) model to a base (full-precision) model, as `llama-perplexity
// --kl-divergence` measures it (llama.cpp tools/perplexity/perplexity.cpp, kl_divergence()):
//
//   at every scored position t with next token y_t, base log-probs b = log_softmax(base logits),
//   model log-probs q = log_softmax(model logits), natural logarithms:
//     KL_t   = Σ_i exp(b_i) · (b_i − q_i)                 KL(base ‖ model), nats
//     Δp_t   = exp(q_{y_t}) − exp(b_{y_t})                 change of the true token's probability
//     same_t = [argmax q == argmax b]                      first index on ties, as llama.cpp
//   reported: mean KL (± its standard error), median, percentiles and max of KL_t; RMS Δp =
//   sqrt(mean Δp_t²) and mean Δp; "same top p" = mean same_t; both perplexities over the same
//   positions. Percentiles interpolate linearly at fraction·(n − 1) of the sorted values, the
//   median averages the two middle values of an even count (llama.cpp's `percentile`).
//
// Scored positions follow the perplexity protocols of perplexity.hpp: kLlamaCpp (what
// llama-perplexity scores: chunks of ctx tokens, the first token of each set to BOS, the second
// half scored) or kGptq (non-overlapping windows, every token but the first scored).
//
// Differences from llama.cpp's arithmetic, all below its own rounding: llama.cpp stores the base
// log-probs as 16-bit integers over [max − 16, max] of each position (steps of 16/65535 nats) and
// skips terms with base log-prob ≤ −16; here both distributions are exact (double from the float
// logits) and every term counts.
//
// Memory: the two models run window by window, without a tape where they can
// (Transformer::scored_logits); the scored rows of one window of logits of each model are alive
// at a time, plus one KL and one Δp value per scored position — never the logits of the whole
// text.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq::eval {

enum class KlProtocol { kLlamaCpp, kGptq };

struct KlOptions {
  int64_t ctx = 512;
  KlProtocol protocol = KlProtocol::kLlamaCpp;
  int32_t bos = 1;  // kLlamaCpp: the token each chunk starts with
};

struct KlDivergenceResult {
  int64_t positions = 0, windows = 0;
  double mean = 0, mean_error = 0;  // KL(base ‖ model), nats; standard error of the mean
  double median = 0, p90 = 0, p95 = 0, p99 = 0, p999 = 0, max = 0, min = 0;
  double same_top = 0;  // fraction of positions whose most likely token is the base's
  double rms_dp = 0;    // sqrt(mean Δp²), Δp = p_model(next) − p_base(next)
  double mean_dp = 0;
  double ppl = 0, ppl_base = 0;  // over the same positions
  double seconds = 0;
};

namespace detail {

// llama.cpp's percentile of sorted values.
inline double kl_percentile(const std::vector<double>& sorted, double fraction) {
  if (fraction <= 0) return sorted.front();
  if (fraction >= 1) return sorted.back();
  const double p = fraction * static_cast<double>(sorted.size() - 1);
  const auto i = static_cast<std::size_t>(p);
  const double f = p - static_cast<double>(i);
  return (1 - f) * sorted[i] + f * sorted[std::min(i + 1, sorted.size() - 1)];
}

// Rows [first, last] of a model's logits for `window`, as a contiguous CPU float tensor of its
// own (the model's logits live only until its next evaluation call).
template <class T>
Tensor<float> float_rows(const Tensor<T>& logits, int64_t first, int64_t last) {
  Tensor<T> rows = logits.slice(0, first, last + 1);
  if (!rows.is_cpu()) rows = rows.to(Device::cpu);
  if constexpr (std::is_same_v<T, float>)
    return rows.contiguous().clone();
  else
    return rows.contiguous().template cast<float>();
}

// Rows [first, last] of a model's logits for `window` as a CPU float tensor: tape-free through
// the model's scored_logits() where it has one (Transformer), else sliced from logits().
template <class Model>
Tensor<float> scored_float_rows(Model& model, const std::vector<int32_t>& window, int64_t first,
                                int64_t last) {
  if constexpr (requires { model.scored_logits(window, first, last); }) {
    auto rows = model.scored_logits(window, first, last);
    if constexpr (std::is_same_v<typename decltype(rows)::value_type, float>)
      return rows;
    else
      return rows.template cast<float>();
  } else {
    return float_rows(model.logits(window), first, last);
  }
}

// log_softmax of one row in double; fails on a non-finite logit.
inline double log_softmax_row(const float* x, int64_t n, double* out, const char* which,
                              int64_t window, int64_t position) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    CBQ_CHECK(std::isfinite(x[i]),
              "kl_divergence: the {} model's logit of token {} is {} (window {}, position {})",
              which, i, x[i], window, position);
    mx = std::max(mx, static_cast<double>(x[i]));
  }
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(x[i]) - mx);
  const double lse = mx + std::log(s);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(x[i]) - lse;
  return lse;
}

}  // namespace detail

// KL divergence and the other fidelity statistics of `model` against `base` over `tokens` (the
// text tokenized as for perplexity: one BOS at the start). Both models must share the
// vocabulary; `model.logits(window)` returns (window, V) logits.
template <class BaseModel, class Model>
KlDivergenceResult kl_divergence(BaseModel& base, Model& model, const std::vector<int32_t>& tokens,
                                 const KlOptions& opt = {}) {
  const int64_t ctx = opt.ctx;
  const bool llamacpp = opt.protocol == KlProtocol::kLlamaCpp;
  CBQ_CHECK(ctx >= (llamacpp ? 4 : 2), "kl_divergence: context {} is too short (at least {})", ctx,
            llamacpp ? 4 : 2);
  const int64_t windows = static_cast<int64_t>(tokens.size()) / ctx;
  CBQ_CHECK(windows >= 1, "kl_divergence: the text has {} tokens, fewer than one window of {}",
            tokens.size(), ctx);
  const auto start = std::chrono::steady_clock::now();
  const int64_t first = llamacpp ? ctx / 2 : 0, last = ctx - 2, per_window = last - first + 1;
  const int64_t n = windows * per_window;
  std::vector<double> kl(static_cast<std::size_t>(n)), dp(static_cast<std::size_t>(n)),
      nll(static_cast<std::size_t>(n)), nll_base(static_cast<std::size_t>(n));
  std::vector<uint8_t> same(static_cast<std::size_t>(n));
  for (int64_t w = 0; w < windows; ++w) {
    std::vector<int32_t> window(tokens.begin() + w * ctx, tokens.begin() + (w + 1) * ctx);
    if (llamacpp) window[0] = opt.bos;
    const Tensor<float> b = detail::scored_float_rows(base, window, first, last);
    const Tensor<float> q = detail::scored_float_rows(model, window, first, last);
    CBQ_CHECK(b.size(1) == q.size(1),
              "kl_divergence: the base model has {} tokens in its vocabulary, the model {}",
              b.size(1), q.size(1));
    const int64_t V = b.size(1);
    parallel_for(per_window, 4, [&](int64_t r0, int64_t r1) {
      std::vector<double> lb(static_cast<std::size_t>(V)), lq(static_cast<std::size_t>(V));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t pos = first + r, k = w * per_window + r;
        const int32_t y = window[static_cast<std::size_t>(pos + 1)];
        CBQ_CHECK(y >= 0 && y < V,
                  "kl_divergence: token {} at position {} of window {} is out "
                  "of the vocabulary ({} tokens)",
                  y, pos + 1, w, V);
        detail::log_softmax_row(b.data() + r * V, V, lb.data(), "base", w, pos);
        detail::log_softmax_row(q.data() + r * V, V, lq.data(), "quantized", w, pos);
        double s = 0;
        int64_t top_b = 0, top_q = 0;
        for (int64_t i = 0; i < V; ++i) {
          const double bi = lb[static_cast<std::size_t>(i)], qi = lq[static_cast<std::size_t>(i)];
          s += std::exp(bi) * (bi - qi);
          if (bi > lb[static_cast<std::size_t>(top_b)]) top_b = i;
          if (qi > lq[static_cast<std::size_t>(top_q)]) top_q = i;
        }
        const auto kk = static_cast<std::size_t>(k);
        kl[kk] = s;
        same[kk] = top_b == top_q;
        nll[kk] = -lq[static_cast<std::size_t>(y)];
        nll_base[kk] = -lb[static_cast<std::size_t>(y)];
        dp[kk] = std::exp(-nll[kk]) - std::exp(-nll_base[kk]);
      }
    });
  }
  KlDivergenceResult res;
  res.positions = n;
  res.windows = windows;
  double sum = 0, sum2 = 0, sdp = 0, sdp2 = 0, snll = 0, snll_base = 0;
  int64_t top = 0;
  for (int64_t k = 0; k < n; ++k) {
    const auto kk = static_cast<std::size_t>(k);
    sum += kl[kk];
    sum2 += kl[kk] * kl[kk];
    sdp += dp[kk];
    sdp2 += dp[kk] * dp[kk];
    snll += nll[kk];
    snll_base += nll_base[kk];
    top += same[kk];
  }
  const double cnt = static_cast<double>(n);
  res.mean = sum / cnt;
  const double var = sum2 / cnt - res.mean * res.mean;
  res.mean_error = var > 0 && n > 10 ? std::sqrt(var / (cnt - 1)) : 0.0;  // llama.cpp's
  res.mean_dp = sdp / cnt;
  res.rms_dp = std::sqrt(sdp2 / cnt);
  res.same_top = static_cast<double>(top) / cnt;
  res.ppl = std::exp(snll / cnt);
  res.ppl_base = std::exp(snll_base / cnt);
  std::sort(kl.begin(), kl.end());
  res.median = detail::kl_percentile(kl, 0.5);
  res.p90 = detail::kl_percentile(kl, 0.90);
  res.p95 = detail::kl_percentile(kl, 0.95);
  res.p99 = detail::kl_percentile(kl, 0.99);
  res.p999 = detail::kl_percentile(kl, 0.999);
  res.max = kl.back();
  res.min = kl.front();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return res;
}

}  // namespace cbq::eval
