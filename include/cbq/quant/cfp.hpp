#pragma once
// Coarse-to-fine pre-processing (CFP, CBQ paper §3.2, Algorithm 1; DESIGN §2): an outlier
// detector on non-negative values, weight-outlier truncation and activation-outlier channel
// scaling factors. docs/CFP.md states the conventions; in short:
//
//   coarse  x sorted ascending (0-based), Q1 = x[⌊n/4⌋], Q3 = x[⌊3n/4⌋],
//           T = Q3 + λ1·(Q3 − Q1), candidates O = {x > T} ascending (|O| = N)
//   fine    for i = 0 … N−1: reserved O[0:i], outliers O[i:N],
//             M(i) = (O[i] − kept_max(i))² − λ2·Var(O[0:i])
//           kept_max(i) = O[i−1] for i > 0, and the largest non-candidate value (≤ T) for i = 0;
//           Var is the population variance of the reserved candidates only (0 for i ≤ 1).
//           The first i with the largest M wins. i = N (no outliers) is not a split: Min(∅) is
//           undefined, and M(0) > 0 always (O[0] > T ≥ every non-candidate), so a coarse
//           candidate set is never rejected wholesale.
//   result  outliers = every value > kept_max (equal values are never split, see docs),
//           kept_max = Max(O*) of the paper read as the largest KEPT value.
//
// CUDA (CudaCfp, cuda/cbq/cuda/quant/cfp.cuh): detect_outliers on a CUDA tensor finds Q1 and Q3 by
// a radix select on the device, counts the kept values and selects the candidates there, and runs
// the same fine stage on the host on the (few) candidates; truncate_weight_outliers and
// ChannelMaxObserver::observe take CUDA tensors too. Order statistics, counts and maxima are
// exact, so every field of the OutlierSet equals the CPU's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq::quant {

// CUDA kernels of the detector's statistics (registered by the CUDA backend). Every pointer is on
// the device unless it says "host". The detector is an algorithm, not an op: its CPU path is the
// reference on host values (nth_element, sort), and the CUDA path composes these primitives into
// the same statistics, checked equal to the CPU's by tests/gpu/test_cfp.cu. So there is no
// CpuCfp with these signatures.
template <class T>
struct CudaCfp {
  // The first index whose value is not finite or is negative, −1 if none.
  static inline int64_t (*first_invalid)(const T* x, int64_t n) = nullptr;
  // The values of ranks rank_a and rank_b (0-based) of the ascending order of x (n), into
  // *value_a and *value_b (host). x must be non-negative.
  static inline void (*order_statistics)(const T* x, int64_t n, int64_t rank_a, int64_t rank_b,
                                         T* value_a, T* value_b) = nullptr;
  // How many values of x (n) are ≤ threshold (compared in double); *max_at_most (host) = the
  // largest of them (0 if none).
  static inline int64_t (*count_at_most)(const T* x, int64_t n, double threshold,
                                         T* max_at_most) = nullptr;
  // Writes the values (into `values`, when not null) and the indices (into `index`, when not
  // null) of the elements with double(x[i]) > threshold, in no particular order, at most
  // `capacity` of them; returns how many there are.
  static inline int64_t (*select_greater)(T* values, int64_t* index, int64_t capacity, const T* x,
                                          int64_t n, double threshold) = nullptr;
  // out[i] = |x[i]|
  static inline void (*abs)(T* out, const T* x, int64_t n) = nullptr;
  // w[i] = copysign(limit, w[i]) where double(|w[i]|) > threshold
  static inline void (*clamp_greater)(T* w, int64_t n, double threshold, T limit) = nullptr;
  // out (cols) = max(0, max_t |x[t, j]|) over x (rows, cols); returns the first (row-major)
  // index of a non-finite element, −1 if none.
  static inline int64_t (*column_abs_max)(T* out, const T* x, int64_t rows, int64_t cols) = nullptr;
};

struct CfpOptions {
  double lambda1 = 1.5;  // IQR multiplier of the coarse threshold
  double lambda2 = 1.0;  // weight of the reserved set's variance in the fine split metric
};

// What the detector found on n values.
struct OutlierSet {
  int64_t n = 0;
  double q1 = 0, q3 = 0;          // x[⌊n/4⌋], x[⌊3n/4⌋] of the ascending sort
  double threshold = 0;           // T = Q3 + λ1·(Q3 − Q1)
  int64_t candidates = 0;         // |{x > T}|
  int64_t split = 0;              // chosen i: O[0:i] reserved, O[i:] outliers (0 if no candidates)
  double score = 0;               // M at the chosen split (0 if no candidates)
  double kept_max = 0;            // the largest value that is NOT an outlier (the paper's Max(O*))
  std::vector<int64_t> outliers;  // indices into the input of the outliers, ascending

  int64_t count() const { return static_cast<int64_t>(outliers.size()); }
};

namespace detail {
inline void check_cfp_options(const CfpOptions& o, std::string_view what) {
  CBQ_CHECK(
      std::isfinite(o.lambda1) && o.lambda1 >= 0 && std::isfinite(o.lambda2) && o.lambda2 >= 0,
      "cfp({}): λ1 = {} and λ2 = {} must be finite and non-negative", what, o.lambda1, o.lambda2);
}

// The fine stage on the ascending candidates `cand` (not empty) with base_max the largest
// non-candidate: sets r.split, r.score and r.kept_max.
inline void fine_split(OutlierSet& r, const std::vector<double>& cand, double base_max,
                       const CfpOptions& opt) {
  // Fine stage: prefix sums of the candidates shifted by O[0] (less cancellation in the
  // variance) give Var(O[0:i]) in O(1) per split.
  const int64_t N = r.candidates;
  const double shift = cand[0];
  double s1 = 0, s2 = 0;  // sums over O[0:i] of (o − shift) and (o − shift)²
  double best = -std::numeric_limits<double>::infinity();
  int64_t best_i = 0;
  for (int64_t i = 0; i < N; ++i) {
    const double kept = i == 0 ? base_max : cand[static_cast<std::size_t>(i - 1)];
    const double gap = cand[static_cast<std::size_t>(i)] - kept;
    double var = 0;
    if (i > 1) {
      const double mean = s1 / static_cast<double>(i);
      var = std::max(0.0, s2 / static_cast<double>(i) - mean * mean);
    }
    const double m = gap * gap - opt.lambda2 * var;
    if (m > best) {
      best = m;
      best_i = i;
    }
    const double y = cand[static_cast<std::size_t>(i)] - shift;
    s1 += y;
    s2 += y * y;
  }
  r.split = best_i;
  r.score = best;
  r.kept_max = best_i == 0 ? base_max : cand[static_cast<std::size_t>(best_i - 1)];
}

// The input check of the detector for value v at index j.
inline void check_cfp_value(double v, int64_t j, std::string_view what) {
  CBQ_CHECK(std::isfinite(v), "cfp({}): value {} at index {} is not finite", what, v, j);
  CBQ_CHECK(v >= 0, "cfp({}): value {} at index {} is negative; the detector takes magnitudes",
            what, v, j);
}
}  // namespace detail

// Runs the coarse-to-fine detector on non-negative finite values. `what` names the tensor in
// error messages. Throws cbq::Error on an empty input, a negative value or a NaN/inf.
template <class T>
OutlierSet detect_outliers(std::span<const T> x, std::string_view what = "values",
                           const CfpOptions& opt = {}) {
  detail::check_cfp_options(opt, what);
  const int64_t n = static_cast<int64_t>(x.size());
  CBQ_CHECK(n > 0, "cfp({}): outlier detection needs at least one value, got an empty set", what);
  for (int64_t j = 0; j < n; ++j)
    detail::check_cfp_value(static_cast<double>(x[static_cast<std::size_t>(j)]), j, what);
  OutlierSet r;
  r.n = n;

  // Coarse stage. Selection instead of a full sort: x[k] of the sorted order is what
  // nth_element puts at k, in O(n).
  std::vector<T> v(x.begin(), x.end());
  const int64_t i1 = n / 4, i3 = (3 * n) / 4;
  std::nth_element(v.begin(), v.begin() + i3, v.end());
  const double q3 = static_cast<double>(v[static_cast<std::size_t>(i3)]);
  std::nth_element(v.begin(), v.begin() + i1, v.begin() + i3 + 1);
  const double q1 = static_cast<double>(v[static_cast<std::size_t>(i1)]);
  r.q1 = q1;
  r.q3 = q3;
  r.threshold = q3 + opt.lambda1 * (q3 - q1);

  // Candidates (> T) and the largest non-candidate (≤ T; exists since Q3 ≤ T).
  std::vector<double> cand;
  double base_max = -1;
  for (int64_t j = 0; j < n; ++j) {
    const double val = static_cast<double>(x[static_cast<std::size_t>(j)]);
    if (val > r.threshold)
      cand.push_back(val);
    else
      base_max = std::max(base_max, val);
  }
  r.candidates = static_cast<int64_t>(cand.size());
  if (cand.empty()) {
    r.kept_max = base_max;
    return r;
  }
  std::sort(cand.begin(), cand.end());
  detail::fine_split(r, cand, base_max, opt);
  // A split between equal values has gap 0 and M ≤ 0 < M(0), so it is never chosen: the
  // outliers are exactly the values above kept_max.
  for (int64_t j = 0; j < n; ++j)
    if (static_cast<double>(x[static_cast<std::size_t>(j)]) > r.kept_max) r.outliers.push_back(j);
  return r;
}

template <class T>
OutlierSet detect_outliers(const std::vector<T>& x, std::string_view what = "values",
                           const CfpOptions& opt = {}) {
  return detect_outliers(std::span<const T>(x.data(), x.size()), what, opt);
}

// The detector on every element of a contiguous tensor (in storage order), on its device.
template <class T>
OutlierSet detect_outliers(const Tensor<T>& x, std::string_view what = "values",
                           const CfpOptions& opt = {}) {
  CBQ_CHECK(x.is_contiguous(), "cfp({}): the values (shape {}) must be contiguous", what,
            x.shape());
  if (x.is_cpu()) return detect_outliers(std::span<const T>(x.data(), x.numel()), what, opt);
  detail::check_cfp_options(opt, what);
  const int64_t n = x.numel();
  CBQ_CHECK(n > 0, "cfp({}): outlier detection needs at least one value, got an empty set", what);
  require_cuda("cfp");
  using Hooks = CudaCfp<T>;
  const std::string op = fmt::format("cfp({})", what);
  cuda_kernel(Hooks::first_invalid, op);
  cuda_kernel(Hooks::order_statistics, op);
  cuda_kernel(Hooks::count_at_most, op);
  cuda_kernel(Hooks::select_greater, op);
  if (const int64_t bad = Hooks::first_invalid(x.data(), n); bad >= 0) {
    T value{};
    copy_bytes(&value, Device::cpu, x.data() + bad, Device::cuda, sizeof(T));
    detail::check_cfp_value(static_cast<double>(value), bad, what);  // throws
  }

  OutlierSet r;
  r.n = n;
  T q1{}, q3{};
  Hooks::order_statistics(x.data(), n, n / 4, (3 * n) / 4, &q1, &q3);
  r.q1 = static_cast<double>(q1);
  r.q3 = static_cast<double>(q3);
  r.threshold = r.q3 + opt.lambda1 * (r.q3 - r.q1);
  // At least one value (Q3 ≤ T) is kept.
  T base_max{};
  const int64_t kept = Hooks::count_at_most(x.data(), n, r.threshold, &base_max);
  r.candidates = n - kept;
  if (r.candidates == 0) {
    r.kept_max = static_cast<double>(base_max);
    return r;
  }
  // The candidates come back unordered; sorted on the host, as the CPU path sorts them.
  Tensor<T> cand_device = Tensor<T>::empty(Shape{r.candidates}, Device::cuda);
  const int64_t found =
      Hooks::select_greater(cand_device.data(), nullptr, r.candidates, x.data(), n, r.threshold);
  CBQ_CHECK(found == r.candidates, "cfp({}): {} candidates counted but {} selected", what,
            r.candidates, found);
  const std::vector<T> cand_t = cand_device.to_vector();
  std::vector<double> cand(cand_t.begin(), cand_t.end());
  std::sort(cand.begin(), cand.end());
  detail::fine_split(r, cand, static_cast<double>(base_max), opt);
  // The outliers (> kept_max ≥ base_max) are among the candidates.
  Tensor<int64_t> index = Tensor<int64_t>::empty(Shape{r.candidates}, Device::cuda);
  const int64_t count =
      Hooks::select_greater(nullptr, index.data(), r.candidates, x.data(), n, r.kept_max);
  CBQ_CHECK(count <= r.candidates, "cfp({}): {} outliers among {} candidates", what, count,
            r.candidates);
  r.outliers.resize(static_cast<std::size_t>(count));
  copy_bytes(r.outliers.data(), Device::cpu, index.data(), Device::cuda,
             sizeof(int64_t) * r.outliers.size());
  std::sort(r.outliers.begin(), r.outliers.end());
  return r;
}

// Weight-outlier truncation of one layer: runs the detector on |W| and clamps every outlier
// weight to ±kept_max (its sign kept), in place. Returns the number of clamped weights; the
// detection is written to `*detection` when given. `layer` names the weight in errors.
template <class T>
int64_t truncate_weight_outliers(Tensor<T>& w, std::string_view layer = "weight",
                                 const CfpOptions& opt = {}, OutlierSet* detection = nullptr) {
  static_assert(std::is_floating_point_v<T>, "truncate_weight_outliers needs a floating weight");
  CBQ_CHECK(w.is_contiguous(), "cfp({}): weight truncation needs a contiguous tensor, got shape {}",
            layer, w.shape());
  if (w.device() == Device::cuda) {
    require_cuda("cfp");
    cuda_kernel(CudaCfp<T>::abs, fmt::format("cfp({})", layer));
    cuda_kernel(CudaCfp<T>::clamp_greater, fmt::format("cfp({})", layer));
    Tensor<T> mag = Tensor<T>::empty(w.shape(), Device::cuda);
    CudaCfp<T>::abs(mag.data(), w.data(), w.numel());
    OutlierSet d = detect_outliers(mag, layer, opt);
    // The same elements as the CPU's d.outliers: |w| > kept_max, clamped to ±kept_max.
    CudaCfp<T>::clamp_greater(w.data(), w.numel(), d.kept_max, static_cast<T>(d.kept_max));
    const int64_t clamped = d.count();
    if (detection) *detection = std::move(d);
    return clamped;
  }
  std::vector<T> mag(static_cast<std::size_t>(w.numel()));
  for (int64_t k = 0; k < w.numel(); ++k) mag[static_cast<std::size_t>(k)] = std::abs(w[k]);
  OutlierSet d = detect_outliers(std::span<const T>(mag), layer, opt);
  const T limit = static_cast<T>(d.kept_max);  // exact: kept_max is one of the |w|
  for (int64_t k : d.outliers) w[k] = std::copysign(limit, w[k]);
  const int64_t clamped = d.count();
  if (detection) *detection = std::move(d);
  return clamped;
}

// Activation-outlier channel scaling factors from per-channel maxima m_j = max_t |X_tj|:
// s_j = sqrt(m_j / m*) for the outlier channels, m* = the largest non-outlier maximum; s_j = 1
// otherwise. Dividing channel j of the activation by s_j (and multiplying column j of the
// consuming weights by s_j) brings an outlier channel's maximum to sqrt(m_j·m*) ≤ m_j.
template <class T>
std::vector<T> activation_outlier_scales(std::span<const T> channel_max,
                                         std::string_view what = "activation",
                                         const CfpOptions& opt = {},
                                         OutlierSet* detection = nullptr) {
  OutlierSet d = detect_outliers(channel_max, what, opt);
  std::vector<T> s(channel_max.size(), T(1));
  if (d.count() > 0) {
    CBQ_CHECK(d.kept_max > 0,
              "cfp({}): {} outlier channels but every kept channel maximum is 0 (Q1 = Q3 = 0 "
              "over {} channels); no finite scaling factor exists",
              what, d.count(), d.n);
    for (int64_t j : d.outliers)
      s[static_cast<std::size_t>(j)] = static_cast<T>(
          std::sqrt(static_cast<double>(channel_max[static_cast<std::size_t>(j)]) / d.kept_max));
  }
  if (detection) *detection = std::move(d);
  return s;
}

template <class T>
std::vector<T> activation_outlier_scales(const std::vector<T>& channel_max,
                                         std::string_view what = "activation",
                                         const CfpOptions& opt = {},
                                         OutlierSet* detection = nullptr) {
  return activation_outlier_scales(std::span<const T>(channel_max.data(), channel_max.size()), what,
                                   opt, detection);
}

// Accumulates m_j = max_t |X_tj| of one linear layer's input over calibration batches. Each batch
// is a tensor (..., d): every leading index is a token row.
template <class T = float>
class ChannelMaxObserver {
 public:
  explicit ChannelMaxObserver(int64_t channels, std::string name = "activation")
      : name_(std::move(name)), max_(static_cast<std::size_t>(channels), T(0)) {
    CBQ_CHECK(channels > 0, "ChannelMaxObserver({}): needs at least one channel, got {}", name_,
              channels);
  }

  void observe(const Tensor<T>& x) {
    CBQ_CHECK(x.ndim() >= 1 && x.shape().cols() == channels(),
              "ChannelMaxObserver({}): batch {} has shape {}, expected (..., {})", name_, batches_,
              x.shape(), channels());
    if (x.device() == Device::cuda) {
      observe_cuda(x);
      return;
    }
    const Tensor<T> c = x.contiguous();
    const int64_t rows = c.shape().rows(), d = channels();
    // Check the whole batch before updating, so a bad batch leaves the maxima untouched.
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t j = 0; j < d; ++j)
        CBQ_CHECK(std::isfinite(c[t * d + j]),
                  "ChannelMaxObserver({}): non-finite value {} at row {} channel {} of batch {}",
                  name_, static_cast<double>(c[t * d + j]), t, j, batches_);
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t j = 0; j < d; ++j) {
        T& m = max_[static_cast<std::size_t>(j)];
        m = std::max(m, std::abs(c[t * d + j]));
      }
    rows_ += rows;
    ++batches_;
  }

  int64_t channels() const { return static_cast<int64_t>(max_.size()); }
  int64_t rows() const { return rows_; }
  int64_t batches() const { return batches_; }
  const std::string& name() const { return name_; }
  const std::vector<T>& maxima() const { return max_; }

  std::vector<T> scales(const CfpOptions& opt = {}, OutlierSet* detection = nullptr) const {
    CBQ_CHECK(rows_ > 0, "ChannelMaxObserver({}): no calibration rows observed", name_);
    return activation_outlier_scales(std::span<const T>(max_), name_, opt, detection);
  }

  void reset() {
    std::fill(max_.begin(), max_.end(), T(0));
    rows_ = batches_ = 0;
  }

 private:
  // The batch's maxima on the GPU, merged on the host (max is exact: same result as the CPU).
  void observe_cuda(const Tensor<T>& x) {
    require_cuda("ChannelMaxObserver");
    cuda_kernel(CudaCfp<T>::column_abs_max, fmt::format("ChannelMaxObserver({})", name_));
    CBQ_CHECK(x.is_contiguous(), "ChannelMaxObserver({}): batch {} of shape {} is not contiguous",
              name_, batches_, x.shape());
    const int64_t rows = x.shape().rows(), d = channels();
    Tensor<T> batch_max = Tensor<T>::empty(Shape{d}, Device::cuda);
    const int64_t bad = CudaCfp<T>::column_abs_max(batch_max.data(), x.data(), rows, d);
    if (bad >= 0) {
      T value{};
      copy_bytes(&value, Device::cpu, x.data() + bad, Device::cuda, sizeof(T));
      fail("ChannelMaxObserver({}): non-finite value {} at row {} channel {} of batch {}", name_,
           static_cast<double>(value), bad / d, bad % d, batches_);
    }
    const std::vector<T> m = batch_max.to_vector();
    for (int64_t j = 0; j < d; ++j) {
      T& acc = max_[static_cast<std::size_t>(j)];
      acc = std::max(acc, m[static_cast<std::size_t>(j)]);
    }
    rows_ += rows;
    ++batches_;
  }

  std::string name_;
  std::vector<T> max_;
  int64_t rows_ = 0, batches_ = 0;
};

}  // namespace cbq::quant
