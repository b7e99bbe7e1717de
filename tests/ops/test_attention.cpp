// attention (ops/attention.hpp): forward against the naive T×T softmax, gradient checks, thread
// independence, memory, errors. CUDA parity: tests/gpu/test_attention.cu.
#include <cbq/ops/attention.hpp>
#include <random>
#include <utility>
#include <vector>

#include "support/gradcheck.hpp"

using namespace cbq;
using cbq::testing::gradcheck;
using cbq::testing::max_abs_diff;
using cbq::testing::randn;

namespace {

// ---- attention reference: full T×T scores per head, causal mask, plain softmax ----
Tensor<double> naive_attention(const Tensor<double>& q, const Tensor<double>& k,
                               const Tensor<double>& v, int64_t hq, int64_t hkv, int64_t hd,
                               bool causal, double scale) {
  const int64_t n = q.size(0);
  Tensor<double> out(q.shape());
  for (int64_t h = 0; h < hq; ++h) {
    const int64_t g = h / (hq / hkv);
    for (int64_t i = 0; i < n; ++i) {
      std::vector<double> s(n, -std::numeric_limits<double>::infinity());
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        if (causal && j > i) continue;
        double dot = 0;
        for (int64_t c = 0; c < hd; ++c) dot += q(i, h * hd + c) * k(j, g * hd + c);
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
      for (int64_t c = 0; c < hd; ++c) {
        double acc = 0;
        for (int64_t j = 0; j < n; ++j) acc += s[j] / sum * v(j, g * hd + c);
        out(i, h * hd + c) = acc;
      }
    }
  }
  return out;
}

struct AttnCase {
  int64_t seq_len, hq, hkv, hd;
  bool causal;
};

// Forces one CPU path (tiles or rows) for a scope; both are tested on every case.
struct UsePath {
  explicit UsePath(ops::detail::AttentionPath p) { ops::detail::attention_path = p; }
  ~UsePath() { ops::detail::attention_path = ops::detail::AttentionPath::automatic; }
  UsePath(const UsePath&) = delete;
  UsePath& operator=(const UsePath&) = delete;
};
constexpr ops::detail::AttentionPath kPaths[] = {ops::detail::AttentionPath::tiles,
                                                 ops::detail::AttentionPath::rows};

// check(case) for every case on both paths, the path and the case captured for a failure.
template <std::size_t K, class F>
void on_both_paths(const AttnCase (&cases)[K], F&& check) {
  for (const auto path : kPaths)
    for (const AttnCase& c : cases) {
      const UsePath use(path);
      CAPTURE(static_cast<int>(path));
      CAPTURE(c.seq_len);
      CAPTURE(c.hq);
      CAPTURE(c.hkv);
      CAPTURE(c.hd);
      CAPTURE(c.causal);
      check(c);
    }
}

}  // namespace

TEST_CASE("attention: forward matches the naive T×T softmax on odd sizes, float and double") {
  const AttnCase cases[] = {
      {7, 4, 2, 6, true},     // grouped-query
      {7, 3, 3, 6, true},     // plain multi-head
      {7, 4, 2, 6, false},    // no mask
      {7, 4, 1, 5, true},     // multi-query, odd head_dim
      {1, 2, 1, 4, true},     // a single token
      {150, 2, 1, 6, true},   // several 64-row tiles: online softmax rescaling across tiles
      {133, 3, 3, 4, false},  // several tiles without mask
      {300, 6, 2, 5, true},   // groups of 3 query heads stacked; crosses a 256-key block
      {520, 3, 1, 4, true},   // three key blocks, the last one partial
      {290, 2, 2, 3, false},  // key blocks without mask
      {75, 4, 2, 12, true},   // the row path's widest padding (12 → 16)
      {40, 2, 1, 16, false},  // the row path's largest head dimension
      {33, 2, 2, 7, true},    // a row chunk and one more row
  };
  on_both_paths(cases, [](const AttnCase& c) {
    auto q = randn<double>(Shape{c.seq_len, c.hq * c.hd}, 41, 1.5);
    auto k = randn<double>(Shape{c.seq_len, c.hkv * c.hd}, 42, 1.5);
    auto v = randn<double>(Shape{c.seq_len, c.hkv * c.hd}, 43);
    const double scale = 1.0 / std::sqrt(double(c.hd));
    auto ref = naive_attention(q, k, v, c.hq, c.hkv, c.hd, c.causal, scale);
    Tape<double> tape;
    auto o = ops::attention(tape.constant(q), tape.constant(k), tape.constant(v), c.hq, c.hkv, c.hd,
                            c.causal);
    REQUIRE(o.shape() == q.shape());
    CHECK(max_abs_diff(o.value(), ref) < 1e-12);
    Tape<float> tape_f;
    auto of = ops::attention(tape_f.constant(q.cast<float>()), tape_f.constant(k.cast<float>()),
                             tape_f.constant(v.cast<float>()), c.hq, c.hkv, c.hd, c.causal);
    CHECK(max_abs_diff(of.value(), ref) < 1e-5);
  });
}

TEST_CASE("attention: an explicit scale and huge logits stay finite and match the reference") {
  const int64_t n = 70, hq = 2, hkv = 1, hd = 4;
  auto q = randn<double>(Shape{n, hq * hd}, 44, 30.0);
  auto k = randn<double>(Shape{n, hkv * hd}, 45, 30.0);
  auto v = randn<double>(Shape{n, hkv * hd}, 46);
  auto ref = naive_attention(q, k, v, hq, hkv, hd, true, 2.0);
  Tape<float> tape;
  auto o = ops::attention(tape.constant(q.cast<float>()), tape.constant(k.cast<float>()),
                          tape.constant(v.cast<float>()), hq, hkv, hd, true, 2.0);
  for (int64_t i = 0; i < o.value().numel(); ++i) REQUIRE(std::isfinite(o.value()[i]));
  CHECK(max_abs_diff(o.value(), ref) < 1e-3);
}

namespace {

// The gradient checks of one path: all three inputs together, and each alone (the others
// constant: the skipped branches of backward) where `alone` says so.
void gradcheck_attention(ops::detail::AttentionPath path, bool (*alone)(const AttnCase&)) {
  const AttnCase cases[] = {
      {7, 4, 2, 6, true},   {7, 3, 3, 6, true},
      {7, 4, 2, 6, false},  {70, 2, 1, 4, true},  // crosses a tile boundary; shared kv head
      {67, 2, 2, 3, false},                       // crosses a tile boundary without mask
      {140, 6, 2, 2, true},  // stacked groups of 3, two 128-row tiles in two backward chunks
      {150, 3, 3, 2, true},  // one kv head per query head, backward parts of tiles {0, 1}, {2}
      {40, 2, 1, 12, true},  // the row path's padding to 16
  };
  for (const AttnCase& c : cases) {
    const UsePath use(path);
    CAPTURE(c.seq_len);
    CAPTURE(c.hq);
    CAPTURE(c.hkv);
    CAPTURE(c.hd);
    CAPTURE(c.causal);
    auto q = randn<double>(Shape{c.seq_len, c.hq * c.hd}, 51);
    auto k = randn<double>(Shape{c.seq_len, c.hkv * c.hd}, 52);
    auto v = randn<double>(Shape{c.seq_len, c.hkv * c.hd}, 53);
    auto build = [&](Tape<double>&, std::vector<Var<double>>& x) {
      return ops::attention(x[0], x[1], x[2], c.hq, c.hkv, c.hd, c.causal, 0.7);
    };
    CHECK(gradcheck(build, {q, k, v}).max_rel_error < 1e-6);
    if (!alone(c)) continue;
    CHECK(gradcheck(build, {q, k, v}, {true, false, false}).max_rel_error < 1e-6);
    CHECK(gradcheck(build, {q, k, v}, {false, true, false}).max_rel_error < 1e-6);
    CHECK(gradcheck(build, {q, k, v}, {false, false, true}).max_rel_error < 1e-6);
  }
}

}  // namespace

TEST_CASE("attention: gradient check in double for q, k and v (tiled path)") {
  gradcheck_attention(ops::detail::AttentionPath::tiles, [](const AttnCase&) { return true; });
}

// Each input alone only up to T 70 here: in double the row kernels are plain loops, instrumented
// in the sanitizer build (-O1; the tiles' GEMMs are OpenBLAS's), where this test takes 20 s so
// (3 s in Release).
TEST_CASE("attention: gradient check in double for q, k and v (row path)") {
  gradcheck_attention(ops::detail::AttentionPath::rows,
                      [](const AttnCase& c) { return c.seq_len <= 70; });
}

TEST_CASE("attention: gradients do not depend on the thread count") {
  for (const auto path : kPaths)
    for (const auto& [hq, hkv] : {std::pair<int64_t, int64_t>{6, 2}, {3, 3}, {9, 3}}) {
      const UsePath use(path);
      CAPTURE(static_cast<int>(path));
      CAPTURE(hq);
      const int64_t n = 300, hd = 8;
      auto q = randn<double>(Shape{n, hq * hd}, 61);
      auto k = randn<double>(Shape{n, hkv * hd}, 62);
      auto v = randn<double>(Shape{n, hkv * hd}, 63);
      auto dout = randn<double>(Shape{n, hq * hd}, 64);
      auto run = [&]() {
        Tape<double> tape;
        auto vq = tape.input(q), vk = tape.input(k), vv = tape.input(v);
        auto o = ops::attention(vq, vk, vv, hq, hkv, hd);
        o.grad().copy_from(dout);
        tape.backward_from_seeded();
        return std::vector<Tensor<double>>{o.value().clone(), vq.grad().clone(), vk.grad().clone(),
                                           vv.grad().clone()};
      };
      const int before = num_threads();
      set_num_threads(1);
      auto single = run();
      set_num_threads(2);
      auto two = run();
      set_num_threads(3);
      auto multi = run();
      set_num_threads(before);
      for (std::size_t i = 0; i < single.size(); ++i) {
        CHECK(max_abs_diff(single[i], two[i]) == 0.0);
        CHECK(max_abs_diff(single[i], multi[i]) == 0.0);
      }
    }
}

TEST_CASE("attention: the row path equals the tiled path in float at the 260K models' shapes") {
  // stories260K: T 512, 8 query heads on 4 kv heads, hd 8; values and gradients.
  const int64_t n = 512, hq = 8, hkv = 4, hd = 8;
  auto q = randn<float>(Shape{n, hq * hd}, 81, 2.0), k = randn<float>(Shape{n, hkv * hd}, 82, 2.0);
  auto v = randn<float>(Shape{n, hkv * hd}, 83), dout = randn<float>(Shape{n, hq * hd}, 84);
  auto run = [&](ops::detail::AttentionPath path) {
    const UsePath use(path);
    Tape<float> tape;
    auto vq = tape.input(q), vk = tape.input(k), vv = tape.input(v);
    auto o = ops::attention(vq, vk, vv, hq, hkv, hd);
    o.grad().copy_from(dout);
    tape.backward_from_seeded();
    return std::vector<Tensor<float>>{o.value().clone(), vq.grad().clone(), vk.grad().clone(),
                                      vv.grad().clone()};
  };
  const auto tiles = run(ops::detail::AttentionPath::tiles);
  const auto rows = run(ops::detail::AttentionPath::rows);
  REQUIRE(ops::detail::attention_uses_rows(hd));
  for (std::size_t i = 0; i < tiles.size(); ++i) {
    CAPTURE(i);
    double scale = 0;
    for (int64_t j = 0; j < tiles[i].numel(); ++j) {
      REQUIRE(std::isfinite(rows[i][j]));
      scale = std::max(scale, std::abs(double(tiles[i][j])));
    }
    CHECK(scale > 0);
    CHECK(max_abs_diff(rows[i], tiles[i]) < 2e-5 * scale);
  }
  CHECK_FALSE(ops::detail::attention_uses_rows(64));  // SmolLM2's hd 64 keeps the tiles
}

TEST_CASE("attention: the row kernels give a row the same bits alone and beside the next row") {
  // Rows go through the row kernels two at a time; in a causal sequence cut after row i (even),
  // row i is the last one and goes alone. Its output and its dq (which depends on rows ≤ i only)
  // must not change by a bit.
  const UsePath use(ops::detail::AttentionPath::rows);
  for (int64_t hd : {4, 8, 13}) {
    CAPTURE(hd);
    const int64_t n = 70, hq = 4, hkv = 2;
    auto q = randn<float>(Shape{n, hq * hd}, 91, 2.0),
         k = randn<float>(Shape{n, hkv * hd}, 92, 2.0);
    auto v = randn<float>(Shape{n, hkv * hd}, 93), dout = randn<float>(Shape{n, hq * hd}, 94);
    auto run = [&](int64_t rows) {
      Tape<float> tape;
      auto vq = tape.input(q.slice(0, 0, rows).contiguous());
      auto vk = tape.input(k.slice(0, 0, rows).contiguous());
      auto vv = tape.input(v.slice(0, 0, rows).contiguous());
      auto o = ops::attention(vq, vk, vv, hq, hkv, hd);
      o.grad().copy_from(dout.slice(0, 0, rows).contiguous());
      tape.backward_from_seeded();
      return std::pair<Tensor<float>, Tensor<float>>{o.value().clone(), vq.grad().clone()};
    };
    const auto [full, full_dq] = run(n);
    for (int64_t i : {0, 14, 16, 30, 32, 46, 68}) {
      CAPTURE(i);
      const auto [cut, cut_dq] = run(i + 1);
      for (int64_t c = 0; c < hq * hd; ++c) {
        REQUIRE(std::isfinite(full[i * hq * hd + c]));
        REQUIRE(std::isfinite(full_dq[i * hq * hd + c]));
        CHECK(cut[i * hq * hd + c] == full[i * hq * hd + c]);
        CHECK(cut_dq[i * hq * hd + c] == full_dq[i * hq * hd + c]);
      }
    }
  }
}

TEST_CASE("attention: work is cut into contiguous runs of about equal cost") {
  using ops::detail::attention_tile_cost;
  using ops::detail::balanced_cuts;
  // Causal: tile t reads t + 1 key tiles; 32 tiles (T 2048) cost 528, cut nearest 264.
  auto causal = [](int64_t t) { return attention_tile_cost(t, 32, true); };
  CHECK(balanced_cuts(32, 2, causal) == std::vector<int64_t>{0, 22, 32});
  // Without the mask every tile costs the same.
  auto flat = [](int64_t t) { return attention_tile_cost(t, 10, false); };
  CHECK(balanced_cuts(10, 3, flat) == std::vector<int64_t>{0, 3, 7, 10});
  CHECK(balanced_cuts(10, 1, flat) == std::vector<int64_t>{0, 10});
  // More runs than items: empty runs, still monotone and covering every item once.
  CHECK(balanced_cuts(2, 4, flat) == std::vector<int64_t>{0, 1, 1, 2, 2});
  // Any costs: every run within one item's cost of its share; runs tile 0..n.
  std::mt19937 rng(5);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 60),
                  parts = 1 + static_cast<int64_t>(rng() % 7);
    std::vector<int64_t> cost(static_cast<std::size_t>(n));
    for (auto& c : cost) c = 1 + static_cast<int64_t>(rng() % 20);
    const auto cuts =
        balanced_cuts(n, parts, [&](int64_t i) { return cost[static_cast<std::size_t>(i)]; });
    REQUIRE(cuts.size() == static_cast<std::size_t>(parts + 1));
    CHECK(cuts.front() == 0);
    CHECK(cuts.back() == n);
    double total = 0, max_item = 0;
    for (int64_t c : cost) {
      total += static_cast<double>(c);
      max_item = std::max(max_item, static_cast<double>(c));
    }
    for (int64_t p = 0; p < parts; ++p) {
      REQUIRE(cuts[static_cast<std::size_t>(p)] <= cuts[static_cast<std::size_t>(p + 1)]);
      double run = 0;
      for (int64_t i = cuts[static_cast<std::size_t>(p)]; i < cuts[static_cast<std::size_t>(p + 1)];
           ++i)
        run += static_cast<double>(cost[static_cast<std::size_t>(i)]);
      CHECK(run <= total / static_cast<double>(parts) + max_item);
    }
  }
}

TEST_CASE("attention: memory grows linearly in T, not as T²") {
  const int64_t n = 400, hq = 2, hkv = 1, hd = 4;
  Tape<double> tape;
  auto q = tape.input(randn<double>(Shape{n, hq * hd}, 71));
  auto k = tape.input(randn<double>(Shape{n, hkv * hd}, 72));
  auto v = tape.input(randn<double>(Shape{n, hkv * hd}, 73));
  auto o = ops::attention(q, k, v, hq, hkv, hd);
  // Forward keeps the output and one log-sum-exp per (row, head).
  CHECK(tape.arena_bytes() == sizeof(double) * (n * hq * hd + n * hq));
  o.grad().fill(1.0);
  tape.backward_from_seeded();
  // Everything on the tape (gradients, kv shares) is a small multiple of T·Hq·hd; a single
  // materialised (T, T) score matrix would already exceed it.
  CHECK(tape.arena_bytes() < sizeof(double) * 10 * n * hq * hd);
  CHECK(tape.arena_bytes() < sizeof(double) * n * n);
}

TEST_CASE("attention: mismatched heads and shapes name the op and the numbers") {
  Tape<double> tape;
  auto q = tape.constant(randn<double>(Shape{5, 12}, 1));
  auto k = tape.constant(randn<double>(Shape{5, 6}, 2));
  auto v = tape.constant(randn<double>(Shape{5, 6}, 3));
  CHECK_THROWS_WITH_AS(ops::attention(q, k, v, 4, 3, 3),
                       doctest::Contains("attention: n_heads 4 is not divisible by n_kv_heads 3"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(
      ops::attention(q, k, v, 3, 1, 3),
      doctest::Contains("attention: q (5, 12) does not match 3 heads of dimension 3"), cbq::Error);
  CHECK_THROWS_WITH_AS(ops::attention(q, k, v, 4, 1, 3),
                       doctest::Contains("attention: k (5, 6) does not match q (5, 12)"),
                       cbq::Error);
  auto v_short = tape.constant(randn<double>(Shape{4, 6}, 4));
  CHECK_THROWS_WITH_AS(ops::attention(q, k, v_short, 4, 2, 3),
                       doctest::Contains("attention: v (4, 6) and k (5, 6) differ"), cbq::Error);
}
