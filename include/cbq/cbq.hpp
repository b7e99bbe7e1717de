#pragma once
// cbq: Cross-Block Quantization for large language models (header-only).
// This umbrella header compiles with a plain C++20 compiler; the CUDA backend lives in
// <cuda/...cuh> headers that only nvcc sees.
#include "cbq/core/blas.hpp"
#include "cbq/core/device.hpp"
#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"
#include "cbq/core/shape.hpp"
#include "cbq/core/tape.hpp"
#include "cbq/core/tensor.hpp"
#include "cbq/ops/ops.hpp"
#include "cbq/optim/optim.hpp"
