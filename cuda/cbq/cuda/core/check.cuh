#pragma once
// Error checking for the CUDA runtime and cuBLASLt. Every failure becomes a cbq::Error whose
// message names the call as written, where it was made and what the library said, e.g.
//   cudaMalloc(&ptr, bytes) failed at cuda/cbq/cuda/core/allocator.cuh:97: out of memory
//   (cudaErrorMemoryAllocation)
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cbq/core/error.hpp>

namespace cbq::cuda::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* call, const char* file,
                                          int line) {
  // Clear the error state when it is not sticky, so that a caught error does not resurface at
  // the next unrelated call.
  (void)cudaGetLastError();
  fail("{} failed at {}:{}: {} ({})", call, file, line, cudaGetErrorString(status),
       cudaGetErrorName(status));
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t status, const char* call,
                                            const char* file, int line) {
  fail("{} failed at {}:{}: {} ({})", call, file, line, cublasLtGetStatusString(status),
       cublasLtGetStatusName(status));
}

inline void check_launch(const char* kernel, const char* file, int line) {
  cudaError_t status = cudaPeekAtLastError();
#ifdef CBQ_CUDA_SYNC_CHECK
  if (status == cudaSuccess) status = cudaDeviceSynchronize();
#endif
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    fail("kernel {} failed at {}:{}: {} ({})", kernel, file, line, cudaGetErrorString(status),
         cudaGetErrorName(status));
  }
}

}  // namespace cbq::cuda::detail

// CBQ_CUDA_CHECK(cudaMemcpyAsync(...)) throws cbq::Error unless the call returns cudaSuccess.
#define CBQ_CUDA_CHECK(call)                                                              \
  do {                                                                                    \
    const cudaError_t cbq_cuda_status_ = (call);                                          \
    if (cbq_cuda_status_ != cudaSuccess)                                                  \
      ::cbq::cuda::detail::throw_cuda_error(cbq_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)

// CBQ_CUBLAS_CHECK(cublasLtMatmul(...)) throws cbq::Error unless the call returns
// CUBLAS_STATUS_SUCCESS.
#define CBQ_CUBLAS_CHECK(call)                                                                \
  do {                                                                                        \
    const cublasStatus_t cbq_cublas_status_ = (call);                                         \
    if (cbq_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                          \
      ::cbq::cuda::detail::throw_cublas_error(cbq_cublas_status_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: CBQ_CUDA_CHECK_LAUNCH("add_kernel") reports a bad launch
// configuration at once. With CBQ_CUDA_SYNC_CHECK defined it also waits for the kernel, so that
// a fault inside it is reported at its launch site (slow; for debugging).
#define CBQ_CUDA_CHECK_LAUNCH(kernel) ::cbq::cuda::detail::check_launch(kernel, __FILE__, __LINE__)
