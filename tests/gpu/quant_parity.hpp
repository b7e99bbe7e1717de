#pragma once
// Helpers shared by the CUDA-vs-CPU tests of the quantizers (test_grid.cu, test_fake_quant.cu,
// test_act_quant.cu, test_cfp.cu) and of LoRA-Rounding (test_lora_rounding.cu): grid specs, the
// granularities under test, a step quantizer's results, and the comparison of reduced gradients
// at the size of their terms.
#include <cmath>
#include <vector>

#include "gpu/gpu_main.hpp"

namespace cbq::gpu_testing {

using quant::Granularity;
using quant::GridSpec;

inline GridSpec make_spec(int bits, bool symmetric, Granularity granularity, int64_t group = 16) {
  GridSpec g;
  g.bits = bits;
  g.symmetric = symmetric;
  g.granularity = granularity;
  g.group_size = group;
  return g;
}

// A step quantizer's output, input gradient and step gradient (fake_quant_weight,
// fake_quant_act_static), on the CPU.
template <class T>
struct StepResult {
  Tensor<T> y, dx, ds;
};

template <class T>
Tensor<T> scaled(Tensor<T> t, double factor) {
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<T>(t[i] * factor);
  return t;
}

// max|gpu − cpu| / max(max|cpu|, floor). A reduced gradient (a sum of terms of random sign)
// can cancel far below the size of its terms, and its rounding error scales with the terms, so
// it is compared at `floor`, a lower bound on the size of its terms.
template <class T>
double reduction_error(const Tensor<T>& gpu, const Tensor<T>& cpu, double floor) {
  const std::vector<T> x = gpu.to_vector(), r = cpu.to_vector();
  REQUIRE(x.size() == r.size());
  return max_rel_error(x, r, floor);  // NaN-aware
}

// factor·sqrt(Σ g²): with factor = LSQ scale × the largest |coefficient| (qmax − qmin; inside
// the grid |round(v) − v| ≤ ½), an upper bound on the random-walk size sqrt(Σ terms²) of a step
// gradient's sum, which is what its rounding error scales with (about ε times it). So 1e-5
// leaves a wide margin over float rounding, while a wrong or missing term is still caught.
template <class T>
double sum_floor(const Tensor<T>& g, double factor) {
  double sum = 0;
  for (int64_t i = 0; i < g.numel(); ++i) sum += static_cast<double>(g[i]) * g[i];
  return factor * std::sqrt(sum);
}

template <class T>
Tensor<T> on(Device device, const Tensor<T>& t) {
  return t.defined() ? t.to(device) : t;
}

// The granularities under test on a row of 40 columns: per-tensor, per-channel, groups of 16
// (a short last group of 8), groups of 40 (exact) and of 64 (larger than the row).
struct Layout {
  Granularity granularity;
  int64_t group;
};
inline const Layout kLayouts[] = {{Granularity::per_tensor, 16},
                                  {Granularity::per_channel, 16},
                                  {Granularity::per_group, 16},
                                  {Granularity::per_group, 40},
                                  {Granularity::per_group, 64}};

}  // namespace cbq::gpu_testing
