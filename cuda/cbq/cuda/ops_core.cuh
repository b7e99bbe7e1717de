#pragma once
// Kernels of the tape's core ops: elementwise, activations, norms, RoPE, embedding, softmax,
// reductions and losses. Each op lives in its own file, included here; block_reduce.cuh holds
// the shared warp/block reductions and the deterministic full and column sums.
#include "cbq/cuda/activations.cuh"
#include "cbq/cuda/block_reduce.cuh"
#include "cbq/cuda/cross_entropy.cuh"
#include "cbq/cuda/embedding.cuh"
#include "cbq/cuda/kl_softmax.cuh"
#include "cbq/cuda/layernorm.cuh"
#include "cbq/cuda/mse.cuh"
#include "cbq/cuda/mul.cuh"
#include "cbq/cuda/reduce.cuh"
#include "cbq/cuda/rmsnorm.cuh"
#include "cbq/cuda/rope.cuh"
#include "cbq/cuda/scale.cuh"
#include "cbq/cuda/softmax.cuh"
