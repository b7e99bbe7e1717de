// embedding (ops/embedding.hpp): gather forward, scatter-add backward against serial loops,
// gradient check, errors. CUDA parity: tests/gpu/test_embedding.cu. Declared case for both checks:
// tests/ops/op_cases.hpp.
#include <cbq/ops/embedding.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

TEST_CASE("embedding: forward gathers table rows, gradient scatter-adds repeated ids") {
  auto table = randn<double>(Shape{7, 5}, 14);
  const std::vector<int32_t> ids = {3, 0, 6, 3, 3, 1, 0};
  Tape<double> tape;
  auto w = tape.input(table);
  auto y = ops::embedding(w, ids);
  REQUIRE(y.shape() == Shape{7, 5});
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (int64_t j = 0; j < 5; ++j) CHECK(y.value()(t, j) == table(ids[t], j));

  // Seed a known output gradient and compare with a serial scatter-add.
  auto seed = randn<double>(Shape{7, 5}, 15);
  y.grad().copy_from(seed);
  tape.backward_from_seeded();
  Tensor<double> ref(Shape{7, 5});
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (int64_t j = 0; j < 5; ++j) ref(ids[t], j) += seed(t, j);
  CHECK(max_abs_diff(w.grad(), ref) < 1e-15);

  auto r = gradcheck(
      [&](Tape<double>&, std::vector<Var<double>>& v) { return ops::embedding(v[0], ids); },
      {table});
  CHECK(r.max_rel_error < 1e-6);
}

TEST_CASE("embedding: the threaded column split matches a serial scatter-add exactly") {
  const int64_t vocab = 5, d = 20001;  // wide enough to split over columns
  auto table = randn<float>(Shape{vocab, d}, 16);
  const std::vector<int32_t> ids = {4, 1, 4, 4, 0, 1};
  Tape<float> tape;
  auto w = tape.input(table);
  auto y = ops::embedding(w, ids);
  auto seed = randn<float>(y.shape(), 17);
  y.grad().copy_from(seed);
  tape.backward_from_seeded();
  Tensor<float> ref(Shape{vocab, d});
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (int64_t j = 0; j < d; ++j) ref(ids[t], j) += seed(t, j);
  CHECK(max_abs_diff(w.grad(), ref) == 0.0);
}

TEST_CASE("embedding: bad ids and tables name the position, the id and the shape") {
  Tape<double> tape;
  auto w = tape.constant(randn<double>(Shape{4, 3}, 1));
  CHECK_THROWS_WITH_AS(
      ops::embedding(w, {0, 2, -1}),
      doctest::Contains(
          "embedding: id -1 at position 2 is out of range for a table of 4 rows (shape (4, 3))"),
      cbq::Error);
  CHECK_THROWS_WITH_AS(ops::embedding(w, {4}),
                       doctest::Contains("embedding: id 4 at position 0 is out of range"),
                       cbq::Error);
  auto flat = tape.constant(randn<double>(Shape{12}, 2));
  CHECK_THROWS_WITH_AS(ops::embedding(flat, {0}),
                       doctest::Contains("embedding: table must be 2-D (V, d), got (12,)"),
                       cbq::Error);
}
