#pragma once
// llama2.c's tokenizer.bin: int32 max_token_length, then for each of vocab_size tokens a float32
// merge score, an int32 byte length and the bytes. The file does not store the token count: it
// comes from the model (or is inferred by reading to the end of the file).
// encode() reproduces llama2.c's `encode` token for token (with a heap instead of its quadratic
// scan; same choice of merge at every step), decode_piece() its `decode`.
#include <cmath>
#include <cstdint>
#include <queue>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/mmap.hpp"
#include "cbq/tokenizer/tokenizer.hpp"

namespace cbq {

class Llama2cTokenizer : public Tokenizer {
 public:
  static constexpr int32_t kBos = 1, kEos = 2, kByteOffset = 3;

  // Reads `path`. `vocab_size` is the model's vocabulary size; the file must hold exactly that
  // many tokens. Pass vocab_size <= 0 to take every token in the file.
  explicit Llama2cTokenizer(const std::string& path, int64_t vocab_size = 0) : path_(path) {
    io::MappedFile file(path);
    io::ByteReader r(file.bytes(), path);
    max_token_length_ = r.read<int32_t>("max_token_length");
    CBQ_CHECK(max_token_length_ >= 0, "{}: max_token_length = {} is negative", path,
              max_token_length_);
    CBQ_CHECK(vocab_size <= INT32_MAX, "{}: vocab_size {} too large", path, vocab_size);
    const bool infer = vocab_size <= 0;
    for (int64_t i = 0; infer ? !r.at_end() : i < vocab_size; ++i) {
      if (r.at_end())
        fail("{}: tokenizer holds only {} tokens but the model's vocabulary has {}", path, i,
             vocab_size);
      read_token(r, i);
    }
    if (!r.at_end()) {
      const std::size_t left = r.remaining();
      int64_t extra = 0;
      try {
        while (!r.at_end()) {
          read_token(r, vocab_size + extra);
          ++extra;
        }
      } catch (const Error&) {
        fail("{}: {} trailing bytes after the {} tokens the model expects", path, left, vocab_size);
      }
      fail("{}: tokenizer holds {} tokens but the model's vocabulary has {}", path,
           vocab_size + extra, vocab_size);
    }
    CBQ_CHECK(!pieces_.empty(), "{}: tokenizer has no tokens", path);
    for (int32_t i = 0; i < static_cast<int32_t>(pieces_.size()); ++i)
      lookup_.emplace(pieces_[static_cast<std::size_t>(i)], i);  // first occurrence wins
  }

  // From pieces and merge scores already in memory (a GGUF vocabulary): `source` names them in
  // messages. Same checks as a file.
  Llama2cTokenizer(std::string source, std::vector<std::string> pieces, std::vector<float> scores,
                   int32_t max_token_length)
      : path_(std::move(source)),
        max_token_length_(max_token_length),
        pieces_(std::move(pieces)),
        scores_(std::move(scores)) {
    CBQ_CHECK(pieces_.size() == scores_.size(), "{}: {} tokens but {} merge scores", path_,
              pieces_.size(), scores_.size());
    CBQ_CHECK(!pieces_.empty(), "{}: tokenizer has no tokens", path_);
    for (std::size_t i = 0; i < scores_.size(); ++i)
      CBQ_CHECK(std::isfinite(scores_[i]), "{}: token {} has a non-finite merge score ({})", path_,
                i, scores_[i]);
    for (int32_t i = 0; i < static_cast<int32_t>(pieces_.size()); ++i)
      lookup_.emplace(pieces_[static_cast<std::size_t>(i)], i);  // first occurrence wins
  }

  using Tokenizer::encode;
  std::vector<int32_t> encode(std::string_view text, bool bos, bool eos) const override {
    // BOS takes part in the merges (as in llama2.c), so it must exist; so must EOS if asked for.
    for (auto [wanted, id, name] : {std::tuple{bos, kBos, "BOS"}, std::tuple{eos, kEos, "EOS"}})
      CBQ_CHECK(!wanted || id < vocab_size(),
                "{}: encode with {} needs token {} but the vocabulary has {} tokens", path_, name,
                id, vocab_size());
    std::vector<int32_t> tokens;
    tokens.reserve(text.size() + 3);
    if (bos) tokens.push_back(kBos);
    if (!text.empty()) {
      int32_t space = find(" ");
      if (space >= 0)
        tokens.push_back(space);
      else
        tokens.push_back(byte_token(' '));
    }
    // UTF-8 code points (at most 4 bytes), byte fallback for those not in the vocabulary.
    std::string buf;
    for (std::size_t i = 0; i < text.size(); ++i) {
      const auto c = static_cast<unsigned char>(text[i]);
      if ((c & 0xC0) != 0x80) buf.clear();
      buf += static_cast<char>(c);
      const unsigned char next = i + 1 < text.size() ? static_cast<unsigned char>(text[i + 1]) : 0;
      if ((next & 0xC0) == 0x80 && buf.size() < 4) continue;
      int32_t id = find(buf);
      if (id >= 0) {
        tokens.push_back(id);
      } else {
        for (unsigned char b : buf) tokens.push_back(byte_token(b));
      }
      buf.clear();
    }
    merge(tokens);
    if (eos) tokens.push_back(kEos);
    return tokens;
  }

  // llama2.c's decode(): the piece, without its leading space after BOS, raw byte for <0xXX>.
  std::string decode_piece(int32_t prev, int32_t id) const override {
    check_id(id);
    std::string_view p = pieces_[static_cast<std::size_t>(id)];
    if (prev == kBos && !p.empty() && p[0] == ' ') p.remove_prefix(1);
    int byte = utf8::parse_byte_piece(p);
    if (byte >= 0) return std::string(1, static_cast<char>(byte));
    return std::string(p);
  }

  // Concatenates decode_piece over `ids`, skipping BOS/EOS. The start of the sequence counts as
  // following BOS, so the dummy-prefix space that encode() adds is removed either way.
  std::string decode(std::span<const int32_t> ids) const override {
    std::string out;
    int32_t prev = kBos;
    for (int32_t id : ids) {
      check_id(id);
      if (id == kBos || id == kEos) {
        prev = id;
        continue;
      }
      std::string s = decode_piece(prev, id);
      if (prev == kBos && s == " " && utf8::parse_byte_piece(piece(id)) == ' ') s.clear();
      out += s;
      prev = id;
    }
    return out;
  }

  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos_id() const override { return kBos; }
  int32_t eos_id() const override { return kEos; }
  const std::string& piece(int32_t id) const override {
    check_id(id);
    return pieces_[static_cast<std::size_t>(id)];
  }
  float score(int32_t id) const override {
    check_id(id);
    return scores_[static_cast<std::size_t>(id)];
  }
  int32_t max_token_length() const { return max_token_length_; }
  const std::string& path() const { return path_; }
  // Id of `piece`, or -1.
  int32_t find(std::string_view piece) const {
    auto it = lookup_.find(std::string(piece));
    return it == lookup_.end() ? -1 : it->second;
  }

 private:
  void read_token(io::ByteReader& r, int64_t i) {
    const std::string what = fmt::format("token {}", i);
    float s = r.read<float>(what);
    int32_t len = r.read<int32_t>(what);
    CBQ_CHECK(len >= 0, "{}: token {} has negative length {} (at offset {})", path_, i, len,
              r.offset() - 4);
    auto bytes = r.take(static_cast<std::size_t>(len), what);
    // A NaN score silently changes which merges win; refuse it.
    CBQ_CHECK(std::isfinite(s), "{}: token {} has a non-finite merge score ({}) at offset {}",
              path_, i, s, r.offset() - static_cast<std::size_t>(len) - 8);
    scores_.push_back(s);
    pieces_.emplace_back(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }

  int32_t byte_token(unsigned char b) const {
    const int32_t id = static_cast<int32_t>(b) + kByteOffset;
    CBQ_CHECK(id < vocab_size(),
              "{}: byte fallback for 0x{:02X} needs token {} but the vocabulary has {} tokens",
              path_, b, id, vocab_size());
    return id;
  }

  // Greedy merges: repeatedly replace the adjacent pair whose concatenation is in the
  // vocabulary with the highest score (leftmost on ties; scores must exceed -1e10, as in
  // llama2.c), until none is left.
  void merge(std::vector<int32_t>& tokens) const {
    const int n = static_cast<int>(tokens.size());
    if (n < 2) return;
    std::vector<int> prev(n), next(n);
    for (int i = 0; i < n; ++i) {
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
    }
    struct Cand {
      float score;
      int left, right;
      int32_t left_id, right_id, merged;
    };
    auto worse = [](const Cand& a, const Cand& b) {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
    std::string buf;
    auto push = [&](int left) {
      int right = next[left];
      if (left < 0 || right < 0) return;
      buf = pieces_[static_cast<std::size_t>(tokens[left])];
      buf += pieces_[static_cast<std::size_t>(tokens[right])];
      auto it = lookup_.find(buf);
      if (it == lookup_.end()) return;
      float s = scores_[static_cast<std::size_t>(it->second)];
      if (!(s > -1e10f)) return;
      heap.push({s, left, right, tokens[left], tokens[right], it->second});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    std::vector<char> alive(n, 1);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      if (!alive[c.left] || !alive[c.right] || next[c.left] != c.right ||
          tokens[c.left] != c.left_id || tokens[c.right] != c.right_id)
        continue;
      tokens[c.left] = c.merged;
      alive[c.right] = 0;
      next[c.left] = next[c.right];
      if (next[c.right] >= 0) prev[next[c.right]] = c.left;
      if (prev[c.left] >= 0) push(prev[c.left]);
      push(c.left);
    }
    int k = 0;
    for (int i = 0; i < n; ++i)
      if (alive[i]) tokens[k++] = tokens[i];
    tokens.resize(k);
  }

  std::string path_;
  int32_t max_token_length_ = 0;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> lookup_;
};

}  // namespace cbq
