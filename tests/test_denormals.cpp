// FlushDenormals (core/denormals.hpp): every pool thread flushes subnormals while it is held and
// gets its previous mode back after; the pass's estimate and the pass compute under it.
#include <atomic>
#include <cbq/core/denormals.hpp>
#include <cbq/core/parallel.hpp>
#include <cstring>
#include <limits>

#include "doctest/doctest.h"

using namespace cbq;

namespace {
// A subnormal float times one, computed where the compiler cannot fold it.
float subnormal_product() {
  volatile float tiny = std::numeric_limits<float>::denorm_min() * 1000.0f;
  volatile float one = 1.0f;
  return tiny * one;
}

// How many of the pool's threads flush now (each chunk of a parallel_for reports its thread).
int threads_flushing() {
  std::atomic<int> flushing{0};
  parallel_for(num_threads(), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) flushing += FlushDenormals::on_this_thread() ? 1 : 0;
  });
  return flushing.load();
}
}  // namespace

TEST_CASE("FlushDenormals: every pool thread flushes while held and is restored after") {
#if CBQ_HAS_MXCSR
  const int before_threads = num_threads();
  set_pool_threads(2);
  REQUIRE_FALSE(FlushDenormals::on_this_thread());
  CHECK(subnormal_product() != 0.0f);  // subnormals are kept by default
  CHECK(threads_flushing() == 0);
  {
    const FlushDenormals flush;
    CHECK(flush.active());
    CHECK(FlushDenormals::on_this_thread());
    CHECK(threads_flushing() == num_threads());
    CHECK(subnormal_product() == 0.0f);
    {
      const FlushDenormals off(false);  // a guard that is off changes nothing
      CHECK_FALSE(off.active());
      CHECK(FlushDenormals::on_this_thread());
    }
  }
  CHECK_FALSE(FlushDenormals::on_this_thread());
  CHECK(threads_flushing() == 0);
  CHECK(subnormal_product() != 0.0f);
  set_pool_threads(before_threads);
#else
  const FlushDenormals flush;
  CHECK_FALSE(flush.active());
#endif
}
