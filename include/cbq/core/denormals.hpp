#pragma once
// Subnormal floats (|x| < 1.2e-38 in float, 2.2e-308 in double) cost x86 CPUs a microcode assist
// of about 100 cycles per operation that reads or makes one. The pass's backward makes them:
// the tails of softmax probabilities over a window's hidden states and of the rounding's sigmoid
// derivatives underflow there. On stories260K's default pass (2 threads) they made the optimiser
// steps 1.5–2.4× slower than the same steps on random inputs (docs/PERFORMANCE.md).
//
// FlushDenormals sets flush-to-zero (FTZ: a subnormal result becomes 0) and denormals-are-zero
// (DAZ: a subnormal input reads as 0) on every thread of cbq's pool, the caller's included, for
// its lifetime, and restores each thread's previous mode after. Threads the pool starts while it
// is held inherit the mode from the thread that starts them. A no-op where the CPU has no MXCSR
// (non-x86) or when constructed with false.
#include <vector>

#include "cbq/core/parallel.hpp"

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define CBQ_HAS_MXCSR 1
#else
#define CBQ_HAS_MXCSR 0
#endif

namespace cbq {

class FlushDenormals {
 public:
  explicit FlushDenormals(bool on = true) : on_(on && CBQ_HAS_MXCSR) {
#if CBQ_HAS_MXCSR
    if (!on_) return;
    saved_.assign(static_cast<std::size_t>(num_threads()), 0u);
    if (detail::in_parallel_region) {  // inside a pool job: the calling thread only
      saved_.assign(1, _mm_getcsr());
      _mm_setcsr(saved_[0] | kFtzDaz);
      return;
    }
    detail::pool().run([this](int t) {
      const unsigned mode = _mm_getcsr();
      if (static_cast<std::size_t>(t) < saved_.size()) saved_[static_cast<std::size_t>(t)] = mode;
      _mm_setcsr(mode | kFtzDaz);
    });
#endif
  }
  ~FlushDenormals() {
#if CBQ_HAS_MXCSR
    if (!on_) return;
    if (detail::in_parallel_region) {
      _mm_setcsr(saved_[0]);
      return;
    }
    detail::pool().run([this](int t) {
      const bool known = static_cast<std::size_t>(t) < saved_.size();
      _mm_setcsr(known ? saved_[static_cast<std::size_t>(t)] : (_mm_getcsr() & ~kFtzDaz));
    });
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

  bool active() const { return on_; }

  // Whether the calling thread flushes subnormals now.
  static bool on_this_thread() {
#if CBQ_HAS_MXCSR
    return (_mm_getcsr() & kFtzDaz) == kFtzDaz;
#else
    return false;
#endif
  }

 private:
  static constexpr unsigned kFtzDaz = 0x8040;  // MXCSR bits 15 (FTZ) and 6 (DAZ)
  bool on_;
  std::vector<unsigned> saved_;  // each pool thread's MXCSR before, by thread index
};

}  // namespace cbq
