#pragma once
// NaN-aware comparisons for the CUDA-vs-CPU tests. Plain C++ (no CUDA), so that the comparison
// itself is tested on machines without a GPU (tests/test_gpu_compare.cpp, label cpu).
//
// Why: a loop like `diff = std::max(diff, |x − r|)` drops a NaN (std::max(d, NaN) returns d),
// so a kernel that writes NaN would pass every `rel_error(...) <= tol`. Here any non-finite
// value on either side makes the error NaN, and `NaN <= tol` is false: the check fails.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace cbq::gpu_testing {

// max(a, b) that keeps a NaN from either side (std::max drops a NaN second argument).
inline double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::max(a, b);
}

// max_i |x_i − r_i| / max(max_i |r_i|, floor); NaN when any x_i or r_i is not finite, 0 when
// both are all zero (and floor is 0). `floor` > 0 compares at a known size instead of the
// reference's maximum (a reduced gradient that cancelled below its terms).
template <class A, class B>
double max_rel_error(const A* x, const B* r, int64_t n, double floor = 0) {
  double diff = 0, scale = floor;
  for (int64_t i = 0; i < n; ++i) {
    const double xi = static_cast<double>(x[i]), ri = static_cast<double>(r[i]);
    if (!std::isfinite(xi) || !std::isfinite(ri)) return std::numeric_limits<double>::quiet_NaN();
    diff = std::max(diff, std::abs(xi - ri));
    scale = std::max(scale, std::abs(ri));
  }
  return scale > 0 ? diff / scale : diff;
}

template <class A, class B>
double max_rel_error(const std::vector<A>& x, const std::vector<B>& r, double floor = 0) {
  if (x.size() != r.size()) return std::numeric_limits<double>::quiet_NaN();
  return max_rel_error(x.data(), r.data(), static_cast<int64_t>(r.size()), floor);
}

// ‖x − r‖₂ / ‖r‖₂ over all elements (the Frobenius norm for matrices); NaN when any value is not
// finite. A norm over millions of elements is a stable statistic of rounding errors, unlike the
// maximum, so it is what the derived tolerances at LLaMA-7B shapes bound.
template <class A, class B>
double norm_rel_error(const A* x, const B* r, int64_t n) {
  double diff2 = 0, ref2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double xi = static_cast<double>(x[i]), ri = static_cast<double>(r[i]);
    if (!std::isfinite(xi) || !std::isfinite(ri)) return std::numeric_limits<double>::quiet_NaN();
    diff2 += (xi - ri) * (xi - ri);
    ref2 += ri * ri;
  }
  return ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
}

template <class A, class B>
double norm_rel_error(const std::vector<A>& x, const std::vector<B>& r) {
  if (x.size() != r.size()) return std::numeric_limits<double>::quiet_NaN();
  return norm_rel_error(x.data(), r.data(), static_cast<int64_t>(r.size()));
}

// Number of elements with |x_i − r_i| > bound_i (or either side not finite): a componentwise
// check against per-element error bounds.
template <class A, class B>
int64_t count_outside(const A* x, const B* r, const double* bound, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double xi = static_cast<double>(x[i]), ri = static_cast<double>(r[i]);
    bad += !(std::abs(xi - ri) <= bound[i]);  // NaN compares false: counted
  }
  return bad;
}

// Rounds a float to TensorFloat-32 (10 explicit mantissa bits) or bfloat16 (7), to nearest with
// ties away from zero (cvt.rna.tf32.f32, the conversion the tensor-core attention uses) or toward
// zero (what hardware that ignores the low bits does); non-finite values pass through.
enum class Rounding { nearest_away, toward_zero };
inline float round_mantissa(float x, int mantissa_bits, Rounding mode) {
  if (!std::isfinite(x)) return x;
  uint32_t bits;
  static_assert(sizeof bits == sizeof x);
  __builtin_memcpy(&bits, &x, sizeof bits);
  const int drop = 23 - mantissa_bits;
  const uint32_t mask = (uint32_t{1} << drop) - 1;
  if (mode == Rounding::nearest_away) bits += uint32_t{1} << (drop - 1);  // carries into exponent
  bits &= ~mask;
  float y;
  __builtin_memcpy(&y, &bits, sizeof y);
  return y;
}
inline float round_tf32(float x, Rounding mode = Rounding::nearest_away) {
  return round_mantissa(x, 10, mode);
}
// bfloat16 with ties to even (__float2bfloat16_rn).
inline float round_bf16(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  float y;
  __builtin_memcpy(&y, &bits, sizeof y);
  return y;
}

}  // namespace cbq::gpu_testing
