// CUDA vs CPU: softmax and log_softmax (ops/softmax.hpp, cuda/cbq/cuda/ops/softmax.cuh), forward
// and backward, float and double, on row shapes with 1, 7, 64, 257 and 1031 columns, logits
// around 0 and around 1000 (stability), more rows than the row grid; the error for a CPU input
// on a CUDA tape. CPU tests: tests/ops/test_softmax.cpp; the declared cases of
// tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), 1e-12 (double) and 1e-5
// (float): the row maxima are exact, the log-sum-exp is a double sum on both devices (only the
// order differs), and the per-element formulas are the CPU's.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

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

TEST_CASE_TEMPLATE("log_softmax: more rows than the row grid (the rows loop)", T, float, double) {
  // 2^20 + 3 rows: the row kernels launch at most 2^20 blocks and loop over the rest.
  const Shape shape{(int64_t(1) << 20) + 3, 2};
  const std::vector<Tensor<T>> inputs{randn<T>(shape, 1)};
  check_parity<T>(
      inputs, [](std::vector<Var<T>>& v) { return ops::log_softmax(v[0]); }, tolerance<T>(), 3);
}

TEST_CASE("softmax: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  Var<float> on_cpu = tape.input(randn<float>(Shape{3, 8}, 1));
  struct Case {
    const char* op;
    std::function<void()> call;
  };
  const Case cases[] = {
      {"softmax", [&] { ops::softmax(on_cpu); }},
      {"log_softmax", [&] { ops::log_softmax(on_cpu); }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.op);
    const std::string message = error_message(c.call);
    CHECK(contains(message, c.op));
    CHECK(contains(message, "different devices"));
  }
}
