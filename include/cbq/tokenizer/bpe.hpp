#pragma once
// The parts every BPE tokenizer here is made of: the byte-level alphabet, the merge loop, and
// the pre-tokenizer steps (Hugging Face semantics: a text is a list of pieces that each step
// splits further). HfTokenizer (tokenizer.json) and ByteLevelBpeTokenizer (GGUF, llama.cpp
// semantics) assemble them.
#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/tokenizer/regex.hpp"
#include "cbq/tokenizer/tokenizer.hpp"
#include "cbq/tokenizer/unicode.hpp"

namespace cbq::bpe {

// GPT-2's reversible byte -> printable code point map.
inline const std::array<char32_t, 256>& byte_to_unicode() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    char32_t n = 0;
    for (int b = 0; b < 256; ++b) t[b] = direct[b] ? static_cast<char32_t>(b) : 256 + n++;
    return t;
  }();
  return table;
}
// The inverse: code point -> byte, -1 for code points outside the alphabet.
inline int unicode_to_byte(char32_t cp) {
  static const std::vector<int16_t> table = [] {
    std::vector<int16_t> t(324, -1);
    for (int b = 0; b < 256; ++b) t[byte_to_unicode()[b]] = static_cast<int16_t>(b);
    return t;
  }();
  return cp < table.size() ? table[cp] : -1;
}
inline std::string byte_level_encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) utf8::append(out, byte_to_unicode()[b]);
  return out;
}
// Byte-level text back to bytes; code points outside the alphabet are kept as UTF-8.
inline std::string byte_level_decode(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size();) {
    char32_t cp;
    int n = utf8::decode(s, i, cp);
    if (n == 0) {
      out += s[i++];
      continue;
    }
    const int b = unicode_to_byte(cp);
    if (b >= 0)
      out += static_cast<char>(b);
    else
      out.append(s, i, static_cast<std::size_t>(n));
    i += static_cast<std::size_t>(n);
  }
  return out;
}

// ---- the merge loop ----

// Vocabulary and merges of a BPE model. encode_word() splits a word into characters (UTF-8 code
// points; an invalid byte is a character of its own), maps them to ids (byte fallback <0xXX> or
// unk when a character is not a token), then repeatedly merges the adjacent pair of lowest rank
// (leftmost on ties): tokenizers' Word::merge_all and llama.cpp's llm_tokenizer_bpe_session make
// the same choice at every step.
class Model {
 public:
  std::vector<std::string> pieces;               // id -> token text ("" for an unused id)
  std::unordered_map<std::string, int32_t> ids;  // token text -> id
  int32_t unk = -1;
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;

  int32_t find(std::string_view s) const {
    auto it = ids.find(std::string(s));
    return it == ids.end() ? -1 : it->second;
  }
  int32_t size() const { return static_cast<int32_t>(pieces.size()); }

  // Adds the merge of rank `rank` (a, b) -> a + b; `what` names it in errors.
  void add_merge(std::string_view a, std::string_view b, int32_t rank, const std::string& what) {
    const int32_t ia = find(a), ib = find(b);
    std::string joined(a);
    joined += b;
    const int32_t im = find(joined);
    CBQ_CHECK(ia >= 0 && ib >= 0 && im >= 0,
              "{}: merge (\"{}\", \"{}\") uses a token that is not in the vocabulary ({})", what, a,
              b,
              ia < 0   ? std::string(a)
              : ib < 0 ? std::string(b)
                       : joined);
    merges_.emplace(key(ia, ib), Merge{rank, im});  // the first (lowest-rank) entry wins
  }
  std::size_t merge_count() const { return merges_.size(); }
  // Rank of the merge producing `id` (-1 for none), for scores.
  std::vector<int32_t> merge_ranks() const {
    std::vector<int32_t> r(pieces.size(), -1);
    for (const auto& [k, m] : merges_) {
      auto& x = r[static_cast<std::size_t>(m.id)];
      if (x < 0 || m.rank < x) x = m.rank;
    }
    return r;
  }

  void finish() {
    for (int b = 0; b < 256; ++b) byte_ids_[b] = find(fmt::format("<0x{:02X}>", b));
  }

  void encode_word(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (ignore_merges)
      if (int32_t id = find(word); id >= 0) {
        out.push_back(id);
        return;
      }
    std::vector<int32_t> sym;
    sym.reserve(word.size());
    for (std::size_t i = 0; i < word.size();) {
      char32_t cp;
      int n = utf8::decode(word, i, cp);
      if (n == 0) n = 1;
      const std::string_view ch = word.substr(i, static_cast<std::size_t>(n));
      i += static_cast<std::size_t>(n);
      if (int32_t id = find(ch); id >= 0) {
        sym.push_back(id);
        continue;
      }
      bool all_bytes = byte_fallback;
      if (byte_fallback)
        for (unsigned char b : ch) all_bytes = all_bytes && byte_ids_[b] >= 0;
      if (all_bytes) {
        for (unsigned char b : ch) sym.push_back(byte_ids_[b]);
      } else if (unk >= 0) {
        if (!(fuse_unk && !sym.empty() && sym.back() == unk)) sym.push_back(unk);
      }
      // else: dropped, as tokenizers does without an unk token
    }
    merge(sym);
    out.insert(out.end(), sym.begin(), sym.end());
  }

 private:
  struct Merge {
    int32_t rank, id;
  };
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void merge(std::vector<int32_t>& sym) const {
    const int n = static_cast<int>(sym.size());
    if (n < 2) return;
    std::vector<int> next(n), prev(n);
    std::vector<char> alive(n, 1);
    for (int i = 0; i < n; ++i) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    struct Cand {
      int32_t rank;
      int left, right;
      int32_t left_id, right_id, merged;
    };
    auto worse = [](const Cand& a, const Cand& b) {
      return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    };
    std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
    auto push = [&](int left) {
      if (left < 0 || next[left] < 0) return;
      const int right = next[left];
      auto it = merges_.find(key(sym[left], sym[right]));
      if (it != merges_.end())
        heap.push({it->second.rank, left, right, sym[left], sym[right], it->second.id});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      if (!alive[c.left] || !alive[c.right] || next[c.left] != c.right ||
          sym[c.left] != c.left_id || sym[c.right] != c.right_id)
        continue;
      sym[c.left] = c.merged;
      alive[c.right] = 0;
      next[c.left] = next[c.right];
      if (next[c.right] >= 0) prev[next[c.right]] = c.left;
      push(prev[c.left]);
      push(c.left);
    }
    int k = 0;
    for (int i = 0; i < n; ++i)
      if (alive[i]) sym[k++] = sym[i];
    sym.resize(k);
  }

  std::unordered_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_ids_{};
};

// ---- pre-tokenization ----

// A piece of text on its way to the model: `at_origin` when it starts at the very beginning of
// the input (Metaspace's prepend_scheme "first" looks at it).
struct Piece {
  std::string text;
  bool at_origin = false;
};

enum class SplitBehavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

// [begin, end) byte ranges of one piece with whether each is a match; covers the piece.
using Spans = std::vector<std::pair<std::pair<std::size_t, std::size_t>, bool>>;

// tokenizers' NormalizedString::split: applies `behavior` to the matches and appends the
// non-empty resulting pieces to `out`.
inline void split_piece(const Piece& p, Spans spans, SplitBehavior behavior, bool invert,
                        std::vector<Piece>& out) {
  if (invert)
    for (auto& s : spans) s.second = !s.second;
  Spans merged;
  bool prev_match = false;
  switch (behavior) {
    case SplitBehavior::isolated:
      for (auto& s : spans) s.second = false;
      merged = std::move(spans);
      break;
    case SplitBehavior::removed:
      merged = std::move(spans);
      break;
    case SplitBehavior::contiguous:
      for (const auto& s : spans) {
        if (s.second == prev_match && !merged.empty())
          merged.back().first.second = s.first.second;
        else
          merged.push_back({s.first, false});
        prev_match = s.second;
      }
      break;
    case SplitBehavior::merged_with_previous:
      for (const auto& s : spans) {
        if (s.second && !prev_match && !merged.empty())
          merged.back().first.second = s.first.second;
        else
          merged.push_back({s.first, false});
        prev_match = s.second;
      }
      break;
    case SplitBehavior::merged_with_next:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->second && !prev_match && !merged.empty())
          merged.back().first.first = it->first.first;
        else
          merged.push_back({it->first, false});
        prev_match = it->second;
      }
      std::reverse(merged.begin(), merged.end());
      break;
  }
  for (const auto& [r, remove] : merged) {
    if (remove || r.second <= r.first) continue;
    out.push_back({p.text.substr(r.first, r.second - r.first), p.at_origin && r.first == 0});
  }
}

// Spans of a regex over a piece (matches as Oniguruma's find_iter, byte offsets).
inline Spans regex_spans(const regex::Regex& re, const std::string& text) {
  std::vector<char32_t> cps;
  std::vector<uint32_t> off;
  unicode::decode_utf8(text, cps, &off);
  Spans spans;
  std::size_t prev = 0;
  for (auto [b, e] : re.find_all(cps)) {
    const std::size_t bb = off[b], eb = off[e];
    if (prev != bb) spans.push_back({{prev, bb}, false});
    spans.push_back({{bb, eb}, true});
    prev = eb;
  }
  if (prev != text.size()) spans.push_back({{prev, text.size()}, false});
  return spans;
}

// Spans where every code point satisfying `pred` is a match of its own (tokenizers' char
// predicate patterns).
template <class Pred>
Spans char_spans(const std::string& text, Pred pred) {
  Spans spans;
  std::size_t last = 0;
  for (std::size_t i = 0; i < text.size();) {
    char32_t cp;
    int n = utf8::decode(text, i, cp);
    if (n == 0) {
      cp = unicode::kInvalidByteBase + static_cast<unsigned char>(text[i]);
      n = 1;
    }
    if (pred(cp)) {
      if (last < i) spans.push_back({{last, i}, false});
      spans.push_back({{i, i + static_cast<std::size_t>(n)}, true});
      last = i + static_cast<std::size_t>(n);
    }
    i += static_cast<std::size_t>(n);
  }
  if (last < text.size()) spans.push_back({{last, text.size()}, false});
  return spans;
}

// One pre-tokenizer step.
class Step {
 public:
  virtual ~Step() = default;
  virtual void apply(std::vector<Piece>& pieces) const = 0;
};

// Split (regex or string pattern) with a behavior; also llama.cpp's regex list (isolated).
class RegexSplit : public Step {
 public:
  RegexSplit(regex::Regex re, SplitBehavior behavior, bool invert)
      : re_(std::move(re)), behavior_(behavior), invert_(invert) {}
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces.size() * 2);
    for (const Piece& p : pieces) split_piece(p, regex_spans(re_, p.text), behavior_, invert_, out);
    pieces.swap(out);
  }
  const regex::Regex& regex() const { return re_; }
  SplitBehavior behavior() const { return behavior_; }
  bool invert() const { return invert_; }

 private:
  regex::Regex re_;
  SplitBehavior behavior_;
  bool invert_;
};

// Splits where a code-point predicate holds (Digits, Punctuation, WhitespaceSplit, …).
class CharSplit : public Step {
 public:
  enum class Kind { digits, punctuation, whitespace, delimiter };
  CharSplit(Kind kind, SplitBehavior behavior, char32_t delimiter = 0)
      : kind_(kind), behavior_(behavior), delimiter_(delimiter) {}
  bool matches(char32_t c) const {
    switch (kind_) {
      case Kind::digits:
        return unicode::in(c, unicode::kNumber);
      case Kind::punctuation:
        // Rust's is_ascii_punctuation || unicode_categories' is_punctuation.
        return (c < 128 && ((c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) ||
                            (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E))) ||
               unicode::in(c, unicode::kPunctuation);
      case Kind::whitespace:
        return unicode::is_white_space(c);
      case Kind::delimiter:
        return c == delimiter_;
    }
    return false;
  }
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces.size() * 2);
    for (const Piece& p : pieces)
      split_piece(p, char_spans(p.text, [&](char32_t c) { return matches(c); }), behavior_, false,
                  out);
    pieces.swap(out);
  }
  Kind kind() const { return kind_; }
  SplitBehavior behavior() const { return behavior_; }

 private:
  Kind kind_;
  SplitBehavior behavior_;
  char32_t delimiter_;
};

inline const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// ByteLevel: optional prefix space, optional GPT-2 regex split, bytes -> byte-level alphabet.
class ByteLevelStep : public Step {
 public:
  ByteLevelStep(bool add_prefix_space, bool use_regex, regex::Dialect dialect)
      : add_prefix_space_(add_prefix_space), use_regex_(use_regex), re_(kGpt2Pattern, dialect) {}
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces.size() * 2);
    for (Piece p : pieces) {
      if (add_prefix_space_ && (p.text.empty() || p.text[0] != ' ')) p.text.insert(0, 1, ' ');
      const std::size_t first = out.size();
      if (use_regex_)
        split_piece(p, regex_spans(re_, p.text), SplitBehavior::isolated, false, out);
      else if (!p.text.empty())
        out.push_back(p);
      for (std::size_t i = first; i < out.size(); ++i) out[i].text = byte_level_encode(out[i].text);
    }
    pieces.swap(out);
  }
  bool add_prefix_space() const { return add_prefix_space_; }
  bool use_regex() const { return use_regex_; }

 private:
  bool add_prefix_space_, use_regex_;
  regex::Regex re_;
};

// Metaspace: ' ' -> replacement, prepend it (always / first piece only / never), split before
// each replacement.
class MetaspaceStep : public Step {
 public:
  enum class Prepend { always, first, never };
  MetaspaceStep(std::string replacement, Prepend prepend, bool split)
      : replacement_(std::move(replacement)), prepend_(prepend), split_(split) {}
  void apply(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    for (const Piece& p : pieces) {
      Piece q{std::string(), p.at_origin};
      for (char c : p.text) {
        if (c == ' ')
          q.text += replacement_;
        else
          q.text += c;
      }
      const bool starts = q.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!q.text.empty() && !starts &&
          (prepend_ == Prepend::always || (prepend_ == Prepend::first && p.at_origin)))
        q.text.insert(0, replacement_);
      if (!split_ || replacement_.empty()) {
        if (!q.text.empty()) out.push_back(std::move(q));
        continue;
      }
      Spans spans;
      std::size_t last = 0;
      for (std::size_t i = 0; i + replacement_.size() <= q.text.size();) {
        if (q.text.compare(i, replacement_.size(), replacement_) == 0) {
          if (last < i) spans.push_back({{last, i}, false});
          spans.push_back({{i, i + replacement_.size()}, true});
          i += replacement_.size();
          last = i;
        } else {
          ++i;
        }
      }
      if (last < q.text.size()) spans.push_back({{last, q.text.size()}, false});
      split_piece(q, spans, SplitBehavior::merged_with_next, false, out);
    }
    pieces.swap(out);
  }
  const std::string& replacement() const { return replacement_; }

 private:
  std::string replacement_;
  Prepend prepend_;
  bool split_;
};

}  // namespace cbq::bpe
