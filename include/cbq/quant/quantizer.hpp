#pragma once
// Compile-time quantizer configuration: granularity tags and cbq::Quantizer<Bits, Granularity>.
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
#include <type_traits>

#include "cbq/quant/grid.hpp"

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

}  // namespace cbq
