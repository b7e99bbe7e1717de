#include <cbq/core/linalg.hpp>
#include <cbq/ops/hadamard.hpp>
#include <cmath>
#include <string>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {

// max |H·Hᵀ − m·I| over the entries, and whether every entry is ±1.
double hadamard_defect(const HadamardMatrix& h, bool* all_pm1) {
  const int64_t m = h.order;
  *all_pm1 = static_cast<int64_t>(h.entries.size()) == m * m;
  for (int8_t e : h.entries) *all_pm1 = *all_pm1 && (e == 1 || e == -1);
  double worst = 0;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < m; ++c) {
      int64_t dot = 0;
      for (int64_t k = 0; k < m; ++k) dot += h.at(r, k) * h.at(c, k);
      worst = std::max(worst, std::abs(static_cast<double>(dot - (r == c ? m : 0))));
    }
  return worst;
}

// M = D·(H_P ⊗ K) as a dense n × n matrix, built entry by entry: H_P by the Sylvester recursion
// H[a][c] = (−1)^popcount(a & c), K = hadamard_matrix(m)/√m (or the transform's own kernel for
// the random orthogonal fallback), D the transform's signs.
std::vector<double> naive_matrix(const ops::HadamardTransform& h) {
  const int64_t n = h.size(), m = h.kernel_size(), P = h.pow2();
  std::vector<double> K(static_cast<size_t>(m * m));
  if (h.kernel_kind() == ops::HadamardTransform::KernelKind::hadamard) {
    const HadamardMatrix hm = *hadamard_matrix(m);
    for (int64_t i = 0; i < m * m; ++i) K[i] = hm.entries[i] / std::sqrt(double(m));
  } else {
    K = h.kernel<double>();
  }
  std::vector<double> M(static_cast<size_t>(n * n));
  for (int64_t a = 0; a < P; ++a)
    for (int64_t b = 0; b < m; ++b)
      for (int64_t c = 0; c < P; ++c)
        for (int64_t e = 0; e < m; ++e) {
          const double hp = (__builtin_popcountll(a & c) % 2 ? -1.0 : 1.0) / std::sqrt(double(P));
          const double d = h.has_signs() ? h.signs<double>()[a * m + b] : 1.0;
          M[(a * m + b) * n + c * m + e] = d * hp * K[b * m + e];
        }
  return M;
}

// y = x·M (transpose: x·Mᵀ) by the dense product, rows of x of length n.
Tensor<double> naive_apply(const Tensor<double>& x, const std::vector<double>& M, int64_t n,
                           bool transpose) {
  Tensor<double> y(x.shape());
  for (int64_t r = 0; r < x.numel() / n; ++r)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += x[r * n + i] * (transpose ? M[j * n + i] : M[i * n + j]);
      y[r * n + j] = s;
    }
  return y;
}

// max |M·Mᵀ − I| of a dense row-major n × n matrix; NaN when M holds one.
double orthogonality_error(const std::vector<double>& M, int64_t n) {
  double worst = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t k = 0; k < n; ++k) s += M[i * n + k] * M[j * n + k];
      const double e = std::abs(s - (i == j ? 1.0 : 0.0));
      if (std::isnan(e)) return e;
      worst = std::max(worst, e);
    }
  return worst;
}

}  // namespace

TEST_CASE("hadamard_matrix: H·Hᵀ = m·I with ±1 entries for every order it builds") {
  // Every multiple of 4 below 92 is reached (Sylvester, Paley I, Paley II, doublings of them),
  // 92 is not; 344 = 7³ + 1 needs Paley I over GF(7³) (LLaMA-7B's MLP 11008 = 32·344).
  std::vector<int64_t> orders = {1, 2, 344};
  for (int64_t m = 4; m < 92; m += 4) orders.push_back(m);
  for (int64_t m : {96, 100, 108, 144, 512}) orders.push_back(m);
  for (int64_t m : orders) {
    CAPTURE(m);
    std::optional<HadamardMatrix> h = hadamard_matrix(m);
    REQUIRE(h.has_value());
    CAPTURE(h->construction);
    bool pm1 = false;
    CHECK(hadamard_defect(*h, &pm1) == 0);
    CHECK(pm1);
  }
  for (int64_t m : {3, 6, 10, 43, 86, 92, 116, 156, 172, 184, 188}) {
    CAPTURE(m);
    CHECK_FALSE(hadamard_matrix(m).has_value());
  }
  CHECK_THROWS_AS(hadamard_matrix(0), Error);
}

TEST_CASE("hadamard transform: forward and transpose match the dense product, float and double") {
  // 576 = 16·36 (SmolLM2 d), 1536 = 128·12 (SmolLM2 MLP), 48 = 4·12, 40 = 2·20, 64 (head dim).
  for (int64_t n : {1, 2, 8, 12, 40, 48, 64, 576, 1536}) {
    for (bool signs : {false, true}) {
      CAPTURE(n);
      CAPTURE(signs);
      const auto h = ops::HadamardTransform::make(n, 7, signs);
      CAPTURE(h.description());
      REQUIRE(h.size() == n);
      REQUIRE(h.pow2() * h.kernel_size() == n);
      CHECK((h.pow2() & (h.pow2() - 1)) == 0);
      const std::vector<double> M = naive_matrix(h);
      Tensor<double> x = randn<double>(Shape{3, n}, 11 + n);
      for (bool transpose : {false, true}) {
        CAPTURE(transpose);
        const Tensor<double> want = naive_apply(x, M, n, transpose);
        Tensor<double> y(x.shape());
        h.apply<double>(x.data(), y.data(), 3, transpose, false);
        CHECK(max_abs_diff(y, want) < 1e-12);
        Tensor<float> xf = x.cast<float>(), yf(x.shape());
        h.apply<float>(xf.data(), yf.data(), 3, transpose, false);
        CHECK(max_abs_diff(yf, want) < 2e-5);
      }
      // In place, then back: x·M·Mᵀ = x.
      Tensor<double> z = x.clone();
      h.apply<double>(z.data(), z.data(), 3, false, false);
      h.apply<double>(z.data(), z.data(), 3, true, false);
      CHECK(max_abs_diff(z, x) < 1e-12);
    }
  }
}

TEST_CASE("hadamard transform: M is orthogonal (dense() · dense()ᵀ = I) for SmolLM2's d 576") {
  const auto h = ops::HadamardTransform::make(576, 3, true);
  CHECK(orthogonality_error(h.dense(), 576) < 1e-12);
}

TEST_CASE(
    "hadamard transform: unsupported sizes are refused naming the size; fallback on request") {
  // stories260K's MLP 172 = 4·43 and LLaMA-7B's would-be 172-Hadamard: no construction here.
  for (int64_t n : {172, 10, 92}) {
    CAPTURE(n);
    try {
      (void)ops::HadamardTransform::make(n, 0, true);
      FAIL("no error for size " << n);
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find(std::to_string(n)) != std::string::npos);
    }
  }
  const auto fb = ops::HadamardTransform::make(172, 5, true, /*allow_random_orthogonal=*/true);
  CHECK(fb.kernel_kind() == ops::HadamardTransform::KernelKind::random_orthogonal);
  CHECK(fb.kernel_size() == 43);
  const std::vector<double> M = fb.dense(), want = naive_matrix(fb);
  double worst = 0;
  for (size_t i = 0; i < M.size(); ++i) worst = std::max(worst, std::abs(M[i] - want[i]));
  CHECK(worst < 1e-12);
  CHECK(orthogonality_error(M, 172) < 1e-12);
  CHECK_THROWS_AS(ops::HadamardTransform::make(0), Error);
}

TEST_CASE("hadamard transform: LLaMA-7B sizes 4096 and 11008 = 32·344 keep norms and invert") {
  for (int64_t n : {4096, 11008}) {
    CAPTURE(n);
    const auto h = ops::HadamardTransform::make(n, 1, true);
    CAPTURE(h.description());
    CHECK(h.kernel_kind() != ops::HadamardTransform::KernelKind::random_orthogonal);
    Tensor<double> x = randn<double>(Shape{2, n}, 4), y(x.shape()), back(x.shape());
    h.apply<double>(x.data(), y.data(), 2, false, false);
    h.apply<double>(y.data(), back.data(), 2, true, false);
    for (int64_t r = 0; r < 2; ++r) {
      double nx = 0, ny = 0;
      for (int64_t i = 0; i < n; ++i) {
        nx += x[r * n + i] * x[r * n + i];
        ny += y[r * n + i] * y[r * n + i];
      }
      CHECK(std::abs(ny - nx) < 1e-10 * nx);
    }
    CHECK(max_abs_diff(back, x) < 1e-12);
    CHECK(max_abs_diff(y, x) > 0.1);  // it did transform
  }
}

TEST_CASE("ops::hadamard: chunk-wise forward, gradient check in double, shape errors") {
  auto h =
      std::make_shared<const ops::HadamardTransform>(ops::HadamardTransform::make(12, 9, true));
  Tensor<double> x = randn<double>(Shape{2, 3, 24}, 21);
  const std::vector<double> M = naive_matrix(*h);
  for (bool transpose : {false, true}) {
    CAPTURE(transpose);
    Tape<double> tape;
    Var<double> y = ops::hadamard(tape.constant(x), h, transpose);
    REQUIRE(y.shape() == x.shape());
    // two 12-element chunks per row, each transformed alone
    CHECK(max_abs_diff(y.value(), naive_apply(x, M, 12, transpose)) < 1e-12);
    auto r =
        gradcheck([&](Tape<double>&,
                      std::vector<Var<double>>& v) { return ops::hadamard(v[0], h, transpose); },
                  {randn<double>(Shape{3, 24}, 22)});
    CHECK(r.max_rel_error < 1e-7);
  }
  Tape<double> tape;
  CHECK_THROWS_AS(ops::hadamard(tape.constant(randn<double>(Shape{2, 18}, 1)), h), Error);
  CHECK_THROWS_AS(ops::hadamard<double>(tape.constant(x), nullptr), Error);
}

TEST_CASE("hadamard transform: a dense (non-orthogonal) M by GEMM, forward, transpose, in place") {
  const int64_t n = 10;
  const Tensor<double> m = randn<double>(Shape{n, n}, 31);
  const std::vector<double> M(m.data(), m.data() + n * n);
  const auto h = std::make_shared<const ops::HadamardTransform>(
      ops::HadamardTransform::dense(n, M, "a random 10 × 10 matrix"));
  CHECK(h->kernel_kind() == ops::HadamardTransform::KernelKind::dense);
  CHECK(h->description() == "a random 10 × 10 matrix");
  CHECK(max_abs_diff(Tensor<double>::from(h->dense(), Shape{n, n}), m) < 1e-12);
  const Tensor<double> x = randn<double>(Shape{7, n}, 32);
  for (bool transpose : {false, true}) {
    CAPTURE(transpose);
    const Tensor<double> want = naive_apply(x, M, n, transpose);
    Tensor<double> y(x.shape());
    h->apply<double>(x.data(), y.data(), 7, transpose, false);
    CHECK(max_abs_diff(y, want) < 1e-12);
    Tensor<double> acc = x.clone();  // accumulate: acc = x + x·M
    h->apply<double>(x.data(), acc.data(), 7, transpose, true);
    Tensor<double> sum(x.shape());
    for (int64_t i = 0; i < x.numel(); ++i) sum[i] = x[i] + want[i];
    CHECK(max_abs_diff(acc, sum) < 1e-12);
    Tensor<double> inplace = x.clone();  // out = in: the GEMM reads a copy
    h->apply<double>(inplace.data(), inplace.data(), 7, transpose, false);
    CHECK(max_abs_diff(inplace, want) < 1e-12);
    // The op's derivative dy·Mᵀ holds for any M, not only orthogonal ones.
    auto r =
        gradcheck([&](Tape<double>&,
                      std::vector<Var<double>>& v) { return ops::hadamard(v[0], h, transpose); },
                  {randn<double>(Shape{3, 2 * n}, 33)});
    CHECK(r.max_rel_error < 1e-7);
  }
  std::vector<double> bad = M;
  bad[5] = std::nan("");
  CHECK_THROWS_WITH_AS(ops::HadamardTransform::dense(n, bad, "bad"),
                       doctest::Contains("non-finite"), Error);
  CHECK_THROWS_WITH_AS(ops::HadamardTransform::dense(n, std::vector<double>(99), "short"),
                       doctest::Contains("needs 100 entries, got 99"), Error);
}

TEST_CASE("linalg::symmetric_eigen: A = V·diag(w)·Vᵀ, V orthonormal, w ascending") {
  const int64_t n = 9;
  const Tensor<double> b = randn<double>(Shape{n, n}, 41);
  std::vector<double> a(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) a[i * n + j] = b[i * n + j] + b[j * n + i];
  std::vector<double> w, v;
  REQUIRE(linalg::symmetric_eigen(a.data(), n, w, v) == 0);
  REQUIRE(w.size() == static_cast<size_t>(n));
  double recon = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t k = 0; k < n; ++k) s += v[i * n + k] * w[k] * v[j * n + k];
      recon = std::max(recon, std::abs(s - a[i * n + j]));
    }
  CHECK(recon < 1e-12 * n);
  CHECK(orthogonality_error(v, n) < 1e-12);
  for (int64_t k = 1; k < n; ++k) CHECK(w[k - 1] <= w[k]);
}
