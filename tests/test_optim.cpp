#include "support/gradcheck.hpp"

using namespace cbq;

TEST_CASE("adam: two steps match hand-computed values, with bias correction") {
  // p0 = 1, lr = 0.1, β1 = 0.9, β2 = 0.999, ε = 1e-8; gradients 0.5 then −0.25.
  // t=1: m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25 → p = 1 − 0.1·0.5/0.5 = 0.9
  // t=2: m = 0.045 − 0.025 = 0.02, v = 0.00024975 + 0.0000625 = 0.00031225,
  //      m̂ = 0.02/0.19 = 0.105263157894737, v̂ = 0.00031225/0.001999 = 0.156203101550775,
  //      sqrt(v̂) = 0.395225380701667, p = 0.9 − 0.1·m̂/(sqrt(v̂) + ε)
  Parameter<double> p("p", Tensor<double>::full(Shape{1}, 1.0));
  optim::Adam<double> adam;
  adam.add_group("g", {&p}, 0.1);
  p.grad[0] = 0.5;
  adam.step();
  CHECK(p.value[0] == doctest::Approx(1 - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-14));
  adam.zero_grad();
  CHECK(p.grad[0] == 0.0);
  p.grad[0] = -0.25;
  adam.step();
  const double expected = 0.9 - 0.1 * 0.105263157894737 / (0.395225380701667 + 1e-8);
  CHECK(p.value[0] == doctest::Approx(expected).epsilon(1e-8));
  CHECK(adam.steps() == 2);
}

TEST_CASE("adam: parameter groups use their own learning rates") {
  Parameter<float> a("a", Tensor<float>::full(Shape{3}, 0.f));
  Parameter<float> b("b", Tensor<float>::full(Shape{2}, 0.f));
  optim::Adam<float> adam;
  int ga = adam.add_group("steps", {&a}, 1e-3);
  int gb = adam.add_group("rounding", {&b}, 1e-1);
  a.grad.fill(2.f);
  b.grad.fill(-3.f);
  adam.step();
  // The first Adam step moves every parameter by exactly lr·sign(g) (up to ε).
  for (int i = 0; i < 3; ++i) CHECK(a.value[i] == doctest::Approx(-1e-3).epsilon(1e-5));
  for (int i = 0; i < 2; ++i) CHECK(b.value[i] == doctest::Approx(1e-1).epsilon(1e-5));
  adam.set_lr(ga, 0.0);
  CHECK(adam.lr(gb) == doctest::Approx(0.1));
  adam.step();
  for (int i = 0; i < 3; ++i) CHECK(a.value[i] == doctest::Approx(-1e-3).epsilon(1e-5));
}

TEST_CASE("adam: a frozen parameter or a negative learning rate is rejected") {
  Parameter<float> frozen("frozen", Tensor<float>::full(Shape{2}, 0.f), false);
  optim::Adam<float> adam;
  CHECK_THROWS_WITH_AS(adam.add_group("g", {&frozen}, 1e-3), doctest::Contains("not trainable"),
                       cbq::Error);
  Parameter<float> ok("ok", Tensor<float>::full(Shape{2}, 0.f));
  CHECK_THROWS_WITH_AS(adam.add_group("g", {&ok}, -1.0), doctest::Contains("learning rate"),
                       cbq::Error);
}

TEST_CASE("cosine schedule: endpoints, midpoint and clamping beyond the end") {
  optim::CosineSchedule s(1e-3, 100, 1e-5);
  CHECK(s.at(0) == doctest::Approx(1e-3));
  CHECK(s.at(50) == doctest::Approx((1e-3 + 1e-5) / 2));
  // t = 25: lr_min + (lr_max − lr_min)(1 + cos(π/4))/2 = 1e-5 + 9.9e-4 · 0.853553390593
  CHECK(s.at(25) == doctest::Approx(1e-5 + 9.9e-4 * 0.853553390593274));
  CHECK(s.at(100) == doctest::Approx(1e-5));
  CHECK(s.at(1000) == doctest::Approx(1e-5));
  CHECK_THROWS_AS(optim::CosineSchedule(1.0, 0), cbq::Error);
}

TEST_CASE("adam: a per-element learning-rate scale makes updates relative") {
  // The first Adam step moves each element by lr·scale·sign(g) (up to ε).
  Parameter<double> s("s", Tensor<double>::from({0.5, 0.002, 3.0}, Shape{3}));
  optim::Adam<double> adam;
  adam.add_group("steps", {&s}, 0.1, {Tensor<double>::from({0.5, 0.002, 3.0}, Shape{3})});
  s.grad.fill(1.0);
  adam.step();
  CHECK(s.value[0] == doctest::Approx(0.5 * 0.9).epsilon(1e-6));
  CHECK(s.value[1] == doctest::Approx(0.002 * 0.9).epsilon(1e-6));
  CHECK(s.value[2] == doctest::Approx(3.0 * 0.9).epsilon(1e-6));
  CHECK_THROWS_WITH_AS(adam.add_group("bad", {&s}, 0.1, {Tensor<double>(Shape{2})}),
                       doctest::Contains("does not match parameter 's'"), cbq::Error);
}
