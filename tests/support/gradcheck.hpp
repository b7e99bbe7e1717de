#pragma once
// Test support: random tensors, naive comparisons and the central-finite-difference gradient
// check every op must pass in double.
#include <doctest/doctest.h>

#include <cbq/cbq.hpp>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace cbq::testing {

// The small real files shipped in data/ (always present).
inline std::string data_dir() {
  if (const char* env = std::getenv("CBQ_DATA_DIR")) return env;
  return CBQ_DATA_DIR;
}
// Optional larger files (../shared/data by default): tests that need them skip with a message.
inline std::string extra_data_dir() {
  if (const char* env = std::getenv("CBQ_EXTRA_DATA_DIR")) return env;
#ifdef CBQ_EXTRA_DATA_DIR
  return CBQ_EXTRA_DATA_DIR;
#else
  return "../shared/data";
#endif
}

template <class T>
Tensor<T> randn(const Shape& shape, uint64_t seed, T scale = T(1)) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  Tensor<T> t = Tensor<T>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(scale * dist(rng));
  return t;
}

template <class T>
Tensor<T> uniform(const Shape& shape, uint64_t seed, T lo, T hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  Tensor<T> t = Tensor<T>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(dist(rng));
  return t;
}

// Largest |a - b| over all elements (shapes must match).
template <class T, class U>
double max_abs_diff(const Tensor<T>& a, const Tensor<U>& b) {
  REQUIRE(a.shape() == b.shape());
  Tensor<T> ca = a.to(Device::cpu);
  Tensor<U> cb = b.to(Device::cpu);
  double m = 0;
  for (int64_t i = 0; i < ca.numel(); ++i) {
    const double d = std::abs(static_cast<double>(ca[i]) - static_cast<double>(cb[i]));
    if (std::isnan(d)) return d;  // std::max would drop it: a NaN must fail `< tol`
    m = std::max(m, d);
  }
  return m;
}

// max_i |t_i|, NaN when an element is NaN.
template <class T>
double max_abs(const Tensor<T>& t) {
  const Tensor<T> c = t.to(Device::cpu);
  double m = 0;
  for (int64_t i = 0; i < c.numel(); ++i) {
    const double v = std::abs(static_cast<double>(c[i]));
    if (std::isnan(v)) return v;
    m = std::max(m, v);
  }
  return m;
}

// Builds the computation on a fresh tape from the given input variables; returns the output.
using Builder = std::function<Var<double>(Tape<double>&, std::vector<Var<double>>&)>;

struct GradcheckResult {
  double max_rel_error = 0;  // max over inputs of ||analytic - numeric|| / max(||.||, floor)
  std::string worst;         // which input
};

// Compares the tape's gradients of L = Σ R ⊙ out (R a fixed random projection, so outputs of
// any shape are covered) against central finite differences with step `eps`.
// `skip(i, k)` may exclude element k of input i (points within eps of a discontinuity).
inline GradcheckResult gradcheck(const Builder& build, std::vector<Tensor<double>> inputs,
                                 std::vector<bool> differentiable = {}, double eps = 1e-6,
                                 uint64_t seed = 1234,
                                 std::function<bool(std::size_t, int64_t)> skip = nullptr) {
  if (differentiable.empty()) differentiable.assign(inputs.size(), true);
  Tape<double> tape;
  std::vector<Var<double>> vars;
  for (std::size_t i = 0; i < inputs.size(); ++i)
    vars.push_back(tape.input(inputs[i], differentiable[i]));
  Var<double> out = build(tape, vars);
  Tensor<double> proj = randn<double>(out.shape(), seed);
  Tensor<double>& g = out.grad();
  for (int64_t k = 0; k < g.numel(); ++k) g[k] = proj[k];
  tape.backward_from_seeded();
  std::vector<Tensor<double>> analytic;
  for (std::size_t i = 0; i < inputs.size(); ++i)
    analytic.push_back(differentiable[i] && vars[i].has_grad() ? vars[i].grad().clone()
                                                               : Tensor<double>(inputs[i].shape()));

  auto loss_at = [&]() {
    Tape<double> t2;
    std::vector<Var<double>> v2;
    for (auto& x : inputs) v2.push_back(t2.constant(x));
    Var<double> o = build(t2, v2);
    const Tensor<double>& ov = o.value();
    double l = 0;
    for (int64_t k = 0; k < ov.numel(); ++k) l += proj[k] * ov[k];
    return l;
  };

  GradcheckResult result;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    if (!differentiable[i]) continue;
    double diff2 = 0, a2 = 0, n2 = 0;
    for (int64_t k = 0; k < inputs[i].numel(); ++k) {
      if (skip && skip(i, k)) continue;
      double saved = inputs[i][k];
      inputs[i][k] = saved + eps;
      double lp = loss_at();
      inputs[i][k] = saved - eps;
      double lm = loss_at();
      inputs[i][k] = saved;
      double numeric = (lp - lm) / (2 * eps);
      double a = analytic[i][k];
      diff2 += (a - numeric) * (a - numeric);
      a2 += a * a;
      n2 += numeric * numeric;
    }
    double rel = std::sqrt(diff2) / std::max({std::sqrt(a2), std::sqrt(n2), 1e-12});
    if (rel > result.max_rel_error) {
      result.max_rel_error = rel;
      result.worst = "input " + std::to_string(i);
    }
  }
  return result;
}

}  // namespace cbq::testing
