#pragma once
// Test support for the quantization ops: the gradient-check rule near discontinuities.
//
// The straight-through / LSQ gradients are not derivatives of the quantizer (round and floor are
// piecewise constant). They are the exact derivatives of a SURROGATE in which every rounding
// residual (round(v) − v, floor(v) − v, round(z) − z) is frozen at the evaluation point, while
// the clamp region of every element (inside / clamped low / clamped high) is still decided by
// the real op's rule at the perturbed point. surrogate_check compares the real op's analytic
// gradient against central finite differences of that surrogate, and skips an input element
// exactly when moving it by ±eps or ±margin·eps changes the region of some output element (the
// surrogate has a kink or jump there). It returns the skipped elements so tests can check that
// they are exactly the ones the rule predicts.
#include <cstdint>
#include <functional>
#include <set>
#include <vector>

#include "support/gradcheck.hpp"

namespace cbq::testing {

// A weight grid spec in one call (group size used only for per-group).
inline quant::GridSpec make_spec(int bits, bool sym, quant::Granularity gr, int64_t group = 16) {
  quant::GridSpec g;
  g.bits = bits;
  g.symmetric = sym;
  g.granularity = gr;
  g.group_size = group;
  return g;
}

using Forward = std::function<Tensor<double>(const std::vector<Tensor<double>>&)>;
using Regions = std::function<std::vector<int>(const std::vector<Tensor<double>>&)>;

struct SurrogateResult {
  double max_rel_error = 0;
  std::vector<std::set<int64_t>> skipped;  // per input
  std::string worst;
};

inline SurrogateResult surrogate_check(const Builder& real, const Forward& surrogate,
                                       const Regions& regions, std::vector<Tensor<double>> inputs,
                                       std::vector<bool> differentiable, bool use_skip = true,
                                       double eps = 1e-6, double margin = 4.0) {
  // Deep copies: the check perturbs these in place and restores them.
  for (auto& t : inputs) t = t.clone();
  SurrogateResult res;
  res.skipped.resize(inputs.size());
  const std::vector<int> reg0 = regions(inputs);
  auto skip = [&](std::size_t i, int64_t k) {
    if (!use_skip) return false;
    const double saved = inputs[i][k];
    bool changes = false;
    for (double d : {-margin * eps, -eps, eps, margin * eps}) {
      inputs[i][k] = saved + d;
      if (regions(inputs) != reg0) changes = true;
    }
    inputs[i][k] = saved;
    if (changes) res.skipped[i].insert(k);
    return changes;
  };
  Builder b = [&](Tape<double>& tape, std::vector<Var<double>>& v) {
    bool analytic = false;
    for (auto& x : v) analytic = analytic || x.requires_grad();
    if (analytic) return real(tape, v);
    std::vector<Tensor<double>> vals;
    for (auto& x : v) vals.push_back(x.value());
    return tape.constant(surrogate(vals));
  };
  GradcheckResult g = gradcheck(b, inputs, differentiable, eps, 1234, skip);
  res.max_rel_error = g.max_rel_error;
  res.worst = g.worst;
  return res;
}

// Value of the real op with no tape gradient (for comparing against the surrogate's forward).
inline Tensor<double> real_value(const Builder& real, const std::vector<Tensor<double>>& inputs) {
  Tape<double> tape;
  std::vector<Var<double>> v;
  for (auto& x : inputs) v.push_back(tape.constant(x));
  return real(tape, v).value().clone();
}

inline Tensor<double> student_t(const Shape& shape, uint64_t seed, double df, double scale) {
  std::mt19937_64 rng(seed);
  std::student_t_distribution<double> dist(df);
  Tensor<double> t = Tensor<double>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = scale * dist(rng);
  return t;
}

}  // namespace cbq::testing
