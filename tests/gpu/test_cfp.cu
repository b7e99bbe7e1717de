// CUDA vs CPU: CFP (quant/cfp.hpp, cuda/cbq/cuda/quant/cfp.cuh): the outlier detection statistics,
// the errors for negative and non-finite values, the weight truncation and the channel-max
// observer, float and double. CPU tests: tests/quant/test_cfp.cpp.
//
// Exactness: every CFP statistic is exact on both devices (order statistics, maxima, the same host
// arithmetic), so they are asserted EQUAL, and the error messages are the CPU's.
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

namespace {

// ------------------------------------------------------------------------------------------
// CFP

void check_same_detection(const quant::OutlierSet& gpu, const quant::OutlierSet& cpu) {
  CHECK(gpu.n == cpu.n);
  CHECK(gpu.q1 == cpu.q1);
  CHECK(gpu.q3 == cpu.q3);
  CHECK(gpu.threshold == cpu.threshold);
  CHECK(gpu.candidates == cpu.candidates);
  CHECK(gpu.split == cpu.split);
  CHECK(gpu.score == cpu.score);
  CHECK(gpu.kept_max == cpu.kept_max);
  CHECK(gpu.outliers == cpu.outliers);
}

// |N(0,1)|·e^(N(0,1)): heavy-tailed non-negative values, n of them.
template <class T>
Tensor<T> heavy_tailed(int64_t n, uint64_t seed) {
  const Tensor<T> a = randn<T>(Shape{n}, seed), b = randn<T>(Shape{n}, seed + 1);
  Tensor<T> x = Tensor<T>::empty(Shape{n});
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(std::abs(a[i]) * std::exp(1.5 * b[i]));
  return x;
}

}  // namespace

TEST_CASE_TEMPLATE("cfp: CUDA detection statistics equal the CPU's exactly", T, float, double) {
  std::vector<Tensor<T>> cases;
  cases.push_back(heavy_tailed<T>(1000, 800));
  cases.push_back(heavy_tailed<T>(1, 801));
  cases.push_back(heavy_tailed<T>(2, 802));
  cases.push_back(heavy_tailed<T>(5, 803));
  cases.push_back(heavy_tailed<T>(200003, 804));  // several radix-sort and select tiles
  {
    // Ties: equal candidates are flagged together, values equal to T are kept.
    std::vector<T> tied;
    for (int i = 0; i < 40; ++i) tied.push_back(static_cast<T>(i % 4));
    tied.push_back(T(100));
    tied.push_back(T(100));
    tied.push_back(T(7.5));
    cases.push_back(Tensor<T>::from(tied, Shape{static_cast<int64_t>(tied.size())}));
  }
  cases.push_back(Tensor<T>(Shape{33}));  // all zero
  for (const Tensor<T>& x : cases) {
    CAPTURE(x.numel());
    for (double lambda2 : {0.0, 1.0, 4.0}) {
      quant::CfpOptions opt;
      opt.lambda2 = lambda2;
      const quant::OutlierSet cpu = quant::detect_outliers(x, "values", opt);
      const quant::OutlierSet gpu = quant::detect_outliers(x.to(Device::cuda), "values", opt);
      check_same_detection(gpu, cpu);
    }
  }
}

TEST_CASE("cfp: CUDA rejects negative and non-finite values with the CPU's message") {
  Tensor<float> x = heavy_tailed<float>(100, 900);
  x[37] = -1.5f;
  x[60] = std::nanf("");
  auto message = [](const Tensor<float>& t) {
    return gpu_testing::error_message([&] { quant::detect_outliers(t, "layers.0.wq"); });
  };
  const std::string cpu = message(x);
  CHECK(gpu_testing::contains(cpu, "index 37"));
  CHECK(message(x.to(Device::cuda)) == cpu);
  x[37] = 1.0f;
  const std::string cpu_nan = message(x);
  CHECK(gpu_testing::contains(cpu_nan, "index 60"));
  CHECK(message(x.to(Device::cuda)) == cpu_nan);
}

TEST_CASE_TEMPLATE("cfp: CUDA weight truncation clamps the same weights to the same values", T,
                   float, double) {
  Tensor<T> w = randn<T>(Shape{64, 96}, 1000);
  w(3, 5) = T(30);
  w(10, 90) = T(-31);
  w(40, 0) = T(12);
  Tensor<T> w_cpu = w.clone();
  Tensor<T> w_gpu = w.to(Device::cuda);
  quant::OutlierSet d_cpu, d_gpu;
  const int64_t n_cpu = quant::truncate_weight_outliers(w_cpu, "w", {}, &d_cpu);
  const int64_t n_gpu = quant::truncate_weight_outliers(w_gpu, "w", {}, &d_gpu);
  CHECK(n_cpu >= 3);
  CHECK(n_gpu == n_cpu);
  check_same_detection(d_gpu, d_cpu);
  CHECK(same_bits(w_gpu, w_cpu));
}

TEST_CASE_TEMPLATE("cfp: ChannelMaxObserver on CUDA batches keeps the CPU's maxima", T, float,
                   double) {
  quant::ChannelMaxObserver<T> cpu(40, "mlp.in"), gpu(40, "mlp.in");
  const Tensor<T> batches[] = {randn<T>(Shape{2, 17, 40}, 1100), randn<T>(Shape{5, 40}, 1101),
                               scaled(randn<T>(Shape{300, 40}, 1102), 3.0)};
  for (const Tensor<T>& b : batches) {
    cpu.observe(b);
    gpu.observe(b.to(Device::cuda));
  }
  CHECK(gpu.maxima() == cpu.maxima());
  CHECK(gpu.rows() == cpu.rows());
  CHECK(gpu.batches() == cpu.batches());
  Tensor<T> bad = randn<T>(Shape{6, 40}, 1103);
  bad(3, 7) = std::numeric_limits<T>::infinity();
  bad(4, 2) = std::numeric_limits<T>::quiet_NaN();
  const std::string cpu_message = gpu_testing::error_message([&] { cpu.observe(bad); });
  const std::string gpu_message =
      gpu_testing::error_message([&] { gpu.observe(bad.to(Device::cuda)); });
  CHECK(gpu_testing::contains(cpu_message, "row 3 channel 7"));
  CHECK(gpu_message == cpu_message);
  CHECK(gpu.maxima() == cpu.maxima());  // a bad batch changes nothing
}
