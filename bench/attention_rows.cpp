// Causal attention on the row path (hd ≤ 16) at stories260K's shapes: T 512, 8 query / 4 kv heads.
// Prints the min, first quartile and median wall time of the forward and of forward + backward,
// and a hash of the output and all three gradients, so that two builds can be compared for speed
// and for bit-identical results at the same optimisation level (the default build: -O3)
// (docs/PERFORMANCE.md, "An AVX2 host").
//
//   attention_rows [HEAD_DIM=8] [CALLS=200] [THREADS=1]
//
// Alternate two builds several times and compare the minima: on a noisy 2-vCPU host the medians of
// Google Benchmark's BM_AttentionShapes (bench_ops) move more than the effects measured here.
#include <algorithm>
#include <cbq/cbq.hpp>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <vector>
#include "bench_tools.hpp"

namespace {

// FNV-1a over the float bits.
uint64_t hash_bits(std::initializer_list<const cbq::Tensor<float>*> tensors) {
  uint64_t h = 1469598103934665603ULL;
  for (const cbq::Tensor<float>* t : tensors)
    for (int64_t e = 0; e < t->numel(); ++e) {
      uint32_t bits;
      std::memcpy(&bits, t->data() + e, sizeof bits);
      h = (h ^ bits) * 1099511628211ULL;
    }
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace cbq;
  const int64_t T = 512, hq = 8, hkv = 4, hd = argc > 1 ? std::atoi(argv[1]) : 8;
  const int calls = std::max(1, argc > 2 ? std::atoi(argv[2]) : 200);
  set_num_threads(argc > 3 ? std::atoi(argv[3]) : 1);
  if (hd < 1 || hd > 16) {
    std::fprintf(stderr, "attention_rows: head dimension %lld is outside the row path's 1..16\n",
                 static_cast<long long>(hd));
    return 2;
  }
  ops::detail::attention_path = ops::detail::AttentionPath::rows;
  const Tensor<float> q = bench::random_normal({T, hq * hd}, 6),
                      k = bench::random_normal({T, hkv * hd}, 7),
                      v = bench::random_normal({T, hkv * hd}, 8),
                      seed = bench::random_normal({T, hq * hd}, 9);
  Tape<float> tape;
  for (const bool backward : {false, true}) {
    std::vector<double> ms;
    uint64_t hash = 0;
    for (int call = 0; call < calls; ++call) {
      const auto start = std::chrono::steady_clock::now();
      const auto c = bench::attention_call(tape, q, k, v, seed, hq, hkv, hd, backward);
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
      if (call == 0)
        hash = backward ? hash_bits({&c.o.value(), &c.q.grad(), &c.k.grad(), &c.v.grad()})
                        : hash_bits({&c.o.value()});
    }
    std::sort(ms.begin(), ms.end());
    std::printf(
        "hd %lld %-15s min %.3f  p25 %.3f  median %.3f ms  (%d calls, %d threads)  bits %016llx\n",
        static_cast<long long>(hd), backward ? "fwd+bwd" : "fwd", ms[0], ms[ms.size() / 4],
        ms[ms.size() / 2], calls, num_threads(), static_cast<unsigned long long>(hash));
  }
  return 0;
}
