// CUDA vs CPU: mse and row_sq_error (ops/mse.hpp, cuda/cbq/cuda/ops/mse.cuh), forward and
// backward, float and double, on row shapes with 1, 7, 64, 257 and 1031 columns, with either
// input constant; determinism; the error for operands on different devices. CPU tests:
// tests/ops/test_mse.cpp; the declared cases of tests/ops/op_cases.hpp: test_op_cases.cu.
//
// Tolerance (rel_error = max |gpu − cpu| / max |cpu|): tolerance<T>(), 1e-12 (double) and 1e-5
// (float): the loss means are double sums on both devices (only the order differs), and the
// per-element formulas are the CPU's.
#include "gpu/parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

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

TEST_CASE("mse: two CUDA runs give identical bits") {
  const Shape shape{513, 1031};
  const std::vector<Tensor<float>> inputs{randn<float>(shape, 1), randn<float>(shape, 2)};
  const GraphFn<float> f = [](std::vector<Var<float>>& v) { return ops::mse(v[0], v[1]); };
  check_deterministic<float>(inputs, f, 5);
}

TEST_CASE("mse: CPU and CUDA operands mixed give a clear error") {
  Tape<float> tape(Device::cuda);
  const Tensor<float> host = randn<float>(Shape{3, 8}, 1);
  Var<float> on_cpu = tape.input(host);
  Var<float> on_gpu = tape.input(host.to(Device::cuda));
  struct Case {
    const char* op;
    std::function<void()> call;
  };
  const Case cases[] = {
      {"mse", [&] { ops::mse(on_gpu, on_cpu); }},
      {"row_sq_error", [&] { ops::row_sq_error(on_cpu, on_gpu); }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.op);
    const std::string message = error_message(c.call);
    CHECK(contains(message, c.op));
    CHECK(contains(message, "different devices"));
  }
}
