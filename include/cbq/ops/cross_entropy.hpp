#pragma once
// cross_entropy: mean over rows of the negative log-likelihood of the target class,
//   L = (1/R) Σ_r (lse(x_r) − x_r[t_r]),  logits x (..., V) with R rows, targets t (R),
// computed with a stable log-sum-exp in double. The only value saved for backward is the per-row
// loss nll_r = lse(x_r) − x_r[t_r]: since lse = x_r[t_r] + nll_r, the softmax is recovered as
// exp((x_j − x_r[t_r]) − nll_r), which stays accurate in float for logits in the hundreds.
// Derivative: d x_r[j] += (g / R) · (softmax(x_r)_j − [j = t_r]).
// token_nll: the same per-row negative log-likelihoods without a tape, in double (perplexity).
#include <vector>

#include "cbq/ops/softmax.hpp"

namespace cbq::ops {

namespace detail {
template <class T>
void check_targets(const char* op, const Tensor<T>& logits, const std::vector<int32_t>& targets) {
  check_rows_input(op, logits);
  const int64_t rows = logits.shape().rows(), classes = logits.shape().cols();
  CBQ_CHECK(static_cast<int64_t>(targets.size()) == rows,
            "{}: {} targets for logits of shape {} ({} rows)", op, targets.size(), logits.shape(),
            rows);
  for (int64_t r = 0; r < rows; ++r)
    CBQ_CHECK(targets[r] >= 0 && targets[r] < classes,
              "{}: target {} at row {} is out of range for {} classes (logits {})", op, targets[r],
              r, classes, logits.shape());
}
}  // namespace detail

template <class T>
class CrossEntropyNode final : public Node<T> {
 public:
  CrossEntropyNode(Var<T> logits, std::vector<int32_t> targets, Tensor<T> nll)
      : logits_(logits), targets_(std::move(targets)), nll_(std::move(nll)) {}
  const char* name() const override { return "cross_entropy"; }
  void backward(Tape<T>& tape) override {
    if (!logits_.requires_grad()) return;
    const Tensor<T>& x = logits_.value();
    const int64_t n = x.shape().cols(), rows = x.shape().rows();
    const T g = tape.grad(this->output).data()[0] / static_cast<T>(rows);
    const T* xp = x.data();
    const T* nll = nll_.data();
    T* dx = logits_.grad().data();
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = xp + r * n;
        T* dr = dx + r * n;
        const double target_logit = static_cast<double>(xr[targets_[r]]);
        for (int64_t j = 0; j < n; ++j) {  // softmax_j = exp(x_j − x_t − nll_r)
          const double p = std::exp(static_cast<double>(xr[j]) - target_logit - nll[r]);
          dr[j] += g * static_cast<T>(p);
        }
        dr[targets_[r]] -= g;  // − onehot
      }
    });
  }

 private:
  Var<T> logits_;
  std::vector<int32_t> targets_;
  Tensor<T> nll_;  // (R,) per-row loss
};

// Mean negative log-likelihood of `targets` under softmax(logits) over the last dimension.
template <class T>
Var<T> cross_entropy(Var<T> logits, const std::vector<int32_t>& targets) {
  const Tensor<T>& x = logits.value();
  detail::check_targets("cross_entropy", x, targets);
  const int64_t n = x.shape().cols(), rows = x.shape().rows();
  CBQ_CHECK(rows > 0, "cross_entropy: logits of shape {} have no rows", x.shape());
  Tape<T>& tape = logits.tape();
  const bool rg = tape.any_requires_grad({logits});
  Tensor<T> nll = tape.scratch(Shape{rows});  // (R,)
  const T* xp = x.data();
  T* np = nll.data();
  parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      np[r] = static_cast<T>(-detail::row_shift(xp + r * n, n).log_prob(xp[r * n + targets[r]]));
  });
  double total = 0;  // serial over rows: deterministic
  for (int64_t r = 0; r < rows; ++r) total += static_cast<double>(np[r]);
  Var<T> out = tape.output(Shape{1}, rg);
  Tensor<T> out_value = out.value();  // shares the output\'s storage
  out_value.data()[0] = static_cast<T>(total / static_cast<double>(rows));
  if (rg) tape.template record<CrossEntropyNode<T>>(out, logits, targets, nll);
  return out;
}

// Per-row −log softmax(logits)[target] in double, for perplexity; no tape, no gradient.
template <class T>
std::vector<double> token_nll(const Tensor<T>& logits, const std::vector<int32_t>& targets) {
  detail::check_targets("token_nll", logits, targets);
  const int64_t n = logits.shape().cols(), rows = logits.shape().rows();
  std::vector<double> nll(static_cast<std::size_t>(rows));
  const T* xp = logits.data();
  parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      nll[r] = -detail::row_shift(xp + r * n, n).log_prob(xp[r * n + targets[r]]);
  });
  return nll;
}

}  // namespace cbq::ops
