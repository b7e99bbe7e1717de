#pragma once
// What the CBQ pass's steps share: non-finite checks that name the tensor and element, the
// observer of calibration ranges on any device, host copies for checkpoints, and the clock of
// the progress lines.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cbq/pass/device_support.hpp"
#include "cbq/quant/act_quant.hpp"

namespace cbq {

namespace detail {

inline double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

inline std::string format_duration(double s) {
  if (s < 60) return fmt::format("{:.1f}s", s);
  if (s < 3600)
    return fmt::format("{}m{:02d}s", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  return fmt::format("{}h{:02d}m", static_cast<int>(s) / 3600, (static_cast<int>(s) % 3600) / 60);
}

// Whether every element is finite. On the CPU: 0·x is 0 for a finite x and NaN otherwise, summed
// in 16 independent lanes (no early exit, so it vectorizes; the pass checks every learned
// parameter after each step, and every block output).
template <class T>
bool all_finite(const Tensor<T>& t) {
  if (!t.is_cpu()) return scan_values(t, "CBQ").first_non_finite < 0;
  const T* p = t.data();
  const int64_t n = t.numel();
  T lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += p[i + j] * T(0);
  T sum = 0;
  for (; i < n; ++i) sum += p[i] * T(0);
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  return sum == T(0);
}

template <class T>
void check_finite(const Tensor<T>& t, const std::string& what) {
  if (!t.is_cpu()) {  // a reduction on the device; only a bad element comes back
    const int64_t i = scan_values(t, "CBQ").first_non_finite;
    if (i >= 0)
      fail("CBQ: {} holds a non-finite value ({}) at element {} (row {}, column {})", what,
           static_cast<double>(element_at(t, i)), i, i / t.shape().cols(), i % t.shape().cols());
    return;
  }
  if (all_finite(t)) return;
  const T* p = t.data();  // find the element for the message
  for (int64_t i = 0; i < t.numel(); ++i)
    CBQ_CHECK(std::isfinite(static_cast<double>(p[i])),
              "CBQ: {} holds a non-finite value ({}) at element {} (row {}, column {})", what,
              static_cast<double>(p[i]), i, i / t.shape().cols(), i % t.shape().cols());
}

// obs.observe(x) for a tensor on any device (MinMaxObserver reads host memory).
template <class T>
void observe(quant::MinMaxObserver<T>& obs, const Tensor<T>& x) {
  if (x.is_cpu()) {
    obs.observe(x);
    return;
  }
  const ValueScan<T> s = scan_values(x, "MinMaxObserver");
  if (s.first_non_finite >= 0)
    fail("MinMaxObserver '{}': element {} of a calibration tensor of shape {} is {}", obs.name,
         s.first_non_finite, x.shape(), static_cast<double>(element_at(x, s.first_non_finite)));
  obs.min = std::min(obs.min, s.min);
  obs.max = std::max(obs.max, s.max);
  obs.count += x.numel();
}

// The tensors themselves when they are all on the host, else host copies (checkpoints).
template <class T>
std::vector<Tensor<T>> on_host(const std::vector<Tensor<T>>& v) {
  bool host = true;
  for (const Tensor<T>& t : v) host = host && t.is_cpu();
  if (host) return v;
  std::vector<Tensor<T>> out;
  for (const Tensor<T>& t : v) out.push_back(t.to(Device::cpu));
  return out;
}

}  // namespace detail

}  // namespace cbq
