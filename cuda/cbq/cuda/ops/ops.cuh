#pragma once
// Kernels of the tape's ops (include/cbq/ops/): elementwise, activations, norms, RoPE,
// embedding, softmax, reductions, losses, linear, attention, the attention-map KL and the
// Hadamard transform. Each op lives in its own file named as its host header, included here.
#include "cbq/cuda/ops/activations.cuh"
#include "cbq/cuda/ops/add.cuh"
#include "cbq/cuda/ops/attention.cuh"
#include "cbq/cuda/ops/attention_map_kl.cuh"
#include "cbq/cuda/ops/common.cuh"
#include "cbq/cuda/ops/cross_entropy.cuh"
#include "cbq/cuda/ops/embedding.cuh"
#include "cbq/cuda/ops/hadamard.cuh"
#include "cbq/cuda/ops/kl_softmax.cuh"
#include "cbq/cuda/ops/layernorm.cuh"
#include "cbq/cuda/ops/linear.cuh"
#include "cbq/cuda/ops/mse.cuh"
#include "cbq/cuda/ops/mul.cuh"
#include "cbq/cuda/ops/reduce.cuh"
#include "cbq/cuda/ops/rmsnorm.cuh"
#include "cbq/cuda/ops/rope.cuh"
#include "cbq/cuda/ops/scale.cuh"
#include "cbq/cuda/ops/softmax.cuh"
