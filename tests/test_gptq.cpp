// GPTQ: Hessian accumulation, the lazy-batch algorithm against an unblocked textbook version,
// act-order and g_idx, static groups, quality against RTN and the error paths.
#include <fmt/format.h>

#include <algorithm>
#include <cbq/formats/safetensors.hpp>
#include <cbq/model/load.hpp>
#include <cbq/model/random.hpp>
#include <cbq/pass/baselines.hpp>
#include <cbq/pass/calibration.hpp>
#include <cbq/quant/fake_quant.hpp>
#include <cbq/quant/gptq.hpp>
#include <cbq/quant/rtn.hpp>
#include <cmath>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "support/gradcheck.hpp"

using namespace cbq;
using namespace cbq::quant;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {

// (T, in) activations with strongly correlated neighbouring channels (AR(1), ρ = 0.8) and
// channel scales spread over a factor of ~10, like a transformer's linear inputs.
Tensor<float> correlated_inputs(int64_t t, int64_t in, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  std::vector<double> scale(static_cast<std::size_t>(in));
  for (double& s : scale) s = std::exp(0.6 * n01(rng));
  Tensor<float> x = Tensor<float>::empty(Shape{t, in});
  const double rho = 0.8;
  for (int64_t r = 0; r < t; ++r) {
    double prev = n01(rng);
    for (int64_t c = 0; c < in; ++c) {
      prev = rho * prev + std::sqrt(1 - rho * rho) * n01(rng);
      x(r, c) = static_cast<float>(scale[static_cast<std::size_t>(c)] * prev + 0.1);
    }
  }
  return x;
}

Tensor<double> hessian_of(const Tensor<float>& x) {
  HessianAccumulator acc(x.size(1), "test");
  acc.add_batch(x);
  return acc.hessian();
}

// ||X Wᵀ − X Ŵᵀ||² in double.
double output_error(const Tensor<float>& x, const Tensor<float>& w, const Tensor<float>& wq) {
  double e = 0;
  for (int64_t t = 0; t < x.size(0); ++t)
    for (int64_t o = 0; o < w.size(0); ++o) {
      double d = 0;
      for (int64_t i = 0; i < x.size(1); ++i)
        d += static_cast<double>(x(t, i)) * (static_cast<double>(w(o, i)) - wq(o, i));
      e += d * d;
    }
  return e;
}

// Dense inverse by Gauss-Jordan elimination with partial pivoting.
std::vector<double> naive_inverse(std::vector<double> a, int64_t n) {
  std::vector<double> inv(static_cast<std::size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) inv[static_cast<std::size_t>(i * n + i)] = 1;
  auto A = [&](int64_t i, int64_t j) -> double& { return a[static_cast<std::size_t>(i * n + j)]; };
  auto I = [&](int64_t i, int64_t j) -> double& {
    return inv[static_cast<std::size_t>(i * n + j)];
  };
  for (int64_t c = 0; c < n; ++c) {
    int64_t piv = c;
    for (int64_t r = c + 1; r < n; ++r)
      if (std::abs(A(r, c)) > std::abs(A(piv, c))) piv = r;
    for (int64_t j = 0; j < n; ++j) {
      std::swap(A(c, j), A(piv, j));
      std::swap(I(c, j), I(piv, j));
    }
    const double p = A(c, c);
    for (int64_t j = 0; j < n; ++j) {
      A(c, j) /= p;
      I(c, j) /= p;
    }
    for (int64_t r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = A(r, c);
      for (int64_t j = 0; j < n; ++j) {
        A(r, j) -= f * A(c, j);
        I(r, j) -= f * I(c, j);
      }
    }
  }
  return inv;
}

struct Naive {
  std::vector<float> deq;  // (rows, cols), original column order
  std::vector<int> codes;
  Tensor<float> scale, zero;
};

// The textbook GPTQ loop: one column at a time, every remaining column updated immediately,
// group parameters from the current weights when a group starts. `perm` (may be empty) is the
// processing order (act-order); static groups are looked up by original column.
// `stale_block` > 0: the reference's group parameters instead — a group's (s, z) from the
// weights as they were when the block of `stale_block` columns holding its first column began.
Naive naive_gptq(const Tensor<float>& W, const Tensor<double>& H, const GridSpec& g,
                 double percdamp, std::vector<int64_t> perm = {}, bool static_groups = false,
                 int64_t stale_block = 0) {
  const int64_t rows = W.size(0), cols = W.size(1);
  if (perm.empty()) {
    perm.resize(static_cast<std::size_t>(cols));
    std::iota(perm.begin(), perm.end(), int64_t{0});
  }
  const bool grouped = g.granularity == Granularity::per_group;
  const int64_t G = g.group_size, ng = g.groups_per_row(cols);
  Naive out;
  out.scale = Tensor<float>(g.param_shape(rows, cols));
  out.zero = Tensor<float>(g.param_shape(rows, cols));
  if (!grouped) init_minmax(W, g, out.scale, out.zero);
  std::vector<double> w0(static_cast<std::size_t>(rows * cols)),
      h0(H.data(), H.data() + cols * cols);
  for (int64_t k = 0; k < rows * cols; ++k) w0[static_cast<std::size_t>(k)] = W[k];
  for (int64_t i = 0; i < cols; ++i)
    if (h0[static_cast<std::size_t>(i * cols + i)] == 0) {
      h0[static_cast<std::size_t>(i * cols + i)] = 1;
      for (int64_t r = 0; r < rows; ++r) w0[static_cast<std::size_t>(r * cols + i)] = 0;
    }
  if (grouped && static_groups)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < ng; ++q) {
        double lo = 1e300, hi = -1e300;
        for (int64_t c = q * G; c < std::min(cols, (q + 1) * G); ++c) {
          lo = std::min(lo, w0[static_cast<std::size_t>(r * cols + c)]);
          hi = std::max(hi, w0[static_cast<std::size_t>(r * cols + c)]);
        }
        minmax_params(static_cast<float>(lo), static_cast<float>(hi), g, out.scale(r, q),
                      out.zero(r, q));
      }
  // Permute.
  std::vector<double> w(w0.size()), h(h0.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      w[static_cast<std::size_t>(r * cols + k)] = w0[static_cast<std::size_t>(r * cols + perm[k])];
  for (int64_t a = 0; a < cols; ++a)
    for (int64_t b = 0; b < cols; ++b)
      h[static_cast<std::size_t>(a * cols + b)] =
          h0[static_cast<std::size_t>(perm[a] * cols + perm[b])];
  double mean = 0;
  for (int64_t i = 0; i < cols; ++i) mean += h[static_cast<std::size_t>(i * cols + i)];
  mean /= static_cast<double>(cols);
  for (int64_t i = 0; i < cols; ++i) h[static_cast<std::size_t>(i * cols + i)] += percdamp * mean;
  const std::vector<double> hinv = naive_inverse(h, cols);
  // Upper Cholesky of H⁻¹ = UᵀU.
  std::vector<double> U(static_cast<std::size_t>(cols * cols), 0.0);
  auto u = [&](int64_t i, int64_t j) -> double& {
    return U[static_cast<std::size_t>(i * cols + j)];
  };
  for (int64_t i = 0; i < cols; ++i) {
    double d = hinv[static_cast<std::size_t>(i * cols + i)];
    for (int64_t k = 0; k < i; ++k) d -= u(k, i) * u(k, i);
    u(i, i) = std::sqrt(d);
    for (int64_t j = i + 1; j < cols; ++j) {
      double s = hinv[static_cast<std::size_t>(i * cols + j)];
      for (int64_t k = 0; k < i; ++k) s -= u(k, i) * u(k, j);
      u(i, j) = s / u(i, i);
    }
  }
  out.deq.assign(static_cast<std::size_t>(rows * cols), 0);
  out.codes.assign(static_cast<std::size_t>(rows * cols), 0);
  for (int64_t r = 0; r < rows; ++r) {
    double* wr = w.data() + r * cols;
    std::vector<double> snapshot(wr, wr + cols);
    float s = 0, z = 0;
    if (!grouped) {
      const int64_t p = g.granularity == Granularity::per_tensor ? 0 : r;
      s = out.scale[p];
      z = out.zero[p];
    }
    for (int64_t j = 0; j < cols; ++j) {
      if (stale_block > 0 && j % stale_block == 0) snapshot.assign(wr, wr + cols);
      if (grouped && !static_groups && j % G == 0) {
        const double* src = stale_block > 0 ? snapshot.data() : wr;
        double lo = 1e300, hi = -1e300;
        for (int64_t c = j; c < std::min(cols, j + G); ++c) {
          lo = std::min(lo, src[c]);
          hi = std::max(hi, src[c]);
        }
        minmax_params(static_cast<float>(lo), static_cast<float>(hi), g, out.scale(r, j / G),
                      out.zero(r, j / G));
        s = out.scale(r, j / G);
        z = out.zero(r, j / G);
      } else if (grouped && static_groups) {
        s = out.scale(r, perm[j] / G);
        z = out.zero(r, perm[j] / G);
      }
      const double q = quantize_code(wr[j], static_cast<double>(s), static_cast<double>(z), g);
      const float xq = dequantize_code(static_cast<float>(q), s, z);
      out.codes[static_cast<std::size_t>(r * cols + perm[j])] = static_cast<int>(q - g.qmin());
      out.deq[static_cast<std::size_t>(r * cols + perm[j])] = xq;
      const double e = (wr[j] - xq) / u(j, j);
      for (int64_t c = j + 1; c < cols; ++c) wr[c] -= e * u(j, c);
    }
  }
  return out;
}

// Compares a library result with the textbook one: every code, every parameter, every value.
void check_same(const GptqResult& got, const Naive& ref) {
  const Tensor<float>& deq = got.dequantized;
  int64_t code_mismatch = 0;
  double deq_diff = 0;
  for (int64_t k = 0; k < deq.numel(); ++k) {
    if (got.weight.codes[k] != ref.codes[static_cast<std::size_t>(k)]) ++code_mismatch;
    deq_diff = std::max(
        deq_diff, static_cast<double>(std::abs(deq[k] - ref.deq[static_cast<std::size_t>(k)])));
  }
  CHECK(code_mismatch == 0);
  CHECK(deq_diff == 0);
  CHECK(max_abs_diff(got.weight.scale, ref.scale) == 0);
  CHECK(max_abs_diff(got.weight.zero, ref.zero) == 0);
}

std::vector<int64_t> act_order_perm(const Tensor<double>& H) {
  const int64_t n = H.size(0);
  std::vector<int64_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  auto diag = [&](int64_t i) { return H(i, i) == 0 ? 1.0 : H(i, i); };
  std::stable_sort(p.begin(), p.end(), [&](int64_t a, int64_t b) { return diag(a) > diag(b); });
  return p;
}

}  // namespace

TEST_CASE("gptq: HessianAccumulator is 2/n sum x xT over all rows, with running-average batches") {
  Tensor<float> a = randn<float>(Shape{7, 5}, 1), b = randn<float>(Shape{2, 3, 5}, 2);
  HessianAccumulator acc(5, "fc1");
  acc.add_batch(a);
  acc.add_batch(b);
  CHECK(acc.rows() == 13);
  CHECK(acc.batches() == 2);
  Tensor<double> h = acc.hessian();
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 5; ++j) {
      double s = 0;
      for (int64_t t = 0; t < 7; ++t) s += static_cast<double>(a(t, i)) * a(t, j);
      for (int64_t t = 0; t < 6; ++t) s += static_cast<double>(b[t * 5 + i]) * b[t * 5 + j];
      CHECK(h(i, j) == doctest::Approx(2.0 * s / 13.0).epsilon(1e-13));
      CHECK(h(i, j) == h(j, i));
    }
  // Merging accumulators of disjoint batches (a thread's share of the samples) gives the mean
  // over all rows, as one accumulator of every batch does.
  HessianAccumulator first(5, "fc1"), second(5, "fc1"), empty(5, "fc1");
  first.add_batch(a);
  second.add_batch(b);
  first.merge(second);
  first.merge(empty);
  CHECK(first.rows() == 13);
  CHECK(first.batches() == 2);
  const Tensor<double> merged = first.hessian();
  for (int64_t k = 0; k < merged.numel(); ++k)
    CHECK(merged[k] == doctest::Approx(h[k]).epsilon(1e-14));
  CHECK_THROWS_WITH_AS(first.merge(HessianAccumulator(4, "other")),
                       doctest::Contains("cannot merge 4 features into 5"), cbq::Error);

  Tensor<float> bad = randn<float>(Shape{3, 5}, 3);
  bad(1, 4) = INFINITY;
  CHECK_THROWS_WITH_AS(acc.add_batch(bad),
                       doctest::Contains("HessianAccumulator(fc1): non-finite activation inf at "
                                         "row 1 column 4 of batch 2"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(acc.add_batch(randn<float>(Shape{3, 4}, 3)),
                       doctest::Contains("has shape (3, 4), expected (..., 5)"), cbq::Error);
  CHECK_THROWS_WITH_AS(acc.add_batch(Tensor<float>(Shape{0, 5})), doctest::Contains("has no rows"),
                       cbq::Error);
  CHECK(acc.rows() == 13);  // failed batches change nothing
}

TEST_CASE("gptq: lazy batches equal the unblocked textbook GPTQ for every block size") {
  const int64_t rows = 24, cols = 100;
  Tensor<float> x = correlated_inputs(300, cols, 31);
  Tensor<float> w = randn<float>(Shape{rows, cols}, 32, 0.1f);
  Tensor<double> h = hessian_of(x);
  const std::vector<GridSpec> specs = {{4, false, Granularity::per_channel, 0},
                                       {3, true, Granularity::per_group, 32},  // short last group
                                       {2, false, Granularity::per_tensor, 0},
                                       {4, false, Granularity::per_group, 20}};
  for (const GridSpec& g : specs) {
    const Naive ref = naive_gptq(w, h, g, 0.01);
    for (int64_t bs : {1, 7, 32, 64, 100, 128, 1000}) {
      CAPTURE(g.bits);
      CAPTURE(g.group_size);
      CAPTURE(bs);
      GptqOptions opt;
      opt.block_size = bs;
      opt.reference_group_params = false;  // the unblocked algorithm's group parameters
      check_same(gptq_quantize(w, h, g, opt, "fc"), ref);
      // The reference's (the default): a group's parameters as its block began.
      opt.reference_group_params = true;
      check_same(gptq_quantize(w, h, g, opt, "fc"), naive_gptq(w, h, g, 0.01, {}, false, bs));
    }
  }
}

TEST_CASE("gptq: act-order processes columns by decreasing diag H and records g_idx") {
  const int64_t rows = 16, cols = 72;
  Tensor<float> x = correlated_inputs(200, cols, 41);
  Tensor<float> w = randn<float>(Shape{rows, cols}, 42, 0.1f);
  Tensor<double> h = hessian_of(x);
  const std::vector<int64_t> perm = act_order_perm(h);
  REQUIRE_FALSE(std::is_sorted(perm.begin(), perm.end()));
  const GridSpec g{4, false, Granularity::per_group, 16};  // 72 = 4·16 + 8
  GptqOptions opt;
  opt.act_order = true;
  opt.block_size = 24;
  GptqResult res = gptq_quantize(w, h, g, opt, "fc");
  CHECK(res.perm == perm);
  for (int64_t k = 1; k < cols; ++k)
    CHECK(h(perm[static_cast<std::size_t>(k - 1)], perm[static_cast<std::size_t>(k - 1)]) >=
          h(perm[static_cast<std::size_t>(k)], perm[static_cast<std::size_t>(k)]));
  // g_idx: the group of original column c is (its position in the processing order) / G.
  REQUIRE(res.weight.group_index.size() == static_cast<std::size_t>(cols));
  std::vector<int> members(5, 0);
  for (int64_t k = 0; k < cols; ++k) {
    const int64_t c = perm[static_cast<std::size_t>(k)];
    CHECK(res.weight.group_index[static_cast<std::size_t>(c)] == k / 16);
    ++members[static_cast<std::size_t>(res.weight.group_index[static_cast<std::size_t>(c)])];
  }
  CHECK(members == std::vector<int>{16, 16, 16, 16, 8});
  // dequantize() goes through group_index and reproduces the result exactly.
  CHECK(max_abs_diff(res.weight.dequantize(), res.dequantized) == 0);
  // It is the textbook algorithm on the permuted problem (the reference's group parameters).
  check_same(res, naive_gptq(w, h, g, 0.01, perm, false, opt.block_size));

  // Static groups with act-order: natural groups (no g_idx), parameters fixed up front.
  opt.static_groups = true;
  GptqResult st = gptq_quantize(w, h, g, opt, "fc");
  CHECK(st.weight.group_index.empty());
  CHECK(max_abs_diff(st.weight.dequantize(), st.dequantized) == 0);
  check_same(st, naive_gptq(w, h, g, 0.01, perm, true));
  Tensor<float> s0, z0;
  init_minmax(w, g, s0, z0);
  CHECK(max_abs_diff(st.weight.scale, s0) == 0);  // no dead columns: the RTN parameters
}

TEST_CASE("gptq: lower output error than RTN on correlated inputs at 3 and 4 bits") {
  const int64_t T = 512, in = 96, out = 64;
  Tensor<float> x = correlated_inputs(T, in, 51);
  Tensor<float> w = randn<float>(Shape{out, in}, 52, 0.05f);
  HessianAccumulator acc(in, "synthetic");
  acc.add_batch(x.slice(0, 0, 200));
  acc.add_batch(x.slice(0, 200, T));
  for (int bits : {3, 4})
    for (bool grouped : {false, true})
      for (bool act_order : {false, true}) {
        GridSpec g{bits, false, grouped ? Granularity::per_group : Granularity::per_channel, 32};
        GptqOptions opt;
        opt.act_order = act_order;
        GptqResult res = gptq_quantize(w, acc, g, opt);
        const double e_gptq = output_error(x, w, res.dequantized);
        const double e_rtn = output_error(x, w, rtn_quantize(w, g).dequantize());
        MESSAGE(fmt::format("W{} {}{}: ||XWᵀ − XŴᵀ||² RTN {:.4f}  GPTQ {:.4f}  (ratio {:.3f})",
                            bits, grouped ? "g32" : "per-channel", act_order ? " act-order" : "",
                            e_rtn, e_gptq, e_gptq / e_rtn));
        CAPTURE(bits);
        CAPTURE(grouped);
        CAPTURE(act_order);
        CHECK(e_gptq < 0.8 * e_rtn);
      }
}

TEST_CASE("gptq: codes lie on the grid and dequantize() equals the returned weight exactly") {
  const int64_t rows = 10, cols = 50;
  Tensor<float> x = correlated_inputs(120, cols, 61);
  Tensor<float> w = randn<float>(Shape{rows, cols}, 62, 0.2f);
  Tensor<double> h = hessian_of(x);
  int configs = 0;
  for (int bits = 2; bits <= 8; ++bits)
    for (bool sym : {false, true})
      for (Granularity gr :
           {Granularity::per_tensor, Granularity::per_channel, Granularity::per_group})
        for (int variant = 0; variant < 4; ++variant) {
          GridSpec g{bits, sym, gr, 16};
          GptqOptions opt;
          opt.block_size = 12;
          opt.act_order = variant >= 1;
          opt.static_groups = variant == 2;
          opt.reference_group_params = variant != 3;
          GptqResult res = gptq_quantize(w, h, g, opt, "fc");
          CAPTURE(bits);
          CAPTURE(sym);
          CAPTURE(static_cast<int>(gr));
          CAPTURE(variant);
          const int64_t levels = int64_t{1} << bits;
          int64_t off_grid = 0;
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c) {
              if (res.weight.codes(r, c) >= levels) ++off_grid;
              const int64_t p = res.weight.param_index(r, c);
              const float s = res.weight.scale[p], z = res.weight.zero[p];
              const float q = res.dequantized(r, c) / s + z;  // back to the integer code
              if (std::abs(q - std::nearbyint(q)) > 1e-3f || q < g.qmin() - 1e-3f ||
                  q > g.qmax() + 1e-3f)
                ++off_grid;
              if (z != std::nearbyint(z)) ++off_grid;
            }
          CHECK(off_grid == 0);
          CHECK(max_abs_diff(res.weight.dequantize(), res.dequantized) == 0);
          ++configs;
        }
  CHECK(configs == 7 * 2 * 3 * 4);
}

TEST_CASE("gptq: with a diagonal Hessian GPTQ is exactly RTN") {
  Tensor<float> w = randn<float>(Shape{8, 70}, 71, 0.1f);
  Tensor<double> h(Shape{70, 70});
  for (int64_t i = 0; i < 70; ++i) h(i, i) = 0.5 + 0.01 * static_cast<double>(i);
  for (int bits : {2, 4, 8})
    for (bool sym : {false, true})
      for (Granularity gr :
           {Granularity::per_tensor, Granularity::per_channel, Granularity::per_group}) {
        GridSpec g{bits, sym, gr, 32};
        GptqResult res = gptq_quantize(w, h, g, {}, "fc");
        QuantizedWeight rtn = rtn_quantize(w, g);
        CAPTURE(bits);
        CAPTURE(sym);
        CAPTURE(static_cast<int>(gr));
        CHECK(max_abs_diff(res.weight.codes, rtn.codes) == 0);
        CHECK(max_abs_diff(res.weight.scale, rtn.scale) == 0);
        CHECK(max_abs_diff(res.dequantized, rtn.dequantize()) == 0);
      }
}

TEST_CASE("gptq: dead input columns (H_ii = 0) quantize to zero") {
  Tensor<float> x = correlated_inputs(100, 40, 81);
  for (int64_t t = 0; t < 100; ++t) x(t, 3) = x(t, 17) = 0.0f;
  Tensor<float> w = randn<float>(Shape{6, 40}, 82, 0.1f);
  HessianAccumulator acc(40, "fc");
  acc.add_batch(x);
  for (bool act_order : {false, true}) {
    GptqOptions opt;
    opt.act_order = act_order;
    GptqResult res = gptq_quantize(w, acc, GridSpec{4, false, Granularity::per_group, 8}, opt);
    CHECK(res.dead_columns == 2);
    for (int64_t r = 0; r < 6; ++r) {
      CHECK(res.dequantized(r, 3) == 0.0f);
      CHECK(res.dequantized(r, 17) == 0.0f);
    }
    check_same(res,
               naive_gptq(w, acc.hessian(), GridSpec{4, false, Granularity::per_group, 8}, 0.01,
                          act_order ? act_order_perm(acc.hessian()) : std::vector<int64_t>{}, false,
                          opt.block_size));
  }
}

TEST_CASE("gptq: the reference's group parameters agree when groups start at block starts") {
  Tensor<float> x = correlated_inputs(150, 64, 91);
  Tensor<float> w = randn<float>(Shape{12, 64}, 92, 0.1f);
  Tensor<double> h = hessian_of(x);
  GridSpec g{3, false, Granularity::per_group, 32};
  GptqOptions exact, ref;
  exact.reference_group_params = false;
  ref.reference_group_params = true;
  for (int64_t bs : {8, 16, 32}) {  // every group starts a block
    exact.block_size = ref.block_size = bs;
    GptqResult a = gptq_quantize(w, h, g, exact), b = gptq_quantize(w, h, g, ref);
    CHECK(max_abs_diff(a.dequantized, b.dequantized) == 0);
  }
  // With blocks of 64 the second group starts mid-block: the reference reads it without the
  // in-block updates, so its parameters (and codes) differ from the unblocked algorithm's.
  exact.block_size = ref.block_size = 64;
  GptqResult a = gptq_quantize(w, h, g, exact), b = gptq_quantize(w, h, g, ref);
  CHECK(max_abs_diff(a.weight.scale, b.weight.scale) > 0);
  CHECK(max_abs_diff(b.weight.dequantize(), b.dequantized) == 0);
}

TEST_CASE("gptq: non-PD Hessian, mismatched sizes and empty inputs are clear errors") {
  Tensor<float> w = randn<float>(Shape{4, 3}, 1);
  Tensor<double> h(Shape{3, 3});
  h(0, 0) = 1;
  h(1, 1) = -5;
  h(2, 2) = 1;
  CHECK_THROWS_WITH_AS(gptq_quantize(w, h, GridSpec{}, {}, "layers.3.mlp.down_proj"),
                       doctest::Contains("gptq(layers.3.mlp.down_proj): Hessian (3 x 3) is not "
                                         "positive definite after dampening"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(gptq_quantize(w, h, GridSpec{}, {}, "down"),
                       doctest::Contains("at column 1"), cbq::Error);
  // An indefinite H whose failing column is reported in original order under act-order.
  Tensor<double> h2(Shape{3, 3});
  h2(0, 0) = 1;
  h2(1, 1) = 4;
  h2(2, 2) = 1;
  h2(0, 1) = h2(1, 0) = 3;  // det of the leading 2×2 block < 0
  GptqOptions ao;
  ao.act_order = true;
  ao.percdamp = 0;
  CHECK_THROWS_WITH_AS(gptq_quantize(w, h2, GridSpec{}, ao, "wq"), doctest::Contains("at column 0"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(gptq_quantize(w, Tensor<double>(Shape{5, 5}), GridSpec{}, {}, "wq"),
                       doctest::Contains("gptq(wq): Hessian of shape (5, 5) does not match the "
                                         "weight's 3 input columns (shape (4, 3))"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(
      gptq_quantize(Tensor<float>(Shape{0, 3}), Tensor<double>(Shape{3, 3}), GridSpec{}, {}, "wq"),
      doctest::Contains("gptq(wq): empty weight of shape (0, 3)"), cbq::Error);
  HessianAccumulator empty(3, "wk");
  CHECK_THROWS_WITH_AS(gptq_quantize(w, empty, GridSpec{}),
                       doctest::Contains("gptq(wk): the Hessian accumulator has seen no "
                                         "calibration rows"),
                       cbq::Error);
  Tensor<double> asym = Tensor<double>::full(Shape{3, 3}, 1.0);
  asym(0, 2) = 2;
  CHECK_THROWS_WITH_AS(gptq_quantize(w, asym, GridSpec{}, {}, "wv"),
                       doctest::Contains("Hessian is not symmetric: H(2, 0) = 1 but H(0, 2) = 2"),
                       cbq::Error);
  Tensor<double> nan_h(Shape{3, 3});
  nan_h(1, 0) = NAN;
  CHECK_THROWS_WITH_AS(gptq_quantize(w, nan_h, GridSpec{}, {}, "wv"),
                       doctest::Contains("Hessian entry (1, 0) is nan"), cbq::Error);
  GptqOptions bad;
  bad.block_size = 0;
  CHECK_THROWS_WITH_AS(gptq_quantize(w, h, GridSpec{}, bad, "wv"),
                       doctest::Contains("block size must be positive, got 0"), cbq::Error);
}

TEST_CASE("gptq: round-to-nearest of the compensated weight reproduces GPTQ's codes") {
  const int64_t rows = 12, cols = 48;
  Tensor<float> x = correlated_inputs(150, cols, 71);
  Tensor<float> w = randn<float>(Shape{rows, cols}, 72, 0.3f);
  Tensor<double> h = hessian_of(x);
  for (int bits : {2, 3, 4, 8})
    for (Granularity gr : {Granularity::per_channel, Granularity::per_group}) {
      GridSpec g{bits, false, gr, 16};
      GptqOptions opt;
      opt.block_size = 20;  // groups start inside blocks too
      GptqResult res = gptq_quantize(w, h, g, opt, "fc");
      CAPTURE(bits);
      CAPTURE(static_cast<int>(gr));
      REQUIRE(res.updated.shape() == w.shape());
      // The compensated weight differs from the original (the error feedback moved it)...
      double moved = 0;
      for (int64_t i = 0; i < w.numel(); ++i) moved += std::abs(res.updated[i] - w[i]);
      CHECK(moved > 0);
      // ...and rounding it to nearest under GPTQ's own grid gives GPTQ's codes.
      const QuantizedWeight nearest =
          quantize_weight(res.updated, res.weight.scale, res.weight.zero, g);
      int64_t differ = 0;
      for (int64_t i = 0; i < nearest.codes.numel(); ++i)
        differ += nearest.codes[i] != res.weight.codes[i];
      CHECK(differ == 0);
    }
}

TEST_CASE("gptq: act-order is GPTQ on the permuted problem, permuted back (round trip)") {
  const int64_t rows = 9, cols = 40;
  Tensor<float> x = correlated_inputs(160, cols, 101);
  Tensor<float> w = randn<float>(Shape{rows, cols}, 102, 0.1f);
  Tensor<double> h = hessian_of(x);
  for (Granularity gr : {Granularity::per_channel, Granularity::per_group}) {
    CAPTURE(static_cast<int>(gr));
    const GridSpec g{3, false, gr, 8};
    GptqOptions opt;
    opt.act_order = true;
    opt.block_size = 16;
    const GptqResult a = gptq_quantize(w, h, g, opt, "fc");
    // perm is a permutation of the columns.
    std::vector<int64_t> sorted = a.perm;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> iota(static_cast<std::size_t>(cols));
    std::iota(iota.begin(), iota.end(), int64_t{0});
    REQUIRE(sorted == iota);
    REQUIRE(a.perm != iota);
    // The same problem with the columns of W and rows/columns of H permuted beforehand, solved
    // without act-order, gives the same weights in permuted order.
    Tensor<float> wp = Tensor<float>::empty(w.shape());
    Tensor<double> hp = Tensor<double>::empty(h.shape());
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t c = a.perm[static_cast<std::size_t>(k)];
      for (int64_t r = 0; r < rows; ++r) wp(r, k) = w(r, c);
      for (int64_t l = 0; l < cols; ++l) hp(k, l) = h(c, a.perm[static_cast<std::size_t>(l)]);
    }
    opt.act_order = false;
    const GptqResult b = gptq_quantize(wp, hp, g, opt, "fc");
    int64_t differ = 0;
    for (int64_t k = 0; k < cols; ++k)
      for (int64_t r = 0; r < rows; ++r)
        differ += a.dequantized(r, a.perm[static_cast<std::size_t>(k)]) != b.dequantized(r, k);
    CHECK(differ == 0);
    CHECK(a.loss == doctest::Approx(b.loss).epsilon(1e-12));
    CHECK(max_abs_diff(a.weight.dequantize(), a.dequantized) == 0);
  }
}

TEST_CASE("gptq: static groups equal dynamic groups without act-order when one block holds all") {
  // In the reference's mode a group's parameters come from W as its block began; with one block
  // for all columns that is the (dead-column-zeroed) original W, exactly what static groups use.
  const int64_t rows = 8, cols = 72;  // 72 = 2·32 + 8: a short last group
  Tensor<float> x = correlated_inputs(200, cols, 111);
  for (int64_t t = 0; t < 200; ++t) x(t, 5) = 0.0f;  // a dead column too
  Tensor<float> w = randn<float>(Shape{rows, cols}, 112, 0.1f);
  Tensor<double> h = hessian_of(x);
  const GridSpec g{4, false, Granularity::per_group, 32};
  GptqOptions dyn, st;
  st.static_groups = true;
  const GptqResult a = gptq_quantize(w, h, g, dyn, "fc"), b = gptq_quantize(w, h, g, st, "fc");
  CHECK(a.dead_columns == 1);
  CHECK(max_abs_diff(a.weight.scale, b.weight.scale) == 0);
  CHECK(max_abs_diff(a.weight.zero, b.weight.zero) == 0);
  CHECK(max_abs_diff(a.weight.codes, b.weight.codes) == 0);
  CHECK(max_abs_diff(a.dequantized, b.dequantized) == 0);
  // Not so when a later block starts a group (its weights carry the earlier blocks' updates)...
  dyn.block_size = st.block_size = 32;
  CHECK(max_abs_diff(gptq_quantize(w, h, g, dyn, "fc").weight.scale,
                     gptq_quantize(w, h, g, st, "fc").weight.scale) > 0);
  // ...nor with the unblocked algorithm's parameters.
  GptqOptions exact;
  exact.reference_group_params = false;
  CHECK(max_abs_diff(gptq_quantize(w, h, g, exact, "fc").weight.scale, b.weight.scale) > 0);
}

TEST_CASE("gptq: a 2 x 3 case by hand") {
  // H = I plus 0.5 between columns 0 and 1, no dampening, 2-bit per-channel asymmetric. By hand:
  //   H⁻¹ = [[4/3, -2/3, 0], [-2/3, 4/3, 0], [0, 0, 1]], its upper Cholesky factor
  //   U = [[2/√3, -1/√3, 0], [0, 1, 0], [0, 0, 1]];  e_j = (w_j − q_j)/U_jj, w_k −= e_j·U_jk.
  // Row 0, w = (0.9, 0.18, -0.3): s = 1.2/3 = 0.4, z = round(0.75) = 1, grid {-0.4, 0, 0.4, 0.8}.
  //   col 0: q = 0.8, e = 0.1/(2/√3), so col 1 becomes 0.18 + e/√3 = 0.18 + 0.05 = 0.23, which
  //   rounds to 0.4 (round-to-nearest of 0.18 gives 0); e = -0.17. col 2 is independent: -0.4.
  // Row 1, w = (0.3, 0.55, 0): s = 0.55/3, z = 0. col 0: 0.3/s = 1.64 → 2s, e = (0.3 − 2s)/(2/√3);
  //   col 1: 0.55 + (0.3 − 2s)/2 = 0.5167 → 3s = 0.55; col 2: 0.
  Tensor<float> w(Shape{2, 3});
  w(0, 0) = 0.9f, w(0, 1) = 0.18f, w(0, 2) = -0.3f;
  w(1, 0) = 0.3f, w(1, 1) = 0.55f, w(1, 2) = 0.0f;
  Tensor<double> h(Shape{3, 3});
  for (int64_t i = 0; i < 3; ++i) h(i, i) = 1;
  h(0, 1) = h(1, 0) = 0.5;
  GptqOptions opt;
  opt.percdamp = 0;
  const GridSpec g{2, false, Granularity::per_channel, 0};
  const GptqResult r = gptq_quantize(w, h, g, opt);
  const double s1 = 0.55f / 3.0f;
  CHECK(r.dequantized(0, 0) == doctest::Approx(0.8).epsilon(1e-6));
  CHECK(r.dequantized(0, 1) == doctest::Approx(0.4).epsilon(1e-6));
  CHECK(r.dequantized(0, 2) == doctest::Approx(-0.4).epsilon(1e-6));
  CHECK(r.dequantized(1, 0) == doctest::Approx(2 * s1).epsilon(1e-6));
  CHECK(r.dequantized(1, 1) == doctest::Approx(3 * s1).epsilon(1e-6));
  CHECK(r.dequantized(1, 2) == 0.0f);
  CHECK(r.updated(0, 1) == doctest::Approx(0.23).epsilon(1e-6));
  CHECK(r.updated(1, 1) == doctest::Approx(0.55 + (0.3 - 2 * s1) / 2).epsilon(1e-6));
  CHECK(rtn_quantize(w, g).dequantize()(0, 1) == 0.0f);  // where GPTQ differs from RTN
  const double e00 = 0.1 / (2 / std::sqrt(3.0)), e01 = 0.23 - 0.4, e02 = 0.1;
  const double e10 = (0.3 - 2 * s1) / (2 / std::sqrt(3.0)),
               e11 = 0.55 + (0.3 - 2 * s1) / 2 - 3 * s1;
  CHECK(r.loss == doctest::Approx((e00 * e00 + e01 * e01 + e02 * e02 + e10 * e10 + e11 * e11) / 2)
                      .epsilon(1e-5));
}

TEST_CASE("calibration: the reference GPTQ's sampling reproduces Python's random.randint") {
  // From CPython 3.11:  import random
  //   random.seed(0); [random.getrandbits(32) for _ in range(2)]   -> [3626764237, 1654615998]
  //   random.seed(0); [random.randint(0, 100195) for _ in range(5)]
  //     -> [50494, 99346, 55125, 5306, 33936]
  //   random.seed(1); [random.randint(0, 100195) for _ in range(3)]  -> [17611, 74606, 100109]
  //   random.seed(2**40 + 7); [random.randint(0, 1000) for _ in range(3)]  -> [628, 765, 834]
  cbq::detail::PythonRandom r0(0);
  CHECK(r0.next() == 3626764237U);
  CHECK(r0.next() == 1654615998U);
  std::vector<int32_t> tokens(100708);
  std::iota(tokens.begin(), tokens.end(), 0);
  const Calibration c0 = sample_calibration_gptq(tokens, 5, 512, 0);
  CHECK(c0.offsets == std::vector<int64_t>{50494, 99346, 55125, 5306, 33936});
  CHECK(c0.samples[1].front() == 99346);
  CHECK(c0.samples[1].size() == 512);
  CHECK(sample_calibration_gptq(tokens, 3, 512, 1).offsets ==
        std::vector<int64_t>{17611, 74606, 100109});
  cbq::detail::PythonRandom big((uint64_t{1} << 40) + 7);
  CHECK(big.randint(1000) == 628);
  CHECK(big.randint(1000) == 765);
  CHECK(big.randint(1000) == 834);
  CHECK_THROWS_WITH_AS(sample_calibration_gptq(std::vector<int32_t>(512, 1), 1, 512, 0),
                       doctest::Contains("needs more than one segment of 512"), cbq::Error);
}

namespace {
// Every linear layer's Hessian in every block, recomputed from the quantized model: block b run
// on the calibration inputs after the quantized blocks before it, with or without its own
// quantizers (full_precision).
std::map<std::string, Tensor<double>> recomputed_hessians(Transformer<LlamaBlock<float>>& m,
                                                          std::vector<Tensor<float>> x,
                                                          bool full_precision_block) {
  std::map<std::string, Tensor<double>> out;
  for (int64_t b = 0; b < m.num_blocks(); ++b) {
    auto linears = m.blocks[b].linears();
    std::vector<HessianAccumulator> acc;
    for (auto* l : linears) acc.emplace_back(l->in_features());
    BlockContext<float> ctx;
    ctx.full_precision = full_precision_block;
    ctx.on_linear_input = [&](const LinearLayer<float>& layer, const Tensor<float>& in) {
      for (size_t j = 0; j < linears.size(); ++j)
        if (linears[j] == &layer) acc[j].add_batch(in);
    };
    for (const auto& xi : x) m.run_block(b, xi, ctx);
    for (size_t j = 0; j < linears.size(); ++j)
      out[fmt::format("layers.{}.{}", b, linears[j]->name)] = acc[j].hessian();
    for (auto& xi : x) xi = m.run_block(b, xi);
  }
  return out;
}
}  // namespace

TEST_CASE("gptq baseline: true-sequential order and the inputs each layer's Hessian sees") {
  const ModelConfig c = tiny_llama_config();
  const WeightMap weights = random_weights(c, 21);
  std::vector<Tensor<float>> x;
  PassSpec spec;
  spec.weight = GridSpec{3, false, Granularity::per_group, 8};
  for (bool sequential : {true, false}) {
    CAPTURE(sequential);
    Transformer<LlamaBlock<float>> m(c, weights);
    if (x.empty())
      for (uint64_t s = 0; s < 3; ++s) {
        std::vector<int32_t> t(20);
        for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>((s * 7 + i * 5) % 37);
        x.push_back(m.embed_tensor(t));
      }
    GptqBaselineOptions o;
    o.true_sequential = sequential;
    std::vector<std::string> order;
    std::map<std::string, Tensor<double>> seen;
    o.on_layer = [&](const std::string& name, const Tensor<double>& h, const GptqResult& r) {
      order.push_back(name);
      seen[name] = h.clone();
      CHECK(max_abs_diff(r.weight.dequantize(), r.dequantized) == 0);
    };
    const QuantizationResult res = quantize_baseline(m, Baseline::gptq, spec, x, o, false);
    // Quantized in forward order: q/k/v, o, gate/up, down (the result keeps linears() order).
    REQUIRE(order.size() == static_cast<size_t>(7 * c.n_layers));
    const std::vector<std::string> names{"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                         "gate_proj", "up_proj", "down_proj"};
    for (int64_t b = 0; b < c.n_layers; ++b)
      for (size_t j = 0; j < names.size(); ++j) {
        CHECK(order[static_cast<size_t>(b) * 7 + j] == fmt::format("layers.{}.{}", b, names[j]));
        CHECK(res.layers[static_cast<size_t>(b) * 7 + j].name == order[b * 7 + j]);
      }
    // True-sequential: a layer's input does not depend on its own or later layers' weights, so
    // the Hessians of the finished, fully quantized model are exactly those GPTQ saw. Otherwise
    // they are those of each block in full precision after the quantized blocks before it.
    const auto quantized = recomputed_hessians(m, x, false);
    const auto fp_block = recomputed_hessians(m, x, true);
    int64_t differ_from_fp = 0;
    for (const auto& [name, h] : seen) {
      CAPTURE(name);
      const auto& expect = sequential ? quantized.at(name) : fp_block.at(name);
      CHECK(max_abs_diff(h, expect) == 0);
      differ_from_fp += max_abs_diff(quantized.at(name), fp_block.at(name)) > 0;
    }
    // Only q/k/v (the block's first inputs) are the same both ways.
    CHECK(differ_from_fp == 4 * c.n_layers);
  }
}

TEST_CASE("gptq baseline: stories260K gives the reference GPTQ's codes (tests/fixtures)") {
  // The fixtures are the reference algorithm (tests/reference/gptq_reference.py: IST-DASLab
  // gptq's llama.py --true-sequential, fasterquant, Quantizer, datautils sampling, in float32)
  // on stories260K with 16 × 512 calibration tokens, Python random seed 0. cbq works in double,
  // so a code could in principle differ where float32 and double round a tie differently.
  namespace fs = std::filesystem;
  const fs::path data(CBQ_DATA_DIR);
  const fs::path fixtures = fs::path(CBQ_SOURCE_DIR) / "tests" / "fixtures" / "gptq-reference";
  const fs::path model_path = data / "models" / "stories260K.bin";
  if (!fs::exists(model_path)) {
    MESSAGE("skipped: " << model_path << " not found");
    return;
  }
  const std::string train =
      io::read_text_file((data / "text" / "tinystories_train_excerpt.txt").string());
  struct Case {
    const char* file;
    int bits;
    bool act_order, static_groups;
  };
  for (const Case& k :
       {Case{"stories260K-w4g32-16x512.safetensors", 4, false, false},
        Case{"stories260K-w3g32-actorder-16x512.safetensors", 3, true, false},
        Case{"stories260K-w3g32-actorder-static-16x512.safetensors", 3, true, true}}) {
    const std::string file = k.file;
    CAPTURE(file);
    auto any = load_model(model_path.string(), (data / "models" / "tok512.bin").string());
    auto& m = any.llama();
    const Calibration calib =
        sample_calibration_gptq(m.tokenizer->encode(train, true, false), 16, 512, 0);
    const io::SafetensorsFile ref((fixtures / k.file).string());
    std::string offsets;
    for (int64_t o : calib.offsets) offsets += (offsets.empty() ? "" : ",") + std::to_string(o);
    REQUIRE(ref.metadata().at("offsets") == offsets);  // the same calibration segments
    std::vector<Tensor<float>> x;
    for (const auto& s : calib.samples) x.push_back(m.embed_tensor(s));
    PassSpec spec;
    spec.weight = GridSpec{k.bits, false, Granularity::per_group, 32};
    GptqBaselineOptions o;
    o.layer.act_order = k.act_order;
    o.layer.static_groups = k.static_groups;
    std::map<std::string, std::vector<int64_t>> perms;
    o.on_layer = [&](const std::string& name, const Tensor<double>&, const GptqResult& r) {
      perms[name] = r.perm;
    };
    const QuantizationResult res = quantize_baseline(m, Baseline::gptq, spec, x, o, false);
    REQUIRE(res.layers.size() == 35);
    int64_t weights = 0, codes_differ = 0, perm_differ = 0;
    double scale_diff = 0, zero_diff = 0;
    for (const LayerResult& l : res.layers) {
      CAPTURE(l.name);
      const auto codes = ref.raw(l.name + ".codes");
      REQUIRE(static_cast<int64_t>(codes.size()) == l.weight.codes.numel());
      for (int64_t i = 0; i < l.weight.codes.numel(); ++i)
        codes_differ += l.weight.codes[i] != static_cast<uint8_t>(codes[static_cast<size_t>(i)]);
      weights += l.weight.codes.numel();
      const Tensor<float> s = ref.to_float(l.name + ".scales"), z = ref.to_float(l.name + ".zeros");
      REQUIRE(s.numel() == l.weight.scale.numel());
      for (int64_t i = 0; i < s.numel(); ++i) {
        scale_diff =
            std::max(scale_diff, std::abs(1.0 - static_cast<double>(l.weight.scale[i]) / s[i]));
        zero_diff = std::max(zero_diff, static_cast<double>(std::abs(l.weight.zero[i] - z[i])));
      }
      if (k.act_order) {
        const Tensor<int32_t> p = ref.to_int32(l.name + ".perm");
        const std::vector<int64_t>& mine = perms.at(l.name);
        REQUIRE(static_cast<int64_t>(mine.size()) == p.numel());
        for (int64_t i = 0; i < p.numel(); ++i) perm_differ += mine[static_cast<size_t>(i)] != p[i];
      }
    }
    MESSAGE(
        fmt::format("{}: {} of {} codes differ from the reference, scales within {:.1e} "
                    "(relative), zero-points within {}, {} act-order positions differ",
                    k.file, codes_differ, weights, scale_diff, zero_diff, perm_differ));
    CHECK(codes_differ == 0);
    CHECK(perm_differ == 0);
    CHECK(scale_diff < 1e-5);
    CHECK(zero_diff == 0);
  }
}
