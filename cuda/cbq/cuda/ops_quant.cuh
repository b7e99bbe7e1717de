#pragma once
// Kernels of attention, the quantizers (weight/activation fake-quant with LSQ gradients),
// LoRA-Rounding, Adam and the CUB/Thrust statistics (min/max, quantiles) used by CFP.
// Each lives in its own file, included here.
#include "cbq/cuda/act_quant.cuh"
#include "cbq/cuda/adam.cuh"
#include "cbq/cuda/attention.cuh"
#include "cbq/cuda/cfp.cuh"
#include "cbq/cuda/fake_quant.cuh"
#include "cbq/cuda/grid_stats.cuh"
#include "cbq/cuda/lora_rounding.cuh"
#include "cbq/cuda/quant_math.cuh"
