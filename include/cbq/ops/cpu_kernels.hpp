#pragma once
// The ops' vectorized CPU kernels (elementwise_kernels.inc), one copy per ISA in namespaces
// cbq::ops::simd_generic / simd_avx2 / simd_avx512; call them with CBQ_SIMD_DISPATCH (see
// ops/vectorize.hpp).
#include <algorithm>
#include <cstdint>

#include "cbq/ops/vectorize.hpp"

#define CBQ_SIMD_KERNELS "cbq/ops/elementwise_kernels.inc"
#include "cbq/ops/simd_kernels.inc"
