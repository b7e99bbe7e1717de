#pragma once
// CUDA-vs-CPU parity harness for the core ops (include after gpu/gpu_main.hpp). run_graph builds
// the same op graph on a Tape(Device::cpu) and a Tape(Device::cuda) from the same CPU inputs,
// seeds the output's gradient with the same random tensor (or a scalar for losses), runs
// backward and returns the output and every input gradient on the CPU; check_parity compares
// them with gpu_testing::rel_error (max |gpu − cpu| / max |cpu|).
#include <functional>
#include <string>
#include <vector>

#include "gpu/gpu_main.hpp"

namespace cbq::gpu_testing {

template <class T>
struct GraphResult {
  Tensor<T> out;
  std::vector<Tensor<T>> grads;  // undefined for inputs that were constants
};

template <class T>
using GraphFn = std::function<Var<T>(std::vector<Var<T>>&)>;

// `needs_grad[i]` false makes input i a constant (empty: every input needs a gradient).
template <class T>
GraphResult<T> run_graph(Device device, const std::vector<Tensor<T>>& inputs, const GraphFn<T>& f,
                         uint64_t grad_seed, const std::vector<bool>& needs_grad = {}) {
  Tape<T> tape(device);
  std::vector<Var<T>> vars;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const bool rg = needs_grad.empty() || needs_grad[i];
    vars.push_back(rg ? tape.input(inputs[i].to(device)) : tape.constant(inputs[i].to(device)));
  }
  Var<T> out = f(vars);
  CHECK(out.device() == device);
  if (out.value().numel() == 1) {
    tape.backward(out, static_cast<T>(0.5 + 0.25 * static_cast<double>(grad_seed % 7)));
  } else {
    out.grad().copy_from(randn<T>(out.shape(), grad_seed));
    tape.backward_from_seeded();
  }
  GraphResult<T> result{out.value().to(Device::cpu), {}};
  for (std::size_t i = 0; i < vars.size(); ++i)
    result.grads.push_back(vars[i].requires_grad() ? vars[i].grad().to(Device::cpu) : Tensor<T>());
  return result;
}

// Runs f twice on the GPU and checks that the output and every gradient are the same bits (the
// kernels' reductions have a fixed order and no atomics).
template <class T>
void check_deterministic(const std::vector<Tensor<T>>& inputs, const GraphFn<T>& f,
                         uint64_t grad_seed = 1) {
  const GraphResult<T> first = run_graph<T>(Device::cuda, inputs, f, grad_seed);
  const GraphResult<T> second = run_graph<T>(Device::cuda, inputs, f, grad_seed);
  CHECK(first.out.to_vector() == second.out.to_vector());
  REQUIRE(first.grads.size() == inputs.size());
  for (std::size_t i = 0; i < first.grads.size(); ++i)
    CHECK(first.grads[i].to_vector() == second.grads[i].to_vector());
}

// Runs f on both devices and checks the output and every gradient within `tol`; returns the
// largest relative error seen (for messages).
template <class T>
double check_parity(const std::vector<Tensor<T>>& inputs, const GraphFn<T>& f, double tol,
                    uint64_t grad_seed = 1, const std::vector<bool>& needs_grad = {}) {
  const GraphResult<T> cpu = run_graph<T>(Device::cpu, inputs, f, grad_seed, needs_grad);
  const GraphResult<T> gpu = run_graph<T>(Device::cuda, inputs, f, grad_seed, needs_grad);
  double worst = rel_error(gpu.out, cpu.out);
  CHECK_MESSAGE(worst <= tol, "output: rel error ", worst, " > ", tol);
  for (std::size_t i = 0; i < cpu.grads.size(); ++i) {
    if (!cpu.grads[i].defined()) {
      CHECK_FALSE(gpu.grads[i].defined());
      continue;
    }
    const double e = rel_error(gpu.grads[i], cpu.grads[i]);
    CHECK_MESSAGE(e <= tol, "gradient of input ", i, ": rel error ", e, " > ", tol);
    worst = nan_max(worst, e);
  }
  return worst;
}

// Row-op shapes: 1, 7, 257 and 1031 columns, row counts that are no multiple of anything, and a
// 3-D input (leading dimensions flattened into rows).
inline std::vector<Shape> row_shapes() {
  return {Shape{1, 1}, Shape{3, 7}, Shape{33, 257}, Shape{5, 1031}, Shape{2, 3, 7}, Shape{1, 64}};
}

// The norms' shapes: row_shapes() and more rows than the 16 row phases of the column sums.
inline std::vector<Shape> norm_shapes() {
  std::vector<Shape> shapes = row_shapes();
  shapes.push_back(Shape{300, 96});
  return shapes;
}

// Elementwise sizes: a single element, odd sizes, and one that needs several grid strides.
inline std::vector<Shape> elementwise_shapes() {
  return {Shape{1}, Shape{7}, Shape{3, 5, 7}, Shape{257, 129}, Shape{(1 << 21) + 3}};
}

// randn scaled by `scale`, with `offset` added to every element.
template <class T>
Tensor<T> randn_scaled(const Shape& shape, uint64_t seed, double scale, double offset = 0) {
  Tensor<T> t = randn<T>(shape, seed);
  for (int64_t i = 0; i < t.numel(); ++i)
    t[i] = static_cast<T>(static_cast<double>(t[i]) * scale + offset);
  return t;
}

}  // namespace cbq::gpu_testing
