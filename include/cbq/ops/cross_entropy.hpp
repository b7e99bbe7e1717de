#pragma once
// cross_entropy: mean over rows of the negative log-likelihood of the target class,
//   L = (1/R) Σ_r (lse(x_r) − x_r[t_r]),  logits x (..., V) with R rows, targets t (R),
// computed with a stable log-sum-exp in double. The only value saved for backward is the per-row
// loss nll_r = lse(x_r) − x_r[t_r]: since lse = x_r[t_r] + nll_r, the softmax is recovered as
// exp((x_j − x_r[t_r]) − nll_r), which stays accurate in float for logits in the hundreds.
// Derivative: d x_r[j] += (g / R) · (softmax(x_r)_j − [j = t_r]).
// token_nll: the same per-row negative log-likelihoods without a tape, in double (perplexity).
// CUDA (cuda/cbq/cuda/ops/cross_entropy.cuh): one block per row, the same double log-sum-exp; the
// mean over rows is a fixed-order reduction in double; targets are copied to the device.
#include <vector>

#include "cbq/ops/cpu_kernels.hpp"
#include "cbq/ops/softmax.hpp"

namespace cbq::ops {

template <class T>
struct CudaCrossEntropy {
  // nll (rows,) = T(lse(x_r) − x_r[t_r]), out[0] = T(Σ_r nll_r / rows) (double sums);
  // logits (rows, n), targets (rows,) on the device
  static inline void (*forward)(T* out, T* nll, const T* logits, const int32_t* targets,
                                int64_t rows, int64_t n) = nullptr;
  // dx (rows, n) += (g[0] / rows) · (softmax(x_r) − onehot(t_r)), softmax from the saved nll
  static inline void (*backward)(T* dx, const T* g, const T* logits, const int32_t* targets,
                                 const T* nll, int64_t rows, int64_t n) = nullptr;
  // nll_host (rows,) = lse(x_r) − x_r[t_r] in double; logits on the device, targets on the host
  static inline void (*token_nll)(double* nll_host, const T* logits, const int32_t* targets_host,
                                  int64_t rows, int64_t n) = nullptr;
};

namespace detail {
template <class T>
double row_nll(const T* row, int64_t n, int32_t target) {
  CBQ_SIMD_RETURN(simd::isa_for<T>(), row_nll<T>(row, n, target));
}

// nll[r] = lse(x_r) − x_r[targets[r]] in double for rows [r0, r1) of x (rows, n): the row maximum
// m, then m − x_t + log Σ_j e^(x_j − m) with a vectorized double exp (within 2 ulp of the C
// library's). Targets must be in range. Used by token_nll and the inference path.
template <class T>
void nll_rows(double* nll, const T* x, const int32_t* targets, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) nll[r] = row_nll(x + r * n, n, targets[r]);
}

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
struct CpuCrossEntropy {
  static void forward(T* out, T* nll, const T* logits, const int32_t* targets, int64_t rows,
                      int64_t n) {
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        nll[r] = static_cast<T>(
            -detail::row_shift(logits + r * n, n).log_prob(logits[r * n + targets[r]]));
    });
    double total = 0;  // serial over rows: deterministic
    for (int64_t r = 0; r < rows; ++r) total += static_cast<double>(nll[r]);
    out[0] = static_cast<T>(total / static_cast<double>(rows));
  }
  static void backward(T* dx, const T* g, const T* logits, const int32_t* targets, const T* nll,
                       int64_t rows, int64_t n) {
    const T gr = g[0] / static_cast<T>(rows);
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = logits + r * n;
        T* dr = dx + r * n;
        const double target_logit = static_cast<double>(xr[targets[r]]);
        for (int64_t j = 0; j < n; ++j) {  // softmax_j = exp(x_j − x_t − nll_r)
          const double p = std::exp(static_cast<double>(xr[j]) - target_logit - nll[r]);
          dr[j] += gr * static_cast<T>(p);
        }
        dr[targets[r]] -= gr;  // − onehot
      }
    });
  }
  static void token_nll(double* nll_host, const T* logits, const int32_t* targets_host,
                        int64_t rows, int64_t n) {
    parallel_for(rows, detail::row_grain(n), [&](int64_t r0, int64_t r1) {
      detail::nll_rows(nll_host, logits, targets_host, r0, r1, n);
    });
  }
};

template <class T>
class CrossEntropyNode;

// Mean negative log-likelihood of `targets` under softmax(logits) over the last dimension.
template <class T>
Var<T> cross_entropy(Var<T> logits, const std::vector<int32_t>& targets) {
  const Tensor<T>& x = logits.value();
  detail::check_targets("cross_entropy", x, targets);
  const int64_t n = x.shape().cols(), rows = x.shape().rows();
  CBQ_CHECK(rows > 0, "cross_entropy: logits of shape {} have no rows", x.shape());
  Tape<T>& tape = logits.tape();
  const bool rg = tape.any_requires_grad({logits});
  Tensor<T> nll = tape.scratch(Shape{rows});   // (R,)
  check_same_device("cross_entropy", nll, x);  // the tape allocates on its own device
  Var<T> out = tape.output(Shape{1}, rg);
  Tensor<T> out_value = out.value();  // shares the output's storage
  // The targets on the op's device (a copy for CUDA), for both kernels.
  Tensor<int32_t> device_targets = Tensor<int32_t>::from(targets, Shape{rows}).to(x.device());
  kernel_for(x.device(), &CpuCrossEntropy<T>::forward, CudaCrossEntropy<T>::forward,
             "cross_entropy")(out_value.data(), nll.data(), x.data(), device_targets.data(), rows,
                              n);
  if (rg) tape.template record<CrossEntropyNode<T>>(out, logits, std::move(device_targets), nll);
  return out;
}

// Per-row −log softmax(logits)[target] in double, for perplexity; no tape, no gradient.
template <class T>
std::vector<double> token_nll(const Tensor<T>& logits, const std::vector<int32_t>& targets) {
  detail::check_targets("token_nll", logits, targets);
  const int64_t n = logits.shape().cols(), rows = logits.shape().rows();
  std::vector<double> nll(static_cast<std::size_t>(rows));
  kernel_for(logits.device(), &CpuCrossEntropy<T>::token_nll, CudaCrossEntropy<T>::token_nll,
             "token_nll")(nll.data(), logits.data(), targets.data(), rows, n);
  return nll;
}

template <class T>
class CrossEntropyNode final : public Node<T> {
 public:
  CrossEntropyNode(Var<T> logits, Tensor<int32_t> targets, Tensor<T> nll)
      : logits_(logits), targets_(std::move(targets)), nll_(std::move(nll)) {}
  const char* name() const override { return "cross_entropy"; }
  void backward(Tape<T>& tape) override {
    if (!logits_.requires_grad()) return;
    const Tensor<T>& x = logits_.value();
    const Tensor<T>& grad = tape.grad(this->output);
    kernel_for(grad.device(), &CpuCrossEntropy<T>::backward, CudaCrossEntropy<T>::backward,
               "cross_entropy")(logits_.grad().data(), grad.data(), x.data(), targets_.data(),
                                nll_.data(), x.shape().rows(), x.shape().cols());
  }

 private:
  Var<T> logits_;
  Tensor<int32_t> targets_;  // (R,) on the op's device
  Tensor<T> nll_;            // (R,) per-row loss
};

}  // namespace cbq::ops
