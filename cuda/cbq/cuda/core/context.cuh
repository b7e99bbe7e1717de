#pragma once
// cbq::cuda::Context: the stream every cbq kernel, copy and GEMM runs on, the cuBLASLt handle
// with its workspace, the float GEMM math mode, and the cache of GEMM plans (descriptors and the
// heuristic's algorithm, per shape).
//
// One process-wide default context is created on first use (on the current device) and used by
// every hook; replace it with set_default_context() or, for a scope, with ContextGuard. Only
// switch contexts while no cbq tensor is in use on the old stream's pending work: the switch
// synchronizes the old stream so that the allocator may reuse its blocks on the new one.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "cbq/cuda/core/check.cuh"

namespace cbq::cuda {

// How float GEMMs compute. fp32: full single precision (CUBLAS_COMPUTE_32F), the mode that
// matches the CPU reference within 1e-5. tf32: inputs rounded to TensorFloat-32 (10-bit
// mantissa) on the tensor cores, accumulation in fp32 (CUBLAS_COMPUTE_32F_FAST_TF32); several
// times faster, about 1e-3 relative error. Double GEMMs always use CUBLAS_COMPUTE_64F.
enum class MathMode { fp32, tf32 };

inline const char* math_mode_name(MathMode m) { return m == MathMode::fp32 ? "fp32" : "tf32"; }

// Which kernels float attention runs (attention.cuh; double always runs the scalar ones).
// automatic: the tensor-core kernels in TF32 when the context's MathMode is tf32, else the FP32
// scalar kernels. fp32: the scalar kernels (the reference). tf32 / bf16: the tensor-core kernels
// with TF32 / BF16 operands and FP32 accumulation, for head dimensions 64 and 128 (others, and
// devices without the shared memory, run the scalar kernels).
enum class AttentionMode { automatic, fp32, tf32, bf16 };

inline const char* attention_mode_name(AttentionMode m) {
  switch (m) {
    case AttentionMode::automatic:
      return "automatic";
    case AttentionMode::fp32:
      return "fp32";
    case AttentionMode::tf32:
      return "tf32";
    case AttentionMode::bf16:
      return "bf16";
  }
  return "?";
}

namespace detail {

// What a cuBLASLt GEMM plan depends on. Dimensions are those of the column-major call.
struct GemmKey {
  cudaDataType_t type;
  cublasComputeType_t compute;
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldc;
  uint32_t align_a, align_b, align_c;  // byte alignment of the pointers (at most 256)
  bool operator==(const GemmKey&) const = default;
};

struct GemmKeyHash {
  std::size_t operator()(const GemmKey& key) const {
    std::size_t h = 1469598103934665603ull;
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(static_cast<uint64_t>(key.type));
    mix(static_cast<uint64_t>(key.compute));
    mix(key.trans_a * 2u + key.trans_b);
    for (int64_t v : {key.m, key.n, key.k, key.lda, key.ldb, key.ldc})
      mix(static_cast<uint64_t>(v));
    mix(key.align_a | (uint64_t(key.align_b) << 16) | (uint64_t(key.align_c) << 32));
    return h;
  }
};

// Descriptors and the chosen algorithm for one GemmKey; owns the descriptors.
struct GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  std::size_t workspace_bytes = 0;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;  // the compute type the algorithm is for
  bool fallback = false;  // FP32 compute because the heuristic had no TF32 algorithm

  GemmPlan() = default;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
  ~GemmPlan() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace detail

class Context {
 public:
  struct Options {
    MathMode math = MathMode::fp32;
    AttentionMode attention = AttentionMode::automatic;
    // cuBLASLt workspace; NVIDIA recommends 32 MiB on Hopper.
    std::size_t workspace_bytes = std::size_t(32) << 20;
    // nullptr: the context creates (and owns) a non-blocking stream. Otherwise the context uses
    // this stream and does not destroy it.
    cudaStream_t stream = nullptr;
  };

  Context() : Context(Options{}) {}
  explicit Context(Options options)
      : math_(options.math),
        attention_(options.attention),
        workspace_bytes_(options.workspace_bytes) {
    CBQ_CUDA_CHECK(cudaGetDevice(&device_));
    if (options.stream) {
      stream_ = options.stream;
    } else {
      CBQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      owns_stream_ = true;
    }
    CBQ_CUBLAS_CHECK(cublasLtCreate(&lt_));
    if (workspace_bytes_ > 0) CBQ_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
  }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  ~Context() {
    (void)cudaStreamSynchronize(stream_);
    plans_.clear();
    if (workspace_) (void)cudaFree(workspace_);
    if (lt_) (void)cublasLtDestroy(lt_);
    if (owns_stream_) (void)cudaStreamDestroy(stream_);
  }

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  cublasLtHandle_t cublaslt() const { return lt_; }
  void* workspace() const { return workspace_; }
  std::size_t workspace_bytes() const { return workspace_bytes_; }

  MathMode math_mode() const { return math_.load(std::memory_order_relaxed); }
  void set_math_mode(MathMode mode) { math_.store(mode, std::memory_order_relaxed); }

  AttentionMode attention_mode() const { return attention_.load(std::memory_order_relaxed); }
  void set_attention_mode(AttentionMode mode) { attention_.store(mode, std::memory_order_relaxed); }

  // Blocks the host until all work queued on this context's stream has finished.
  void synchronize() const { CBQ_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  // The cached plan for `key`, built by `make` on first use. Plans live as long as the context.
  template <class Make>
  const detail::GemmPlan& gemm_plan(const detail::GemmKey& key, Make&& make) {
    std::lock_guard<std::mutex> lock(plans_mutex_);
    auto it = plans_.find(key);
    if (it == plans_.end()) it = plans_.emplace(key, make()).first;
    return *it->second;
  }
  std::size_t num_gemm_plans() const {
    std::lock_guard<std::mutex> lock(plans_mutex_);
    return plans_.size();
  }
  // Plans that run in FP32 compute although TF32 was asked for (no TF32 algorithm fitted).
  std::size_t num_gemm_fallbacks() const {
    std::lock_guard<std::mutex> lock(plans_mutex_);
    std::size_t n = 0;
    for (const auto& [key, plan] : plans_) n += plan->fallback;
    return n;
  }

 private:
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  std::atomic<MathMode> math_;
  std::atomic<AttentionMode> attention_;
  std::size_t workspace_bytes_;
  mutable std::mutex plans_mutex_;
  std::unordered_map<detail::GemmKey, std::unique_ptr<detail::GemmPlan>, detail::GemmKeyHash>
      plans_;
};

namespace detail {

struct DefaultContextSlot {
  std::mutex mutex;
  std::shared_ptr<Context> owner;
  std::atomic<Context*> current{nullptr};
};

// Never destroyed: hooks may run during static destruction (tensors freed at exit).
inline DefaultContextSlot& default_context_slot() {
  static DefaultContextSlot* slot = new DefaultContextSlot();
  return *slot;
}

}  // namespace detail

// The context the hooks use; created with default Options on first use.
inline Context& default_context() {
  detail::DefaultContextSlot& slot = detail::default_context_slot();
  if (Context* ctx = slot.current.load(std::memory_order_acquire)) return *ctx;
  std::lock_guard<std::mutex> lock(slot.mutex);
  if (!slot.owner) {
    slot.owner = std::make_shared<Context>();
    slot.current.store(slot.owner.get(), std::memory_order_release);
  }
  return *slot.owner;
}

// Makes `ctx` the default context and returns the previous one (null if none was created yet).
// Synchronizes the previous context's stream first. A null `ctx` forgets the current default;
// the next default_context() then creates a fresh one.
inline std::shared_ptr<Context> set_default_context(std::shared_ptr<Context> ctx) {
  detail::DefaultContextSlot& slot = detail::default_context_slot();
  std::lock_guard<std::mutex> lock(slot.mutex);
  if (slot.owner) slot.owner->synchronize();
  std::shared_ptr<Context> previous = std::move(slot.owner);
  slot.owner = std::move(ctx);
  slot.current.store(slot.owner.get(), std::memory_order_release);
  return previous;
}

// Uses `ctx` as the default context for a scope.
class ContextGuard {
 public:
  explicit ContextGuard(std::shared_ptr<Context> ctx)
      : previous_(set_default_context(std::move(ctx))) {}
  ~ContextGuard() {
    try {
      set_default_context(std::move(previous_));
    } catch (...) {  // destructors do not throw; a failing sync resurfaces at the next call
    }
  }
  ContextGuard(const ContextGuard&) = delete;
  ContextGuard& operator=(const ContextGuard&) = delete;

 private:
  std::shared_ptr<Context> previous_;
};

// Sets the default context's float GEMM math mode for a scope.
class MathModeGuard {
 public:
  explicit MathModeGuard(MathMode mode) : previous_(default_context().math_mode()) {
    default_context().set_math_mode(mode);
  }
  ~MathModeGuard() { default_context().set_math_mode(previous_); }
  MathModeGuard(const MathModeGuard&) = delete;
  MathModeGuard& operator=(const MathModeGuard&) = delete;

 private:
  MathMode previous_;
};

// Sets the default context's attention kernels for a scope.
class AttentionModeGuard {
 public:
  explicit AttentionModeGuard(AttentionMode mode) : previous_(default_context().attention_mode()) {
    default_context().set_attention_mode(mode);
  }
  ~AttentionModeGuard() { default_context().set_attention_mode(previous_); }
  AttentionModeGuard(const AttentionModeGuard&) = delete;
  AttentionModeGuard& operator=(const AttentionModeGuard&) = delete;

 private:
  AttentionMode previous_;
};

}  // namespace cbq::cuda
