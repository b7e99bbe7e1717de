#pragma once
// sum, mean: reductions over all elements to a tensor of shape (1,).
// Derivative: sum: d a[i] += d out;  mean: d a[i] += d out / N.
// Forward sums accumulate in double over fixed blocks, so the result does not depend on the
// thread count (on CUDA: fixed per-block partials added in order, cuda/cbq/cuda/ops/reduce.cuh).
#include <algorithm>
#include <vector>

#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
struct CudaReduce {
  // out[0] = T(Σ_i x[i] / divisor), accumulated in double; out on the device
  static inline void (*sum)(T* out, const T* x, int64_t n, double divisor) = nullptr;
  // d[i] += g[0] · coefficient, i < n; g (1,) on the device
  static inline void (*sum_backward)(T* d, const T* g, T coefficient, int64_t n) = nullptr;
};

namespace detail {
// Elements per block of the deterministic blocked sum.
inline constexpr int64_t kSumBlock = 1 << 14;

// Σ_{i<n} term(i) in double: per-block partial sums (in parallel), then combined in block order.
template <class F>
double blocked_sum(int64_t n, F&& term) {
  auto block_sum = [&](int64_t begin, int64_t end) {
    double s = 0;
    for (int64_t i = begin; i < end; ++i) s += static_cast<double>(term(i));
    return s;
  };
  if (n <= kSumBlock) return block_sum(0, n);
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  // The calling thread's buffer (the workers write into it through the pointer).
  struct BlockedSumPartials;
  double* partial = thread_buffer<double, BlockedSumPartials>(blocks);
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      partial[b] = block_sum(b * kSumBlock, std::min(n, (b + 1) * kSumBlock));
  });
  double total = 0;
  for (int64_t b = 0; b < blocks; ++b) total += partial[b];
  return total;
}

}  // namespace detail

template <class T>
struct CpuReduce {
  static void sum(T* out, const T* x, int64_t n, double divisor) {
    out[0] = static_cast<T>(detail::blocked_sum(n, [&](int64_t i) { return x[i]; }) / divisor);
  }
  static void sum_backward(T* d, const T* g, T coefficient, int64_t n) {
    const T gc = g[0] * coefficient;
    parallel_for(n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) d[i] += gc;
    });
  }
};

namespace detail {

template <class T>
class SumNode;

template <class T>
Var<T> reduce_all(const char* op, Var<T> a, bool divide_by_count) {
  const Tensor<T>& va = a.value();
  check_contiguous(op, "input", va);
  const int64_t n = va.numel();
  CBQ_CHECK(!divide_by_count || n > 0, "{}: input of shape {} has no elements", op, va.shape());
  const T* x = va.data();
  const double count = divide_by_count ? static_cast<double>(n) : 1.0;
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a});
  Var<T> out = tape.output(Shape{1}, rg);
  Tensor<T> out_value = out.value();     // shares the output's storage
  check_same_device(op, out_value, va);  // the tape allocates on its own device
  kernel_for(va.device(), &CpuReduce<T>::sum, CudaReduce<T>::sum, op)(out_value.data(), x, n,
                                                                      count);
  if (rg) tape.template record<SumNode<T>>(out, a, static_cast<T>(1.0 / count), op);
  return out;
}

// Shared node of sum and mean: d a[i] += coefficient · d out.
template <class T>
class SumNode final : public Node<T> {
 public:
  SumNode(Var<T> a, T coefficient, const char* name)
      : a_(a), coefficient_(coefficient), name_(name) {}
  const char* name() const override { return name_; }
  void backward(Tape<T>& tape) override {
    if (!a_.requires_grad()) return;
    const Tensor<T>& grad = tape.grad(this->output);
    kernel_for(grad.device(), &CpuReduce<T>::sum_backward, CudaReduce<T>::sum_backward, name_)(
        a_.grad().data(), grad.data(), coefficient_, a_.value().numel());
  }

 private:
  Var<T> a_;
  T coefficient_;
  const char* name_;
};

}  // namespace detail

// Σ_i a[i], shape (1,).
template <class T>
Var<T> sum(Var<T> a) {
  return detail::reduce_all("sum", a, false);
}

// (1/N) Σ_i a[i], shape (1,); N = a.numel() must be positive.
template <class T>
Var<T> mean(Var<T> a) {
  return detail::reduce_all("mean", a, true);
}

}  // namespace cbq::ops
