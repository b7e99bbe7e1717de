#pragma once
// Kernels of attention, the quantizers (weight/activation fake-quant with LSQ gradients),
// LoRA-Rounding, Adam and the CUB/Thrust statistics (min/max, quantiles) used by CFP.
// Each lives in its own file, included here.
