#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::randn;

TEST_CASE("tape: gradients accumulate into parameters and the arena is reused after clear") {
  Parameter<double> w("w", randn<double>(Shape{3, 4}, 1));
  Tape<double> tape;
  Tensor<double> x = randn<double>(Shape{5, 4}, 2);
  std::size_t allocations_after_first = 0;
  for (int step = 0; step < 3; ++step) {
    tape.clear();
    auto y = ops::linear(tape.constant(x), tape.param(w));
    tape.backward_from_seeded();  // nothing seeded: no gradient flows
    CHECK_FALSE(y.has_grad());
    y.grad().fill(1.0);
    tape.backward_from_seeded();
    if (step == 0) allocations_after_first = tape.arena_allocations();
  }
  // Three identical steps allocate no new buffers after the first.
  CHECK(tape.arena_allocations() == allocations_after_first);
  // dW = Σ_steps Gᵀ x with G = 1: each entry is 3 × column sum of x.
  for (int j = 0; j < 3; ++j)
    for (int k = 0; k < 4; ++k) {
      double col = 0;
      for (int r = 0; r < 5; ++r) col += x(r, k);
      CHECK(w.grad(j, k) == doctest::Approx(3 * col));
    }
}

TEST_CASE("tape: backward needs a scalar loss that depends on a trainable variable") {
  Tape<double> tape;
  auto a = tape.constant(randn<double>(Shape{2, 2}, 3));
  auto b = tape.constant(randn<double>(Shape{2, 2}, 4));
  auto c = ops::add(a, b);
  CHECK_THROWS_WITH_AS(tape.backward(c), doctest::Contains("must be a scalar"), cbq::Error);
}

TEST_CASE("tape: NoGrad records nothing") {
  Tape<double> tape;
  auto a = tape.input(randn<double>(Shape{2, 2}, 3));
  {
    NoGrad<double> guard(tape);
    auto c = ops::add(a, a);
    CHECK_FALSE(c.requires_grad());
  }
  CHECK(tape.num_nodes() == 0);
  auto d = ops::add(a, a);
  CHECK(d.requires_grad());
  CHECK(tape.num_nodes() == 1);
}
