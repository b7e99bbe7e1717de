#pragma once
// CPU vector kernels: a small SIMD vocabulary, kernels compiled once per ISA, runtime dispatch.
//
// cbq is header-only, so its loops are compiled with the user's flags, typically plain x86-64
// (SSE2, no FMA), where the compiler cannot vectorize exp, log or floor and every hot
// elementwise loop that needs them runs scalar (glibc's expf is ~4 ns a call: a million calls
// per training step). Three pieces fix that without asking the user for -march flags:
//
//   Pack<float, N>   N floats in GCC vector extensions, with the operations kernels need.
//                    Kernels are written with them explicitly, so nothing depends on the
//                    auto-vectorizer (which, under the default -ftrapping-math, gives up on loops
//                    with clamps and selects).
//   simd_kernels.inc includes a kernel file three times, in namespaces simd_generic (the
//                    build's own ISA, 4 lanes), simd_avx2 (AVX2+FMA, 8 lanes) and simd_avx512
//                    (AVX-512, 16 lanes), the last two under #pragma GCC target, so each copy is
//                    compiled, optimized and inlined for its ISA from the start. (A generic
//                    lambda inlined into a function with the target attribute is not enough: GCC
//                    optimizes the lambda for the default ISA first, and for instance combines
//                    two comparisons into a mask operation that it then expands lane by lane.)
//   cpu_isa()        the best ISA of this CPU (x86-64 with GCC; generic elsewhere), capped by the
//                    environment variable CBQ_SIMD (generic, avx2, avx512) to test every path on
//                    one machine. Callers switch on it (see quant/lora_rounding.hpp).
//
// exp / log are Cephes' branch-free polynomial forms, below 1 ulp of the correctly rounded
// result over their range (measured against double). Results can differ between ISAs by float
// rounding (FMA contraction, lane order of sums); on one machine they are deterministic.
// Pack<double, N> is one scalar lane with the C library's functions (exact, for gradient checks
// in double; callers run it in simd_generic); so is every type without GCC vector extensions
// (compilers other than GCC).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

// GCC (also as nvcc's host compiler: the tools that nvcc builds run the same CPU kernels);
// other compilers get the scalar types.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER)
#define CBQ_VECTOR_EXTENSIONS 1
#if defined(__x86_64__)
#define CBQ_X86_DISPATCH 1
#endif
#endif

#if defined(__GNUC__)
#define CBQ_ALWAYS_INLINE __attribute__((always_inline))
#else
#define CBQ_ALWAYS_INLINE
#endif

#ifdef CBQ_VECTOR_EXTENSIONS
// GCC warns (-Wpsabi) that a function returning a 32- or 64-byte vector changes the calling
// convention without AVX. Every such function here is always inlined into code of the right
// ISA, so no call ever returns one. The warning is raised where templates are instantiated, at
// the end of the including translation unit, so it stays off from here on (it concerns only
// such vector returns). Vector arguments are passed by reference for the same reason.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace cbq::simd {

enum class Isa { generic, avx2, avx512 };

// The best ISA of this CPU, capped by CBQ_SIMD.
inline Isa cpu_isa() {
#ifdef CBQ_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::generic;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = Isa::avx512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = Isa::avx2;
    if (const char* cap = std::getenv("CBQ_SIMD")) {
      const std::string_view c(cap);
      const Isa limit = c == "generic" ? Isa::generic : c == "avx2" ? Isa::avx2 : Isa::avx512;
      if (static_cast<int>(limit) < static_cast<int>(best)) best = limit;
    }
    return best;
  }();
  return isa;
#else
  return Isa::generic;
#endif
}

#ifdef CBQ_VECTOR_EXTENSIONS
inline constexpr int kGenericLanes = 4;
#else
inline constexpr int kGenericLanes = 1;
#endif

// The ISA a kernel for scalar type T runs with: double always runs the generic (scalar) copy, so
// that gradient checks in double do not depend on the machine.
template <class T>
Isa isa_for() {
  return std::is_same_v<T, float> ? cpu_isa() : Isa::generic;
}

// Runs simd_<isa>::<call> for the ISA `isa`, in the caller's namespace (where simd_kernels.inc
// placed the kernels): CBQ_SIMD_DISPATCH(simd::isa_for<T>(), my_kernel<T>(a, b));
#ifdef CBQ_X86_DISPATCH
#define CBQ_SIMD_DISPATCH(isa, ...) \
  switch (isa) {                    \
    case ::cbq::simd::Isa::avx512:  \
      simd_avx512::__VA_ARGS__;     \
      break;                        \
    case ::cbq::simd::Isa::avx2:    \
      simd_avx2::__VA_ARGS__;       \
      break;                        \
    default:                        \
      simd_generic::__VA_ARGS__;    \
      break;                        \
  }
// The same for a call whose value is returned: CBQ_SIMD_RETURN(simd::isa_for<T>(), f<T>(x));
#define CBQ_SIMD_RETURN(isa, ...)       \
  switch (isa) {                        \
    case ::cbq::simd::Isa::avx512:      \
      return simd_avx512::__VA_ARGS__;  \
    case ::cbq::simd::Isa::avx2:        \
      return simd_avx2::__VA_ARGS__;    \
    default:                            \
      return simd_generic::__VA_ARGS__; \
  }
#else
#define CBQ_SIMD_RETURN(isa, ...)     \
  do {                                \
    (void)(isa);                      \
    return simd_generic::__VA_ARGS__; \
  } while (false)
#define CBQ_SIMD_DISPATCH(isa, ...) \
  do {                              \
    (void)(isa);                    \
    simd_generic::__VA_ARGS__;      \
  } while (false)
#endif

// ---- Pack<T, N>: N lanes of T ----
template <class T, int N>
struct Pack;

#ifdef CBQ_VECTOR_EXTENSIONS
// The vector types of each width, with their conversions (GCC rejects __builtin_convertvector on
// types that depend on a template parameter, so these are spelled out per width).
#define CBQ_SIMD_WIDTH(n)                                    \
  typedef float vf##n __attribute__((vector_size(4 * n)));   \
  typedef int32_t vi##n __attribute__((vector_size(4 * n))); \
  CBQ_ALWAYS_INLINE inline vi##n to_int(const vf##n& x) {    \
    return __builtin_convertvector(x, vi##n);                \
  }                                                          \
  CBQ_ALWAYS_INLINE inline vf##n to_float(const vi##n& x) {  \
    return __builtin_convertvector(x, vf##n);                \
  }                                                          \
  template <>                                                \
  struct VectorTypes<n> {                                    \
    using F = vf##n;                                         \
    using I = vi##n;                                         \
  };
template <int N>
struct VectorTypes;
CBQ_SIMD_WIDTH(4)
CBQ_SIMD_WIDTH(8)
CBQ_SIMD_WIDTH(16)
#undef CBQ_SIMD_WIDTH

// Sum of the lanes by pairwise halving (lane i + lane i + N/2, …): the same order at every width.
CBQ_ALWAYS_INLINE inline float reduce_add(const vf4& v) {
  const vf4 t = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
  return t[0] + t[1];
}
CBQ_ALWAYS_INLINE inline float reduce_add(const vf8& v) {
  return reduce_add(
      vf4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7)));
}
CBQ_ALWAYS_INLINE inline float reduce_add(const vf16& v) {
  return reduce_add(vf8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                        __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)));
}

// Largest lane by pairwise halving (lanes are ordered; no NaN).
CBQ_ALWAYS_INLINE inline float reduce_max(const vf4& v) {
  const vf4 t = __builtin_shufflevector(v, v, 2, 3, 0, 1);
  const vf4 m = v < t ? t : v;
  return m[0] < m[1] ? m[1] : m[0];
}
CBQ_ALWAYS_INLINE inline float reduce_max(const vf8& v) {
  const vf4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3),
            b = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return reduce_max(vf4(a < b ? b : a));
}
CBQ_ALWAYS_INLINE inline float reduce_max(const vf16& v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
            b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return reduce_max(vf8(a < b ? b : a));
}

template <int N>
struct Pack<float, N> {
  using V = typename VectorTypes<N>::F;
  using M = typename VectorTypes<N>::I;  // masks: −1 / 0 per lane
  using scalar = float;
  static constexpr int lanes = N;

  CBQ_ALWAYS_INLINE static V splat(float x) { return V{} + x; }
  CBQ_ALWAYS_INLINE static M splat_int(int32_t x) { return M{} + x; }
  // Loads / stores of `count` lanes (count < N: the other lanes are `fill`).
  CBQ_ALWAYS_INLINE static V load(const float* p, int count = N, float fill = 0.0f) {
    V v;
    if (count == N) {
      std::memcpy(&v, p, sizeof(V));
    } else {
      float t[N];
      for (int i = 0; i < N; ++i) t[i] = i < count ? p[i] : fill;
      std::memcpy(&v, t, sizeof(V));
    }
    return v;
  }
  CBQ_ALWAYS_INLINE static void store(float* p, const V& v, int count = N) {
    if (count == N) {
      std::memcpy(p, &v, sizeof(V));
    } else {
      float t[N];
      std::memcpy(t, &v, sizeof(V));
      for (int i = 0; i < count; ++i) p[i] = t[i];
    }
  }
  // Integral lanes in [0, 255] as bytes (codes).
  CBQ_ALWAYS_INLINE static void store_u8(uint8_t* p, const V& v, int count = N) {
    float t[N];
    std::memcpy(t, &v, sizeof(V));
    for (int i = 0; i < count; ++i) p[i] = static_cast<uint8_t>(t[i]);
  }
  // Sum of the lanes in a fixed order (pairwise halving).
  CBQ_ALWAYS_INLINE static float sum(const V& v) { return reduce_add(v); }
  // The largest lane (no NaN among them).
  CBQ_ALWAYS_INLINE static float max(const V& v) { return reduce_max(v); }
  // v with lanes `count` and above set to `fill` (a compare against the lane index, no memory).
  CBQ_ALWAYS_INLINE static V first_lanes(const V& v, int64_t count, float fill = 0.0f) {
    V index;
    for (int i = 0; i < N; ++i) index[i] = static_cast<float>(i);
    return index < splat(static_cast<float>(count)) ? v : splat(fill);
  }
  CBQ_ALWAYS_INLINE static M lt(const V& a, const V& b) { return a < b; }
  CBQ_ALWAYS_INLINE static M le(const V& a, const V& b) { return a <= b; }
  CBQ_ALWAYS_INLINE static M eq(const V& a, const V& b) { return a == b; }
  CBQ_ALWAYS_INLINE static M all(bool b) { return splat_int(b ? -1 : 0); }
  CBQ_ALWAYS_INLINE static V select(const M& m, const V& a, const V& b) { return m ? a : b; }
  CBQ_ALWAYS_INLINE static V abs(const V& x) {
    return reinterpret_cast<V>(reinterpret_cast<M>(x) & splat_int(0x7fffffff));
  }
  // clamp(x, lo, hi) with std::clamp's semantics (NaN stays NaN).
  CBQ_ALWAYS_INLINE static V clamp(const V& x, const V& lo, const V& hi) {
    return x < lo ? lo : (hi < x ? hi : x);
  }
  // floor(x), exact for every float (NaN and infinities pass through).
  CBQ_ALWAYS_INLINE static V floor(const V& x) {
    const M small = abs(x) < splat(8388608.0f);  // 2^23: larger floats are integers
    const V xs = small ? x : splat(0.0f);
    const V t = to_float(to_int(xs));  // toward zero
    const V f = xs < t ? t - splat(1.0f) : t;
    return small ? f : x;
  }
  // e^x, x clamped to [−87, 88] (e^−87 ≈ 1.6e−38 stands in for the denormal range).
  // n = round(x·log2 e) by adding 1.5·2^23 (the sum's low mantissa bits are n), two operations
  // where a conversion floor takes four; each bound a max / min (NaN passes through).
  CBQ_ALWAYS_INLINE static V exp(const V& x_in) {
    V x = x_in < splat(-87.0f) ? splat(-87.0f) : x_in;
    x = splat(88.0f) < x ? splat(88.0f) : x;
    const V shifter = splat(12582912.0f);
    const V t = x * splat(1.44269504088896341f) + shifter;
    const V n = t - shifter;
    V r = x - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    V p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * (r * r) + r + splat(1.0f);
    const M bits = (reinterpret_cast<M>(t) - reinterpret_cast<M>(shifter) + splat_int(127)) << 23;
    return p * reinterpret_cast<V>(bits);
  }
  // log x for normal positive x (callers handle 0, denormals, infinities and NaN).
  CBQ_ALWAYS_INLINE static V log(const V& x) {
    const M bits = reinterpret_cast<M>(x);
    M e = (bits >> 23) - splat_int(126);  // x = m · 2^e with m in [0.5, 1)
    V m = reinterpret_cast<V>((bits & splat_int(0x007fffff)) | splat_int(0x3f000000));
    const M small = m < splat(0.707106781186547524f);  // m in [sqrt(1/2), sqrt(2)) around 1
    e = small ? e - splat_int(1) : e;
    m = small ? m + m - splat(1.0f) : m - splat(1.0f);
    const V z = m * m;
    V p = splat(7.0376836292e-2f);
    p = p * m - splat(1.1514610310e-1f);
    p = p * m + splat(1.1676998740e-1f);
    p = p * m - splat(1.2420140846e-1f);
    p = p * m + splat(1.4249322787e-1f);
    p = p * m - splat(1.6668057665e-1f);
    p = p * m + splat(2.0000714765e-1f);
    p = p * m - splat(2.4999993993e-1f);
    p = p * m + splat(3.3333331174e-1f);
    V y = p * m * z;
    const V fe = to_float(e);
    y = y + fe * splat(-2.12194440e-4f);
    y = y - splat(0.5f) * z;
    return m + y + fe * splat(0.693359375f);
  }
};
#endif

// One scalar lane: double always, float without vector extensions.
template <class T>
struct ScalarPack {
  using V = T;
  using M = bool;
  using scalar = T;
  static constexpr int lanes = 1;
  static V splat(T x) { return x; }
  static V load(const T* p, int = 1, T = T(0)) { return *p; }
  static void store(T* p, V v, int = 1) { *p = v; }
  static void store_u8(uint8_t* p, V v, int = 1) { *p = static_cast<uint8_t>(v); }
  static T sum(V v) { return v; }
  static T max(V v) { return v; }
  static V first_lanes(V v, int64_t count, T fill = T(0)) { return count > 0 ? v : fill; }
  static M lt(V a, V b) { return a < b; }
  static M le(V a, V b) { return a <= b; }
  static M eq(V a, V b) { return a == b; }
  static M all(bool b) { return b; }
  static V select(M m, V a, V b) { return m ? a : b; }
  static V abs(V x) { return std::fabs(x); }
  static V clamp(V x, V lo, V hi) { return x < lo ? lo : (hi < x ? hi : x); }
  static V floor(V x) { return std::floor(x); }
  static V exp(V x) { return std::exp(x); }
  static V log(V x) { return std::log(x); }
};

template <int N>
struct Pack<double, N> : ScalarPack<double> {};

// ---- DPack<D>: D doubles, with float and double loads / stores (for double-precision sums) ----
#ifdef CBQ_VECTOR_EXTENSIONS
#define CBQ_SIMD_DWIDTH(n)                                   \
  typedef double vd##n __attribute__((vector_size(8 * n)));  \
  typedef int64_t vl##n __attribute__((vector_size(8 * n))); \
  typedef float vh##n __attribute__((vector_size(4 * n)));   \
  CBQ_ALWAYS_INLINE inline vd##n to_double(const vh##n& x) { \
    return __builtin_convertvector(x, vd##n);                \
  }                                                          \
  CBQ_ALWAYS_INLINE inline vh##n to_single(const vd##n& x) { \
    return __builtin_convertvector(x, vh##n);                \
  }                                                          \
  template <>                                                \
  struct DoubleTypes<n> {                                    \
    using D = vd##n;                                         \
    using L = vl##n;                                         \
    using H = vh##n;                                         \
  };
template <int N>
struct DoubleTypes;
CBQ_SIMD_DWIDTH(2)
CBQ_SIMD_DWIDTH(4)
CBQ_SIMD_DWIDTH(8)
#undef CBQ_SIMD_DWIDTH

template <int N>
struct DPack {
  using V = typename DoubleTypes<N>::D;
  using L = typename DoubleTypes<N>::L;  // masks and integers
  using H = typename DoubleTypes<N>::H;  // the same lanes in float
  static constexpr int lanes = N;

  CBQ_ALWAYS_INLINE static V splat(double x) { return V{} + x; }
  CBQ_ALWAYS_INLINE static V load(const double* p, int count = N, double fill = 0.0) {
    V v;
    if (count == N) {
      std::memcpy(&v, p, sizeof(V));
    } else {
      double t[N];
      for (int i = 0; i < N; ++i) t[i] = i < count ? p[i] : fill;
      std::memcpy(&v, t, sizeof(V));
    }
    return v;
  }
  CBQ_ALWAYS_INLINE static V load(const float* p, int count = N, double fill = 0.0) {
    H h;
    if (count == N) {
      std::memcpy(&h, p, sizeof(H));
    } else {
      float t[N];
      for (int i = 0; i < N; ++i) t[i] = i < count ? p[i] : static_cast<float>(fill);
      std::memcpy(&h, t, sizeof(H));
    }
    return to_double(h);
  }
  // p[i] += T(v[i]) (the value rounded to T first, as static_cast<T>(double) does)
  CBQ_ALWAYS_INLINE static void add_to(double* p, const V& v, int count = N) {
    double t[N];
    std::memcpy(t, &v, sizeof(V));
    for (int i = 0; i < count; ++i) p[i] += t[i];
  }
  CBQ_ALWAYS_INLINE static void add_to(float* p, const V& v, int count = N) {
    const H h = to_single(v);
    if (count == N) {
      H d;
      std::memcpy(&d, p, sizeof(H));
      d = d + h;
      std::memcpy(p, &d, sizeof(H));
    } else {
      float t[N];
      std::memcpy(t, &h, sizeof(H));
      for (int i = 0; i < count; ++i) p[i] += t[i];
    }
  }
  CBQ_ALWAYS_INLINE static double sum(const V& v) {  // pairwise halving
    double t[N];
    std::memcpy(t, &v, sizeof(V));
    for (int w = N / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) t[i] += t[i + w];
    return t[0];
  }
  // e^x for x in [−708, 709] (clamped: e^−708 ≈ 3e−308 stands in for the denormal range):
  // x = n·ln2 + r with |r| ≤ ln2/2 (Cody–Waite), e^r by its Taylor series to r^13 (truncation
  // below 1e−17 relative), 2^n built in the exponent bits. Within 2 ulp of the exact value.
  CBQ_ALWAYS_INLINE static V exp(const V& x_in) {
    const V lo = splat(-708.0), hi = splat(709.0);
    const V x = x_in < lo ? lo : (hi < x_in ? hi : x_in);
    const V shifter = splat(6755399441055744.0);  // 1.5·2^52: adding it rounds to an integer
    const V t = x * splat(1.4426950408889634074) + shifter;
    const V n = t - shifter;
    const L ni = reinterpret_cast<L>(t) - reinterpret_cast<L>(shifter);
    V r = x - n * splat(6.93147180369123816490e-01);
    r = r - n * splat(1.90821492927058770002e-10);
    V p = splat(1.0 / 6227020800.0);  // 1/13!
    p = p * r + splat(1.0 / 479001600.0);
    p = p * r + splat(1.0 / 39916800.0);
    p = p * r + splat(1.0 / 3628800.0);
    p = p * r + splat(1.0 / 362880.0);
    p = p * r + splat(1.0 / 40320.0);
    p = p * r + splat(1.0 / 5040.0);
    p = p * r + splat(1.0 / 720.0);
    p = p * r + splat(1.0 / 120.0);
    p = p * r + splat(1.0 / 24.0);
    p = p * r + splat(1.0 / 6.0);
    p = p * r + splat(0.5);
    p = p * r + splat(1.0);
    p = p * r + splat(1.0);
    return p * reinterpret_cast<V>((ni + (L{} + 1023)) << 52);
  }
};
#else
template <int N>
struct DPack {
  using V = double;
  static constexpr int lanes = 1;
  static V splat(double x) { return x; }
  static V load(const double* p, int = 1, double = 0.0) { return *p; }
  static V load(const float* p, int = 1, double = 0.0) { return *p; }
  static void add_to(double* p, V v, int = 1) { *p += v; }
  static void add_to(float* p, V v, int = 1) { *p += static_cast<float>(v); }
  static double sum(V v) { return v; }
  static V exp(V x) { return std::exp(x); }
};
#endif

#ifndef CBQ_VECTOR_EXTENSIONS
template <int N>
struct Pack<float, N> : ScalarPack<float> {};
#endif

}  // namespace cbq::simd
