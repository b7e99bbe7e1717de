// reshape (ops/reshape.hpp): a view without a copy, the gradient through it, errors.
// CUDA parity: tests/gpu/test_scale.cu (with scale). Declared case for both checks:
// tests/ops/op_cases.hpp.
#include <cbq/ops/mul.hpp>
#include <cbq/ops/reshape.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::randn;

TEST_CASE("reshape: a view without a copy whose gradient flows back with the input's shape") {
  auto a = randn<double>(Shape{2, 5, 9}, 11);
  Tape<double> tape;
  auto x = tape.input(a);
  auto y = ops::reshape(x, Shape{10, 9});
  REQUIRE(y.shape() == Shape{10, 9});
  CHECK(y.value().shares_storage(x.value()));
  CHECK(y.value().data() == x.value().data());

  auto r = gradcheck(
      [](Tape<double>&, std::vector<Var<double>>& v) {
        // reshape between two ops so the gradient must be re-read in the input's layout
        return ops::mul(ops::reshape(v[0], Shape{9, 10}), v[1]);
      },
      {randn<double>(Shape{2, 5, 9}, 12), randn<double>(Shape{9, 10}, 13)});
  CHECK(r.max_rel_error < 1e-6);
}

TEST_CASE("reshape: a different element count is an error naming both shapes") {
  Tape<double> tape;
  auto a = tape.constant(randn<double>(Shape{3, 7}, 1));
  CHECK_THROWS_WITH_AS(
      ops::reshape(a, Shape{4, 5}),
      doctest::Contains("reshape: cannot view (3, 7) (21 elements) as (4, 5) (20 elements)"),
      cbq::Error);
}
