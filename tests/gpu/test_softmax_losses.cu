// CUDA vs CPU: softmax, log_softmax and the losses (mse, row_sq_error, cross_entropy, token_nll;
// kl_softmax: test_kl_softmax.cu), forward and backward, float and double, on row shapes with 1, 7,
// 64, 257 and 1031 columns, large logits (stability), more rows than the row grid, and mixed
// devices.
//
// Tolerances (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), 1e-12 (double) and 1e-5
// (float), for every op here: the row maxima are exact, the log-sum-exp, the KL terms and the
// loss means are double sums on both devices (only the order differs), and the per-element
// formulas are the CPU's. token_nll returns double on both devices from the same formula: 1e-12
// for float and double logits.
#include "gpu/parity.hpp"

using namespace cbq;
using cbq::gpu_testing::check_parity;
using cbq::gpu_testing::contains;
using cbq::gpu_testing::error_message;
using cbq::gpu_testing::GraphFn;
using cbq::gpu_testing::randn;
using cbq::gpu_testing::randn_scaled;
using cbq::gpu_testing::row_shapes;
using cbq::gpu_testing::run_graph;
using cbq::gpu_testing::tolerance;

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

TEST_CASE_TEMPLATE("softmax and log_softmax: CUDA matches CPU", T, float, double) {
  uint64_t seed = 1;
  for (const Shape& shape : row_shapes()) {
    CAPTURE(shape.str());
    // Logits of scale 3, and the same with an offset of 1000 (max-subtraction must keep it finite).
    for (double offset : {0.0, 1000.0}) {
      CAPTURE(offset);
      const std::vector<Tensor<T>> inputs{randn_scaled<T>(shape, seed++, 3.0, offset)};
      check_parity<T>(
          inputs, [](std::vector<Var<T>>& v) { return ops::softmax(v[0]); }, tolerance<T>(),
          seed++);
      check_parity<T>(
          inputs, [](std::vector<Var<T>>& v) { return ops::log_softmax(v[0]); }, tolerance<T>(),
          seed++);
    }
  }
}

TEST_CASE_TEMPLATE("softmax and rmsnorm: more rows than the row grid (the rows loop)", T, float,
                   double) {
  // 2^20 + 3 rows: the row kernels launch at most 2^20 blocks and loop over the rest.
  const Shape shape{(int64_t(1) << 20) + 3, 2};
  const std::vector<Tensor<T>> inputs{randn<T>(shape, 1), randn<T>(Shape{2}, 2)};
  check_parity<T>(
      inputs, [](std::vector<Var<T>>& v) { return ops::log_softmax(v[0]); }, tolerance<T>(), 3);
  // Weight frozen: a float dw summed over 2^20 rows differs from the CPU's float sum by the
  // CPU's own rounding (~2e-5 relative), which is not what this test is about.
  check_parity<T>(inputs, [](std::vector<Var<T>>& v) { return ops::rmsnorm(v[0], v[1], 1e-5); },
                  tolerance<T>(), 4, {true, false});
}

TEST_CASE_TEMPLATE("mse and row_sq_error: CUDA matches CPU", T, float, double) {
  uint64_t seed = 100;
  for (const Shape& shape : row_shapes()) {
    CAPTURE(shape.str());
    const std::vector<Tensor<T>> inputs{randn<T>(shape, seed++), randn<T>(shape, seed++)};
    const GraphFn<T> mse = [](std::vector<Var<T>>& v) { return ops::mse(v[0], v[1]); };
    const GraphFn<T> row = [](std::vector<Var<T>>& v) { return ops::row_sq_error(v[0], v[1]); };
    check_parity<T>(inputs, mse, tolerance<T>(), seed++);
    check_parity<T>(inputs, row, tolerance<T>(), seed++);
    check_parity<T>(inputs, mse, tolerance<T>(), seed++, {false, true});  // constant target
    check_parity<T>(inputs, row, tolerance<T>(), seed++, {true, false});
  }
}

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

TEST_CASE("losses: two CUDA runs give identical bits") {
  const Shape shape{513, 1031};
  const std::vector<Tensor<float>> inputs{randn<float>(shape, 1), randn<float>(shape, 2)};
  const std::vector<int32_t> targets = make_targets(shape.rows(), shape.cols(), 3);
  const GraphFn<float> fs[] = {
      [](std::vector<Var<float>>& v) { return ops::mse(v[0], v[1]); },
      [](std::vector<Var<float>>& v) { return ops::kl_softmax(v[0], v[1], 1.0f); },
      [targets](std::vector<Var<float>>& v) { return ops::cross_entropy(v[0], targets); }};
  for (const GraphFn<float>& f : fs) cbq::gpu_testing::check_deterministic<float>(inputs, f, 5);
}

TEST_CASE("softmax and losses: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> host = randn<float>(Shape{3, 8}, 1);
  Var<float> on_cpu = tape.input(host);
  Var<float> on_gpu = tape.input(host.to(Device::cuda));
  const std::vector<int32_t> targets{0, 5, 7};
  struct Case {
    const char* op;
    std::function<void()> call;
  };
  const Case cases[] = {
      {"softmax", [&] { ops::softmax(on_cpu); }},
      {"log_softmax", [&] { ops::log_softmax(on_cpu); }},
      {"mse", [&] { ops::mse(on_gpu, on_cpu); }},
      {"row_sq_error", [&] { ops::row_sq_error(on_cpu, on_gpu); }},
      {"kl_softmax", [&] { ops::kl_softmax(on_gpu, on_cpu); }},
      {"cross_entropy", [&] { ops::cross_entropy(on_cpu, targets); }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.op);
    const std::string message = error_message(c.call);
    CHECK(contains(message, c.op));
    CHECK(contains(message, "different devices"));
  }
}
