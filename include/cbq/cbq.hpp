#pragma once
// cbq: Cross-Block Quantization for large language models (header-only).
// This umbrella header compiles with a plain C++20 compiler; the CUDA backend is
// <cbq/cuda.cuh>, which only nvcc sees.
#include "cbq/core/blas.hpp"
#include "cbq/core/device.hpp"
#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"
#include "cbq/core/shape.hpp"
#include "cbq/core/tape.hpp"
#include "cbq/core/tensor.hpp"
#include "cbq/eval/perplexity.hpp"
#include "cbq/io/native.hpp"
#include "cbq/model/load.hpp"
#include "cbq/model/random.hpp"
#include "cbq/ops/ops.hpp"
#include "cbq/optim/optim.hpp"
#include "cbq/pass/baselines.hpp"
#include "cbq/pass/pass.hpp"
#include "cbq/quant/cfp.hpp"
#include "cbq/quant/gptq.hpp"
#include "cbq/quant/pack.hpp"
#include "cbq/quant/quantizer.hpp"
#include "cbq/quant/rtn.hpp"
