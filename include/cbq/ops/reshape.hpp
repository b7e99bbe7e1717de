#pragma once
// reshape: a view of a contiguous tensor with a new shape (same number of elements, no copy).
// Derivative: d a += d out, read with a's shape (the element order is unchanged).
#include "cbq/ops/common.hpp"

namespace cbq::ops {

template <class T>
class ReshapeNode final : public Node<T> {
 public:
  explicit ReshapeNode(Var<T> a) : a_(a) {}
  const char* name() const override { return "reshape"; }
  void backward(Tape<T>& tape) override {
    // accumulate() works on flat element order, which a contiguous reshape preserves.
    if (a_.requires_grad()) accumulate(a_.grad(), tape.grad(this->output));
  }

 private:
  Var<T> a_;
};

template <class T>
Var<T> reshape(Var<T> a, const Shape& shape) {
  const Tensor<T>& va = a.value();
  check_contiguous("reshape", "input", va);
  CBQ_CHECK(shape.numel() == va.numel(),
            "reshape: cannot view {} ({} elements) as {} ({} elements)", va.shape(), va.numel(),
            shape, shape.numel());
  Tape<T>& tape = a.tape();
  const bool rg = tape.any_requires_grad({a});
  Var<T> out = tape.output_view(va.reshape(shape), rg);
  if (rg) tape.template record<ReshapeNode<T>>(out, a);
  return out;
}

}  // namespace cbq::ops
