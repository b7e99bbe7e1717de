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

TEST_CASE("adam: many parameters split over threads get the per-element update, bit for bit") {
  // step() updates all CPU parameters in one split of their elements together; splits cut
  // parameters at arbitrary points. Reference: one element at a time, the same float expressions.
  const int before_threads = num_threads();
  for (int threads : {1, 2, 3}) {
    set_pool_threads(threads);
    CAPTURE(threads);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    const std::vector<int64_t> sizes = {1, 4097, 3, 12000, 64, 5000, 2};
    std::vector<std::unique_ptr<Parameter<float>>> params;
    std::vector<Tensor<float>> scales;
    for (size_t i = 0; i < sizes.size(); ++i) {
      Tensor<float> v(Shape{sizes[i]});
      for (int64_t j = 0; j < sizes[i]; ++j) v[j] = normal(rng);
      params.push_back(std::make_unique<Parameter<float>>(fmt::format("p{}", i), v));
      Tensor<float> s(Shape{sizes[i]});
      for (int64_t j = 0; j < sizes[i]; ++j) s[j] = 0.5f + std::abs(normal(rng));
      scales.push_back(s);
    }
    optim::Adam<float> adam;
    adam.add_group("plain", {params[0].get(), params[1].get(), params[2].get()}, 1e-2);
    adam.add_group("scaled", {params[3].get(), params[4].get()}, 3e-3, {scales[3], scales[4]});
    adam.add_group("last", {params[5].get(), params[6].get()}, 0.1);
    const double lrs[] = {1e-2, 1e-2, 1e-2, 3e-3, 3e-3, 0.1, 0.1};
    std::vector<std::vector<float>> p_ref(sizes.size()), m_ref(sizes.size()), v_ref(sizes.size());
    for (size_t i = 0; i < sizes.size(); ++i) {
      p_ref[i].assign(params[i]->value.data(), params[i]->value.data() + sizes[i]);
      m_ref[i].assign(static_cast<size_t>(sizes[i]), 0.f);
      v_ref[i].assign(static_cast<size_t>(sizes[i]), 0.f);
    }
    for (int t = 1; t <= 3; ++t) {
      for (auto& p : params)
        for (int64_t j = 0; j < p->grad.numel(); ++j) p->grad[j] = normal(rng);
      adam.step();
      const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
      const auto bc1 = static_cast<float>(1 - std::pow(0.9, t));
      const auto bc2 = static_cast<float>(1 - std::pow(0.999, t));
      for (size_t i = 0; i < sizes.size(); ++i) {
        const auto lr = static_cast<float>(lrs[i]);
        const bool scaled = i == 3 || i == 4;
        int64_t mismatches = 0;
        for (int64_t j = 0; j < sizes[i]; ++j) {
          const auto k = static_cast<size_t>(j);
          const float g = params[i]->grad[j];
          m_ref[i][k] = b1 * m_ref[i][k] + (1 - b1) * g;
          v_ref[i][k] = b2 * v_ref[i][k] + (1 - b2) * g * g;
          const float update = lr * (m_ref[i][k] / bc1) / (std::sqrt(v_ref[i][k] / bc2) + eps);
          p_ref[i][k] -= scaled ? scales[i][j] * update : update;
          // Bit equality; a NaN fails it too.
          if (!(params[i]->value[j] == p_ref[i][k])) ++mismatches;
        }
        CAPTURE(i);
        CHECK(mismatches == 0);
      }
    }
    adam.zero_grad();  // also one split over all parameters
    int64_t nonzero = 0;
    for (auto& p : params)
      for (int64_t j = 0; j < p->grad.numel(); ++j) nonzero += p->grad[j] == 0.f ? 0 : 1;
    CHECK(nonzero == 0);
  }
  set_pool_threads(before_threads);
}
