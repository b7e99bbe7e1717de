#pragma once
// Hadamard matrices and seeded random orthogonal matrices: the building blocks of the model
// rotations (docs/ROTATION.md).
//
//   hadamard_matrix(m)   a ±1 matrix H with H·Hᵀ = m·I, for m = 1, 2 and every multiple of 4 that
//                        the Paley constructions reach, directly or after Sylvester doublings:
//                          Paley I,  q ≡ 3 (mod 4) a prime power:  m = q + 1
//                          Paley II, q ≡ 1 (mod 4) a prime power:  m = 2(q + 1)
//                        (12, 20, 28, 36, 40, 44, 52, 60, … all multiples of 4 below 92; the first
//                        orders they miss are 92, 116, 156, 172, 184, 188). Otherwise none.
//   random_orthogonal(m, seed)  the Q factor of the QR decomposition of an m × m matrix of
//                        standard normal numbers (Box–Muller on std::mt19937_64, so the same
//                        seed gives the same matrix with every standard library), with R's
//                        diagonal positive: Haar-distributed.
// Paley's matrices use the quadratic character χ of the field GF(q) (q = p^k: polynomials over
// GF(p) modulo an irreducible polynomial of degree k, found by search).
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "cbq/core/error.hpp"

namespace cbq {

struct HadamardMatrix {
  int64_t order = 0;
  std::vector<int8_t> entries;  // row-major order × order, each ±1
  std::string construction;     // e.g. "Paley I (q = 11)", "Sylvester 2 ⊗ Paley II (q = 5)"
  int at(int64_t r, int64_t c) const { return entries[static_cast<size_t>(r * order + c)]; }
};

namespace detail {

// (p, k) with q = p^k for a prime p and k ≥ 1, or (0, 0) when q is not a prime power.
inline std::pair<int64_t, int> prime_power(int64_t q) {
  if (q < 2) return {0, 0};
  int64_t p = 0;
  for (int64_t f = 2; f * f <= q; ++f)
    if (q % f == 0) {
      p = f;
      break;
    }
  if (p == 0) return {q, 1};  // q is prime
  int k = 0;
  while (q % p == 0) {
    q /= p;
    ++k;
  }
  return q == 1 ? std::pair<int64_t, int>{p, k} : std::pair<int64_t, int>{0, 0};
}

// GF(p^k): element a ∈ [0, q) is the polynomial Σ digit_i(a)·x^i (base-p digits).
class GaloisField {
 public:
  GaloisField(int64_t p, int k) : p_(p), k_(k), q_(1) {
    for (int i = 0; i < k; ++i) q_ *= p;
    // A monic x^k + Σ f_j x^j is irreducible iff the quotient ring is a field, i.e. every
    // nonzero a has a^(q−1) = 1 (then every nonzero element is a unit).
    for (int64_t f = 0; f < q_; ++f) {
      modulus_ = digits(f);
      if (k == 1 || is_field()) return;
    }
    fail("GaloisField: no irreducible polynomial of degree {} over GF({})", k, p);
  }
  int64_t size() const { return q_; }
  int64_t sub(int64_t a, int64_t b) const {
    std::vector<int64_t> x = digits(a), y = digits(b);
    for (int i = 0; i < k_; ++i) x[i] = ((x[i] - y[i]) % p_ + p_) % p_;
    return number(x);
  }
  int64_t mul(int64_t a, int64_t b) const {
    const std::vector<int64_t> x = digits(a), y = digits(b);
    std::vector<int64_t> prod(static_cast<size_t>(2 * k_), 0);
    for (int i = 0; i < k_; ++i)
      for (int j = 0; j < k_; ++j) prod[i + j] = (prod[i + j] + x[i] * y[j]) % p_;
    // x^k ≡ −Σ f_j x^j
    for (int i = 2 * k_ - 2; i >= k_; --i) {
      const int64_t c = prod[i];
      if (c == 0) continue;
      prod[i] = 0;
      for (int j = 0; j < k_; ++j)
        prod[i - k_ + j] = ((prod[i - k_ + j] - c * modulus_[j]) % p_ + p_) % p_;
    }
    prod.resize(static_cast<size_t>(k_));
    return number(prod);
  }
  // χ(a): 0 for a = 0, 1 for a nonzero square, −1 otherwise.
  std::vector<int> quadratic_character() const {
    std::vector<int> chi(static_cast<size_t>(q_), -1);
    chi[0] = 0;
    for (int64_t a = 1; a < q_; ++a) chi[static_cast<size_t>(mul(a, a))] = 1;
    return chi;
  }

 private:
  std::vector<int64_t> digits(int64_t a) const {
    std::vector<int64_t> d(static_cast<size_t>(k_));
    for (int i = 0; i < k_; ++i, a /= p_) d[i] = a % p_;
    return d;
  }
  int64_t number(const std::vector<int64_t>& d) const {
    int64_t a = 0;
    for (int i = k_ - 1; i >= 0; --i) a = a * p_ + d[i];
    return a;
  }
  int64_t power(int64_t a, int64_t e) const {
    int64_t r = 1;
    while (e > 0) {
      if (e & 1) r = mul(r, a);
      a = mul(a, a);
      e >>= 1;
    }
    return r;
  }
  bool is_field() const {
    for (int64_t a = 1; a < q_; ++a)
      if (power(a, q_ - 1) != 1) return false;
    return true;
  }

  int64_t p_;
  int k_;
  int64_t q_;
  std::vector<int64_t> modulus_;  // f_0 … f_{k−1} of the monic modulus
};

// The Jacobsthal matrix Q_ab = χ(a − b) of GF(q).
inline std::vector<int> jacobsthal(int64_t p, int k) {
  GaloisField field(p, k);
  const int64_t q = field.size();
  const std::vector<int> chi = field.quadratic_character();
  std::vector<int> Q(static_cast<size_t>(q * q));
  for (int64_t a = 0; a < q; ++a)
    for (int64_t b = 0; b < q; ++b) Q[a * q + b] = chi[static_cast<size_t>(field.sub(a, b))];
  return Q;
}

// Paley I: H = I + [[0, 1ᵀ], [−1, Q]] (order q + 1, q ≡ 3 mod 4).
inline HadamardMatrix paley1(int64_t p, int k) {
  const std::vector<int> Q = jacobsthal(p, k);
  const int64_t q = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(Q.size()))));
  const int64_t m = q + 1;
  HadamardMatrix h{m, std::vector<int8_t>(static_cast<size_t>(m * m)),
                   fmt::format("Paley I (q = {})", q)};
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < m; ++c) {
      int s;
      if (r == 0)
        s = c == 0 ? 0 : 1;
      else if (c == 0)
        s = -1;
      else
        s = Q[(r - 1) * q + (c - 1)];
      h.entries[r * m + c] = static_cast<int8_t>(s + (r == c ? 1 : 0));
    }
  return h;
}

// Paley II: C = [[0, 1ᵀ], [1, Q]] (symmetric, q ≡ 1 mod 4) with 0 → [[1, −1], [−1, −1]] and
// ±1 → ±[[1, 1], [1, −1]] (order 2(q + 1)).
inline HadamardMatrix paley2(int64_t p, int k) {
  const std::vector<int> Q = jacobsthal(p, k);
  const int64_t q = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(Q.size()))));
  const int64_t n = q + 1, m = 2 * n;
  HadamardMatrix h{m, std::vector<int8_t>(static_cast<size_t>(m * m)),
                   fmt::format("Paley II (q = {})", q)};
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const int s = (r == 0 && c == 0) ? 0 : (r == 0 || c == 0 ? 1 : Q[(r - 1) * q + (c - 1)]);
      const int zero[2][2] = {{1, -1}, {-1, -1}}, one[2][2] = {{1, 1}, {1, -1}};
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
          h.entries[(2 * r + i) * m + 2 * c + j] =
              static_cast<int8_t>(s == 0 ? zero[i][j] : s * one[i][j]);
    }
  return h;
}

}  // namespace detail

// A Hadamard matrix of order m from the constructions above, or none.
inline std::optional<HadamardMatrix> hadamard_matrix(int64_t m) {
  CBQ_CHECK(m >= 1, "hadamard_matrix: order {} must be positive", m);
  if (m == 1) return HadamardMatrix{1, {1}, "1"};
  if (m == 2) return HadamardMatrix{2, {1, 1, 1, -1}, "Sylvester 2"};
  if (m % 4 != 0) return std::nullopt;
  if (const auto [p, k] = detail::prime_power(m - 1); p != 0) return detail::paley1(p, k);
  if (const auto [p, k] = detail::prime_power(m / 2 - 1); p != 0 && (m / 2 - 1) % 4 == 1)
    return detail::paley2(p, k);
  std::optional<HadamardMatrix> half = hadamard_matrix(m / 2);
  if (!half) return std::nullopt;
  const int64_t n = m / 2;
  HadamardMatrix h{m, std::vector<int8_t>(static_cast<size_t>(m * m)),
                   "Sylvester 2 ⊗ " + half->construction};
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < m; ++c)
      h.entries[r * m + c] =
          static_cast<int8_t>(half->at(r % n, c % n) * ((r >= n && c >= n) ? -1 : 1));
  return h;
}

// Standard normal numbers from std::mt19937_64 by Box–Muller (portable, unlike
// std::normal_distribution, whose algorithm each standard library chooses).
class PortableNormal {
 public:
  explicit PortableNormal(uint64_t seed) : rng_(seed) {}
  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double two_pi = 6.283185307179586476925286766559;
    double u1 = 0;
    while (u1 == 0) u1 = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
    const double u2 = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(two_pi * u2);
    has_spare_ = true;
    return r * std::cos(two_pi * u2);
  }
  uint64_t bits() { return rng_(); }

 private:
  std::mt19937_64 rng_;
  double spare_ = 0;
  bool has_spare_ = false;
};

// Q (row-major m × m) of the QR decomposition of a seeded Gaussian matrix, by modified
// Gram–Schmidt with one re-orthogonalisation pass (columns orthonormal to ~1e-15).
inline std::vector<double> random_orthogonal(int64_t m, uint64_t seed) {
  CBQ_CHECK(m >= 1, "random_orthogonal: order {} must be positive", m);
  PortableNormal normal(seed);
  std::vector<std::vector<double>> cols(static_cast<size_t>(m), std::vector<double>(m));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < m; ++c) cols[c][r] = normal();
  for (int64_t c = 0; c < m; ++c) {
    std::vector<double>& v = cols[c];
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t j = 0; j < c; ++j) {
        double dot = 0;
        for (int64_t i = 0; i < m; ++i) dot += cols[j][i] * v[i];
        for (int64_t i = 0; i < m; ++i) v[i] -= dot * cols[j][i];
      }
    double norm = 0;
    for (double x : v) norm += x * x;
    norm = std::sqrt(norm);
    CBQ_CHECK(norm > 1e-8, "random_orthogonal: a Gaussian column of order {} was degenerate", m);
    for (double& x : v) x /= norm;  // R's diagonal entry is +norm
  }
  std::vector<double> q(static_cast<size_t>(m * m));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < m; ++c) q[r * m + c] = cols[c][r];
  return q;
}

}  // namespace cbq
