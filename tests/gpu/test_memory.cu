// The CUDA backend's plumbing: copies, fills, the caching allocator, contexts and the error
// macros.
#include "gpu/gpu_main.hpp"

using namespace cbq;
using namespace cbq::gpu_testing;

namespace {
__global__ void noop_kernel() {}
}  // namespace

TEST_CASE("memory: the CUDA hooks are registered by including <cbq/cuda.cuh>") {
  CHECK(cuda_available());
  // (bool) because doctest cannot print function pointers.
  CHECK(bool(ops::CudaAdd<float>::forward));
  CHECK(bool(ops::CudaCommon<double>::axpy));
  CHECK(bool(ops::CudaGemm<float>::gemm));
  CHECK(bool(ops::CudaGemm<double>::gemm));
  CHECK(bool(ops::CudaLinear<float>::bias_forward));
  CHECK(bool(ops::CudaLinear<double>::bias_backward));
}

TEST_CASE("memory: host -> device -> device -> host round trip is exact") {
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(7), int64_t(1000003)}) {
    CAPTURE(n);
    const Tensor<double> host = randn<double>(Shape{n}, 3);
    const Tensor<double> device = host.to(Device::cuda);
    CHECK(device.device() == Device::cuda);
    const Tensor<double> copy = device.clone();  // device -> device
    const Tensor<double> back = copy.to(Device::cpu);
    CHECK(back.to_vector() == host.to_vector());
  }
}

TEST_CASE("memory: a strided CPU view copies to the device as a contiguous tensor") {
  const Tensor<float> host = randn<float>(Shape{5, 3}, 4);
  const Tensor<float> transposed = host.transpose(0, 1);  // (3, 5), not contiguous
  const Tensor<float> back = transposed.to(Device::cuda).to(Device::cpu);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 5; ++j) CHECK(back(i, j) == host(j, i));
}

TEST_CASE("memory: zero-initialised device tensors and zero() on the device") {
  Tensor<float> t(Shape{33, 17}, Device::cuda);
  for (float v : t.to_vector()) CHECK(v == 0.0f);
  t.copy_from(randn<float>(Shape{33, 17}, 5));
  t.zero();
  for (float v : t.to_vector()) CHECK(v == 0.0f);
}

TEST_CASE("allocator: buckets round up by at most 12.5%") {
  using A = cuda::CachingAllocator;
  CHECK(A::bucket_size(1) == 512);
  CHECK(A::bucket_size(512) == 512);
  CHECK(A::bucket_size(513) == 1024);
  CHECK(A::bucket_size((1 << 20) - 1) == (1 << 20));
  CHECK(A::bucket_size((1 << 20) + 1) == (1 << 20) + (1 << 17));
  for (std::size_t bytes : {std::size_t(1000), std::size_t(3) << 20, std::size_t(176160768) + 5}) {
    CAPTURE(bytes);
    CHECK(A::bucket_size(bytes) >= bytes);
    CHECK(A::bucket_size(bytes) <= bytes + bytes / 8 + 512);
  }
}

TEST_CASE("allocator: a freed block is reused for a request of the same bucket") {
  if (!cuda::allocator().caching()) {  // CBQ_CUDA_NO_CACHE: nothing is reused, by design
    MESSAGE("not applicable: the allocator's cache is off (CBQ_CUDA_NO_CACHE)");
    return;
  }
  cuda::CachingAllocator& alloc = cuda::allocator();
  void* first = alloc.allocate(1000);
  const cuda::AllocatorStats after_first = alloc.stats();
  CHECK(after_first.bytes_in_use >= 1024);
  alloc.deallocate(first);
  CHECK(alloc.stats().bytes_cached >= 1024);
  void* second = alloc.allocate(900);  // same 1024-byte bucket
  const cuda::AllocatorStats after_second = alloc.stats();
  CHECK(second == first);
  CHECK(after_second.num_cuda_malloc == after_first.num_cuda_malloc);
  CHECK(after_second.num_cache_hits == after_first.num_cache_hits + 1);
  alloc.deallocate(second);
}

TEST_CASE("allocator: a repeated training step reaches a steady state without cudaMalloc") {
  if (!cuda::allocator().caching()) {  // CBQ_CUDA_NO_CACHE: nothing is reused, by design
    MESSAGE("not applicable: the allocator's cache is off (CBQ_CUDA_NO_CACHE)");
    return;
  }
  const Tensor<float> x = randn<float>(Shape{37, 64}, 6), w = randn<float>(Shape{96, 64}, 7);
  Parameter<float> weight("w", w.to(Device::cuda));
  Parameter<float> bias("b", Tensor<float>(Shape{96}, Device::cuda));
  Tape<float> tape(Device::cuda);
  auto step = [&] {
    tape.clear();
    Var<float> y =
        ops::linear(tape.input(x.to(Device::cuda), false), tape.param(weight), tape.param(bias));
    y.grad().copy_from(randn<float>(y.shape(), 8));
    tape.backward_from_seeded();
  };
  step();
  step();
  const cuda::AllocatorStats warm = cuda::allocator().stats();
  for (int i = 0; i < 3; ++i) step();
  const cuda::AllocatorStats steady = cuda::allocator().stats();
  CHECK(steady.num_cuda_malloc == warm.num_cuda_malloc);
  CHECK(steady.num_allocations > warm.num_allocations);  // the inputs were uploaded again
  CHECK(tape.arena_allocations() > 0);
}

TEST_CASE("allocator: out of memory names the request and the allocator stays usable") {
  const std::string message =
      error_message([] { cuda::allocator().allocate(std::size_t(1) << 50); });
  CHECK(contains(message, "out of memory"));
  CHECK(contains(message, std::to_string(std::size_t(1) << 50)));
  void* ptr = cuda::allocator().allocate(4096);
  CHECK(ptr != nullptr);
  cuda::allocator().deallocate(ptr);
}

TEST_CASE("check: CBQ_CUDA_CHECK names the call, the file and the CUDA error") {
  void* ptr = nullptr;
  const std::string message =
      error_message([&] { CBQ_CUDA_CHECK(cudaMalloc(&ptr, std::size_t(1) << 50)); });
  CHECK(contains(message, "cudaMalloc(&ptr, std::size_t(1) << 50)"));
  CHECK(contains(message, "test_memory.cu:"));
  CHECK(contains(message, "cudaErrorMemoryAllocation"));
  CBQ_CUDA_CHECK(cudaGetLastError());  // the failure did not leave a sticky error behind
}

TEST_CASE("check: CBQ_CUBLAS_CHECK and CBQ_CUDA_CHECK_LAUNCH") {
  const std::string cublas = error_message([] { CBQ_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE); });
  CHECK(contains(cublas, "CUBLAS_STATUS_INVALID_VALUE"));
  CHECK(contains(cublas, "test_memory.cu:"));
  const std::string launch = error_message([] {
    noop_kernel<<<1, 4096>>>();  // more threads per block than any GPU allows
    CBQ_CUDA_CHECK_LAUNCH("noop_kernel");
  });
  CHECK(contains(launch, "noop_kernel"));
  CHECK(contains(launch, "cudaErrorInvalidConfiguration"));
  CBQ_CUDA_CHECK(cudaGetLastError());
}

TEST_CASE("context: a scoped context with its own stream and math mode") {
  cuda::Context& before = cuda::default_context();
  CHECK(before.math_mode() == cuda::MathMode::fp32);
  CHECK(before.stream() != nullptr);
  CHECK(before.cublaslt() != nullptr);
  {
    cuda::Context::Options options;
    options.math = cuda::MathMode::tf32;
    auto ctx = std::make_shared<cuda::Context>(options);
    cuda::ContextGuard guard(ctx);
    CHECK(&cuda::default_context() == ctx.get());
    CHECK(cuda::default_context().math_mode() == cuda::MathMode::tf32);
    // Work on the new stream uses the same hooks.
    const Tensor<float> host = randn<float>(Shape{100}, 9);
    CHECK(host.to(Device::cuda).to(Device::cpu).to_vector() == host.to_vector());
  }
  CHECK(&cuda::default_context() == &before);
  {
    cuda::MathModeGuard tf32(cuda::MathMode::tf32);
    CHECK(cuda::default_context().math_mode() == cuda::MathMode::tf32);
  }
  CHECK(cuda::default_context().math_mode() == cuda::MathMode::fp32);
}
