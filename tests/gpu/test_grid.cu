// CUDA vs CPU: the RTN grid, quant::init_minmax (quant/grid.hpp,
// cuda/cbq/cuda/quant/grid_stats.cuh), float and double, every granularity, symmetric and
// asymmetric, 2, 4 and 8 bits, constant and one-signed rows, and a tensor large enough for many
// warps per row. CPU tests: tests/quant/test_grid.cpp.
//
// Exactness: the scales and zero-points are order statistics (minima, maxima) and the same host
// arithmetic on both devices, so they are asserted EQUAL bit for bit.
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

TEST_CASE_TEMPLATE("init_minmax: CUDA equals CPU bit for bit, every granularity", T, float,
                   double) {
  for (const Layout& layout : kLayouts)
    for (bool symmetric : {false, true})
      for (int bits : {2, 4, 8}) {
        const GridSpec spec = make_spec(bits, symmetric, layout.granularity, layout.group);
        Tensor<T> w = scaled(randn<T>(Shape{9, 40}, 100 + bits), 0.1);
        for (int64_t c = 0; c < 40; ++c) {
          w(3, c) = T(0);                // constant row: the minimum step
          w(4, c) = std::abs(w(4, c));   // all positive: lo floored at 0
          w(5, c) = -std::abs(w(5, c));  // all negative: hi floored at 0
        }
        Tensor<T> s_cpu, z_cpu, s_gpu, z_gpu;
        quant::init_minmax(w, spec, s_cpu, z_cpu);
        quant::init_minmax(w.to(Device::cuda), spec, s_gpu, z_gpu);
        CAPTURE(static_cast<int>(layout.granularity));
        CAPTURE(layout.group);
        CAPTURE(symmetric);
        CAPTURE(bits);
        CHECK(s_gpu.device() == Device::cuda);
        CHECK(same_bits(s_gpu, s_cpu));
        CHECK(same_bits(z_gpu, z_cpu));
      }
  // Large enough for many warps per row and several blocks per tensor.
  const Tensor<T> big = randn<T>(Shape{300, 3001}, 7);
  for (Granularity gr : {Granularity::per_tensor, Granularity::per_channel, Granularity::per_group})
    for (bool symmetric : {false, true}) {
      const GridSpec spec = make_spec(4, symmetric, gr, 128);
      Tensor<T> s_cpu, z_cpu, s_gpu, z_gpu;
      quant::init_minmax(big, spec, s_cpu, z_cpu);
      quant::init_minmax(big.to(Device::cuda), spec, s_gpu, z_gpu);
      CHECK(same_bits(s_gpu, s_cpu));
      CHECK(same_bits(z_gpu, z_cpu));
    }
}
