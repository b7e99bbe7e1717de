// sum and mean (ops/reduce.hpp): against naive totals, gradient checks, thread-count
// independence, errors. CUDA parity: tests/gpu/test_reduce.cu. Declared case for both checks:
// tests/ops/op_cases.hpp.
#include <cbq/ops/reduce.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::randn;

namespace {
const Shape kReduceShapes[] = {Shape{3, 7}, Shape{2, 5, 9}, Shape{11}};
}  // namespace

TEST_CASE("sum: forward and mean match naive totals, output shape (1,), gradient check") {
  for (const Shape& shape : kReduceShapes) {
    auto a = randn<double>(shape, 9);
    double ref = 0;
    for (int64_t i = 0; i < a.numel(); ++i) ref += a[i];
    Tape<double> tape;
    auto s = ops::sum(tape.constant(a));
    auto m = ops::mean(tape.constant(a));
    REQUIRE(s.shape() == Shape{1});
    REQUIRE(m.shape() == Shape{1});
    CHECK(s.value()[0] == doctest::Approx(ref).epsilon(1e-12));
    CHECK(m.value()[0] == doctest::Approx(ref / a.numel()).epsilon(1e-12));
    auto rs =
        gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::sum(v[0]); }, {a});
    auto rm =
        gradcheck([](Tape<double>&, std::vector<Var<double>>& v) { return ops::mean(v[0]); }, {a});
    CHECK(rs.max_rel_error < 1e-6);
    CHECK(rm.max_rel_error < 1e-6);
  }
}

TEST_CASE("sum: large float sums accumulate in double and do not depend on the thread count") {
  const int64_t n = 300001;  // many blocks, odd tail
  auto a = randn<double>(Shape{n}, 10).cast<float>();
  long double ref = 0;
  for (int64_t i = 0; i < n; ++i) ref += a[i];
  const int saved_threads = num_threads();
  std::vector<float> results;
  for (int threads : {1, 2, 3}) {
    set_pool_threads(threads);
    Tape<float> tape;
    results.push_back(ops::sum(tape.constant(a)).value()[0]);
  }
  set_pool_threads(saved_threads);
  CHECK(results[0] == results[1]);
  CHECK(results[0] == results[2]);
  CHECK(std::abs(results[0] - static_cast<double>(ref)) < 1e-3);
}

TEST_CASE("mean: an empty input is an error naming the op and the shape") {
  Tape<double> tape;
  auto a = tape.constant(Tensor<double>(Shape{0, 4}));
  CHECK_THROWS_WITH_AS(
      ops::mean(a), doctest::Contains("mean: input of shape (0, 4) has no elements"), cbq::Error);
  CHECK(ops::sum(a).value()[0] == 0.0);
}
