#pragma once
// Reverse-mode automatic differentiation on a tape (Wengert list).
//
// A Tape<T> owns the values and gradients of every variable of one computation. Ops (in
// include/cbq/ops/) compute their forward pass eagerly, take their output buffer from the tape's
// arena, and record a Node that saves exactly what backward needs. Tape::backward(loss) walks
// the nodes in reverse and each node *accumulates* into its inputs' gradients.
//
// Buffers: every output, saved tensor and gradient comes from an arena that is handed out in
// allocation order. clear() rewinds the arena without freeing it, so a training step that
// repeats the same ops reuses the same buffers and allocates nothing in the steady state.
// Consequence: tensors obtained from a tape are valid until its next clear(); clone() them to
// keep them longer.
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq {

template <class T>
class Tape;

// A learnable tensor that lives across steps (a weight, a step size, a LoRA factor).
template <class T>
struct Parameter {
  std::string name;
  Tensor<T> value;
  Tensor<T> grad;  // same shape as value; accumulated by backward, cleared by zero_grad()
  bool trainable = true;

  Parameter() = default;
  Parameter(std::string name_, Tensor<T> value_, bool trainable_ = true)
      : name(std::move(name_)), value(std::move(value_)), trainable(trainable_) {
    if (trainable) grad = Tensor<T>(value.shape(), value.device());
  }
  void zero_grad() {
    if (grad.defined()) grad.zero();
  }
};

// A handle to one variable on a tape. Cheap to copy.
template <class T>
class Var {
 public:
  Var() = default;
  Var(Tape<T>* tape, int id) : tape_(tape), id_(id) {}

  bool valid() const { return tape_ != nullptr; }
  Tape<T>& tape() const { return *tape_; }
  int id() const { return id_; }
  const Tensor<T>& value() const { return tape_->value(id_); }
  const Shape& shape() const { return value().shape(); }
  Device device() const { return value().device(); }
  bool requires_grad() const { return tape_->requires_grad(id_); }
  // The gradient buffer, zero-initialised on first access.
  Tensor<T>& grad() const { return tape_->grad(id_); }
  // For an op that writes its whole contribution in one pass (a GEMM with β): the buffer and the
  // β to use — 0 when the buffer is new this step (not zeroed: the op overwrites it), else 1.
  std::pair<Tensor<T>*, T> grad_for_write() const { return tape_->grad_for_write(id_); }
  bool has_grad() const { return tape_->has_grad(id_); }

 private:
  Tape<T>* tape_ = nullptr;
  int id_ = -1;
};

// One recorded op. `output` is the variable it produced; backward reads that variable's
// gradient and accumulates into the gradients of the inputs that require one.
template <class T>
class Node {
 public:
  virtual ~Node() = default;
  virtual const char* name() const = 0;
  virtual void backward(Tape<T>& tape) = 0;
  int output = -1;
};

template <class T>
class Tape {
 public:
  explicit Tape(Device device = Device::cpu) : device_(device) {}
  Tape(const Tape&) = delete;
  Tape& operator=(const Tape&) = delete;

  Device device() const { return device_; }

  // ---- leaves ----
  // A value without a gradient (data, frozen weights, targets).
  Var<T> constant(const Tensor<T>& value) { return add_entry(value, false, nullptr); }
  // A value whose gradient is kept on the tape (read it with var.grad() after backward).
  Var<T> input(const Tensor<T>& value, bool requires_grad = true) {
    return add_entry(value, requires_grad && grad_enabled_, nullptr);
  }
  // A parameter: its gradient accumulates into p.grad, which outlives clear().
  Var<T> param(Parameter<T>& p) {
    bool rg = p.trainable && grad_enabled_;
    if (rg && !p.grad.defined()) p.grad = Tensor<T>(p.value.shape(), p.value.device());
    return add_entry(p.value, rg, rg ? &p : nullptr);
  }

  // ---- for op implementations ----
  // True when any of `inputs` needs a gradient (and gradients are enabled).
  bool any_requires_grad(std::initializer_list<Var<T>> inputs) const {
    if (!grad_enabled_) return false;
    for (const auto& v : inputs)
      if (v.valid() && requires_grad(v.id())) return true;
    return false;
  }
  // A fresh output variable of `shape` backed by an arena buffer (contents uninitialised).
  Var<T> output(const Shape& shape, bool requires_grad) {
    return add_entry(arena_take(shape, false), requires_grad && grad_enabled_, nullptr);
  }
  // An output variable whose value is an existing tensor (a view such as a reshape).
  Var<T> output_view(const Tensor<T>& value, bool requires_grad) {
    return add_entry(value, requires_grad && grad_enabled_, nullptr);
  }
  // A buffer from the arena for values an op saves for backward (or for temporaries).
  Tensor<T> scratch(const Shape& shape, bool zero = false) { return arena_take(shape, zero); }

  // Records a node producing `out`. Only call when out.requires_grad().
  template <class N, class... Args>
  N& record(Var<T> out, Args&&... args) {
    auto node = std::make_unique<N>(std::forward<Args>(args)...);
    node->output = out.id();
    N& ref = *node;
    nodes_.push_back(std::move(node));
    return ref;
  }

  // ---- access ----
  const Tensor<T>& value(int id) const { return entries_.at(check_id(id)).value; }
  bool requires_grad(int id) const { return entries_.at(check_id(id)).requires_grad; }
  bool has_grad(int id) const { return entries_.at(check_id(id)).grad.defined(); }
  Tensor<T>& grad(int id) {
    Entry& e = entries_.at(check_id(id));
    if (!e.grad.defined()) {
      if (e.param) {
        e.grad = e.param->grad;
      } else {
        e.grad = arena_take(e.value.shape(), true);
      }
    }
    return e.grad;
  }

  std::pair<Tensor<T>*, T> grad_for_write(int id) {
    Entry& e = entries_.at(check_id(id));
    if (e.grad.defined() || e.param) return {&grad(id), T(1)};  // accumulate
    e.grad = arena_take(e.value.shape(), false);
    return {&e.grad, T(0)};
  }

  // ---- differentiation ----
  // Seeds d(loss) = seed (loss must hold one element) and runs every node backward.
  void backward(Var<T> loss, T seed = T(1)) {
    CBQ_CHECK(loss.valid() && &loss.tape() == this, "backward: the loss is not on this tape");
    CBQ_CHECK(loss.value().numel() == 1, "backward: the loss must be a scalar, got shape {}",
              loss.shape());
    CBQ_CHECK(requires_grad(loss.id()),
              "backward: the loss does not depend on any variable that requires a gradient");
    Tensor<T>& g = grad(loss.id());
    // Accumulate so that backward can be called with several seeds on one tape.
    if (g.device() == Device::cpu) {
      g.data()[0] += seed;
    } else {
      Tensor<T> host = g.to(Device::cpu);
      host.data()[0] += seed;
      g.copy_from(host);
    }
    backward_from_seeded();
  }
  // Runs every node backward with output gradients already seeded (for non-scalar seeds).
  void backward_from_seeded() {
    for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) {
      Node<T>& node = **it;
      if (!has_grad(node.output)) continue;  // nothing flows back through this node
      node.backward(*this);
    }
  }

  // Forgets all variables and nodes; keeps the arena for the next step.
  void clear() {
    entries_.clear();
    nodes_.clear();
    arena_cursor_ = 0;
    ++generation_;
  }
  // Counts clear() calls: a Var kept from an earlier generation no longer names its variable.
  std::uint64_t generation() const { return generation_; }

  bool grad_enabled() const { return grad_enabled_; }
  void set_grad_enabled(bool enabled) { grad_enabled_ = enabled; }

  std::size_t num_nodes() const { return nodes_.size(); }
  std::size_t num_vars() const { return entries_.size(); }
  const Node<T>& node(std::size_t i) const { return *nodes_.at(i); }
  // Bytes held by the arena (reused across clear()).
  std::size_t arena_bytes() const {
    std::size_t b = 0;
    for (const auto& t : arena_) b += sizeof(T) * static_cast<std::size_t>(t.numel());
    return b;
  }
  // How many arena buffers were newly allocated since construction (steady state: constant).
  std::size_t arena_allocations() const { return arena_allocations_; }

 private:
  std::uint64_t generation_ = 0;
  struct Entry {
    Tensor<T> value;
    Tensor<T> grad;
    Parameter<T>* param = nullptr;
    bool requires_grad = false;
  };

  int check_id(int id) const {
    CBQ_CHECK(id >= 0 && id < static_cast<int>(entries_.size()),
              "tape: variable {} does not exist (the tape holds {}; was it cleared?)", id,
              entries_.size());
    return id;
  }

  Var<T> add_entry(const Tensor<T>& value, bool requires_grad, Parameter<T>* param) {
    entries_.push_back(Entry{value, Tensor<T>(), param, requires_grad});
    return Var<T>(this, static_cast<int>(entries_.size()) - 1);
  }

  // Zero-fills t; large host buffers in parallel (gradients are zeroed on the step's critical
  // path, between parallel regions).
  static void zero_fill(Tensor<T>& t) {
    constexpr int64_t kParallelBytes = 64 << 10;
    const int64_t n = t.numel();
    if (!t.is_cpu() || n * static_cast<int64_t>(sizeof(T)) < kParallelBytes) {
      t.zero();
      return;
    }
    T* p = t.data();
    parallel_for(n, kParallelBytes / static_cast<int64_t>(sizeof(T)) / 4,
                 [p](int64_t a, int64_t b) { std::fill(p + a, p + b, T(0)); });
  }

  Tensor<T> arena_take(const Shape& shape, bool zero) {
    Tensor<T> t;
    if (arena_cursor_ < arena_.size() && arena_[arena_cursor_].numel() == shape.numel()) {
      t = arena_[arena_cursor_].reshape(shape);
      if (zero) zero_fill(t);
    } else {
      t = Tensor<T>::empty(shape, device_);
      if (zero) zero_fill(t);
      ++arena_allocations_;
      if (arena_cursor_ < arena_.size()) {
        arena_[arena_cursor_] = t;
      } else {
        arena_.push_back(t);
      }
    }
    ++arena_cursor_;
    return t;
  }

  Device device_;
  // A deque, so that references returned by value()/grad() stay valid while ops add entries
  // (an op typically holds `const Tensor<T>& X = x.value()` across tape.output()).
  std::deque<Entry> entries_;
  std::vector<std::unique_ptr<Node<T>>> nodes_;
  std::vector<Tensor<T>> arena_;
  std::size_t arena_cursor_ = 0;
  std::size_t arena_allocations_ = 0;
  bool grad_enabled_ = true;
};

// Disables gradient recording on a tape for a scope (evaluation passes).
template <class T>
class NoGrad {
 public:
  explicit NoGrad(Tape<T>& tape) : tape_(tape), previous_(tape.grad_enabled()) {
    tape.set_grad_enabled(false);
  }
  ~NoGrad() { tape_.set_grad_enabled(previous_); }
  NoGrad(const NoGrad&) = delete;
  NoGrad& operator=(const NoGrad&) = delete;

 private:
  Tape<T>& tape_;
  bool previous_;
};

}  // namespace cbq
