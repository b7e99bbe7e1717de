// attention_map_kl (ops/attention_map_kl.hpp): forward against the naive KL of the materialized
// (T, T) attention maps, gradient checks for every input, identical inputs, float against double,
// thread independence, memory, NaN propagation, errors. CUDA parity:
// tests/gpu/test_attention_map_kl.cu. Declared cases for both checks: tests/ops/op_cases.hpp.
#include <cbq/ops/attention_map_kl.hpp>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {

struct MapKlCase {
  int64_t seq_len, hq, hkv, hd;
  bool causal;
};

// Row-wise log softmax of scale · Q_h K_gᵀ in long double, every head materialized as (Hq, T, T);
// masked entries −∞.
std::vector<long double> naive_log_maps(const Tensor<double>& q, const Tensor<double>& k,
                                        const MapKlCase& c, double scale) {
  const int64_t n = c.seq_len;
  const long double inf = std::numeric_limits<long double>::infinity();
  std::vector<long double> out(static_cast<std::size_t>(c.hq * n * n), -inf);
  for (int64_t h = 0; h < c.hq; ++h) {
    const int64_t g = h / (c.hq / c.hkv);
    for (int64_t i = 0; i < n; ++i) {
      long double* row = out.data() + (h * n + i) * n;
      long double mx = -inf;
      for (int64_t j = 0; j < n; ++j) {
        if (c.causal && j > i) continue;
        long double dot = 0;
        for (int64_t e = 0; e < c.hd; ++e)
          dot += static_cast<long double>(q(i, h * c.hd + e)) * k(j, g * c.hd + e);
        row[j] = dot * scale;
        mx = std::max(mx, row[j]);
      }
      long double sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += std::exp(row[j] - mx);
      for (int64_t j = 0; j < n; ++j) row[j] -= mx + std::log(sum);
    }
  }
  return out;
}

// (1/(T·Hq)) Σ_{h,i} Σ_j P*_ij (log P*_ij − log P_ij) from the materialized maps.
double naive_map_kl(const Tensor<double>& qt, const Tensor<double>& kt, const Tensor<double>& q,
                    const Tensor<double>& k, const MapKlCase& c, double scale) {
  const std::vector<long double> lpt = naive_log_maps(qt, kt, c, scale);
  const std::vector<long double> lp = naive_log_maps(q, k, c, scale);
  long double total = 0;
  for (std::size_t e = 0; e < lpt.size(); ++e)
    if (std::isfinite(lpt[e])) total += std::exp(lpt[e]) * (lpt[e] - lp[e]);
  return static_cast<double>(total / static_cast<long double>(c.seq_len * c.hq));
}

// Target q*, k* and a model q = q* + noise · N, k = k* + noise · N (a quantized model's
// projections near the full-precision ones).
struct MapKlInputs {
  Tensor<double> qt, kt, q, k;
};

MapKlInputs map_kl_inputs(const MapKlCase& c, uint64_t seed, double spread = 1.0,
                          double noise = 0.3) {
  MapKlInputs in{randn<double>(Shape{c.seq_len, c.hq * c.hd}, seed, spread),
                 randn<double>(Shape{c.seq_len, c.hkv * c.hd}, seed + 1, spread),
                 randn<double>(Shape{c.seq_len, c.hq * c.hd}, seed + 2, noise),
                 randn<double>(Shape{c.seq_len, c.hkv * c.hd}, seed + 3, noise)};
  for (int64_t e = 0; e < in.q.numel(); ++e) in.q[e] += in.qt[e];
  for (int64_t e = 0; e < in.k.numel(); ++e) in.k[e] += in.kt[e];
  return in;
}

// The loss and the four gradients (every input differentiable) on a CPU tape of T.
template <class T>
std::vector<Tensor<double>> map_kl_run(const MapKlInputs& in, const MapKlCase& c,
                                       std::optional<double> scale = std::nullopt) {
  Tape<T> tape;
  std::vector<Var<T>> v{tape.input(in.qt.cast<T>()), tape.input(in.kt.cast<T>()),
                        tape.input(in.q.cast<T>()), tape.input(in.k.cast<T>())};
  Var<T> loss = ops::attention_map_kl(v[0], v[1], v[2], v[3], c.hq, c.hkv, c.hd, c.causal, scale);
  REQUIRE(loss.shape() == Shape{1});
  tape.backward(loss);
  std::vector<Tensor<double>> out{loss.value().template cast<double>()};
  for (auto& x : v) out.push_back(x.grad().template cast<double>());
  return out;
}

const MapKlCase kMapKlCases[] = {
    {7, 4, 2, 6, true},    // grouped-query
    {7, 4, 2, 6, false},   // grouped-query, no mask
    {7, 3, 3, 5, true},    // multi-head
    {6, 2, 2, 4, false},   // multi-head, no mask
    {9, 4, 1, 3, true},    // multi-query
    {1, 2, 1, 4, true},    // a single token: P* = P = 1, zero loss
    {70, 4, 2, 8, true},   // longer rows
    {40, 2, 2, 5, false},  // longer rows, no mask
};

}  // namespace

TEST_CASE("attention_map_kl: forward matches the naive KL of the materialized maps") {
  for (const MapKlCase& c : kMapKlCases) {
    CAPTURE(c.seq_len);
    CAPTURE(c.hq);
    CAPTURE(c.hkv);
    CAPTURE(c.hd);
    CAPTURE(c.causal);
    const MapKlInputs in = map_kl_inputs(c, 100, 1.5);
    const double scale = 1.0 / std::sqrt(double(c.hd));
    const double ref = naive_map_kl(in.qt, in.kt, in.q, in.k, c, scale);
    REQUIRE(std::isfinite(ref));
    Tape<double> tape;
    auto kl = ops::attention_map_kl(tape.constant(in.qt), tape.constant(in.kt), tape.constant(in.q),
                                    tape.constant(in.k), c.hq, c.hkv, c.hd, c.causal);
    REQUIRE(kl.shape() == Shape{1});
    if (c.seq_len > 1) CHECK(kl.value()[0] > 0);
    CHECK(std::abs(kl.value()[0] - ref) <= 1e-13 * std::max(1.0, std::abs(ref)));
    // float: the same double formulas on the inputs rounded to float
    Tape<float> tf;
    auto klf =
        ops::attention_map_kl(tf.constant(in.qt.cast<float>()), tf.constant(in.kt.cast<float>()),
                              tf.constant(in.q.cast<float>()), tf.constant(in.k.cast<float>()),
                              c.hq, c.hkv, c.hd, c.causal);
    const double ref_f = naive_map_kl(
        in.qt.cast<float>().cast<double>(), in.kt.cast<float>().cast<double>(),
        in.q.cast<float>().cast<double>(), in.k.cast<float>().cast<double>(), c, scale);
    REQUIRE(std::isfinite(klf.value()[0]));
    CHECK(std::abs(static_cast<double>(klf.value()[0]) - ref_f) <=
          1e-6 * std::max(1e-3, std::abs(ref_f)));
  }
}

TEST_CASE("attention_map_kl: an explicit scale and huge scores match the reference") {
  // Scores in the hundreds: many probabilities underflow, log P stays exact.
  const MapKlCase c{33, 4, 2, 4, true};
  const MapKlInputs in = map_kl_inputs(c, 110, 6.0, 2.0);
  for (double scale : {0.1, 2.0}) {
    CAPTURE(scale);
    const double ref = naive_map_kl(in.qt, in.kt, in.q, in.k, c, scale);
    REQUIRE(std::isfinite(ref));
    const auto d = map_kl_run<double>(in, c, scale);
    CHECK(std::abs(d[0][0] - ref) <= 1e-12 * std::max(1.0, ref));
    for (const auto& t : d) REQUIRE(std::isfinite(max_abs(t)));
    const auto f = map_kl_run<float>(in, c, scale);
    for (const auto& t : f) REQUIRE(std::isfinite(max_abs(t)));
  }
}

TEST_CASE("attention_map_kl: gradient check in double for all four inputs and each alone") {
  for (const MapKlCase& c : kMapKlCases) {
    CAPTURE(c.seq_len);
    CAPTURE(c.hq);
    CAPTURE(c.hkv);
    CAPTURE(c.causal);
    const MapKlInputs in = map_kl_inputs(c, 120, 1.0, 0.5);
    auto build = [&](Tape<double>&, std::vector<Var<double>>& x) {
      return ops::attention_map_kl(x[0], x[1], x[2], x[3], c.hq, c.hkv, c.hd, c.causal, 0.8);
    };
    const std::vector<Tensor<double>> inputs{in.qt, in.kt, in.q, in.k};
    CHECK(gradcheck(build, inputs).max_rel_error < 1e-6);
    // The usual use: constant targets. Then, on the short cases, each input alone (the skipped
    // branches of backward).
    CHECK(gradcheck(build, inputs, {false, false, true, true}).max_rel_error < 1e-6);
    if (c.seq_len > 10) continue;
    for (std::size_t only = 0; only < 4; ++only) {
      CAPTURE(only);
      std::vector<bool> d(4, false);
      d[only] = true;
      CHECK(gradcheck(build, inputs, d).max_rel_error < 1e-6);
    }
  }
}

TEST_CASE("attention_map_kl: the same variable on both sides sums both gradients") {
  // attention_map_kl(q, k, q, k) is 0 for every q, k: its gradient is exactly zero. With q shared
  // but separate keys the gradient of q is the sum of both sides' (checked numerically).
  const MapKlCase c{6, 4, 2, 3, true};
  const MapKlInputs in = map_kl_inputs(c, 130);
  auto shared_q = [&](Tape<double>&, std::vector<Var<double>>& x) {
    return ops::attention_map_kl(x[0], x[1], x[0], x[2], c.hq, c.hkv, c.hd, c.causal);
  };
  CHECK(gradcheck(shared_q, {in.qt, in.kt, in.k}).max_rel_error < 1e-6);
  Tape<double> tape;
  auto q = tape.input(in.q), k = tape.input(in.k);
  auto kl = ops::attention_map_kl(q, k, q, k, c.hq, c.hkv, c.hd, c.causal);
  tape.backward(kl);
  CHECK(kl.value()[0] == 0.0);
  CHECK(max_abs(q.grad()) == 0.0);
  CHECK(max_abs(k.grad()) == 0.0);
}

TEST_CASE("attention_map_kl: identical inputs give exactly zero loss and zero gradients") {
  for (const MapKlCase& c : kMapKlCases)
    for (double spread : {1.0, 8.0}) {
      CAPTURE(c.seq_len);
      CAPTURE(c.hq);
      CAPTURE(spread);
      const MapKlInputs in = map_kl_inputs(c, 140, spread, 0.0);  // q = q*, k = k*
      const auto d = map_kl_run<double>(in, c);
      const auto f = map_kl_run<float>(in, c);
      for (std::size_t e = 0; e < d.size(); ++e) {
        CAPTURE(e);
        CHECK(max_abs(d[e]) == 0.0);  // NaN-aware: a NaN fails
        CHECK(max_abs(f[e]) == 0.0);
      }
    }
}

TEST_CASE("attention_map_kl: float agrees with double, also at large log-sum-exps") {
  // The log-sum-exps are saved as float pairs hi + lo: backward's P = exp(s − lse) keeps its
  // precision where lse is large, so the float gradients are the double ones rounded.
  const MapKlCase c{50, 4, 2, 8, true};
  for (double spread : {1.0, 4.0}) {
    CAPTURE(spread);
    MapKlInputs in = map_kl_inputs(c, 150, spread, 0.05 * spread);
    // Round the inputs to float first, so both runs see the same values.
    for (Tensor<double>* t : {&in.qt, &in.kt, &in.q, &in.k}) *t = t->cast<float>().cast<double>();
    const auto d = map_kl_run<double>(in, c);
    const auto f = map_kl_run<float>(in, c);
    REQUIRE(std::isfinite(d[0][0]));
    CHECK(std::abs(f[0][0] - d[0][0]) <= 1e-6 * d[0][0]);
    for (std::size_t e = 1; e < d.size(); ++e) {
      CAPTURE(e);
      CHECK(max_abs_diff(f[e], d[e]) <= 1e-6 * max_abs(d[e]));
    }
  }
}

TEST_CASE("attention_map_kl: results do not depend on the thread count") {
  for (const MapKlCase& c : {MapKlCase{150, 6, 2, 8, true}, MapKlCase{97, 3, 3, 5, false}}) {
    CAPTURE(c.causal);
    const MapKlInputs in = map_kl_inputs(c, 160);
    const int before = num_threads();
    set_num_threads(1);
    const auto single = map_kl_run<double>(in, c);
    const auto single_f = map_kl_run<float>(in, c);
    set_num_threads(2);
    const auto two = map_kl_run<double>(in, c);
    set_num_threads(3);
    const auto three = map_kl_run<double>(in, c);
    const auto three_f = map_kl_run<float>(in, c);
    set_num_threads(before);
    for (std::size_t e = 0; e < single.size(); ++e) {
      CAPTURE(e);
      CHECK(max_abs_diff(single[e], two[e]) == 0.0);
      CHECK(max_abs_diff(single[e], three[e]) == 0.0);
      CHECK(max_abs_diff(single_f[e], three_f[e]) == 0.0);
    }
  }
}

TEST_CASE("attention_map_kl: memory grows linearly in T, not as T²") {
  const int64_t n = 300, hq = 4, hkv = 2, hd = 4;
  const MapKlCase c{n, hq, hkv, hd, true};
  const MapKlInputs in = map_kl_inputs(c, 170);
  Tape<double> tape;
  auto kl = ops::attention_map_kl(tape.constant(in.qt), tape.constant(in.kt), tape.input(in.q),
                                  tape.input(in.k), hq, hkv, hd);
  // Forward keeps the scalar and five values per (row, head).
  CHECK(tape.arena_bytes() == sizeof(double) * (1 + 5 * n * hq));
  tape.backward(kl);
  CHECK(tape.arena_bytes() < sizeof(double) * 4 * n * hq * hd);
  CHECK(tape.arena_bytes() < sizeof(double) * n * n);
}

TEST_CASE("attention_map_kl: a NaN in any input makes the loss and the gradients NaN") {
  const MapKlCase c{5, 2, 1, 3, true};
  const MapKlInputs base = map_kl_inputs(c, 180);
  for (int which = 0; which < 4; ++which) {
    CAPTURE(which);
    MapKlInputs in = base;
    Tensor<double>* t[] = {&in.qt, &in.kt, &in.q, &in.k};
    *t[which] = t[which]->clone();
    // Element 0: row 0 of head 0 (queries: that row's map; keys: key 0, seen by every query).
    (*t[which])[0] = std::numeric_limits<double>::quiet_NaN();
    const auto d = map_kl_run<double>(in, c);
    CHECK(std::isnan(d[0][0]));
    CHECK(std::isnan(max_abs(d[3])));  // the model's q
  }
}

TEST_CASE("attention_map_kl: mismatched heads and shapes name the op and the numbers") {
  Tape<double> tape;
  auto qt = tape.constant(randn<double>(Shape{5, 12}, 1));
  auto kt = tape.constant(randn<double>(Shape{5, 6}, 2));
  auto q = tape.constant(randn<double>(Shape{5, 12}, 3));
  auto k = tape.constant(randn<double>(Shape{5, 6}, 4));
  CHECK_THROWS_WITH_AS(
      ops::attention_map_kl(qt, kt, q, k, 4, 3, 3),
      doctest::Contains("attention_map_kl: n_heads 4 is not divisible by n_kv_heads 3"),
      cbq::Error);
  CHECK_THROWS_WITH_AS(ops::attention_map_kl(qt, kt, q, k, 0, 1, 3),
                       doctest::Contains("attention_map_kl: n_heads 0, n_kv_heads 1 and "
                                         "head_dim 3 must be positive"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(
      ops::attention_map_kl(qt, kt, q, k, 3, 1, 3),
      doctest::Contains("attention_map_kl: q_target (5, 12) does not match 3 heads of dimension 3"),
      cbq::Error);
  CHECK_THROWS_WITH_AS(
      ops::attention_map_kl(qt, kt, q, k, 4, 1, 3),
      doctest::Contains("attention_map_kl: k_target (5, 6) does not match q_target (5, 12)"),
      cbq::Error);
  auto q_short = tape.constant(randn<double>(Shape{4, 12}, 5));
  CHECK_THROWS_WITH_AS(ops::attention_map_kl(qt, kt, q_short, k, 4, 2, 3),
                       doctest::Contains("attention_map_kl: q (4, 12) and q_target (5, 12) differ"),
                       cbq::Error);
  auto k_wide = tape.constant(randn<double>(Shape{5, 9}, 6));
  CHECK_THROWS_WITH_AS(ops::attention_map_kl(qt, kt, q, k_wide, 4, 2, 3),
                       doctest::Contains("attention_map_kl: k (5, 9) and k_target (5, 6) differ"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(
      ops::attention_map_kl(qt, kt, q, k, 4, 2, 3, true, std::numeric_limits<double>::infinity()),
      doctest::Contains("attention_map_kl: scale must be finite, got inf"), cbq::Error);
  auto empty = tape.constant(Tensor<double>(Shape{0, 12}));
  auto empty_k = tape.constant(Tensor<double>(Shape{0, 6}));
  CHECK_THROWS_WITH_AS(ops::attention_map_kl(empty, empty_k, empty, empty_k, 4, 2, 3),
                       doctest::Contains("attention_map_kl: q_target (0, 12) has no rows"),
                       cbq::Error);
}
