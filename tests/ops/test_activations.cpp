// silu, relu and gelu (ops/activations.hpp): forward against the naive formulas, gradient
// checks, relu at its kink. CUDA parity: tests/gpu/test_activations.cu.
// Declared case for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/activations.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {
template <class F>
Tensor<double> naive_map(const Tensor<double>& x, F f) {
  Tensor<double> y(x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) y[i] = f(x[i]);
  return y;
}
double ref_silu(double x) { return x / (1 + std::exp(-x)); }
double ref_relu(double x) { return x > 0 ? x : 0; }
double ref_gelu(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }

// Skips finite-difference points within `margin` of the kink at 0.
std::function<bool(std::size_t, int64_t)> skip_near_zero(const Tensor<double>& x, double margin) {
  return [x, margin](std::size_t, int64_t k) { return std::abs(x[k]) < margin; };
}
}  // namespace

TEST_CASE("silu: forward matches x·σ(x), float and double, including large magnitudes") {
  auto x = randn<double>(Shape{7, 13}, 1, 3.0);
  x[0] = 80.0;
  x[1] = -80.0;
  x[2] = 0.0;
  Tape<double> tape;
  CHECK(max_abs_diff(ops::silu(tape.constant(x)).value(), naive_map(x, ref_silu)) < 1e-12);
  Tape<float> tape_f;
  auto yf = ops::silu(tape_f.constant(x.cast<float>()));
  CHECK(max_abs_diff(yf.value(), naive_map(x, ref_silu)) < 1e-4);
  for (int64_t i = 0; i < yf.value().numel(); ++i) CHECK(std::isfinite(yf.value()[i]));
}

TEST_CASE("silu: gradient check in double") {
  auto x = randn<double>(Shape{3, 5, 7}, 2, 2.0);
  auto r =
      gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::silu(v[0]); }, {x});
  CHECK(r.max_rel_error < 1e-6);
}

TEST_CASE("relu: forward, and the gradient is 0 at exactly x = 0") {
  auto x = randn<double>(Shape{5, 9}, 3);
  x[4] = 0.0;
  Tape<double> tape;
  auto vx = tape.input(x);
  auto y = ops::relu(vx);
  CHECK(max_abs_diff(y.value(), naive_map(x, ref_relu)) == 0.0);
  y.grad().fill(1.0);
  tape.backward_from_seeded();
  for (int64_t i = 0; i < x.numel(); ++i) CHECK(vx.grad()[i] == (x[i] > 0 ? 1.0 : 0.0));
  CHECK(vx.grad()[4] == 0.0);
}

TEST_CASE("relu: gradient check in double away from the kink") {
  auto x = randn<double>(Shape{4, 11}, 4);
  auto r = gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::relu(v[0]); },
                     {x}, {}, 1e-6, 1234, skip_near_zero(x, 1e-4));
  CHECK(r.max_rel_error < 1e-6);
}

TEST_CASE("gelu: forward is the exact erf form, not the tanh approximation") {
  auto x = randn<double>(Shape{6, 7}, 5, 2.0);
  Tape<double> tape;
  auto y = ops::gelu(tape.constant(x));
  CHECK(max_abs_diff(y.value(), naive_map(x, ref_gelu)) < 1e-12);
  // PyTorch: torch.nn.functional.gelu(torch.tensor(1.0, dtype=torch.float64)) = 0.8413447460685429
  Tape<double> one;
  CHECK(ops::gelu(one.constant(Tensor<double>::full(Shape{1}, 1.0))).value()[0] ==
        doctest::Approx(0.8413447460685429).epsilon(1e-14));
  Tape<float> tape_f;
  CHECK(max_abs_diff(ops::gelu(tape_f.constant(x.cast<float>())).value(), naive_map(x, ref_gelu)) <
        1e-5);
}

TEST_CASE("gelu: gradient check in double") {
  auto x = randn<double>(Shape{3, 5, 7}, 6, 2.0);
  auto r =
      gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::gelu(v[0]); }, {x});
  CHECK(r.max_rel_error < 1e-6);
}
