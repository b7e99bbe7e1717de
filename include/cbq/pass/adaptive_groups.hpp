#pragma once
// ACBQ's adaptive cross-block groups (docs/ACBQ.md): instead of CBQ's fixed sliding window, the
// units (pass/units.hpp) are cut into consecutive, disjoint groups from a measured dependency
// D(u, u+1) between adjacent units, and each group is one window of the pass, minimising the
// error of its composed output.
//   unit_dependencies  D(u, u+1) on calibration samples (PassOptions::dependency says which
//                      measure; config.hpp defines both);
//   adaptive_groups    the groups: D normalised by its mean over the model; a group grows by the
//                      next unit while its mean normalised dependency stays ≥ the threshold and
//                      it holds fewer than max_units units;
//   group_windows,
//   adaptive_schedule  the windows: group g with the `overlap` groups after it (CBQ's sliding
//                      window with groups for blocks); group g's units leave after its window.
// The abstract gives neither formula; both measures and the rule are our reading of secondary
// descriptions of the paper (docs/ACBQ.md says which parts are ours).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cbq/core/error.hpp"
#include "cbq/pass/config.hpp"
#include "cbq/pass/units.hpp"
#include "cbq/pass/window_schedule.hpp"

namespace cbq {

inline const char* dependency_measure_name(DependencyMeasure m) {
  return m == DependencyMeasure::entropy ? "entropy" : "error-gain";
}

// Consecutive disjoint groups of units from the adjacent dependencies dep[u] = D(u, u+1)
// (U − 1 values for U units), as windows whose `finalize` is their end. Deterministic; every unit
// is in exactly one group, no group holds more than max_units units.
inline std::vector<Window> adaptive_groups(const std::vector<double>& dep, double threshold,
                                           int64_t max_units) {
  const int64_t U = static_cast<int64_t>(dep.size()) + 1;
  CBQ_CHECK(max_units >= 1, "adaptive groups: at most {} units per group (must be ≥ 1)", max_units);
  CBQ_CHECK(max_units <= U, "adaptive groups: groups of up to {} units, but the model has only {}",
            max_units, U);
  CBQ_CHECK(std::isfinite(threshold), "adaptive groups: the threshold {} is not finite", threshold);
  double mean = 0;
  for (double d : dep) {
    CBQ_CHECK(std::isfinite(d) && d >= 0,
              "adaptive groups: dependency {} is not a finite non-negative number", d);
    mean += d;
  }
  mean = dep.empty() ? 1.0 : mean / static_cast<double>(dep.size());
  std::vector<Window> groups;
  for (int64_t first = 0; first < U;) {
    int64_t last = first;
    double sum = 0;
    while (last + 1 < U && last - first + 1 < max_units) {
      // All-zero dependencies: every pair weighs 1 (no information to group by).
      const double d = mean > 0 ? dep[static_cast<size_t>(last)] / mean : 1.0;
      if ((sum + d) / static_cast<double>(last - first + 1) < threshold) break;
      sum += d;
      ++last;
    }
    groups.push_back({first, last, last + 1});
    first = last + 1;
  }
  return groups;
}

// The pass's windows over groups (adaptive_groups' output): window g holds group g and the
// `overlap` groups after it, extended unit by unit to at least `min_units` units, and finalizes
// group g; the window that reaches the last unit finalizes everything left (as
// window_schedule's last window). overlap 0, min_units ≤ 1: the groups themselves.
inline std::vector<Window> group_windows(const std::vector<Window>& groups, int64_t overlap,
                                         int64_t min_units = 0) {
  CBQ_CHECK(overlap >= 0, "adaptive groups: overlap {} must be ≥ 0 groups", overlap);
  CBQ_CHECK(min_units >= 0, "adaptive groups: windows of at least {} units (must be ≥ 0)",
            min_units);
  const int64_t G = static_cast<int64_t>(groups.size());
  if (G == 0) return {};
  const int64_t last_unit = groups.back().last;
  std::vector<Window> windows;
  for (int64_t g = 0; g < G; ++g) {
    const Window& group = groups[static_cast<size_t>(g)];
    const int64_t end =
        std::min(std::max(groups[static_cast<size_t>(std::min(g + overlap, G - 1))].last,
                          group.first + min_units - 1),
                 last_unit);
    const bool last = end == last_unit;
    windows.push_back({group.first, end, last ? end + 1 : group.last + 1});
    if (last) break;
  }
  return windows;
}

// adaptive_groups, then group_windows.
inline std::vector<Window> adaptive_schedule(const std::vector<double>& dep, double threshold,
                                             int64_t max_units, int64_t overlap = 0,
                                             int64_t min_units = 0) {
  return group_windows(adaptive_groups(dep, threshold, max_units), overlap, min_units);
}

namespace detail {

// Σ_t JS(p_t ‖ q_t) in bits over the rows of a and b (L, d): p_t, q_t = softmax of the row over
// its RMS.
template <class T>
double js_bits_sum(const Tensor<T>& a, const Tensor<T>& b) {
  const Tensor<T> ha = a.is_cpu() ? a : a.to(Device::cpu);
  const Tensor<T> hb = b.is_cpu() ? b : b.to(Device::cpu);
  const int64_t L = ha.size(0), d = ha.size(1);
  std::vector<double> p(static_cast<size_t>(d)), q(static_cast<size_t>(d));
  auto distribution = [&](const Tensor<T>& h, int64_t r, std::vector<double>& out) {
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += static_cast<double>(h(r, c)) * h(r, c);
    const double inv_rms = 1.0 / std::sqrt(std::max(ss / static_cast<double>(d), 1e-30));
    double mx = -INFINITY;
    for (int64_t c = 0; c < d; ++c) mx = std::max(mx, static_cast<double>(h(r, c)) * inv_rms);
    double sum = 0;
    for (int64_t c = 0; c < d; ++c)
      sum += out[static_cast<size_t>(c)] = std::exp(static_cast<double>(h(r, c)) * inv_rms - mx);
    for (double& v : out) v /= sum;
  };
  double total = 0;
  for (int64_t r = 0; r < L; ++r) {
    distribution(ha, r, p);
    distribution(hb, r, q);
    double js = 0;
    for (size_t c = 0; c < p.size(); ++c) {
      const double m = 0.5 * (p[c] + q[c]);
      if (p[c] > 0) js += 0.5 * p[c] * std::log(p[c] / m);
      if (q[c] > 0) js += 0.5 * q[c] * std::log(q[c] / m);
    }
    total += std::max(js, 0.0) / std::log(2.0);
  }
  return total;
}

template <class T>
double squared_distance(const Tensor<T>& a, const Tensor<T>& b) {
  const Tensor<T> ha = a.is_cpu() ? a : a.to(Device::cpu);
  const Tensor<T> hb = b.is_cpu() ? b : b.to(Device::cpu);
  double s = 0;
  for (int64_t i = 0; i < ha.numel(); ++i) {
    const double e = static_cast<double>(ha[i]) - static_cast<double>(hb[i]);
    s += e * e;
  }
  return s;
}

template <class T>
double squared_norm(const Tensor<T>& a) {
  const Tensor<T> h = a.is_cpu() ? a : a.to(Device::cpu);
  double s = 0;
  for (int64_t i = 0; i < h.numel(); ++i) s += static_cast<double>(h[i]) * h[i];
  return s;
}

}  // namespace detail

// D(u, u+1) for u = 0 … U − 2, measured on the first `samples` of x0 (unit 0's inputs) along the
// full-precision path. error_gain needs `quantize_unit(u, on)`, which installs (on) or removes
// unit u's round-to-nearest quantizers.
template <class Model>
std::vector<double> unit_dependencies(PassUnits<Model>& units,
                                      const std::vector<Tensor<typename Model::T>>& x0,
                                      DependencyMeasure measure, int64_t samples,
                                      const std::function<void(int64_t, bool)>& quantize_unit) {
  using T = typename Model::T;
  const int64_t U = units.count();
  const int64_t S =
      std::min<int64_t>(std::max<int64_t>(samples, 1), static_cast<int64_t>(x0.size()));
  CBQ_CHECK(U >= 2, "adaptive groups: the model has {} unit(s); there is nothing to group", U);
  CBQ_CHECK(S >= 1, "adaptive groups: no calibration samples to measure dependencies on");
  BlockContext<T> fp;
  fp.full_precision = true;
  std::vector<double> num(static_cast<size_t>(U - 1), 0.0), den(static_cast<size_t>(U - 1), 0.0);
  if (measure == DependencyMeasure::entropy) {
    for (int64_t n = 0; n < S; ++n) {
      Tensor<T> y = units.run(0, x0[static_cast<size_t>(n)], fp);
      for (int64_t u = 0; u + 1 < U; ++u) {
        Tensor<T> next = units.run(u + 1, y, fp);
        num[static_cast<size_t>(u)] += detail::js_bits_sum(y, next);
        den[static_cast<size_t>(u)] += static_cast<double>(y.size(0));
        y = next;
      }
    }
    std::vector<double> dep(num.size());
    for (size_t u = 0; u < dep.size(); ++u) dep[u] = 1.0 - num[u] / std::max(den[u], 1.0);
    return dep;
  }
  CBQ_CHECK(static_cast<bool>(quantize_unit),
            "adaptive groups: the error-gain dependency needs a way to quantize a unit");
  // e_u (error after u) and e_{u+1} (after u+1), relative to the full-precision outputs' energy.
  std::vector<double> err_u(num.size(), 0), energy_u(num.size(), 0), err_next(num.size(), 0),
      energy_next(num.size(), 0);
  for (int64_t n = 0; n < S; ++n) {
    Tensor<T> x = x0[static_cast<size_t>(n)];
    Tensor<T> y = units.run(0, x, fp);  // unit u's FP output; z becomes the next one
    for (int64_t u = 0; u + 1 < U; ++u) {
      quantize_unit(u, true);
      const Tensor<T> yq = units.run(u, x, BlockContext<T>{});
      quantize_unit(u, false);
      const Tensor<T> z = units.run(u + 1, y, fp);
      const Tensor<T> zq = units.run(u + 1, yq, fp);
      const size_t i = static_cast<size_t>(u);
      err_u[i] += detail::squared_distance(yq, y);
      energy_u[i] += detail::squared_norm(y);
      err_next[i] += detail::squared_distance(zq, z);
      energy_next[i] += detail::squared_norm(z);
      x = y;
      y = z;
    }
  }
  std::vector<double> dep(num.size());
  for (size_t u = 0; u < dep.size(); ++u) {
    const double before = err_u[u] / std::max(energy_u[u], 1e-300);
    const double after = err_next[u] / std::max(energy_next[u], 1e-300);
    // A unit that its quantizer does not change (no error to amplify) links to nothing.
    dep[u] = before > 0 ? after / before : 0.0;
  }
  return dep;
}

}  // namespace cbq
