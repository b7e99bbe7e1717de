// CUDA vs CPU: cross_entropy and token_nll (ops/cross_entropy.hpp,
// cuda/cbq/cuda/ops/cross_entropy.cuh), forward and backward, float and double, on row shapes with
// 1, 7, 64, 257 and 1031 columns, logits around 0 and around 300, after log_softmax; determinism;
// the error for a CPU input on a CUDA tape. CPU tests: tests/ops/test_cross_entropy.cpp; the
// declared cases of tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerances (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), 1e-12 (double) and 1e-5
// (float): the row maxima are exact, the log-sum-exp and the loss mean are double sums on both
// devices (only the order differs), and the per-element formulas are the CPU's. token_nll
// returns double on both devices from the same formula: 1e-12 for float and double logits.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {
// Deterministic pseudo-random class ids in [0, classes).
std::vector<int32_t> make_targets(int64_t rows, int64_t classes, uint64_t seed) {
  std::vector<int32_t> targets(static_cast<std::size_t>(rows));
  uint64_t state = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (auto& t : targets) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<int32_t>((state >> 33) % static_cast<uint64_t>(classes));
  }
  return targets;
}
}  // namespace

TEST_CASE_TEMPLATE("cross_entropy: CUDA matches CPU", T, float, double) {
  uint64_t seed = 300;
  for (const Shape& shape : row_shapes()) {
    CAPTURE(shape.str());
    for (double offset : {0.0, 300.0}) {
      CAPTURE(offset);
      const std::vector<Tensor<T>> inputs{randn_scaled<T>(shape, seed++, 4.0, offset)};
      const std::vector<int32_t> targets = make_targets(shape.rows(), shape.cols(), seed++);
      const GraphFn<T> f = [targets](std::vector<Var<T>>& v) {
        return ops::cross_entropy(v[0], targets);
      };
      check_parity<T>(inputs, f, tolerance<T>(), seed++);
      // cross_entropy after log_softmax: its backward feeds the softmax backward.
      const GraphFn<T> chained = [targets](std::vector<Var<T>>& v) {
        return ops::cross_entropy(ops::log_softmax(v[0]), targets);
      };
      check_parity<T>(inputs, chained, tolerance<T>(), seed++);
    }
  }
}

TEST_CASE_TEMPLATE("token_nll: CUDA logits give the CPU's per-row values", T, float, double) {
  uint64_t seed = 400;
  for (const Shape& shape : row_shapes()) {
    CAPTURE(shape.str());
    const Tensor<T> logits = randn_scaled<T>(shape, seed++, 4.0, 10.0);
    const std::vector<int32_t> targets = make_targets(shape.rows(), shape.cols(), seed++);
    const std::vector<double> cpu = ops::token_nll(logits, targets);
    const std::vector<double> gpu = ops::token_nll(logits.to(Device::cuda), targets);
    REQUIRE(gpu.size() == cpu.size());
    // max |gpu − cpu| / max(max |cpu|, 1), NaN-aware
    CHECK(gpu_testing::max_rel_error(gpu, cpu, 1.0) <= 1e-12);
  }
}

TEST_CASE("cross_entropy: two CUDA runs give identical bits") {
  const Shape shape{513, 1031};
  const std::vector<Tensor<float>> inputs{randn<float>(shape, 1)};
  const std::vector<int32_t> targets = make_targets(shape.rows(), shape.cols(), 3);
  const GraphFn<float> f = [targets](std::vector<Var<float>>& v) {
    return ops::cross_entropy(v[0], targets);
  };
  check_deterministic<float>(inputs, f, 5);
}

TEST_CASE("cross_entropy: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  Var<float> on_cpu = tape.input(randn<float>(Shape{3, 8}, 1));
  const std::vector<int32_t> targets{0, 5, 7};
  const std::string message = error_message([&] { ops::cross_entropy(on_cpu, targets); });
  CHECK(contains(message, "cross_entropy"));
  CHECK(contains(message, "different devices"));
}
