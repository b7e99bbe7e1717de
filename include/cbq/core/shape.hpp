#pragma once
// A small fixed-capacity shape (up to 6 dimensions), printable as "(3, 4)".
#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "cbq/core/error.hpp"

namespace cbq {

inline constexpr int kMaxDims = 6;

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) {
    CBQ_CHECK(dims.size() <= kMaxDims, "Shape: {} dimensions exceed the maximum of {}", dims.size(),
              kMaxDims);
    for (int64_t d : dims) push_back(d);
  }
  template <class It>
  Shape(It first, It last) {
    for (; first != last; ++first) push_back(static_cast<int64_t>(*first));
  }

  void push_back(int64_t d) {
    CBQ_CHECK(ndim_ < kMaxDims, "Shape: more than {} dimensions", kMaxDims);
    CBQ_CHECK(d >= 0, "Shape: negative dimension {}", d);
    dims_[ndim_++] = d;
  }

  int ndim() const { return ndim_; }
  // Negative indices count from the end, as in NumPy.
  int64_t operator[](int i) const { return dims_[normalize(i)]; }
  int64_t& operator[](int i) { return dims_[normalize(i)]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim_; ++i) n *= dims_[i];
    return n;
  }
  // Product of all dimensions but the last: the "rows" of a row-major matrix view.
  int64_t rows() const { return ndim_ == 0 ? 1 : numel() / std::max<int64_t>(dims_[ndim_ - 1], 1); }
  int64_t cols() const { return ndim_ == 0 ? 1 : dims_[ndim_ - 1]; }
  const int64_t* begin() const { return dims_.data(); }
  const int64_t* end() const { return dims_.data() + ndim_; }

  int normalize(int i) const {
    int j = i < 0 ? i + ndim_ : i;
    CBQ_CHECK(j >= 0 && j < ndim_, "Shape: dimension index {} out of range for {} dimensions", i,
              ndim_);
    return j;
  }

  friend bool operator==(const Shape& a, const Shape& b) {
    return a.ndim_ == b.ndim_ && std::equal(a.begin(), a.end(), b.begin());
  }

  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < ndim_; ++i) {
      if (i) s += ", ";
      s += std::to_string(dims_[i]);
    }
    if (ndim_ == 1) s += ",";
    return s + ")";
  }

 private:
  std::array<int64_t, kMaxDims> dims_{};
  int ndim_ = 0;
};

}  // namespace cbq

template <>
struct fmt::formatter<cbq::Shape> : fmt::formatter<std::string> {
  auto format(const cbq::Shape& s, format_context& ctx) const {
    return fmt::formatter<std::string>::format(s.str(), ctx);
  }
};
