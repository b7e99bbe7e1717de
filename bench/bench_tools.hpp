#pragma once
// Helpers shared by the benchmark programs: the token ids that llama-tokenize wrote, the process's
// peak resident memory, seeded random inputs, and one timed causal attention call.
#include <sys/resource.h>

#include <cbq/cbq.hpp>
#include <cbq/core/error.hpp>
#include <charconv>
#include <cstdint>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace cbq::bench {

// Token ids as llama-tokenize --ids prints them ("[1, 2, 3]") or whitespace-separated; anything
// that is not a decimal int32 is a cbq::Error naming the file and the word.
inline std::vector<int32_t> read_token_ids(const std::string& path) {
  std::ifstream in(path);
  if (!in) cbq::fail("{}: cannot open the ids file", path);
  std::string s((std::istreambuf_iterator<char>(in)), {});
  for (char& c : s)
    if (c == '[' || c == ']' || c == ',') c = ' ';
  std::istringstream is(s);
  std::vector<int32_t> ids;
  std::string word;
  while (is >> word) {
    int32_t id = 0;
    auto [end, ec] = std::from_chars(word.data(), word.data() + word.size(), id);
    if (ec != std::errc() || end != word.data() + word.size())
      cbq::fail("{}: \"{}\" (word {}) is not a token id", path, word, ids.size() + 1);
    ids.push_back(id);
  }
  return ids;
}

// Peak resident set size of this process in MiB.
inline double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

// A tensor of standard normal values from `seed`.
inline Tensor<float> random_normal(const Shape& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  Tensor<float> t = Tensor<float>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = normal(rng);
  return t;
}

// One causal attention on a cleared tape: its output, and with `backward` the gradients of q, k and
// v seeded by `seed` (BM_AttentionShapes in bench_ops, attention_rows).
struct AttentionCall {
  Var<float> q, k, v, o;
};
inline AttentionCall attention_call(Tape<float>& tape, const Tensor<float>& q,
                                    const Tensor<float>& k, const Tensor<float>& v,
                                    const Tensor<float>& seed, int64_t hq, int64_t hkv, int64_t hd,
                                    bool backward) {
  tape.clear();
  AttentionCall c{tape.input(q, backward), tape.input(k, backward), tape.input(v, backward), {}};
  c.o = ops::attention(c.q, c.k, c.v, hq, hkv, hd, true);
  if (backward) {
    c.o.grad().copy_from(seed);
    tape.backward_from_seeded();
  }
  return c;
}

}  // namespace cbq::bench
