#pragma once
// Tensor<T>: an owning, reference-counted n-dimensional array with shape, strides and a device.
// Copies of a Tensor share storage (like a shared_ptr); clone() makes a deep copy. Views
// (reshape, slice, transpose) share storage without copying.
#include <cstdint>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include "cbq/core/device.hpp"
#include "cbq/core/error.hpp"
#include "cbq/core/shape.hpp"

namespace cbq {

template <class T>
class Tensor {
  static_assert(std::is_floating_point_v<T> || std::is_integral_v<T>,
                "cbq::Tensor holds arithmetic scalars (float, double, integer codes)");

 public:
  using value_type = T;

  Tensor() = default;

  // Zero-initialised tensor of `shape` on `device`.
  explicit Tensor(const Shape& shape, Device device = Device::cpu) {
    allocate(shape, device, true);
  }

  static Tensor empty(const Shape& shape, Device device = Device::cpu) {
    Tensor t;
    t.allocate(shape, device, false);
    return t;
  }
  static Tensor zeros(const Shape& shape, Device device = Device::cpu) {
    return Tensor(shape, device);
  }
  static Tensor full(const Shape& shape, T value) {
    Tensor t = empty(shape);
    t.fill(value);
    return t;
  }
  // CPU tensor holding a copy of `values`.
  static Tensor from(const std::vector<T>& values, const Shape& shape) {
    CBQ_CHECK(static_cast<int64_t>(values.size()) == shape.numel(),
              "Tensor::from: {} values do not fill shape {} ({} elements)", values.size(), shape,
              shape.numel());
    Tensor t = empty(shape);
    std::copy(values.begin(), values.end(), t.data());
    return t;
  }

  bool defined() const { return storage_ != nullptr || shape_.ndim() > 0; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.ndim(); }
  int64_t size(int dim) const { return shape_[dim]; }
  int64_t numel() const { return shape_.numel(); }
  int64_t stride(int dim) const { return strides_[shape_.normalize(dim)]; }
  Device device() const { return device_; }
  bool is_cpu() const { return device_ == Device::cpu; }

  T* data() { return data_; }
  const T* data() const { return data_; }
  // Contiguous CPU data as a span (checked).
  std::span<T> span() {
    check_dense_cpu("span");
    return {data_, static_cast<std::size_t>(numel())};
  }
  std::span<const T> span() const {
    check_dense_cpu("span");
    return {data_, static_cast<std::size_t>(numel())};
  }

  bool is_contiguous() const {
    int64_t expected = 1;
    for (int i = shape_.ndim() - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[i] != expected) return false;
      expected *= shape_[i];
    }
    return true;
  }

  // Element access through strides (CPU only); for tests, references and small loops.
  template <class... I>
  T& operator()(I... idx) {
    return data_[offset_of(idx...)];
  }
  template <class... I>
  const T& operator()(I... idx) const {
    return data_[offset_of(idx...)];
  }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

  // A view with a new shape over the same contiguous data.
  Tensor reshape(Shape shape) const {
    CBQ_CHECK(is_contiguous(), "reshape: tensor of shape {} is not contiguous", shape_);
    int64_t known = shape.numel();
    CBQ_CHECK(known == numel(), "reshape: cannot view {} ({} elements) as {} ({} elements)", shape_,
              numel(), shape, known);
    Tensor t = *this;
    t.shape_ = shape;
    t.set_contiguous_strides();
    return t;
  }

  // Rows/elements [begin, end) of dimension `dim`, sharing storage.
  Tensor slice(int dim, int64_t begin, int64_t end) const {
    int d = shape_.normalize(dim);
    CBQ_CHECK(0 <= begin && begin <= end && end <= shape_[d],
              "slice: range [{}, {}) out of bounds for dimension {} of {}", begin, end, dim,
              shape_);
    Tensor t = *this;
    t.data_ = data_ + begin * strides_[d];
    t.shape_[d] = end - begin;
    return t;
  }
  // Index `i` of dimension `dim`, dropping that dimension.
  Tensor select(int dim, int64_t i) const {
    int d = shape_.normalize(dim);
    Tensor s = slice(d, i, i + 1);
    Tensor t = s;
    t.shape_ = Shape();
    int k = 0;
    for (int j = 0; j < shape_.ndim(); ++j) {
      if (j == d) continue;
      t.shape_.push_back(s.shape_[j]);
      t.strides_[k++] = s.strides_[j];
    }
    return t;
  }
  Tensor transpose(int d0, int d1) const {
    int a = shape_.normalize(d0), b = shape_.normalize(d1);
    Tensor t = *this;
    std::swap(t.shape_[a], t.shape_[b]);
    std::swap(t.strides_[a], t.strides_[b]);
    return t;
  }

  // Deep copy, contiguous, same device.
  Tensor clone() const { return to(device_); }
  Tensor contiguous() const { return is_contiguous() ? *this : clone(); }

  // Deep copy onto `device` (contiguous result).
  Tensor to(Device device) const {
    Tensor out = empty(shape_, device);
    if (is_contiguous()) {
      copy_bytes(out.data_, device, data_, device_, sizeof(T) * numel());
    } else {
      CBQ_CHECK(device_ == Device::cpu, "to: strided copies are only supported from the CPU");
      Tensor host = device == Device::cpu ? out : empty(shape_);
      int64_t n = 0;
      for_each_index([&](int64_t off) { host.data_[n++] = data_[off]; });
      if (device != Device::cpu)
        copy_bytes(out.data_, device, host.data_, Device::cpu, sizeof(T) * numel());
    }
    return out;
  }

  // Copy the values of `src` (same shape, any device) into this tensor's storage.
  void copy_from(const Tensor& src) {
    CBQ_CHECK(src.shape() == shape_, "copy_from: shape {} into {}", src.shape(), shape_);
    CBQ_CHECK(is_contiguous() && src.is_contiguous(), "copy_from: both tensors must be contiguous");
    copy_bytes(data_, device_, src.data_, src.device_, sizeof(T) * numel());
  }

  void fill(T value) {
    if (device_ != Device::cpu) {  // rare on the device: fill on the host, then one copy
      CBQ_CHECK(is_contiguous(), "fill: tensor of shape {} is not contiguous", shape_);
      copy_from(full(shape_, value));
      return;
    }
    check_dense_cpu("fill");
    std::fill(data_, data_ + numel(), value);
  }
  void zero() {
    CBQ_CHECK(is_contiguous(), "zero: tensor of shape {} is not contiguous", shape_);
    zero_bytes(data_, device_, sizeof(T) * numel());
  }

  // Elementwise static_cast, on this tensor's device (a device tensor goes through the host).
  template <class U>
  Tensor<U> cast() const {
    if (device_ != Device::cpu) return to(Device::cpu).template cast<U>().to(device_);
    check_dense_cpu("cast");
    Tensor<U> out = Tensor<U>::empty(shape_);
    for (int64_t i = 0; i < numel(); ++i) out.data()[i] = static_cast<U>(data_[i]);
    return out;
  }

  std::vector<T> to_vector() const {
    Tensor c = device_ == Device::cpu ? contiguous() : to(Device::cpu);
    return std::vector<T>(c.data_, c.data_ + c.numel());
  }

  // A contiguous tensor of `shape` viewing `storage` from byte `offset` (e.g. one sample of a
  // file-backed activation set).
  static Tensor view_of(std::shared_ptr<Storage> storage, const Shape& shape, std::size_t offset) {
    CBQ_CHECK(offset % alignof(T) == 0 &&
                  offset + sizeof(T) * static_cast<std::size_t>(shape.numel()) <= storage->bytes(),
              "Tensor::view_of: shape {} at byte {} does not fit a storage of {} bytes", shape,
              offset, storage->bytes());
    Tensor t;
    t.shape_ = shape;
    t.device_ = storage->device();
    t.data_ = reinterpret_cast<T*>(static_cast<std::byte*>(storage->data()) + offset);
    t.storage_ = std::move(storage);
    t.set_contiguous_strides();
    return t;
  }

  // True when both tensors view the same storage (used by the tape's aliasing checks).
  bool shares_storage(const Tensor& other) const { return storage_ && storage_ == other.storage_; }

 private:
  template <class U>
  friend class Tensor;

  void allocate(const Shape& shape, Device device, bool zero_fill) {
    shape_ = shape;
    device_ = device;
    storage_ =
        std::make_shared<Storage>(sizeof(T) * static_cast<std::size_t>(shape.numel()), device);
    data_ = static_cast<T*>(storage_->data());
    set_contiguous_strides();
    if (zero_fill) zero_bytes(data_, device, sizeof(T) * numel());
  }
  void set_contiguous_strides() {
    int64_t s = 1;
    for (int i = shape_.ndim() - 1; i >= 0; --i) {
      strides_[i] = s;
      s *= shape_[i];
    }
  }
  void check_dense_cpu(const char* what) const {
    CBQ_CHECK(device_ == Device::cpu, "{}: tensor of shape {} is on {}, expected cpu", what, shape_,
              device_name(device_));
    CBQ_CHECK(is_contiguous(), "{}: tensor of shape {} is not contiguous", what, shape_);
  }
  template <class... I>
  int64_t offset_of(I... idx) const {
    static_assert(sizeof...(I) <= kMaxDims, "too many indices");
    const int64_t index[] = {static_cast<int64_t>(idx)...};
    int64_t off = 0;
    for (std::size_t i = 0; i < sizeof...(I); ++i) off += index[i] * strides_[i];
    return off;
  }
  template <class F>
  void for_each_index(F&& f) const {
    int nd = shape_.ndim();
    if (numel() == 0) return;
    std::array<int64_t, kMaxDims> idx{};
    for (int64_t n = 0; n < numel(); ++n) {
      int64_t off = 0;
      for (int i = 0; i < nd; ++i) off += idx[i] * strides_[i];
      f(off);
      for (int i = nd - 1; i >= 0; --i) {
        if (++idx[i] < shape_[i]) break;
        idx[i] = 0;
      }
    }
  }

  std::shared_ptr<Storage> storage_;
  T* data_ = nullptr;
  Shape shape_;
  std::array<int64_t, kMaxDims> strides_{};
  Device device_ = Device::cpu;
};

// Throws unless `a` and `b` have the same shape; `op` names the caller in the message.
template <class A, class B>
void check_same_shape(const char* op, const A& a, const B& b) {
  CBQ_CHECK(a.shape() == b.shape(), "{}: shapes {} and {} differ", op, a.shape(), b.shape());
}

}  // namespace cbq
