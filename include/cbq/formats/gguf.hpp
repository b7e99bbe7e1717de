#pragma once
// GGUF, llama.cpp's model file (version 3; version 2 has the same little-endian layout and is
// read too). See docs/GGUF.md.
//
//   "GGUF"  u32 version  u64 n_tensors  u64 n_kv
//   n_kv ×      { string key, u32 value_type, value }
//   n_tensors × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//   zero padding to `general.alignment` (default 32), then the data section; every tensor starts
//   at data_start + offset (a multiple of the alignment)
//   string = u64 length + bytes (no terminator); array = u32 element type, u64 count, elements
//
// ne[0] is the innermost dimension (a row), so a row-major (rows, cols) matrix has ne = {cols,
// rows}. Block types (llama.cpp's ggml-common.h), d and m are IEEE fp16:
//   Q4_0 {d; u8 qs[16]}      x[j] = ((qs[j] & 15) − 8) · d, x[j+16] = ((qs[j] >> 4) − 8) · d
//   Q4_1 {d; m; u8 qs[16]}   x[j] = (qs[j] & 15) · d + m, x[j+16] = (qs[j] >> 4) · d + m
//   Q8_0 {d; i8 qs[32]}      x[j] = qs[j] · d
//
// GgufFile reads a file over mmap and checks every count, length and offset against the file
// size before using it: a truncated or hostile file throws cbq::Error naming the file, the
// offset and the field, and nothing is allocated beyond what the remaining bytes can hold.
// GgufWriter writes any metadata (all value types, arrays of them) and tensors, to a temporary
// renamed onto `path` when complete.
#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/ranges.h>

#include "cbq/core/error.hpp"
#include "cbq/core/half.hpp"
#include "cbq/core/mmap.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq::io {

inline constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
inline constexpr uint32_t kGgufVersion = 3;
inline constexpr uint32_t kGgufDefaultAlignment = 32;
inline constexpr std::size_t kGgmlMaxName = 64;  // ggml's limit, terminator included
inline constexpr int kGgmlMaxDims = 4;

// ---- metadata values ----

enum class GgufType : uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12,
};

inline const char* gguf_type_name(GgufType t) {
  static constexpr const char* names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                          "bool", "string", "array", "u64", "i64", "f64"};
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? names[i] : "invalid";
}
inline bool gguf_type_valid(uint32_t t) { return t <= 12; }
// Bytes of a scalar of type t (0 for string and array).
inline std::size_t gguf_scalar_size(GgufType t) {
  switch (t) {
    case GgufType::u8:
    case GgufType::i8:
    case GgufType::boolean:
      return 1;
    case GgufType::u16:
    case GgufType::i16:
      return 2;
    case GgufType::u32:
    case GgufType::i32:
    case GgufType::f32:
      return 4;
    case GgufType::u64:
    case GgufType::i64:
    case GgufType::f64:
      return 8;
    default:
      return 0;
  }
}

namespace detail {
template <class T>
constexpr GgufType gguf_type_of() {
  if constexpr (std::is_same_v<T, uint8_t>)
    return GgufType::u8;
  else if constexpr (std::is_same_v<T, int8_t>)
    return GgufType::i8;
  else if constexpr (std::is_same_v<T, uint16_t>)
    return GgufType::u16;
  else if constexpr (std::is_same_v<T, int16_t>)
    return GgufType::i16;
  else if constexpr (std::is_same_v<T, uint32_t>)
    return GgufType::u32;
  else if constexpr (std::is_same_v<T, int32_t>)
    return GgufType::i32;
  else if constexpr (std::is_same_v<T, float>)
    return GgufType::f32;
  else if constexpr (std::is_same_v<T, bool>)
    return GgufType::boolean;
  else if constexpr (std::is_same_v<T, uint64_t>)
    return GgufType::u64;
  else if constexpr (std::is_same_v<T, int64_t>)
    return GgufType::i64;
  else if constexpr (std::is_same_v<T, double>)
    return GgufType::f64;
  else
    static_assert(sizeof(T) == 0, "GgufValue: not a GGUF scalar type");
}
}  // namespace detail

// One metadata value: a scalar, a string, or an array of scalars or strings (GGUF allows arrays
// of arrays; ggml rejects them, and so do we). Arrays of scalars keep their raw little-endian
// bytes, so reading a file never allocates much more than its size.
class GgufValue {
 public:
  GgufValue() = default;

  template <class T>
  static GgufValue of(T v) {
    GgufValue out;
    out.type_ = detail::gguf_type_of<T>();
    if constexpr (std::is_same_v<T, bool>) {
      out.bits_ = v ? 1 : 0;
    } else {
      std::memcpy(&out.bits_, &v, sizeof(T));
    }
    return out;
  }
  static GgufValue string(std::string s) {
    GgufValue out;
    out.type_ = GgufType::string;
    out.str_ = std::move(s);
    return out;
  }
  template <class T>
  static GgufValue array_of(const std::vector<T>& values) {
    GgufValue out;
    out.type_ = GgufType::array;
    if constexpr (std::is_same_v<T, std::string>) {
      out.elem_ = GgufType::string;
      out.strings_ = values;
    } else {
      out.elem_ = detail::gguf_type_of<T>();
      out.raw_.resize(values.size() * sizeof(T));
      for (std::size_t i = 0; i < values.size(); ++i) {
        const T v = values[i];
        std::memcpy(out.raw_.data() + i * sizeof(T), &v, sizeof(T));
      }
    }
    out.count_ = values.size();
    return out;
  }
  // An array of `elem` (a scalar type or string) from values of that type.
  static GgufValue array(GgufType elem, const std::vector<GgufValue>& items) {
    CBQ_CHECK(elem != GgufType::array && gguf_type_valid(static_cast<uint32_t>(elem)),
              "GGUF: arrays of {} are not supported", gguf_type_name(elem));
    GgufValue out;
    out.type_ = GgufType::array;
    out.elem_ = elem;
    const std::size_t size = gguf_scalar_size(elem);
    for (std::size_t i = 0; i < items.size(); ++i) {
      CBQ_CHECK(items[i].type_ == elem, "GGUF: array of {} holds a {} at index {}",
                gguf_type_name(elem), gguf_type_name(items[i].type_), i);
      if (elem == GgufType::string) {
        out.strings_.push_back(items[i].str_);
      } else {
        const uint64_t bits = items[i].bits_;
        const auto* b = reinterpret_cast<const std::byte*>(&bits);
        out.raw_.insert(out.raw_.end(), b, b + size);
      }
    }
    out.count_ = items.size();
    return out;
  }

  GgufType type() const { return type_; }
  GgufType array_type() const { return elem_; }
  bool is_integer() const { return is_integer_type(type_); }
  static bool is_integer_type(GgufType t) {
    switch (t) {
      case GgufType::u8:
      case GgufType::i8:
      case GgufType::u16:
      case GgufType::i16:
      case GgufType::u32:
      case GgufType::i32:
      case GgufType::u64:
      case GgufType::i64:
        return true;
      default:
        return false;
    }
  }

  // The scalar as exactly type T (no conversion); throws naming both types otherwise.
  template <class T>
  T get() const {
    constexpr GgufType want = detail::gguf_type_of<T>();
    CBQ_CHECK(type_ == want, "GGUF: value is {}, not {}", gguf_type_name(type_),
              gguf_type_name(want));
    if constexpr (std::is_same_v<T, bool>) {
      return bits_ != 0;
    } else {
      T v;
      std::memcpy(&v, &bits_, sizeof(T));
      return v;
    }
  }
  // Any integer type as int64 (u64 above INT64_MAX throws).
  int64_t as_int() const {
    switch (type_) {
      case GgufType::u8:
        return get<uint8_t>();
      case GgufType::i8:
        return get<int8_t>();
      case GgufType::u16:
        return get<uint16_t>();
      case GgufType::i16:
        return get<int16_t>();
      case GgufType::u32:
        return get<uint32_t>();
      case GgufType::i32:
        return get<int32_t>();
      case GgufType::i64:
        return get<int64_t>();
      case GgufType::u64: {
        const uint64_t v = get<uint64_t>();
        CBQ_CHECK(v <= static_cast<uint64_t>(INT64_MAX), "GGUF: u64 value {} is too large", v);
        return static_cast<int64_t>(v);
      }
      default:
        fail("GGUF: value is {}, not an integer", gguf_type_name(type_));
    }
  }
  double as_double() const {
    if (type_ == GgufType::f32) return get<float>();
    if (type_ == GgufType::f64) return get<double>();
    return static_cast<double>(as_int());
  }
  const std::string& as_string() const {
    CBQ_CHECK(type_ == GgufType::string, "GGUF: value is {}, not a string", gguf_type_name(type_));
    return str_;
  }

  // ---- arrays ----
  std::size_t size() const {
    CBQ_CHECK(type_ == GgufType::array, "GGUF: value is {}, not an array", gguf_type_name(type_));
    return static_cast<std::size_t>(count_);
  }
  // Element i as a value of its own.
  GgufValue item(std::size_t i) const {
    CBQ_CHECK(i < size(), "GGUF: array index {} out of range ({} elements)", i, size());
    if (elem_ == GgufType::string) return string(strings_[i]);
    GgufValue v;
    v.type_ = elem_;
    const std::size_t n = gguf_scalar_size(elem_);
    std::memcpy(&v.bits_, raw_.data() + i * n, n);
    return v;
  }
  // The elements as exactly type T (std::string for string arrays).
  template <class T>
  std::vector<T> array() const {
    if constexpr (std::is_same_v<T, std::string>) {
      CBQ_CHECK(type_ == GgufType::array && elem_ == GgufType::string,
                "GGUF: value is {}, not an array of strings", describe_type());
      return strings_;
    } else {
      constexpr GgufType want = detail::gguf_type_of<T>();
      CBQ_CHECK(type_ == GgufType::array && elem_ == want, "GGUF: value is {}, not an array of {}",
                describe_type(), gguf_type_name(want));
      std::vector<T> out(static_cast<std::size_t>(count_));
      for (std::size_t i = 0; i < out.size(); ++i) {
        if constexpr (std::is_same_v<T, bool>) {
          out[i] = raw_[i] != std::byte{0};
        } else {
          std::memcpy(&out[i], raw_.data() + i * sizeof(T), sizeof(T));
        }
      }
      return out;
    }
  }
  const std::vector<std::string>& strings() const {
    CBQ_CHECK(type_ == GgufType::array && elem_ == GgufType::string,
              "GGUF: value is {}, not an array of strings", describe_type());
    return strings_;
  }
  // Raw little-endian bytes of a scalar (the low gguf_scalar_size(type) bytes) or of the
  // elements of a scalar array.
  uint64_t raw_bits() const { return bits_; }
  const std::vector<std::byte>& raw_array() const { return raw_; }

  std::string describe_type() const {
    if (type_ != GgufType::array) return gguf_type_name(type_);
    return fmt::format("array of {} {}", count_, gguf_type_name(elem_));
  }

  bool operator==(const GgufValue& o) const {
    return type_ == o.type_ && elem_ == o.elem_ && bits_ == o.bits_ && str_ == o.str_ &&
           count_ == o.count_ && raw_ == o.raw_ && strings_ == o.strings_;
  }

 private:
  friend class GgufFile;
  GgufType type_ = GgufType::u8;
  GgufType elem_ = GgufType::u8;  // element type of an array
  uint64_t bits_ = 0;             // scalar payload
  std::string str_;
  uint64_t count_ = 0;                // array length
  std::vector<std::byte> raw_;        // array of scalars: count × element size bytes
  std::vector<std::string> strings_;  // array of strings
};

// ---- tensor types ----

enum class GgmlType : uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q8_1 = 9,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  q8_k = 15,
  iq2_xxs = 16,
  iq2_xs = 17,
  iq3_xxs = 18,
  iq1_s = 19,
  iq4_nl = 20,
  iq3_s = 21,
  iq2_s = 22,
  iq4_xs = 23,
  i8 = 24,
  i16 = 25,
  i32 = 26,
  i64 = 27,
  f64 = 28,
  iq1_m = 29,
  bf16 = 30,
  tq1_0 = 34,
  tq2_0 = 35,
  mxfp4 = 39,
};

struct GgmlTypeTraits {
  const char* name;
  int64_t block;  // elements per block
  int64_t bytes;  // bytes per block
};

// Block size and bytes of every type in ggml's type_traits table (llama.cpp as vendored by
// llama-cpp-python 0.3.16); nullopt for ids that are removed or unknown.
inline std::optional<GgmlTypeTraits> ggml_type_traits(uint32_t t) {
  switch (t) {
    case 0:
      return GgmlTypeTraits{"F32", 1, 4};
    case 1:
      return GgmlTypeTraits{"F16", 1, 2};
    case 2:
      return GgmlTypeTraits{"Q4_0", 32, 18};
    case 3:
      return GgmlTypeTraits{"Q4_1", 32, 20};
    case 6:
      return GgmlTypeTraits{"Q5_0", 32, 22};
    case 7:
      return GgmlTypeTraits{"Q5_1", 32, 24};
    case 8:
      return GgmlTypeTraits{"Q8_0", 32, 34};
    case 9:
      return GgmlTypeTraits{"Q8_1", 32, 36};
    case 10:
      return GgmlTypeTraits{"Q2_K", 256, 84};
    case 11:
      return GgmlTypeTraits{"Q3_K", 256, 110};
    case 12:
      return GgmlTypeTraits{"Q4_K", 256, 144};
    case 13:
      return GgmlTypeTraits{"Q5_K", 256, 176};
    case 14:
      return GgmlTypeTraits{"Q6_K", 256, 210};
    case 15:
      return GgmlTypeTraits{"Q8_K", 256, 292};
    case 16:
      return GgmlTypeTraits{"IQ2_XXS", 256, 66};
    case 17:
      return GgmlTypeTraits{"IQ2_XS", 256, 74};
    case 18:
      return GgmlTypeTraits{"IQ3_XXS", 256, 98};
    case 19:
      return GgmlTypeTraits{"IQ1_S", 256, 50};
    case 20:
      return GgmlTypeTraits{"IQ4_NL", 32, 18};
    case 21:
      return GgmlTypeTraits{"IQ3_S", 256, 110};
    case 22:
      return GgmlTypeTraits{"IQ2_S", 256, 82};
    case 23:
      return GgmlTypeTraits{"IQ4_XS", 256, 136};
    case 24:
      return GgmlTypeTraits{"I8", 1, 1};
    case 25:
      return GgmlTypeTraits{"I16", 1, 2};
    case 26:
      return GgmlTypeTraits{"I32", 1, 4};
    case 27:
      return GgmlTypeTraits{"I64", 1, 8};
    case 28:
      return GgmlTypeTraits{"F64", 1, 8};
    case 29:
      return GgmlTypeTraits{"IQ1_M", 256, 56};
    case 30:
      return GgmlTypeTraits{"BF16", 1, 2};
    case 34:
      return GgmlTypeTraits{"TQ1_0", 256, 54};
    case 35:
      return GgmlTypeTraits{"TQ2_0", 256, 66};
    case 39:
      return GgmlTypeTraits{"MXFP4", 32, 17};
    default:
      return std::nullopt;
  }
}
inline GgmlTypeTraits ggml_traits(GgmlType t) {
  auto tr = ggml_type_traits(static_cast<uint32_t>(t));
  CBQ_CHECK(tr.has_value(), "GGUF: unknown ggml type {}", static_cast<uint32_t>(t));
  return *tr;
}
inline const char* ggml_type_name(GgmlType t) {
  auto tr = ggml_type_traits(static_cast<uint32_t>(t));
  return tr ? tr->name : "invalid";
}

// ---- llama.cpp blocks ----

struct BlockQ4_0 {
  uint16_t d;  // fp16
  uint8_t qs[16];
};
struct BlockQ4_1 {
  uint16_t d, m;  // fp16
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;  // fp16
  int8_t qs[32];
};
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34,
              "llama.cpp block layouts");

// Nibbles n[0..31] (each 0..15) → qs: element j in the low nibble of byte j, element j+16 in
// its high nibble.
inline void pack_nibbles(const uint8_t* n, uint8_t* qs) {
  for (int j = 0; j < 16; ++j)
    qs[j] = static_cast<uint8_t>((n[j] & 0x0F) | ((n[j + 16] & 0x0F) << 4));
}
inline BlockQ4_0 make_block_q4_0(uint16_t d, const uint8_t* nibbles) {
  BlockQ4_0 b{};
  b.d = d;
  pack_nibbles(nibbles, b.qs);
  return b;
}
inline BlockQ4_1 make_block_q4_1(uint16_t d, uint16_t m, const uint8_t* nibbles) {
  BlockQ4_1 b{};
  b.d = d;
  b.m = m;
  pack_nibbles(nibbles, b.qs);
  return b;
}
inline BlockQ8_0 make_block_q8_0(uint16_t d, const int8_t* q) {
  BlockQ8_0 b{};
  b.d = d;
  std::memcpy(b.qs, q, 32);
  return b;
}

// Dequantizes `n` elements of type t from `src` into dst, with ggml's arithmetic (fp16 → fp32
// exactly, then x0·d or x0·d + m in float). Supports F32, F16, BF16, Q4_0, Q4_1, Q8_0.
inline void ggml_dequantize(GgmlType t, const std::byte* src, float* dst, int64_t n,
                            const std::string& what) {
  auto load = [&](auto& block, int64_t i) {
    std::memcpy(&block, src + i * sizeof(block), sizeof(block));
  };
  switch (t) {
    case GgmlType::f32:
      std::memcpy(dst, src, static_cast<std::size_t>(n) * 4);
      return;
    case GgmlType::f16:
    case GgmlType::bf16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = t == GgmlType::f16 ? f16_to_float(h) : bf16_to_float(h);
      }
      return;
    case GgmlType::q4_0:
      for (int64_t i = 0; i < n / 32; ++i) {
        BlockQ4_0 b;
        load(b, i);
        const float d = f16_to_float(b.d);
        for (int j = 0; j < 16; ++j) {
          const int x0 = (b.qs[j] & 0x0F) - 8, x1 = (b.qs[j] >> 4) - 8;
          dst[i * 32 + j] = static_cast<float>(x0) * d;
          dst[i * 32 + j + 16] = static_cast<float>(x1) * d;
        }
      }
      return;
    case GgmlType::q4_1:
      for (int64_t i = 0; i < n / 32; ++i) {
        BlockQ4_1 b;
        load(b, i);
        const float d = f16_to_float(b.d), m = f16_to_float(b.m);
        for (int j = 0; j < 16; ++j) {
          const int x0 = b.qs[j] & 0x0F, x1 = b.qs[j] >> 4;
          dst[i * 32 + j] = static_cast<float>(x0) * d + m;
          dst[i * 32 + j + 16] = static_cast<float>(x1) * d + m;
        }
      }
      return;
    case GgmlType::q8_0:
      for (int64_t i = 0; i < n / 32; ++i) {
        BlockQ8_0 b;
        load(b, i);
        const float d = f16_to_float(b.d);
        for (int j = 0; j < 32; ++j) dst[i * 32 + j] = static_cast<float>(b.qs[j]) * d;
      }
      return;
    default:
      fail(
          "{}: ggml type {} cannot be dequantized by cbq (supported: F32, F16, BF16, Q4_0, Q4_1, "
          "Q8_0)",
          what, ggml_type_name(t));
  }
}

// ---- tensors ----

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // innermost first
  GgmlType type = GgmlType::f32;
  uint64_t offset = 0;       // from the start of the data section
  uint64_t nbytes = 0;       // bytes of data
  uint64_t info_offset = 0;  // where the tensor info starts in the file

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t e : ne) n *= e;
    return n;
  }
  // Row-major shape (ne reversed): a matrix with ne = {cols, rows} has shape (rows, cols).
  Shape shape() const { return Shape(ne.rbegin(), ne.rend()); }
};

namespace detail {

inline uint64_t align_up(uint64_t x, uint64_t a, std::string_view what) {
  return checked_add(x, (a - x % a) % a, what);
}

// Bytes of a tensor of type t with dims ne (ne[0] must be a multiple of the block size).
inline uint64_t ggml_nbytes(const GgmlTypeTraits& tr, const std::vector<int64_t>& ne,
                            std::string_view what) {
  uint64_t n = 1;
  for (int64_t e : ne) n = checked_mul(n, static_cast<uint64_t>(e), what);
  return checked_mul(n / static_cast<uint64_t>(tr.block), static_cast<uint64_t>(tr.bytes), what);
}

// Checks name, dims and block divisibility; `where` prefixes the message.
inline void check_tensor_shape(const std::string& where, const std::string& name,
                               const std::vector<int64_t>& ne, GgmlType type) {
  CBQ_CHECK(!name.empty(), "{}: empty tensor name", where);
  CBQ_CHECK(name.size() < kGgmlMaxName, "{}: tensor name '{}' has {} bytes; ggml allows at most {}",
            where, name, name.size(), kGgmlMaxName - 1);
  CBQ_CHECK(!ne.empty() && static_cast<int>(ne.size()) <= kGgmlMaxDims,
            "{}: tensor '{}' has {} dimensions; GGUF tensors have 1 to {}", where, name, ne.size(),
            kGgmlMaxDims);
  const GgmlTypeTraits tr = ggml_traits(type);
  uint64_t total = 1;
  for (std::size_t i = 0; i < ne.size(); ++i) {
    CBQ_CHECK(ne[i] >= 1, "{}: tensor '{}' dimension ne[{}] = {} must be positive", where, name, i,
              ne[i]);
    CBQ_CHECK(!__builtin_mul_overflow(total, static_cast<uint64_t>(ne[i]), &total) &&
                  total <= static_cast<uint64_t>(INT64_MAX),
              "{}: tensor '{}' element count overflows (ne = {})", where, name,
              fmt::join(ne, ", "));
  }
  CBQ_CHECK(ne[0] % tr.block == 0,
            "{}: tensor '{}' of type {} needs ne[0] (row length) = {} to be a multiple of its "
            "block size {}",
            where, name, tr.name, ne[0], tr.block);
}

}  // namespace detail

// ---- writer ----

class GgufWriter {
 public:
  // Fills exactly nbytes of tensor data.
  using Filler = std::function<void(std::span<std::byte>)>;

  // Sets (or replaces) a metadata key. "general.alignment" must be a u32 power of two.
  void set(const std::string& key, GgufValue value) {
    CBQ_CHECK(!key.empty(), "GGUF writer: empty metadata key");
    if (key == "general.alignment") {
      CBQ_CHECK(value.type() == GgufType::u32, "GGUF writer: general.alignment must be u32, not {}",
                gguf_type_name(value.type()));
      const uint32_t a = value.get<uint32_t>();
      CBQ_CHECK(a > 0 && std::has_single_bit(a),
                "GGUF writer: general.alignment = {} is not a power of two", a);
    }
    auto it = index_.find(key);
    if (it != index_.end()) {
      kv_[it->second].second = std::move(value);
    } else {
      index_[key] = kv_.size();
      kv_.emplace_back(key, std::move(value));
    }
  }
  template <class T>
  void set_scalar(const std::string& key, T v) {
    set(key, GgufValue::of<T>(v));
  }
  void set_string(const std::string& key, std::string v) {
    set(key, GgufValue::string(std::move(v)));
  }
  const GgufValue* find(const std::string& key) const {
    auto it = index_.find(key);
    return it == index_.end() ? nullptr : &kv_[it->second].second;
  }
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }

  uint32_t alignment() const {
    const GgufValue* a = find("general.alignment");
    return a ? a->get<uint32_t>() : kGgufDefaultAlignment;
  }
  void set_alignment(uint32_t a) { set_scalar<uint32_t>("general.alignment", a); }

  // A tensor whose bytes `fill` writes when the file is written (so large models are converted
  // one tensor at a time); ne innermost first.
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, Filler fill) {
    detail::check_tensor_shape("GGUF writer", name, ne, type);
    CBQ_CHECK(!tensor_index_.count(name), "GGUF writer: tensor '{}' added twice", name);
    const uint64_t nbytes = detail::ggml_nbytes(ggml_traits(type), ne, name);
    tensor_index_[name] = tensors_.size();
    tensors_.push_back({name, std::move(ne), type, nbytes, std::move(fill)});
  }
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                  std::vector<std::byte> bytes) {
    const uint64_t nbytes = detail::ggml_nbytes(ggml_traits(type), ne, name);
    CBQ_CHECK(bytes.size() == nbytes, "GGUF writer: tensor '{}' has {} bytes, its shape needs {}",
              name, bytes.size(), nbytes);
    auto shared = std::make_shared<std::vector<std::byte>>(std::move(bytes));
    add_tensor(name, type, std::move(ne), [shared](std::span<std::byte> out) {
      std::memcpy(out.data(), shared->data(), out.size());
    });
  }
  // A float tensor (row-major shape) stored as F32, F16 or BF16.
  void add_float(const std::string& name, const Tensor<float>& t, GgmlType type = GgmlType::f32) {
    CBQ_CHECK(type == GgmlType::f32 || type == GgmlType::f16 || type == GgmlType::bf16,
              "GGUF writer: add_float('{}') stores F32, F16 or BF16, not {}", name,
              ggml_type_name(type));
    Tensor<float> c = t.to(Device::cpu).contiguous();
    std::vector<int64_t> ne;
    for (int d = c.ndim() - 1; d >= 0; --d) ne.push_back(c.size(d));
    add_tensor(name, type, std::move(ne), [c, type](std::span<std::byte> out) {
      const float* p = c.data();
      if (type == GgmlType::f32) {
        std::memcpy(out.data(), p, out.size());
        return;
      }
      for (int64_t i = 0; i < c.numel(); ++i) {
        const uint16_t h = type == GgmlType::f16 ? float_to_f16(p[i]) : float_to_bf16(p[i]);
        std::memcpy(out.data() + 2 * i, &h, 2);
      }
    });
  }
  std::size_t tensor_count() const { return tensors_.size(); }

  // Writes the file (to a temporary beside it, renamed onto path when complete; atomic_file.hpp).
  // Returns its size.
  uint64_t write(const std::string& path) const {
    const uint64_t align = alignment();
    std::string header;
    auto put = [&](const void* p, std::size_t n) { header.append(static_cast<const char*>(p), n); };
    auto put_u32 = [&](uint32_t v) { put(&v, 4); };
    auto put_u64 = [&](uint64_t v) { put(&v, 8); };
    auto put_str = [&](const std::string& s) {
      put_u64(s.size());
      put(s.data(), s.size());
    };
    auto put_value = [&](const GgufValue& v) {
      if (v.type() == GgufType::string) {
        put_str(v.as_string());
      } else if (v.type() == GgufType::array) {
        put_u32(static_cast<uint32_t>(v.array_type()));
        put_u64(v.size());
        if (v.array_type() == GgufType::string) {
          for (const std::string& item : v.strings()) put_str(item);
        } else {
          put(v.raw_array().data(), v.raw_array().size());
        }
      } else {
        const uint64_t bits = v.raw_bits();
        put(&bits, gguf_scalar_size(v.type()));
      }
    };
    put_u32(kGgufMagic);
    put_u32(kGgufVersion);
    put_u64(tensors_.size());
    put_u64(kv_.size());
    for (const auto& [key, value] : kv_) {
      put_str(key);
      put_u32(static_cast<uint32_t>(value.type()));
      put_value(value);
    }
    std::vector<uint64_t> offsets;
    uint64_t data_size = 0;
    for (const Pending& t : tensors_) {
      put_str(t.name);
      put_u32(static_cast<uint32_t>(t.ne.size()));
      for (int64_t e : t.ne) put_u64(static_cast<uint64_t>(e));
      put_u32(static_cast<uint32_t>(t.type));
      put_u64(data_size);
      offsets.push_back(data_size);
      data_size = detail::align_up(checked_add(data_size, t.nbytes, path), align, path);
    }
    header.resize(detail::align_up(header.size(), align, path), '\0');
    const uint64_t total = checked_add(header.size(), data_size, path);
    write_file_atomic(path, [&](std::ofstream& out) {
      out.write(header.data(), static_cast<std::streamsize>(header.size()));
      std::vector<std::byte> buf;
      for (const Pending& t : tensors_) {
        buf.assign(detail::align_up(t.nbytes, align, path), std::byte{0});
        t.fill(std::span<std::byte>(buf.data(), t.nbytes));
        out.write(reinterpret_cast<const char*>(buf.data()),
                  static_cast<std::streamsize>(buf.size()));
      }
    });
    return total;
  }

 private:
  struct Pending {
    std::string name;
    std::vector<int64_t> ne;
    GgmlType type;
    uint64_t nbytes;
    Filler fill;
  };
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, std::size_t> index_;
  std::vector<Pending> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
};

// ---- reader ----

class GgufFile {
 public:
  explicit GgufFile(std::string path) : file_(std::move(path)) { parse(); }

  const std::string& path() const { return file_.path(); }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  uint64_t size() const { return file_.size(); }

  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(const std::string& key) const {
    auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
  }
  const GgufValue& at(const std::string& key) const {
    const GgufValue* v = find(key);
    CBQ_CHECK(v != nullptr, "{}: metadata key '{}' is missing", path(), key);
    return *v;
  }
  // The value of `key` as T, checked (integers must fit T; floats accept f32/f64).
  template <class T>
  T get(const std::string& key) const {
    const GgufValue& v = at(key);
    try {
      if constexpr (std::is_same_v<T, std::string>) {
        return v.as_string();
      } else if constexpr (std::is_same_v<T, bool>) {
        return v.get<bool>();
      } else if constexpr (std::is_floating_point_v<T>) {
        CBQ_CHECK(v.type() == GgufType::f32 || v.type() == GgufType::f64,
                  "value is {}, not a float", gguf_type_name(v.type()));
        return static_cast<T>(v.as_double());
      } else {
        if constexpr (std::is_same_v<T, uint64_t>) {
          if (v.type() == GgufType::u64) return v.get<uint64_t>();
        }
        const int64_t i = v.as_int();
        const bool fits = std::is_signed_v<T>
                              ? i >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
                                    i <= static_cast<int64_t>(std::numeric_limits<T>::max())
                              : i >= 0 && static_cast<uint64_t>(i) <=
                                              static_cast<uint64_t>(std::numeric_limits<T>::max());
        CBQ_CHECK(fits, "value {} out of range", i);
        return static_cast<T>(i);
      }
    } catch (const Error& e) {
      fail("{}: metadata key '{}': {}", path(), key, e.what());
    }
  }
  template <class T>
  T get_or(const std::string& key, T fallback) const {
    return find(key) ? get<T>(key) : fallback;
  }

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }
  const GgufTensorInfo& tensor(const std::string& name) const {
    const GgufTensorInfo* t = find_tensor(name);
    CBQ_CHECK(t != nullptr, "{}: tensor '{}' is missing", path(), name);
    return *t;
  }
  std::span<const std::byte> data(const GgufTensorInfo& t) const {
    return file_.bytes().subspan(data_offset_ + t.offset, t.nbytes);
  }
  // The tensor dequantized to float, in its row-major shape.
  Tensor<float> to_float(const std::string& name) const {
    const GgufTensorInfo& t = tensor(name);
    Tensor<float> out = Tensor<float>::empty(t.shape());
    ggml_dequantize(t.type, data(t).data(), out.data(), t.numel(),
                    fmt::format("{}: tensor '{}'", path(), t.name));
    return out;
  }

 private:
  // Reads with bounds checks; errors name the file, offset and field.
  struct Cursor {
    std::span<const std::byte> bytes;
    const std::string* path;
    uint64_t pos = 0;

    uint64_t remaining() const { return bytes.size() - pos; }
    [[noreturn]] void truncated(uint64_t need, const std::string& field) const {
      fail("{}: truncated GGUF: {} needs {} bytes at offset {}, only {} left (file is {} bytes)",
           *path, field, need, pos, remaining(), bytes.size());
    }
    const std::byte* take(uint64_t n, const std::string& field) {
      if (n > remaining()) truncated(n, field);
      const std::byte* p = bytes.data() + pos;
      pos += n;
      return p;
    }
    template <class T>
    T read(const std::string& field) {
      T v;
      std::memcpy(&v, take(sizeof(T), field), sizeof(T));
      return v;
    }
    std::string read_string(const std::string& field) {
      const uint64_t at = pos;
      const uint64_t n = read<uint64_t>(field + " length");
      if (n > remaining())
        fail("{}: {} at offset {} has length {}, but only {} bytes are left (file is {} bytes)",
             *path, field, at, n, remaining(), bytes.size());
      const std::byte* p = take(n, field);
      return std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n));
    }
  };

  // A metadata value; arrays hold scalars or strings only (element type 9 is refused below).
  GgufValue read_value(Cursor& c, GgufType type, const std::string& field) {
    GgufValue v;
    v.type_ = type;
    switch (type) {
      case GgufType::string:
        v.str_ = c.read_string(field);
        return v;
      case GgufType::array: {
        const uint64_t at = c.pos;
        const uint32_t elem = c.read<uint32_t>(field + " element type");
        CBQ_CHECK(
            gguf_type_valid(elem) && elem != static_cast<uint32_t>(GgufType::array),
            "{}: {} at offset {} has invalid element type {} (arrays of arrays are not supported)",
            path(), field, at, elem);
        v.elem_ = static_cast<GgufType>(elem);
        const uint64_t count = c.read<uint64_t>(field + " count");
        const uint64_t min_size = v.elem_ == GgufType::string ? 8 : gguf_scalar_size(v.elem_);
        if (count > c.remaining() / min_size)
          fail(
              "{}: {} at offset {} claims {} elements of {} ({} bytes at least), but only {} "
              "bytes are left",
              path(), field, at, count, gguf_type_name(v.elem_), min_size, c.remaining());
        v.count_ = count;
        if (v.elem_ == GgufType::string) {
          v.strings_.reserve(static_cast<std::size_t>(count));
          for (uint64_t i = 0; i < count; ++i)
            v.strings_.push_back(c.read_string(fmt::format("{}[{}]", field, i)));
        } else {
          const std::byte* p = c.take(count * min_size, field);
          v.raw_.assign(p, p + count * min_size);
          if (v.elem_ == GgufType::boolean)
            for (uint64_t i = 0; i < count; ++i)
              CBQ_CHECK(v.raw_[i] <= std::byte{1},
                        "{}: {}[{}] at offset {} is a bool with byte value {} (must be 0 or 1)",
                        path(), field, i, c.pos - count + i, static_cast<int>(v.raw_[i]));
        }
        return v;
      }
      default: {
        const std::size_t n = gguf_scalar_size(type);
        std::memcpy(&v.bits_, c.take(n, field), n);
        if (type == GgufType::boolean && v.bits_ > 1)
          fail("{}: {} at offset {} is a bool with byte value {} (must be 0 or 1)", path(), field,
               c.pos - 1, v.bits_);
        return v;
      }
    }
  }

  void parse() {
    Cursor c{file_.bytes(), &file_.path()};
    const std::string& p = file_.path();
    CBQ_CHECK(file_.size() >= 24,
              "{}: not a GGUF file: {} bytes, shorter than the 24-byte GGUF header", p,
              file_.size());
    const uint32_t magic = c.read<uint32_t>("magic");
    CBQ_CHECK(magic == kGgufMagic,
              "{}: not a GGUF file: magic 0x{:08X} at offset 0 (expected 'GGUF')", p, magic);
    version_ = c.read<uint32_t>("version");
    if (version_ != 2 && version_ != 3) {
      const uint32_t swapped = __builtin_bswap32(version_);
      if (swapped == 2 || swapped == 3)
        fail("{}: big-endian GGUF (version field 0x{:08X} at offset 4) is not supported", p,
             version_);
      fail("{}: GGUF version {} at offset 4 is not supported (cbq reads versions 2 and 3)", p,
           version_);
    }
    const uint64_t n_tensors = c.read<uint64_t>("tensor count");
    const uint64_t n_kv = c.read<uint64_t>("metadata count");
    // Each key/value needs at least 8 + 4 + 1 bytes, each tensor info 8 + 4 + 8 + 4 + 8.
    if (n_kv > c.remaining() / 13)
      fail("{}: metadata count {} at offset 16 cannot fit in the {} bytes after the header", p,
           n_kv, c.remaining());
    if (n_tensors > c.remaining() / 32)
      fail("{}: tensor count {} at offset 8 cannot fit in the {} bytes after the header", p,
           n_tensors, c.remaining());
    kv_.reserve(static_cast<std::size_t>(n_kv));
    for (uint64_t i = 0; i < n_kv; ++i) {
      const uint64_t at = c.pos;
      std::string key = c.read_string(fmt::format("metadata[{}] key", i));
      CBQ_CHECK(!key.empty(), "{}: metadata[{}] at offset {} has an empty key", p, i, at);
      CBQ_CHECK(!kv_index_.count(key), "{}: metadata key '{}' at offset {} appears twice", p, key,
                at);
      const std::string field = fmt::format("metadata '{}'", key);
      const uint64_t type_at = c.pos;
      const uint32_t type = c.read<uint32_t>(field + " type");
      CBQ_CHECK(gguf_type_valid(type), "{}: {} at offset {} has invalid value type {}", p, field,
                type_at, type);
      GgufValue v = read_value(c, static_cast<GgufType>(type), field + " value");
      kv_index_[key] = kv_.size();
      kv_.emplace_back(std::move(key), std::move(v));
    }
    alignment_ = kGgufDefaultAlignment;
    if (const GgufValue* a = find("general.alignment")) {
      CBQ_CHECK(a->type() == GgufType::u32, "{}: general.alignment has type {}, expected u32", p,
                gguf_type_name(a->type()));
      alignment_ = a->get<uint32_t>();
      CBQ_CHECK(alignment_ > 0 && std::has_single_bit(alignment_),
                "{}: general.alignment = {} is not a power of two", p, alignment_);
    }
    tensors_.reserve(static_cast<std::size_t>(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      t.info_offset = c.pos;
      t.name = c.read_string(fmt::format("tensor[{}] name", i));
      const std::string field = fmt::format("tensor[{}] '{}'", i, t.name);
      CBQ_CHECK(!t.name.empty() && t.name.size() < kGgmlMaxName,
                "{}: tensor[{}] at offset {} has a name of {} bytes (1 to {} allowed)", p, i,
                t.info_offset, t.name.size(), kGgmlMaxName - 1);
      CBQ_CHECK(!tensor_index_.count(t.name), "{}: tensor '{}' at offset {} appears twice", p,
                t.name, t.info_offset);
      const uint64_t dims_at = c.pos;
      const uint32_t n_dims = c.read<uint32_t>(field + " n_dims");
      CBQ_CHECK(n_dims >= 1 && n_dims <= static_cast<uint32_t>(kGgmlMaxDims),
                "{}: {} at offset {} has n_dims = {} (1 to {} allowed)", p, field, dims_at, n_dims,
                kGgmlMaxDims);
      for (uint32_t d = 0; d < n_dims; ++d) {
        const uint64_t at = c.pos;
        const uint64_t e = c.read<uint64_t>(fmt::format("{} ne[{}]", field, d));
        CBQ_CHECK(e >= 1 && e <= static_cast<uint64_t>(INT64_MAX),
                  "{}: {} ne[{}] = {} at offset {} is out of range", p, field, d, e, at);
        t.ne.push_back(static_cast<int64_t>(e));
      }
      const uint64_t type_at = c.pos;
      const uint32_t type = c.read<uint32_t>(field + " type");
      const auto tr = ggml_type_traits(type);
      CBQ_CHECK(tr.has_value(), "{}: {} at offset {} has unknown ggml type {}", p, field, type_at,
                type);
      t.type = static_cast<GgmlType>(type);
      try {
        detail::check_tensor_shape(p, t.name, t.ne, t.type);
      } catch (const Error& e) {
        fail("{} (tensor info at offset {})", e.what(), t.info_offset);
      }
      t.nbytes = detail::ggml_nbytes(*tr, t.ne, p + ": " + field);
      const uint64_t off_at = c.pos;
      t.offset = c.read<uint64_t>(field + " offset");
      CBQ_CHECK(t.offset % alignment_ == 0,
                "{}: {} data offset {} (at offset {}) is not a multiple of the alignment {}", p,
                field, t.offset, off_at, alignment_);
      tensor_index_[t.name] = tensors_.size();
      tensors_.push_back(std::move(t));
    }
    data_offset_ = detail::align_up(c.pos, alignment_, p);
    for (const GgufTensorInfo& t : tensors_) {
      uint64_t end = 0;
      const bool overflow = __builtin_add_overflow(data_offset_, t.offset, &end) ||
                            __builtin_add_overflow(end, t.nbytes, &end);
      CBQ_CHECK(!overflow && end <= file_.size(),
                "{}: tensor '{}' ({} {}, {} bytes at data offset {}) ends beyond the end of the "
                "file ({} bytes; data section starts at {})",
                p, t.name, ggml_type_name(t.type), fmt::join(t.ne, "x"), t.nbytes, t.offset,
                file_.size(), data_offset_);
    }
  }

  MappedFile file_;
  uint32_t version_ = 0;
  uint32_t alignment_ = kGgufDefaultAlignment;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, std::size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
};

}  // namespace cbq::io
