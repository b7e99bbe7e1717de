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

#include "cbq/core/parallel.hpp"
#include "cbq/core/tape.hpp"
#include "cbq/model/block.hpp"

namespace cbq {

enum class UnitKind { blocks, sub_blocks };

// How the pass's forward-only loops over the calibration samples (targets, GPTQ Hessians, the
// advance) share the CPU threads. A block's ops at small widths (stories260K: d 64, T 512) have
// too little work to split over two threads; two halves of the samples side by side, each run
// single-threaded on its own tape, do. The split is a fixed kSampleChunks halves whatever the
// thread count (sums over samples are taken per half, then in order), so results stay the same
// on 1 or 2 threads (RELIABILITY.md, "Determinism"). Wider models (d ≥ kSideBySideMaxDim), a
// device, or a loop whose callbacks must see the samples in order (`side_by_side` false) take
// one chunk: the ops split their own work.
inline constexpr int kSampleChunks = 2;
inline constexpr int64_t kSideBySideMaxDim = 512;
inline int sample_chunks(int64_t samples, Device device, int64_t model_dim,
                         bool side_by_side = true) {
  if (!side_by_side || device != Device::cpu || samples < kSampleChunks ||
      model_dim >= kSideBySideMaxDim)
    return 1;
  return kSampleChunks;
}

// Calls body(chunk, begin, end, tape) for the `chunks` contiguous chunks of [0, samples), side by
// side on the pool (in turn on one thread); each call gets its own tape on `device`. Rethrows the
// first exception.
template <class T, class Body>
void for_sample_chunks(int64_t samples, int chunks, Device device, Body&& body) {
  if (chunks <= 1) {
    Tape<T> tape(device);
    body(0, int64_t{0}, samples, tape);
    return;
  }
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Tape<T> tape(device);
      body(static_cast<int>(c), samples * c / chunks, samples * (c + 1) / chunks, tape);
    }
  });
}

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
  // The same on the caller's tape (cleared first): a thread of for_sample_chunks.
  Tensor<T> run(Tape<T>& tape, int64_t u, const Tensor<T>& x, const BlockContext<T>& ctx = {}) {
    tape.clear();
    NoGrad<T> off(tape);
    Var<T> in = tape.constant(x.device() == tape.device() ? x : x.to(tape.device()));
    return forward(tape, u, in, ctx).value().clone();
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
