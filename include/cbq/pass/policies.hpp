#pragma once
// Every compile-time policy of cbq::Pass<WeightQ, ActQ, Window, Rounding> in one place (as
// CUTLASS keeps its dispatch policies): the weight quantizer (Quantizer<Bits, Granularity> with
// PerTensor / PerChannel / PerGroup<G>), activation quantization (ActQuant<Bits>), the window
// schedule (SlidingWindow<Blocks, Overlap>) and the rounding (LoraRounding<Rank>,
// NearestRounding, FullRounding). PassSpec (pass/config.hpp) is their run-time description.
//
//   using Pass = cbq::Pass<cbq::Quantizer<4, cbq::PerGroup<32>>,   // weights
//                          cbq::ActQuant<16>,                       // activations (16 = off)
//                          cbq::SlidingWindow<2, 1>,                // blocks per window, overlap
//                          cbq::LoraRounding<5>>;                   // rounding
//
//   using W4 = cbq::Quantizer<4, cbq::PerGroup<128>>;        // 4-bit, asymmetric, groups of 128
//   using W8s = cbq::Quantizer<8, cbq::PerChannel, true>;     // 8-bit, symmetric, one s per row
//   constexpr cbq::quant::GridSpec g = W4::spec();            // the runtime description
//
// Misuse fails to compile with a sentence:
//   cbq::Quantizer<5, cbq::PerChannel>   → "cbq::Quantizer: Bits must be 2, 3, 4 or 8"
//   cbq::Quantizer<4, cbq::PerGroup<0>>  → "cbq::PerGroup<G>: the group size G must be positive"
//   cbq::Quantizer<4, cbq::PerToken>     → "cbq::Quantizer: PerToken is for activations only; ..."
//   cbq::Quantizer<4, int>               → "cbq::Quantizer: the granularity must be one of ..."
#include <concepts>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cbq/quant/grid.hpp"
#include "cbq/quant/lora_rounding.hpp"

namespace cbq {

// One (s, z) pair for the whole tensor.
struct PerTensor {
  static constexpr quant::Granularity kind = quant::Granularity::per_tensor;
  static constexpr int64_t group_size = 0;
  static constexpr bool activation_only = false;
};

// One (s, z) pair per output row of a weight (per output channel).
struct PerChannel {
  static constexpr quant::Granularity kind = quant::Granularity::per_channel;
  static constexpr int64_t group_size = 0;
  static constexpr bool activation_only = false;
};

// One (s, z) pair per row per G consecutive input columns; a short last group when G does not
// divide the number of columns (see grid.hpp).
template <int64_t G>
struct PerGroup {
  static_assert(G > 0, "cbq::PerGroup<G>: the group size G must be positive");
  static constexpr quant::Granularity kind = quant::Granularity::per_group;
  static constexpr int64_t group_size = G;
  static constexpr bool activation_only = false;
};

// One step per token (row) of an activation, computed on the fly from that token's min/max
// (quant::fake_quant_act_per_token). Has no meaning for weights.
struct PerToken {
  static constexpr int64_t group_size = 0;
  static constexpr bool activation_only = true;
};

// Any of the four tags above (or a user tag with the same members).
template <class G>
concept GranularityTag = requires {
  { G::group_size } -> std::convertible_to<int64_t>;
  { G::activation_only } -> std::convertible_to<bool>;
};

// A granularity a weight quantizer accepts: PerTensor, PerChannel or PerGroup<G>.
template <class G>
concept WeightGranularity = GranularityTag<G> && !G::activation_only && requires {
  { G::kind } -> std::convertible_to<quant::Granularity>;
};

namespace detail {
template <class G>
constexpr bool is_weight_granularity() {
  if constexpr (GranularityTag<G>) {
    return WeightGranularity<G>;
  } else {
    return false;
  }
}
template <class G>
constexpr bool is_activation_only() {
  if constexpr (GranularityTag<G>) {
    return G::activation_only;
  } else {
    return false;
  }
}
template <class G>
constexpr int64_t group_size_of() {
  if constexpr (GranularityTag<G>) {
    return G::group_size;
  } else {
    return 0;
  }
}
}  // namespace detail

// The compile-time description of a weight quantizer. Bits ∈ {2, 3, 4, 8} (the widths the
// packers and the GPTQ/GGUF exporters support); asymmetric by default.
template <int Bits, class Granularity, bool Symmetric = false>
struct Quantizer {
  static_assert(Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8,
                "cbq::Quantizer: Bits must be 2, 3, 4 or 8");
  static_assert(GranularityTag<Granularity>,
                "cbq::Quantizer: the granularity must be one of cbq::PerTensor, cbq::PerChannel, "
                "cbq::PerGroup<G>");
  static_assert(!detail::is_activation_only<Granularity>(),
                "cbq::Quantizer: PerToken is for activations only; weights use cbq::PerTensor, "
                "cbq::PerChannel or cbq::PerGroup<G>");

  using granularity = Granularity;
  static constexpr int bits = Bits;
  static constexpr bool symmetric = Symmetric;
  static constexpr int64_t group_size = detail::group_size_of<Granularity>();
  // The integer range of a code: [0, 2^b − 1] asymmetric, [−2^(b−1), 2^(b−1) − 1] symmetric.
  static constexpr int64_t qmin = Symmetric ? -(int64_t{1} << (Bits - 1)) : 0;
  static constexpr int64_t qmax =
      Symmetric ? (int64_t{1} << (Bits - 1)) - 1 : (int64_t{1} << Bits) - 1;

  static constexpr quant::GridSpec spec() {
    if constexpr (detail::is_weight_granularity<Granularity>()) {
      quant::GridSpec g;
      g.bits = Bits;
      g.symmetric = Symmetric;
      g.granularity = Granularity::kind;
      g.group_size = Granularity::kind == quant::Granularity::per_group ? Granularity::group_size
                                                                        : int64_t{128};
      return g;
    } else {
      return quant::GridSpec{};  // unreachable: a static_assert above already failed
    }
  }
};

// True for every instantiation of cbq::Quantizer.
template <class Q>
struct is_quantizer : std::false_type {};
template <int B, class G, bool S>
struct is_quantizer<Quantizer<B, G, S>> : std::true_type {};
template <class Q>
concept WeightQuantizer = is_quantizer<Q>::value;

// Compile-time LoRA-Rounding configuration: the rank r of V = A1·A2.
template <int Rank>
struct LoraRounding {
  static_assert(Rank >= 1, "cbq::LoraRounding: Rank must be at least 1");
  static constexpr int rank = Rank;

  // Parameters for one layer; throws when Rank > min(rows, cols) of that layer.
  template <class T>
  static quant::LoraRoundingParams<T> init(const std::string& layer, const Tensor<T>& W,
                                           const Tensor<T>& scale, const Tensor<T>& zero,
                                           const quant::GridSpec& spec,
                                           const quant::LoraInit& options = {}) {
    return quant::init_lora_rounding(layer, W, scale, zero, spec, int64_t{Rank}, options);
  }
};

// Activation quantization of every linear layer's input. Bits ≥ 16 means none. The default
// granularity follows the paper: per-tensor static (learned step) at ≥ 8 bits, per-token dynamic
// (learned clipping factor) below.
template <int Bits, class Granularity = std::conditional_t<(Bits >= 8), PerTensor, PerToken>>
struct ActQuant {
  static_assert(Bits == 4 || Bits == 6 || Bits == 8 || Bits >= 16,
                "cbq::ActQuant: Bits must be 4, 6, 8, or 16 (no activation quantization)");
  static_assert(
      std::is_same_v<Granularity, PerTensor> || std::is_same_v<Granularity, PerToken>,
      "cbq::ActQuant: activations are quantized PerTensor (static) or PerToken (dynamic)");
  static constexpr int bits = Bits;
  static constexpr bool per_token = std::is_same_v<Granularity, PerToken>;
};

// CBQ's sliding window: Blocks units per window (blocks, or sub-block units with SubBlockUnits),
// consecutive windows sharing Overlap of them.
template <int Blocks, int Overlap>
struct SlidingWindow {
  static_assert(Blocks >= 1, "cbq::SlidingWindow: a window holds at least one block");
  static_assert(Overlap >= 0 && Overlap < Blocks,
                "cbq::SlidingWindow: Overlap must be smaller than Blocks (windows must advance)");
  static constexpr int blocks = Blocks;
  static constexpr int overlap = Overlap;
  static constexpr bool adaptive = false;
};

// ACBQ's adaptive groups: groups of at most MaxUnits units, cut where the measured dependency
// of adjacent units is low, each window a group and the OverlapGroups groups after it
// (pass/adaptive_groups.hpp; the measure and the threshold are PassOptions at run time).
template <int MaxUnits, int OverlapGroups = 1>
struct AdaptiveWindow {
  static_assert(MaxUnits >= 1, "cbq::AdaptiveWindow: a group holds at least one unit");
  static_assert(OverlapGroups >= 0, "cbq::AdaptiveWindow: OverlapGroups must be ≥ 0");
  static constexpr int blocks = MaxUnits;
  static constexpr int overlap = OverlapGroups;
  static constexpr bool adaptive = true;
};

// What a window's units are (pass/units.hpp): whole transformer blocks (CBQ), or each block's
// attention and FFN halves (ACBQ), which needs a cbq::SplitTransformerBlock.
struct BlockUnits {
  static constexpr bool sub_blocks = false;
};
struct SubBlockUnits {
  static constexpr bool sub_blocks = true;
};

// Rounding ablations beside LoraRounding<Rank>: plain round-to-nearest with learned steps
// (LSQ), and AdaRound's full-matrix rounding logits V (rows × cols parameters).
struct NearestRounding {};
struct FullRounding {};

enum class RoundingKind { nearest, lora, full };

template <class R>
struct rounding_traits;
template <int Rank>
struct rounding_traits<LoraRounding<Rank>> {
  static constexpr RoundingKind kind = RoundingKind::lora;
  static constexpr int rank = Rank;
};
template <>
struct rounding_traits<NearestRounding> {
  static constexpr RoundingKind kind = RoundingKind::nearest;
  static constexpr int rank = 0;
};
template <>
struct rounding_traits<FullRounding> {
  static constexpr RoundingKind kind = RoundingKind::full;
  static constexpr int rank = 0;
};

template <class R>
concept RoundingPolicy = requires {
  rounding_traits<R>::kind;
};

}  // namespace cbq
