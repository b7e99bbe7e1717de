#pragma once
// Kernels of the quantizers (include/cbq/quant/): weight and activation fake-quant with LSQ
// gradients, LoRA-Rounding and AdaRound, the RTN grid's statistics and CFP's (CUB/Thrust
// quantiles, outlier counts). Each lives in its own file, included here.
#include "cbq/cuda/quant/act_quant.cuh"
#include "cbq/cuda/quant/cfp.cuh"
#include "cbq/cuda/quant/fake_quant.cuh"
#include "cbq/cuda/quant/grid_stats.cuh"
#include "cbq/cuda/quant/lora_rounding.cuh"
#include "cbq/cuda/quant/quant_math.cuh"
