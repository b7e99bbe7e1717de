#pragma once
// cbq's CUDA backend. Include this header in exactly the .cu files that need it (at least one
// per program): it registers, at static initialisation, the device hooks (cbq::cuda_hooks():
// allocation, copies, fills) and every op's CUDA implementation (ops::CudaAdd, CudaCommon,
// CudaGemm, CudaLinear, ...). After that, Tensor::to(Device::cuda) and Tape<T>(Device::cuda)
// run the same op graph on the GPU.
//
//   #include <cbq/cuda.cuh>   // in a .cu file compiled by nvcc, linked to cbq::cuda
//   cbq::Tape<float> tape(cbq::Device::cuda);
//   auto x = tape.input(host_x.to(cbq::Device::cuda));
//
// Pieces (cuda/cbq/cuda/): check (error macros), allocator (caching device allocator),
// context (stream, cuBLASLt handle, math mode), memory (device hooks), gemm (cuBLASLt),
// launch (grid helpers) and one file per op with its kernels and launchers.
#ifndef __CUDACC__
#error \
    "<cbq/cuda.cuh> must be compiled by nvcc (put it in a .cu file); host code uses <cbq/cbq.hpp>"
#endif

// fmt 9 (Debian 12's) turns its constexpr off under nvcc but keeps consteval format strings,
// which then fail to compile. Keeping constexpr on fixes that; the CMake target cbq::cuda sets
// the same for every CUDA source, which also covers files that include fmt before this header.
#ifndef FMT_USE_CONSTEXPR
#define FMT_USE_CONSTEXPR 1
#endif

#include <cbq/cbq.hpp>

// cuda/cbq/cuda/ mirrors include/cbq/: core/ (context, allocator, memory, launch, GEMM,
// block reductions), ops/, quant/, optim/, pass/.
#include "cbq/cuda/core/allocator.cuh"
#include "cbq/cuda/core/block_reduce.cuh"
#include "cbq/cuda/core/check.cuh"
#include "cbq/cuda/core/context.cuh"
#include "cbq/cuda/core/gemm.cuh"
#include "cbq/cuda/core/launch.cuh"
#include "cbq/cuda/core/memory.cuh"
#include "cbq/cuda/ops/ops.cuh"
#include "cbq/cuda/optim/adam.cuh"
#include "cbq/cuda/pass/pass.cuh"
#include "cbq/cuda/quant/quant.cuh"
