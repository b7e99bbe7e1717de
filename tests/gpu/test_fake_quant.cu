// CUDA vs CPU: the weight fake-quant with LSQ step gradients, quant::fake_quant_weight
// (quant/fake_quant.hpp, cuda/cbq/cuda/quant/fake_quant.cuh), and the codes of quantize_weight,
// float and double, every granularity, ties and clamp bounds. CPU tests:
// tests/quant/test_fake_quant.cpp.
//
// Exactness: the forward evaluates the CPU's expressions in the CPU's order with IEEE
// round-to-nearest operations and rint (ties to even), so outputs, codes and clamp decisions are
// asserted EQUAL bit for bit, including values exactly on a rounding tie or a clamp bound. The
// step gradient is a reduction in another order: double 1e-12, float 1e-5, compared at the size
// of its terms when its value cancelled below them (reduction_error with sum_floor), because its
// rounding error scales with the terms.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "gpu/gpu_main.hpp"
#include "gpu/quant_parity.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;
using quant::Granularity;
using quant::GridSpec;

namespace {

template <class T>
StepResult<T> run_fake_quant(Device device, const Tensor<T>& w, const Tensor<T>& s,
                             const Tensor<T>& z, const GridSpec& spec, const Tensor<T>& g,
                             bool lsq) {
  Tape<T> tape(device);
  Parameter<T> scale("s", s.to(device));
  Var<T> vw = tape.input(w.to(device));
  Var<T> y = quant::fake_quant_weight(vw, tape.param(scale), on(device, z), spec, lsq);
  y.grad().copy_from(g.to(device));
  tape.backward_from_seeded();
  return {y.value().to(Device::cpu), vw.grad().to(Device::cpu), scale.grad.to(Device::cpu)};
}

}  // namespace

TEST_CASE_TEMPLATE("fake_quant_weight: CUDA forward is bit-exact and LSQ grads match, all layouts",
                   T, float, double) {
  uint64_t seed = 200;
  for (const Layout& layout : kLayouts)
    for (bool symmetric : {false, true})
      for (int bits : {2, 4, 8})
        for (bool lsq : {true, false}) {
          const GridSpec spec = make_spec(bits, symmetric, layout.granularity, layout.group);
          const Tensor<T> w = scaled(randn<T>(Shape{11, 40}, seed++), 0.1);
          const Tensor<T> g = randn<T>(Shape{11, 40}, seed++);
          Tensor<T> s, z;
          quant::init_minmax(w, spec, s, z);
          s = scaled(s, 0.8);              // some codes clamp
          if (symmetric) z = Tensor<T>();  // the "all zero-points 0" path
          const StepResult<T> cpu = run_fake_quant(Device::cpu, w, s, z, spec, g, lsq);
          const StepResult<T> gpu = run_fake_quant(Device::cuda, w, s, z, spec, g, lsq);
          CAPTURE(static_cast<int>(layout.granularity));
          CAPTURE(layout.group);
          CAPTURE(symmetric);
          CAPTURE(bits);
          CAPTURE(lsq);
          CHECK(same_bits(gpu.y, cpu.y));
          CHECK(same_bits(gpu.dx, cpu.dx));  // G ⊙ pass: the same clamp decisions
          const double span = double(spec.qmax() - spec.qmin());
          const double lsq_min = lsq ? 1.0 / std::sqrt(440.0 * double(spec.qmax())) : 1.0;
          CHECK(reduction_error(gpu.ds, cpu.ds, sum_floor(g, lsq_min * span)) <= tolerance<T>());
          // The codes of the same grid, from CUDA tensors, equal the CPU's.
          const quant::QuantizedWeight qc = quant::quantize_weight(w, s, z, spec);
          const quant::QuantizedWeight qg = quant::quantize_weight(
              w.to(Device::cuda), s.to(Device::cuda), on(Device::cuda, z), spec);
          CHECK(qg.codes.to_vector() == qc.codes.to_vector());
        }
}

TEST_CASE_TEMPLATE("fake_quant_weight: ties round to even and bounds stay inside, CPU = CUDA", T,
                   float, double) {
  // s = 1/4 and z = 8 (4 bits, [0, 15]): w/s is exact, so w = (k + ½)/4 is an exact tie, and
  // w = −2 and 7/4 land exactly on qmin and qmax.
  const GridSpec spec = make_spec(4, false, Granularity::per_tensor);
  std::vector<T> values;
  for (int k = -12; k <= 12; ++k) values.push_back(static_cast<T>((k + 0.5) / 4.0));  // ties
  for (int k = -10; k <= 9; ++k) values.push_back(static_cast<T>(k / 4.0));           // on grid
  const auto n = static_cast<int64_t>(values.size());
  const Tensor<T> w = Tensor<T>::from(values, Shape{1, n});
  const Tensor<T> s = Tensor<T>::full(Shape{1, 1}, T(0.25));
  const Tensor<T> z = Tensor<T>::full(Shape{1, 1}, T(8));
  const Tensor<T> ones = Tensor<T>::full(Shape{1, n}, T(1));
  const StepResult<T> cpu = run_fake_quant(Device::cpu, w, s, z, spec, ones, true);
  const StepResult<T> gpu = run_fake_quant(Device::cuda, w, s, z, spec, ones, true);
  CHECK(same_bits(gpu.y, cpu.y));
  CHECK(same_bits(gpu.dx, cpu.dx));
  int64_t inside = 0;
  for (int64_t i = 0; i < n; ++i) {
    // Independent expectation: ties to even, then the clamp; on a bound counts as inside.
    const double v = static_cast<double>(values[static_cast<std::size_t>(i)]) * 4.0;
    const double r = std::nearbyint(v);
    const double q = std::clamp(r + 8.0, 0.0, 15.0);
    CAPTURE(v);
    CHECK(static_cast<double>(gpu.y[i]) == 0.25 * (q - 8.0));
    CHECK(static_cast<double>(gpu.dx[i]) == (r + 8.0 == q ? 1.0 : 0.0));
    inside += r + 8.0 == q;
  }
  CHECK(inside > 10);
  CHECK(inside < n);
  const double lsq_factor = 1.0 / std::sqrt(double(n) * 15.0);
  CHECK(reduction_error(gpu.ds, cpu.ds, sum_floor(ones, lsq_factor * 15.0)) <= tolerance<T>());
}
