// CFP (quant/cfp.hpp): outlier detector, weight truncation, activation channel scales and the
// channel-max observer. CUDA parity: tests/gpu/test_cfp.cu.
#include <algorithm>
#include <cbq/quant/cfp.hpp>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "support/gradcheck.hpp"

using namespace cbq;
using namespace cbq::quant;
using cbq::testing::randn;

namespace {

// The detector written the slow, obvious way: a full sort, every split evaluated with a
// two-pass variance, the first maximum kept.
struct NaiveDetection {
  double threshold = 0, kept_max = 0;
  int64_t candidates = 0, split = 0;
  std::vector<int64_t> outliers;
};
NaiveDetection naive_detect(const std::vector<double>& x, double l1 = 1.5, double l2 = 1.0) {
  std::vector<double> s = x;
  std::sort(s.begin(), s.end());
  const std::size_t n = s.size();
  const double q1 = s[n / 4], q3 = s[3 * n / 4];
  NaiveDetection r;
  r.threshold = q3 + l1 * (q3 - q1);
  std::vector<double> cand, base;
  for (double v : s) (v > r.threshold ? cand : base).push_back(v);
  r.candidates = static_cast<int64_t>(cand.size());
  r.kept_max = base.back();
  if (!cand.empty()) {
    double best = -1e300;
    for (std::size_t i = 0; i < cand.size(); ++i) {
      const double kept = i == 0 ? base.back() : cand[i - 1];
      double mean = 0, var = 0;
      for (std::size_t k = 0; k < i; ++k) mean += cand[k];
      if (i > 0) mean /= static_cast<double>(i);
      for (std::size_t k = 0; k < i; ++k) var += (cand[k] - mean) * (cand[k] - mean);
      if (i > 0) var /= static_cast<double>(i);
      const double m = (cand[i] - kept) * (cand[i] - kept) - l2 * var;
      if (m > best) {
        best = m;
        r.split = static_cast<int64_t>(i);
        r.kept_max = kept;
      }
    }
  }
  for (std::size_t j = 0; j < n; ++j)
    if (x[j] > r.kept_max) r.outliers.push_back(static_cast<int64_t>(j));
  return r;
}

std::vector<double> iota_values(int n, double start = 0) {
  std::vector<double> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

}  // namespace

TEST_CASE("cfp: quartiles are the sorted values at n/4 and 3n/4, no outliers in a spread") {
  std::vector<double> x = iota_values(100);  // 0 … 99
  std::shuffle(x.begin(), x.end(), std::mt19937_64(3));
  OutlierSet d = detect_outliers(x);
  CHECK(d.n == 100);
  CHECK(d.q1 == 25);
  CHECK(d.q3 == 75);
  CHECK(d.threshold == 75 + 1.5 * 50);
  CHECK(d.candidates == 0);
  CHECK(d.count() == 0);
  CHECK(d.kept_max == 99);
}

TEST_CASE("cfp: all values equal give no outliers") {
  std::vector<float> x(37, 2.5f);
  OutlierSet d = detect_outliers(x);
  CHECK(d.threshold == doctest::Approx(2.5));
  CHECK(d.candidates == 0);
  CHECK(d.outliers.empty());
  CHECK(d.kept_max == 2.5);
  std::vector<float> zeros(10, 0.0f);
  CHECK(detect_outliers(zeros).count() == 0);
}

TEST_CASE("cfp: a single huge value is the only outlier and kept_max is the next value") {
  std::vector<double> x = iota_values(20, 1);  // 1 … 20
  x.insert(x.begin() + 7, 1000.0);             // index 7
  OutlierSet d = detect_outliers(x);
  CHECK(d.candidates == 1);
  CHECK(d.split == 0);
  REQUIRE(d.count() == 1);
  CHECK(d.outliers[0] == 7);
  CHECK(d.kept_max == 20);
  CHECK(d.score == doctest::Approx(980.0 * 980.0));
}

TEST_CASE("cfp: two clusters of outliers, the fine stage keeps the nearer cluster") {
  // 0 … 99, a near cluster {200, 201, 202} and a far one {1000, 1001}; n = 105.
  std::vector<double> x = iota_values(100);
  for (double v : {200.0, 1000.0, 201.0, 1001.0, 202.0}) x.push_back(v);
  OutlierSet d = detect_outliers(x);
  CHECK(d.q1 == 26);
  CHECK(d.q3 == 78);
  CHECK(d.threshold == 78 + 1.5 * 52);
  CHECK(d.candidates == 5);
  CHECK(d.split == 3);  // reserved {200, 201, 202}
  CHECK(d.kept_max == 202);
  CHECK(d.outliers == std::vector<int64_t>{101, 103});
  CHECK(d.score == doctest::Approx(798.0 * 798.0 - 2.0 / 3.0));

  // A wide near cluster and a heavy variance penalty: keeping it costs more than its gap is
  // worth, so every candidate becomes an outlier.
  std::vector<double> y = iota_values(100);
  for (double v : {200.0, 300.0, 400.0, 1000.0}) y.push_back(v);
  CHECK(detect_outliers(y).split == 3);
  OutlierSet heavy = detect_outliers(y, "wide", CfpOptions{1.5, 100.0});
  CHECK(heavy.split == 0);
  CHECK(heavy.kept_max == 99);
  CHECK(heavy.count() == 4);
}

TEST_CASE("cfp: n = 1, 2, 3, 4 never have outliers, n = 5 can") {
  CHECK(detect_outliers(std::vector<double>{7}).count() == 0);
  CHECK(detect_outliers(std::vector<double>{7}).kept_max == 7);
  CHECK(detect_outliers(std::vector<double>{0, 1e9}).count() == 0);
  CHECK(detect_outliers(std::vector<double>{1e9, 0, 1}).count() == 0);
  OutlierSet four = detect_outliers(std::vector<double>{1, 1, 1, 1e9});
  CHECK(four.q3 == 1e9);  // ⌊3·4/4⌋ = 3 is the maximum
  CHECK(four.count() == 0);
  OutlierSet five = detect_outliers(std::vector<double>{1, 100, 1, 1, 1});
  CHECK(five.threshold == 1);
  CHECK(five.outliers == std::vector<int64_t>{1});
  CHECK(five.kept_max == 1);
}

TEST_CASE("cfp: ties - values equal to T are kept, equal outliers are flagged together") {
  // n = 8: Q1 = x[2] = 2, Q3 = x[6] = 6, T = 12.
  CHECK(detect_outliers(std::vector<double>{0, 1, 2, 3, 4, 5, 6, 12}).count() == 0);
  CHECK(detect_outliers(std::vector<double>{0, 1, 2, 3, 4, 5, 6, 12.5}).count() == 1);
  // Two equal outliers are never split apart.
  std::vector<double> x = iota_values(20);
  x.push_back(500);
  x.push_back(500);
  x.push_back(40);
  OutlierSet d = detect_outliers(x);
  CHECK(d.outliers == std::vector<int64_t>{20, 21});
  CHECK(d.kept_max == 40);
  // Two splits with the same M: the first (more outliers) wins. n = 12, T = 18,
  // candidates {20, 31}: M(0) = (20 − 9)² = 121 = M(1) = (31 − 20)² − Var({20}).
  std::vector<double> t = iota_values(10);
  t.push_back(31);
  t.push_back(20);
  OutlierSet e = detect_outliers(t);
  CHECK(e.threshold == 18);
  CHECK(e.candidates == 2);
  CHECK(e.split == 0);
  CHECK(e.outliers == std::vector<int64_t>{10, 11});
}

TEST_CASE("cfp: matches a naive all-splits search on heavy-tailed random data") {
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    std::mt19937_64 rng(seed);
    std::cauchy_distribution<double> cauchy(0.0, 1.0);
    const int n = 50 + static_cast<int>(seed) * 37;
    std::vector<double> x(static_cast<std::size_t>(n));
    for (double& v : x) v = std::abs(cauchy(rng));
    OutlierSet d = detect_outliers(x);
    NaiveDetection ref = naive_detect(x);
    CAPTURE(seed);
    CHECK(d.threshold == ref.threshold);
    CHECK(d.candidates == ref.candidates);
    CHECK(d.split == ref.split);
    CHECK(d.kept_max == ref.kept_max);
    CHECK(d.outliers == ref.outliers);
    CHECK(std::is_sorted(d.outliers.begin(), d.outliers.end()));
    if (d.candidates > 0) CHECK(d.count() >= 1);
  }
}

TEST_CASE("cfp: empty, negative and non-finite inputs are errors naming the tensor") {
  CHECK_THROWS_WITH_AS(detect_outliers(std::vector<float>{}, "layers.0.wq"),
                       doctest::Contains("cfp(layers.0.wq): outlier detection needs at least one"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(detect_outliers(std::vector<double>{1, -0.5, 2}, "m"),
                       doctest::Contains("value -0.5 at index 1 is negative"), cbq::Error);
  CHECK_THROWS_WITH_AS(detect_outliers(std::vector<double>{1, NAN}, "m"),
                       doctest::Contains("at index 1 is not finite"), cbq::Error);
  CHECK_THROWS_WITH_AS(detect_outliers(std::vector<double>{1, 2}, "m", CfpOptions{-1, 1}),
                       doctest::Contains("must be finite and non-negative"), cbq::Error);
}

TEST_CASE("cfp: weight truncation clamps exactly the detected outliers to plus or minus kept_max") {
  Tensor<float> w = randn<float>(Shape{32, 48}, 11, 0.02f);
  w(3, 5) = 0.9f;
  w(17, 40) = -1.3f;
  w(30, 0) = 0.25f;
  const Tensor<float> before = w.clone();
  std::vector<float> mag(static_cast<std::size_t>(w.numel()));
  for (int64_t k = 0; k < w.numel(); ++k) mag[static_cast<std::size_t>(k)] = std::abs(w[k]);
  const OutlierSet expected = detect_outliers(mag, "fc");

  OutlierSet got;
  const int64_t clamped = truncate_weight_outliers(w, "fc", {}, &got);
  CHECK(clamped == expected.count());
  CHECK(got.outliers == expected.outliers);
  CHECK(clamped >= 2);
  const float limit = static_cast<float>(expected.kept_max);
  std::vector<bool> is_out(static_cast<std::size_t>(w.numel()), false);
  for (int64_t k : expected.outliers) is_out[static_cast<std::size_t>(k)] = true;
  float new_max = 0;
  for (int64_t k = 0; k < w.numel(); ++k) {
    if (is_out[static_cast<std::size_t>(k)]) {
      CHECK(std::abs(before[k]) > limit);
      CHECK(w[k] == std::copysign(limit, before[k]));
    } else {
      CHECK(w[k] == before[k]);
    }
    new_max = std::max(new_max, std::abs(w[k]));
  }
  CHECK(new_max == limit);
  CHECK(std::signbit(w(17, 40)));
}

TEST_CASE("cfp: activation scales are sqrt(m_j / m_star) on outlier channels, 1 elsewhere") {
  std::vector<float> m(64);
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  for (float& v : m) v = u(rng);
  m[9] = 60.0f;  // two outliers close together, far from the rest
  m[50] = 70.0f;
  OutlierSet d;
  std::vector<float> s = activation_outlier_scales(m, "mlp.fc1", {}, &d);
  REQUIRE(d.outliers == std::vector<int64_t>{9, 50});
  double mstar = 0;
  for (std::size_t j = 0; j < m.size(); ++j)
    if (j != 9 && j != 50) mstar = std::max(mstar, static_cast<double>(m[j]));
  CHECK(d.kept_max == mstar);
  for (std::size_t j = 0; j < m.size(); ++j) {
    if (j == 9 || j == 50) {
      CHECK(s[j] == doctest::Approx(std::sqrt(m[j] / mstar)).epsilon(1e-6));
      // The scaled channel's maximum is the geometric mean of m_j and m*.
      CHECK(m[j] / s[j] == doctest::Approx(std::sqrt(m[j] * mstar)).epsilon(1e-6));
    } else {
      CHECK(s[j] == 1.0f);
    }
  }
  // Dividing X by s and multiplying the columns of W by s leaves X·Wᵀ unchanged.
  Tensor<double> x = randn<double>(Shape{8, 64}, 6), w = randn<double>(Shape{5, 64}, 7);
  for (int64_t t = 0; t < 8; ++t)
    for (int64_t n = 0; n < 5; ++n) {
      double a = 0, b = 0;
      for (int64_t j = 0; j < 64; ++j) {
        a += x(t, j) * w(n, j);
        b +=
            (x(t, j) / s[static_cast<std::size_t>(j)]) * (w(n, j) * s[static_cast<std::size_t>(j)]);
      }
      CHECK(b == doctest::Approx(a).epsilon(1e-12));
    }
  // No kept channel with a positive maximum: no finite scale exists.
  std::vector<float> dead{0, 0, 0, 0, 0, 0, 0, 5};
  CHECK_THROWS_WITH_AS(activation_outlier_scales(dead, "down_proj"),
                       doctest::Contains("cfp(down_proj): 1 outlier channels but every kept"),
                       cbq::Error);
}

TEST_CASE("cfp: ChannelMaxObserver accumulates max |X| per channel over batches") {
  ChannelMaxObserver<float> obs(16, "layers.2.q_proj");
  Tensor<float> a = randn<float>(Shape{10, 16}, 1), b = randn<float>(Shape{2, 3, 16}, 2);
  b(1, 2, 4) = -30.0f;
  obs.observe(a);
  obs.observe(b);
  CHECK(obs.rows() == 16);
  CHECK(obs.batches() == 2);
  for (int64_t j = 0; j < 16; ++j) {
    float m = 0;
    for (int64_t t = 0; t < 10; ++t) m = std::max(m, std::abs(a(t, j)));
    for (int64_t t = 0; t < 6; ++t) m = std::max(m, std::abs(b[t * 16 + j]));
    CHECK(obs.maxima()[static_cast<std::size_t>(j)] == m);
  }
  CHECK(obs.maxima()[4] == 30.0f);
  std::vector<float> s = obs.scales();
  CHECK(s[4] > 1.0f);
  // Non-contiguous batches are read through their strides.
  ChannelMaxObserver<float> tobs(10, "t");
  tobs.observe(a.transpose(0, 1));
  CHECK(tobs.rows() == 16);

  Tensor<float> bad = randn<float>(Shape{4, 16}, 3);
  bad(2, 7) = NAN;
  const auto saved = obs.maxima();
  CHECK_THROWS_WITH_AS(obs.observe(bad),
                       doctest::Contains("non-finite value nan at row 2 channel 7 of batch 2"),
                       cbq::Error);
  CHECK(obs.maxima() == saved);
  CHECK_THROWS_WITH_AS(obs.observe(randn<float>(Shape{4, 15}, 3)),
                       doctest::Contains("has shape (4, 15), expected (..., 16)"), cbq::Error);
  ChannelMaxObserver<float> fresh(4, "fresh");
  CHECK_THROWS_WITH_AS(fresh.scales(), doctest::Contains("no calibration rows"), cbq::Error);
}
