#pragma once
// The regular expressions of pre-tokenizers (GPT-2, Llama-3, Qwen2, StarCoder, DeepSeek, …),
// matched over code points with a backtracking matcher of our own.
//
// Why not a library: the two references disagree with every library at the edges, and the
// tokens must be theirs. Hugging Face `tokenizers` runs Oniguruma with Unicode 16.0 tables;
// llama.cpp runs hand-written splitters and std::regex over its Unicode 15.1 tables, with
// ASCII-only \d and \w. Debian 12's PCRE2 (10.42) has Unicode 14 tables, so it would split CJK
// extension H/I ideographs and the 15.x/16.0 letters differently from both (and \s differs at
// U+0085). Here the Unicode version, \d, \w, \s, '.', '$' and case folding follow the chosen
// Dialect, and anything outside the supported syntax is a cbq::Error naming the pattern.
//
// Supported: literals (UTF-8, escapes \t \n \r \f \v \e \0 \xHH \x{H…} \uHHHH, escaped
// punctuation), '.', classes [...] / [^...] with ranges and nested classes, \s \S \d \D \w \W,
// \p{..} \P{..} \p{^..} for general categories (L, Lu, Ll, Lt, Lm, Lo, M, Mn, Mc, Me, N, Nd,
// Nl, No, P, Pc, Pd, Ps, Pe, Pi, Pf, Po, S, Sm, Sc, Sk, So, Z, Zs, Zl, Zp, C, Cc, Cf, Co, Cn and
// their long names), groups ( ) (?: ) (?i: ) (?-i: ), lookahead (?= ) (?! ), atomic (?> ),
// quantifiers ? * + {n} {n,} {n,m} {,m} (greedy; lazy with '?'; possessive ?+ *+ ++), anchors
// ^ $ \A \z \Z. Refused: backreferences, lookbehind, named groups, inline (?i) without a colon,
// scripts (\p{Han}), POSIX brackets, class intersection (&&), \b, \h, case-insensitive non-ASCII
// literals, and a repeated sub-pattern that can match the empty string (it could loop).
#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/tokenizer/unicode.hpp"

namespace cbq::regex {

enum class Dialect {
  // Oniguruma (Ruby syntax) as Hugging Face tokenizers uses it: Unicode 16.0, \d = \p{Nd},
  // \w = [\p{L}\p{M}\p{N}\p{Pc}] (in a class without \p{No}), '.' = not '\n', ^ $ at line
  // boundaries, (?i) folds ſ→s, K→k.
  oniguruma,
  // llama.cpp: Unicode 15.1, \d = [0-9], \w = [A-Za-z0-9_] (std::regex on its collapsed text),
  // '.' = not '\n' or '\r', ^ $ at the ends of the text, (?i) by its simple lowercase mapping.
  llama_cpp,
};

class Regex {
 public:
  Regex() = default;
  Regex(std::string pattern, Dialect dialect) : pattern_(std::move(pattern)), dialect_(dialect) {
    version_ = dialect == Dialect::oniguruma ? unicode::Version::v16_0 : unicode::Version::v15_1;
    unicode::decode_utf8(pattern_, src_);
    for (char32_t c : src_)
      if (c >= unicode::kInvalidByteBase) fail_syntax("the pattern is not valid UTF-8");
    Node root = parse_alternation(0);
    if (pos_ != src_.size()) fail_syntax("unbalanced ')'");
    compile(root);
    emit({Op::match});
    compute_first();
    CBQ_CHECK(prog_.size() <= kMaxProgram,
              "regex \"{}\": compiles to {} instructions, more than the {} allowed", pattern_,
              prog_.size(), kMaxProgram);
  }

  const std::string& pattern() const { return pattern_; }
  Dialect dialect() const { return dialect_; }

  // The leftmost match beginning at or after `from`: [begin, end) in code points.
  bool search(std::span<const char32_t> text, std::size_t from, std::size_t& begin,
              std::size_t& end) const {
    Runner r{*this, text, 0, {}};
    for (std::size_t s = from; s <= text.size(); ++s) {
      if (s < text.size() && !first_.may_start(text[s], *this)) continue;
      if (s == text.size() && !first_.nullable) break;
      if (r.run(0, s, end)) {
        begin = s;
        return true;
      }
    }
    return false;
  }

  // Every match, as Oniguruma's find_iter in the Rust `onig` crate: after each match the search
  // resumes at its end; an empty match right where the previous match ended is skipped.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::span<const char32_t> text) const {
    std::vector<std::pair<std::size_t, std::size_t>> out;
    std::size_t from = 0, b = 0, e = 0;
    bool have_last = false;
    std::size_t last_end = 0;
    while (from <= text.size() && search(text, from, b, e)) {
      if (b == e && have_last && last_end == e) {
        from = e + 1;
        continue;
      }
      out.emplace_back(b, e);
      from = e;
      have_last = true;
      last_end = e;
    }
    return out;
  }

 private:
  static constexpr std::size_t kMaxProgram = 20000;
  static constexpr std::size_t kMaxDepth = 64;
  // Backtracking steps allowed for one match attempt (Oniguruma's retry limit is 10^7 too).
  static constexpr std::size_t kMaxSteps = 10'000'000;

  // ---- character classes ----
  struct Item {
    enum Kind : uint8_t { range, categories, space, digit, word, word_in_class, sub } kind;
    bool negate = false;
    char32_t lo = 0, hi = 0;
    uint32_t mask = 0;
    int sub_class = -1;
  };
  struct Class {
    std::vector<Item> items;
    bool negate = false;
    bool fold = false;
    std::array<uint64_t, 2> ascii{};  // precomputed answers for code points < 128
  };

  bool item_matches(const Item& it, char32_t c) const {
    bool m = false;
    switch (it.kind) {
      case Item::range:
        m = c >= it.lo && c <= it.hi;
        break;
      case Item::categories:
        m = unicode::in(c, it.mask, version_);
        break;
      case Item::space:
        m = unicode::is_white_space(c);
        break;
      case Item::digit:
        m = is_digit(c);
        break;
      case Item::word:
        m = is_word(c, false);
        break;
      case Item::word_in_class:
        m = is_word(c, true);
        break;
      case Item::sub:
        m = class_matches(classes_[static_cast<std::size_t>(it.sub_class)], c);
        break;
    }
    return m != it.negate;
  }
  bool class_matches_raw(const Class& k, char32_t c) const {
    bool m = false;
    for (const Item& it : k.items)
      if (item_matches(it, c)) {
        m = true;
        break;
      }
    return m != k.negate;
  }
  bool class_matches(const Class& k, char32_t c) const {
    if (c < 128) return (k.ascii[c >> 6] >> (c & 63)) & 1u;
    if (!k.fold) return class_matches_raw(k, c);
    const char32_t f = fold(c);
    return class_matches_raw(k, c) || (f != c && class_matches_fold_ascii(k, f));
  }
  bool class_matches_fold_ascii(const Class& k, char32_t f) const {
    // f is an ASCII lowercase letter: the class matches when it holds either case of it.
    return class_matches_raw(k, f) || class_matches_raw(k, f - 32);
  }
  void finish_class(Class& k) const {
    for (char32_t c = 0; c < 128; ++c) {
      bool m = class_matches_raw(k, c);
      if (k.fold && c >= 'A' && c <= 'Z') m = m || class_matches_raw(k, c + 32);
      if (k.fold && c >= 'a' && c <= 'z') m = m || class_matches_raw(k, c - 32);
      if (m) k.ascii[c >> 6] |= uint64_t{1} << (c & 63);
    }
  }

  bool is_digit(char32_t c) const {
    if (dialect_ == Dialect::llama_cpp) return c >= '0' && c <= '9';
    return unicode::category(c, version_) == unicode::tables::Nd;
  }
  // Oniguruma's \w is not the same inside a class: [\w] leaves out the other numbers (\p{No},
  // e.g. ²) that a bare \w matches (measured against tokenizers 0.23.3).
  bool is_word(char32_t c, bool in_class) const {
    if (dialect_ == Dialect::llama_cpp || c < 128)
      return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    const uint32_t numbers =
        in_class ? unicode::bit(unicode::tables::Nd) | unicode::bit(unicode::tables::Nl)
                 : unicode::kNumber;
    return unicode::in(
        c, unicode::kLetter | unicode::kMark | numbers | unicode::bit(unicode::tables::Pc),
        version_);
  }
  // Case folding onto ASCII lowercase (only ASCII patterns fold).
  char32_t fold(char32_t c) const {
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (c == 0x212A) return 'k';  // KELVIN SIGN: folds (Oniguruma) and lowercases (llama.cpp) to k
    if (dialect_ == Dialect::oniguruma && c == 0x17F) return 's';  // LONG S folds to s
    if (dialect_ == Dialect::llama_cpp && c == 0x130) return 'i';  // İ lowercases to i
    return c;
  }

  // ---- syntax tree ----
  struct Node {
    enum Kind : uint8_t {
      empty,
      literal,
      cls,
      any,
      concat,
      alt,
      repeat,
      look,
      atomic,
      anchor
    } kind = empty;
    char32_t ch = 0;
    bool fold = false;
    int cls_index = -1;
    std::vector<Node> kids;
    int min = 0, max = 0;  // max < 0: unbounded
    bool greedy = true, possessive = false, negate = false;
    enum Anchor : uint8_t { line_start, line_end, text_start, text_end, text_end_nl } where{};
  };

  [[noreturn]] void fail_syntax(const std::string& what) const {
    fail(
        "regex \"{}\": {} (at character {}); cbq's matcher supports the syntax listed in "
        "docs/FORMATS.md",
        pattern_, what, pos_);
  }
  bool at_end() const { return pos_ >= src_.size(); }
  char32_t peek(std::size_t k = 0) const { return pos_ + k < src_.size() ? src_[pos_ + k] : 0; }
  bool eat(char32_t c) {
    if (!at_end() && src_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  Node parse_alternation(std::size_t depth) {
    if (depth > kMaxDepth) fail_syntax(fmt::format("groups nested deeper than {}", kMaxDepth));
    Node first = parse_sequence(depth);
    if (peek() != '|') return first;
    Node alt;
    alt.kind = Node::alt;
    alt.kids.push_back(std::move(first));
    while (eat('|')) alt.kids.push_back(parse_sequence(depth));
    return alt;
  }

  Node parse_sequence(std::size_t depth) {
    Node seq;
    seq.kind = Node::concat;
    while (!at_end() && peek() != '|' && peek() != ')') {
      Node atom = parse_atom(depth);
      seq.kids.push_back(parse_quantifier(std::move(atom)));
    }
    if (seq.kids.size() == 1) return std::move(seq.kids[0]);
    return seq;
  }

  bool parse_number(int& v) {
    if (!(peek() >= '0' && peek() <= '9')) return false;
    long long x = 0;
    while (peek() >= '0' && peek() <= '9') {
      x = x * 10 + (peek() - '0');
      if (x > 100000) fail_syntax("repetition count too large");
      ++pos_;
    }
    v = static_cast<int>(x);
    return true;
  }

  Node parse_quantifier(Node atom) {
    for (;;) {
      int lo = 0, hi = -1;
      const std::size_t save = pos_;
      bool braces = false;
      if (eat('*')) {
        lo = 0;
      } else if (eat('+')) {
        lo = 1;
      } else if (eat('?')) {
        lo = 0;
        hi = 1;
      } else if (peek() == '{') {
        ++pos_;
        int a = 0, b = -1;
        bool have_a = parse_number(a);
        bool ok = false;
        if (eat('}')) {
          ok = have_a;
          b = a;
        } else if (eat(',')) {
          bool have_b = parse_number(b);
          ok = (have_a || have_b) && eat('}');
          if (!have_a) a = 0;
          if (!have_b) b = -1;
        }
        if (!ok) {  // not a quantifier: '{' is a literal (as in Oniguruma)
          pos_ = save;
          return atom;
        }
        if (b >= 0 && b < a) fail_syntax("repetition {n,m} with m < n");
        lo = a;
        hi = b;
        braces = true;
      } else {
        return atom;
      }
      if (atom.kind == Node::anchor || atom.kind == Node::look)
        fail_syntax("quantifier after an anchor or lookahead");
      Node rep;
      rep.kind = Node::repeat;
      rep.min = lo;
      rep.max = hi;
      if (eat('?')) {
        rep.greedy = false;
      } else if (peek() == '+') {
        if (braces)
          fail_syntax("'+' after {n,m} (possessive in some syntaxes, a repetition in others)");
        ++pos_;
        rep.possessive = true;
      }
      if (nullable(atom) && (hi < 0 || hi > 1))
        fail_syntax("a repeated sub-pattern that can match the empty string");
      rep.kids.push_back(std::move(atom));
      atom = std::move(rep);
    }
  }

  char32_t parse_hex(int min_digits, int max_digits, bool braces) {
    if (braces && !eat('{')) fail_syntax("expected '{' after \\x");
    char32_t v = 0;
    int n = 0;
    while (n < max_digits) {
      char32_t c = peek();
      int d = c >= '0' && c <= '9'   ? int(c - '0')
              : c >= 'a' && c <= 'f' ? int(c - 'a' + 10)
              : c >= 'A' && c <= 'F' ? int(c - 'A' + 10)
                                     : -1;
      if (d < 0) break;
      v = v * 16 + static_cast<char32_t>(d);
      ++pos_;
      ++n;
    }
    if (n < min_digits) fail_syntax("bad hexadecimal escape");
    if (braces && !eat('}')) fail_syntax("expected '}' after \\x{...");
    if (v > 0x10FFFF) fail_syntax("code point above U+10FFFF");
    return v;
  }

  uint32_t property_mask(const std::string& name) const {
    using namespace unicode;
    using namespace unicode::tables;
    static const std::pair<const char*, uint32_t> kNames[] = {
        {"L", kLetter},
        {"Letter", kLetter},
        {"Lu", bit(Lu)},
        {"Uppercase_Letter", bit(Lu)},
        {"Ll", bit(Ll)},
        {"Lowercase_Letter", bit(Ll)},
        {"Lt", bit(Lt)},
        {"Titlecase_Letter", bit(Lt)},
        {"Lm", bit(Lm)},
        {"Modifier_Letter", bit(Lm)},
        {"Lo", bit(Lo)},
        {"Other_Letter", bit(Lo)},
        {"M", kMark},
        {"Mark", kMark},
        {"Combining_Mark", kMark},
        {"Mn", bit(Mn)},
        {"Nonspacing_Mark", bit(Mn)},
        {"Mc", bit(Mc)},
        {"Spacing_Mark", bit(Mc)},
        {"Me", bit(Me)},
        {"Enclosing_Mark", bit(Me)},
        {"N", kNumber},
        {"Number", kNumber},
        {"Nd", bit(Nd)},
        {"Decimal_Number", bit(Nd)},
        {"Nl", bit(Nl)},
        {"Letter_Number", bit(Nl)},
        {"No", bit(No)},
        {"Other_Number", bit(No)},
        {"P", kPunctuation},
        {"Punctuation", kPunctuation},
        {"Pc", bit(Pc)},
        {"Connector_Punctuation", bit(Pc)},
        {"Pd", bit(Pd)},
        {"Dash_Punctuation", bit(Pd)},
        {"Ps", bit(Ps)},
        {"Open_Punctuation", bit(Ps)},
        {"Pe", bit(Pe)},
        {"Close_Punctuation", bit(Pe)},
        {"Pi", bit(Pi)},
        {"Initial_Punctuation", bit(Pi)},
        {"Pf", bit(Pf)},
        {"Final_Punctuation", bit(Pf)},
        {"Po", bit(Po)},
        {"Other_Punctuation", bit(Po)},
        {"S", kSymbol},
        {"Symbol", kSymbol},
        {"Sm", bit(Sm)},
        {"Math_Symbol", bit(Sm)},
        {"Sc", bit(Sc)},
        {"Currency_Symbol", bit(Sc)},
        {"Sk", bit(Sk)},
        {"Modifier_Symbol", bit(Sk)},
        {"So", bit(So)},
        {"Other_Symbol", bit(So)},
        {"Z", kSeparator},
        {"Separator", kSeparator},
        {"Zs", bit(Zs)},
        {"Space_Separator", bit(Zs)},
        {"Zl", bit(Zl)},
        {"Line_Separator", bit(Zl)},
        {"Zp", bit(Zp)},
        {"Paragraph_Separator", bit(Zp)},
        {"C", kOther},
        {"Other", kOther},
        {"Cc", bit(Cc)},
        {"Control", bit(Cc)},
        {"Cf", bit(Cf)},
        {"Format", bit(Cf)},
        {"Co", bit(Co)},
        {"Private_Use", bit(Co)},
        {"Cn", bit(Cn)},
        {"Unassigned", bit(Cn)},
    };
    for (const auto& [n, m] : kNames)
      if (name == n) return m;
    fail_syntax(fmt::format("unsupported property \\p{{{}}} (general categories only)", name));
  }

  // After '\' at top level or in a class: a class item (\s, \p{..}, ...) or a literal code point.
  bool parse_escape(Item& item, char32_t& lit, bool in_class) {
    if (at_end()) fail_syntax("pattern ends with '\\'");
    const char32_t c = src_[pos_++];
    auto simple = [&](Item::Kind k, bool neg) {
      item = Item{};
      item.kind = k;
      item.negate = neg;
      return true;
    };
    switch (c) {
      case 's':
        return simple(Item::space, false);
      case 'S':
        return simple(Item::space, true);
      case 'd':
        return simple(Item::digit, false);
      case 'D':
        return simple(Item::digit, true);
      case 'w':
        return simple(in_class ? Item::word_in_class : Item::word, false);
      case 'W':
        return simple(in_class ? Item::word_in_class : Item::word, true);
      case 'p':
      case 'P': {
        bool neg = c == 'P';
        if (!eat('{')) fail_syntax("expected '{' after \\p");
        if (eat('^')) neg = !neg;
        std::string name;
        while (!at_end() && peek() != '}') {
          if (peek() >= 128) fail_syntax("bad property name");
          name += static_cast<char>(src_[pos_++]);
        }
        if (!eat('}')) fail_syntax("unterminated \\p{");
        item = Item{};
        item.kind = Item::categories;
        item.negate = neg;
        item.mask = property_mask(name);
        return true;
      }
      case 't':
        lit = '\t';
        return false;
      case 'n':
        lit = '\n';
        return false;
      case 'r':
        lit = '\r';
        return false;
      case 'f':
        lit = '\f';
        return false;
      case 'v':
        lit = '\v';
        return false;
      case 'a':
        lit = 0x07;
        return false;
      case 'e':
        lit = 0x1B;
        return false;
      case '0':
        lit = 0;
        return false;
      case 'x':
        lit = peek() == '{' ? parse_hex(1, 8, true) : parse_hex(1, 2, false);
        return false;
      case 'u':
        lit = parse_hex(4, 4, false);
        return false;
      default:
        break;
    }
    if (c < 128 && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '1' && c <= '9')))
      fail_syntax(fmt::format("unsupported escape \\{}{}", static_cast<char>(c),
                              in_class ? " in a class" : ""));
    lit = c;  // escaped punctuation or a non-ASCII character
    return false;
  }

  int parse_class(bool fold, std::size_t depth) {
    if (depth > kMaxDepth) fail_syntax("classes nested too deeply");
    // At the character after '['.
    Class k;
    k.fold = fold;
    if (eat('^')) k.negate = true;
    bool first = true;
    for (;;) {
      if (at_end()) fail_syntax("unterminated character class");
      char32_t c = peek();
      if (c == ']' && !first) {
        ++pos_;
        break;
      }
      first = false;
      if (c == '[') {
        if (peek(1) == ':') fail_syntax("POSIX bracket expressions are not supported");
        ++pos_;
        Item it;
        it.kind = Item::sub;
        it.sub_class = parse_class(fold, depth + 1);
        k.items.push_back(it);
        continue;
      }
      if (c == '&' && peek(1) == '&') fail_syntax("class intersection '&&' is not supported");
      char32_t lo;
      ++pos_;
      if (c == '\\') {
        Item it;
        if (parse_escape(it, lo, true)) {
          k.items.push_back(it);
          continue;
        }
      } else {
        lo = c;
      }
      char32_t hi = lo;
      if (peek() == '-' && peek(1) != ']' && pos_ + 1 < src_.size()) {
        ++pos_;
        char32_t d = src_[pos_++];
        if (d == '[') fail_syntax("a range ending in a class");
        if (d == '\\') {
          Item it;
          if (parse_escape(it, hi, true)) fail_syntax("a range ending in a class escape");
        } else {
          hi = d;
        }
        if (hi < lo) fail_syntax("a range out of order");
      }
      if (fold && (hi >= 128 || (lo >= 128)))
        fail_syntax("case-insensitive non-ASCII characters are not supported");
      Item it;
      it.kind = Item::range;
      it.lo = lo;
      it.hi = hi;
      k.items.push_back(it);
    }
    if (fold)
      for (const Item& it : k.items)
        if (it.kind == Item::categories &&
            (it.mask & (unicode::bit(unicode::tables::Lu) | unicode::bit(unicode::tables::Ll) |
                        unicode::bit(unicode::tables::Lt))) &&
            (it.mask & unicode::kLetter) != unicode::kLetter)
          fail_syntax("case-insensitive cased-letter categories are not supported");
    finish_class(k);
    classes_.push_back(std::move(k));
    return static_cast<int>(classes_.size() - 1);
  }

  Node class_node(int index) {
    Node n;
    n.kind = Node::cls;
    n.cls_index = index;
    return n;
  }

  Node parse_atom(std::size_t depth) {
    const char32_t c = src_[pos_++];
    Node n;
    switch (c) {
      case '(': {
        bool was_fold = fold_;
        Node::Kind kind = Node::concat;
        bool negate = false;
        if (eat('?')) {
          if (eat(':')) {
          } else if (eat('=')) {
            kind = Node::look;
          } else if (eat('!')) {
            kind = Node::look;
            negate = true;
          } else if (eat('>')) {
            kind = Node::atomic;
          } else if (peek() == 'i' && peek(1) == ':') {
            pos_ += 2;
            fold_ = true;
          } else if (peek() == '-' && peek(1) == 'i' && peek(2) == ':') {
            pos_ += 3;
            fold_ = false;
          } else if (peek() == '<' && (peek(1) == '=' || peek(1) == '!')) {
            fail_syntax("lookbehind is not supported");
          } else if (peek() == 'i' || peek() == 'm' || peek() == 'x' || peek() == '-') {
            fail_syntax("inline options other than (?i:...) / (?-i:...) are not supported");
          } else {
            fail_syntax("unsupported group (?...)");
          }
        }
        Node inner = parse_alternation(depth + 1);
        if (!eat(')')) fail_syntax("missing ')'");
        fold_ = was_fold;
        if (kind == Node::concat) return inner;
        n.kind = kind;
        n.negate = negate;
        n.kids.push_back(std::move(inner));
        return n;
      }
      case ')':
        fail_syntax("unbalanced ')'");
      case '[':
        return class_node(parse_class(fold_, depth + 1));
      case '.':
        n.kind = Node::any;
        return n;
      case '^':
        n.kind = Node::anchor;
        n.where = dialect_ == Dialect::oniguruma ? Node::line_start : Node::text_start;
        return n;
      case '$':
        n.kind = Node::anchor;
        n.where = dialect_ == Dialect::oniguruma ? Node::line_end : Node::text_end;
        return n;
      case '*':
      case '+':
      case '?':
        fail_syntax("quantifier without anything to repeat");
      case '\\': {
        if (peek() == 'A' || peek() == 'z' || peek() == 'Z') {
          const char32_t a = src_[pos_++];
          n.kind = Node::anchor;
          n.where = a == 'A' ? Node::text_start : a == 'z' ? Node::text_end : Node::text_end_nl;
          return n;
        }
        if (peek() == 'b' || peek() == 'B') fail_syntax("word boundaries are not supported");
        if (peek() == 'h' || peek() == 'H' || peek() == 'k' || peek() == 'g' || peek() == 'G' ||
            peek() == 'K' || peek() == 'R' || peek() == 'X' || peek() == 'Q')
          fail_syntax(fmt::format("unsupported escape \\{}", static_cast<char>(peek())));
        Item it;
        char32_t lit;
        if (parse_escape(it, lit, false)) {
          Class k;
          k.items.push_back(it);
          k.fold = fold_;
          finish_class(k);
          classes_.push_back(std::move(k));
          return class_node(static_cast<int>(classes_.size() - 1));
        }
        return literal(lit);
      }
      default:
        return literal(c);
    }
  }

  Node literal(char32_t c) {
    Node n;
    n.kind = Node::literal;
    n.ch = c;
    if (fold_ && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) {
      n.fold = true;
      n.ch = c | 0x20;
    } else if (fold_ && c >= 128) {
      fail_syntax("case-insensitive non-ASCII characters are not supported");
    }
    return n;
  }

  static bool nullable(const Node& n) {
    switch (n.kind) {
      case Node::empty:
      case Node::look:
      case Node::anchor:
        return true;
      case Node::literal:
      case Node::cls:
      case Node::any:
        return false;
      case Node::concat:
        for (const Node& k : n.kids)
          if (!nullable(k)) return false;
        return true;
      case Node::alt:
        for (const Node& k : n.kids)
          if (nullable(k)) return true;
        return false;
      case Node::repeat:
        return n.min == 0 || nullable(n.kids[0]);
      case Node::atomic:
        return nullable(n.kids[0]);
    }
    return true;
  }

  // ---- program ----
  enum class Op : uint8_t { chr, chr_fold, cls, any, split, jmp, match, anchor, look, atomic };
  struct Inst {
    Op op;
    bool negate = false;
    uint8_t where = 0;
    char32_t c = 0;
    int32_t x = 0, y = 0;  // split: preferred x, else y; jmp: x; look/atomic: body at x, next y
  };
  std::size_t emit(Inst i) {
    if (prog_.size() > kMaxProgram)
      fail(
          "regex \"{}\": compiles to more than {} instructions (large repetition counts?); not "
          "supported",
          pattern_, kMaxProgram);
    prog_.push_back(i);
    return prog_.size() - 1;
  }

  void compile(const Node& n) {
    switch (n.kind) {
      case Node::empty:
        return;
      case Node::literal:
        emit({n.fold ? Op::chr_fold : Op::chr, false, 0, n.ch});
        return;
      case Node::cls:
        emit({Op::cls, false, 0, 0, n.cls_index});
        return;
      case Node::any:
        emit({Op::any});
        return;
      case Node::anchor:
        emit({Op::anchor, false, static_cast<uint8_t>(n.where)});
        return;
      case Node::concat:
        for (const Node& k : n.kids) compile(k);
        return;
      case Node::alt: {
        std::vector<std::size_t> jumps;
        for (std::size_t i = 0; i < n.kids.size(); ++i) {
          if (i + 1 < n.kids.size()) {
            const std::size_t s = emit({Op::split});
            prog_[s].x = static_cast<int32_t>(s + 1);
            compile(n.kids[i]);
            jumps.push_back(emit({Op::jmp}));
            prog_[s].y = static_cast<int32_t>(prog_.size());
          } else {
            compile(n.kids[i]);
          }
        }
        for (std::size_t j : jumps) prog_[j].x = static_cast<int32_t>(prog_.size());
        return;
      }
      case Node::look:
      case Node::atomic: {
        const std::size_t at = emit({n.kind == Node::look ? Op::look : Op::atomic, n.negate});
        prog_[at].x = static_cast<int32_t>(at + 1);
        compile(n.kids[0]);
        emit({Op::match});
        prog_[at].y = static_cast<int32_t>(prog_.size());
        return;
      }
      case Node::repeat: {
        if (n.possessive) {
          Node inner = n;
          inner.possessive = false;
          Node atomic;
          atomic.kind = Node::atomic;
          atomic.kids.push_back(std::move(inner));
          compile(atomic);
          return;
        }
        const Node& body = n.kids[0];
        for (int i = 0; i < n.min; ++i) compile(body);
        if (n.max < 0) {
          // L: split(body, out); body; jmp L
          const std::size_t s = emit({Op::split});
          compile(body);
          const std::size_t j = emit({Op::jmp});
          prog_[j].x = static_cast<int32_t>(s);
          set_split(s, s + 1, prog_.size(), n.greedy);
        } else {
          std::vector<std::size_t> splits;
          for (int i = n.min; i < n.max; ++i) {
            splits.push_back(emit({Op::split}));
            compile(body);
          }
          for (std::size_t s : splits) set_split(s, s + 1, prog_.size(), n.greedy);
        }
        return;
      }
    }
  }
  void set_split(std::size_t s, std::size_t body, std::size_t out, bool greedy) {
    prog_[s].x = static_cast<int32_t>(greedy ? body : out);
    prog_[s].y = static_cast<int32_t>(greedy ? out : body);
  }

  // What can begin a match: code points for which a match attempt is worth starting.
  struct FirstSet {
    bool nullable = true;
    bool any = true;
    std::vector<int> classes;
    std::vector<char32_t> chars;
    bool may_start(char32_t c, const Regex& re) const {
      if (any || nullable) return true;
      for (char32_t x : chars)
        if (x == c || (x >= 'a' && x <= 'z' && re.fold(c) == x)) return true;
      for (int k : classes)
        if (re.class_matches(re.classes_[static_cast<std::size_t>(k)], c)) return true;
      return false;
    }
  };
  // First set of the program from instruction pc (following splits and jumps); false when an
  // instruction that needs no character (anchor, lookahead, match) can come first.
  bool first_of(std::size_t pc, FirstSet& f, std::vector<char>& seen) const {
    if (seen[pc]) return true;
    seen[pc] = 1;
    const Inst& i = prog_[pc];
    switch (i.op) {
      case Op::chr:
      case Op::chr_fold:
        f.chars.push_back(i.c);
        return true;
      case Op::cls:
        f.classes.push_back(i.x);
        return true;
      case Op::any:
        return false;
      case Op::split:
        return first_of(static_cast<std::size_t>(i.x), f, seen) &&
               first_of(static_cast<std::size_t>(i.y), f, seen);
      case Op::jmp:
        return first_of(static_cast<std::size_t>(i.x), f, seen);
      case Op::atomic:
        return first_of(static_cast<std::size_t>(i.x), f, seen);
      default:
        return false;
    }
  }
  void compute_first() {
    FirstSet f;
    std::vector<char> seen(prog_.size(), 0);
    if (first_of(0, f, seen)) {
      f.any = false;
      f.nullable = false;
    }
    first_ = std::move(f);
  }

  struct Runner {
    const Regex& re;
    std::span<const char32_t> text;
    std::size_t steps = 0;
    std::vector<std::pair<int32_t, std::size_t>> stack;

    bool anchor_ok(uint8_t where, std::size_t pos) const {
      const std::size_t n = text.size();
      switch (where) {
        case Node::line_start:
          return pos == 0 || text[pos - 1] == '\n';
        case Node::line_end:
          return pos == n || text[pos] == '\n';
        case Node::text_start:
          return pos == 0;
        case Node::text_end:
          return pos == n;
        case Node::text_end_nl:
          return pos == n || (pos + 1 == n && text[pos] == '\n');
      }
      return false;
    }

    // Runs the program from pc at pos; on reaching `match`, sets end and returns true.
    bool run(int32_t pc, std::size_t pos, std::size_t& end) {
      const std::size_t base = stack.size();
      const auto& prog = re.prog_;
      const std::size_t n = text.size();
      for (;;) {
        if (++steps > kMaxSteps)
          fail(
              "regex \"{}\": more than {} backtracking steps on a {}-code-point text "
              "(pathological pattern)",
              re.pattern_, kMaxSteps, n);
        const Inst& in = prog[static_cast<std::size_t>(pc)];
        bool ok = true;
        switch (in.op) {
          case Op::chr:
            ok = pos < n && text[pos] == in.c;
            ++pos;
            ++pc;
            break;
          case Op::chr_fold:
            ok = pos < n && re.fold(text[pos]) == in.c;
            ++pos;
            ++pc;
            break;
          case Op::cls:
            ok =
                pos < n && re.class_matches(re.classes_[static_cast<std::size_t>(in.x)], text[pos]);
            ++pos;
            ++pc;
            break;
          case Op::any:
            ok = pos < n && text[pos] != '\n' &&
                 (re.dialect_ == Dialect::oniguruma || text[pos] != '\r');
            ++pos;
            ++pc;
            break;
          case Op::split:
            stack.emplace_back(in.y, pos);
            pc = in.x;
            break;
          case Op::jmp:
            pc = in.x;
            break;
          case Op::anchor:
            ok = anchor_ok(in.where, pos);
            ++pc;
            break;
          case Op::look: {
            std::size_t e;
            ok = run(in.x, pos, e) != in.negate;
            pc = in.y;
            break;
          }
          case Op::atomic: {
            std::size_t e;
            ok = run(in.x, pos, e);
            pos = e;
            pc = in.y;
            break;
          }
          case Op::match:
            end = pos;
            stack.resize(base);
            return true;
        }
        if (!ok) {
          if (stack.size() == base) return false;
          pc = stack.back().first;
          pos = stack.back().second;
          stack.pop_back();
        }
      }
    }
  };

  std::string pattern_;
  Dialect dialect_ = Dialect::oniguruma;
  unicode::Version version_ = unicode::Version::v16_0;
  std::vector<char32_t> src_;
  std::size_t pos_ = 0;
  bool fold_ = false;
  std::vector<Class> classes_;
  std::vector<Inst> prog_;
  FirstSet first_;
};

}  // namespace cbq::regex
