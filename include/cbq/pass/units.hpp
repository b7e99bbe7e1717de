#pragma once
// The units a pass's windows are made of (PassSpec::units): whole transformer blocks (CBQ), or
// each block's attention and FFN halves (ACBQ's sub-block units; model/block.hpp,
// SplitTransformerBlock). Unit u is block u, or with sub-block units half u % 2 of block u / 2
// (the attention half first). A window [first, last] and its `finalize` count units; with whole
// blocks every call here is the block call it replaces, so a CBQ pass computes what it did before
// units existed.
#include <cstdint>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cbq/model/block.hpp"

namespace cbq {

enum class UnitKind { blocks, sub_blocks };

inline const char* unit_kind_name(UnitKind kind) {
  return kind == UnitKind::sub_blocks ? "sub-block" : "block";
}

template <class Model>
class PassUnits {
 public:
  using T = typename Model::T;
  using Block = typename Model::block_type;

  PassUnits(Model& model, UnitKind kind) : model_(model), kind_(kind) {
    if constexpr (!SplitTransformerBlock<Block>)
      CBQ_CHECK(kind != UnitKind::sub_blocks,
                "sub-block units (ACBQ): this model's block type does not expose its attention "
                "and FFN halves (cbq::SplitTransformerBlock); use whole-block units");
  }

  Model& model() const { return model_; }
  UnitKind kind() const { return kind_; }
  bool sub_blocks() const { return kind_ == UnitKind::sub_blocks; }
  int64_t count() const { return sub_blocks() ? 2 * model_.num_blocks() : model_.num_blocks(); }
  int64_t block(int64_t u) const { return sub_blocks() ? u / 2 : u; }
  BlockPart part(int64_t u) const {
    if (!sub_blocks()) return BlockPart::whole;
    return u % 2 == 0 ? BlockPart::attention : BlockPart::ffn;
  }
  bool is_attention(int64_t u) const { return part(u) == BlockPart::attention; }
  // "3" (block 3) or "3.attention".
  std::string name(int64_t u) const {
    return sub_blocks() ? fmt::format("{}.{}", block(u), block_part_name(part(u)))
                        : fmt::format("{}", u);
  }
  // "blocks 3..4", "block 3", "units 3.ffn..5.attention", "unit 3.ffn".
  std::string range(int64_t first, int64_t last) const {
    const char* noun = sub_blocks() ? "unit" : "block";
    if (first == last) return fmt::format("{} {}", noun, name(first));
    return fmt::format("{}s {}..{}", noun, name(first), name(last));
  }

  Var<T> forward(Tape<T>& tape, int64_t u, Var<T> x, const BlockContext<T>& ctx) {
    return forward_part(model_.blocks[static_cast<size_t>(block(u))], part(u), tape, x, ctx);
  }
  // The unit applied to x (owned result; the model's evaluation tape).
  Tensor<T> run(int64_t u, const Tensor<T>& x, const BlockContext<T>& ctx = {}) {
    return model_.run_block_part(block(u), part(u), x, ctx);
  }
  std::vector<LinearLayer<T>*> linears(int64_t u) {
    return part_linears(model_.blocks[static_cast<size_t>(block(u))], part(u));
  }
  std::vector<Parameter<T>*> parameters(int64_t u) {
    return part_parameters(model_.blocks[static_cast<size_t>(block(u))], part(u));
  }
  // Where the unit's first linear layer stands in its block's linears() (layer seeds stay those
  // of whole-block units).
  int64_t linear_offset(int64_t u) {
    if (part(u) != BlockPart::ffn) return 0;
    return static_cast<int64_t>(linears(u - 1).size());
  }

 private:
  Model& model_;
  UnitKind kind_;
};

}  // namespace cbq
