#pragma once
// A caching allocator for device memory. Freed blocks are kept in size-bucketed free lists and
// handed out again, so a training step that repeats the same shapes calls cudaMalloc only
// during its first iteration ("steady state": stats().num_cuda_malloc stops growing).
//
// Buckets: a request is rounded up to a multiple of 512 bytes below 1 MiB, and above that to
// one of 8 sizes per power of two (at most 12.5% slack). A free block is reused only for a
// request of the same bucket, so a small tensor never pins a huge block.
//
// Streams: blocks are reused without waiting, which is safe because all cbq work is ordered on
// one stream (the default context's; see context.cuh). Releasing memory to the driver
// (empty_cache, or the retry after an out-of-memory error) synchronizes the device first.
//
// CBQ_CUDA_NO_CACHE=1 (read once, at the allocator's creation): every request is its own
// cudaMalloc of exactly the requested bytes and every release a cudaFree (which waits for the
// device). Slow; for compute-sanitizer, whose memcheck then sees an access past a tensor's end
// instead of the bucket's slack, and whose initcheck sees no stale data from an earlier tensor.
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cbq/cuda/core/check.cuh"

namespace cbq::cuda {

struct AllocatorStats {
  std::size_t bytes_in_use = 0;       // bucket sizes of the blocks handed out now
  std::size_t bytes_requested = 0;    // requested sizes of the blocks handed out now
  std::size_t peak_bytes_in_use = 0;  // since construction or reset_peak()
  std::size_t bytes_cached = 0;       // free blocks kept for reuse
  std::size_t num_allocations = 0;    // allocate() calls
  std::size_t num_cache_hits = 0;     // ... served from the free lists
  std::size_t num_cuda_malloc = 0;    // cudaMalloc calls
  std::size_t num_cuda_free = 0;      // cudaFree calls
};

class CachingAllocator {
 public:
  static constexpr std::size_t kSmallGranularity = 512;
  static constexpr std::size_t kSmallLimit = std::size_t(1) << 20;

  CachingAllocator() {
    const char* v = std::getenv("CBQ_CUDA_NO_CACHE");
    caching_ = !(v && *v && std::strcmp(v, "0") != 0);
  }
  // Whether freed blocks are kept for reuse (false under CBQ_CUDA_NO_CACHE).
  bool caching() const { return caching_; }
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;
  ~CachingAllocator() { release_cached(); }

  // The bucket a request of `bytes` is served from.
  static std::size_t bucket_size(std::size_t bytes) {
    if (bytes <= kSmallGranularity) return kSmallGranularity;
    const std::size_t granularity =
        bytes < kSmallLimit ? kSmallGranularity : std::bit_floor(bytes) / 8;
    return (bytes + granularity - 1) / granularity * granularity;
  }

  // A block of at least `bytes` (nullptr for 0). Throws cbq::Error when the device is full
  // even after the cache was released.
  void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t size = caching_ ? bucket_size(bytes) : bytes;
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.num_allocations;
    void* ptr = nullptr;
    if (auto it = free_.find(size); caching_ && it != free_.end() && !it->second.empty()) {
      ptr = it->second.back();
      it->second.pop_back();
      stats_.bytes_cached -= size;
      ++stats_.num_cache_hits;
    } else {
      ptr = cuda_malloc(size, bytes);
    }
    live_.emplace(ptr, Block{size, bytes});
    stats_.bytes_in_use += size;
    stats_.bytes_requested += bytes;
    stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
    return ptr;
  }

  // Returns a block to its free list. Never throws (it runs in destructors); an unknown
  // pointer is reported on stderr and ignored.
  void deallocate(void* ptr) noexcept {
    if (!ptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(ptr);
    if (it == live_.end()) {
      std::fprintf(stderr, "cbq::cuda::CachingAllocator: free of unknown pointer %p ignored\n",
                   ptr);
      return;
    }
    const Block block = it->second;
    live_.erase(it);
    stats_.bytes_in_use -= block.size;
    stats_.bytes_requested -= block.requested;
    if (!caching_) {  // cudaFree waits for the work that may still use the block
      ++stats_.num_cuda_free;
      (void)cudaFree(ptr);
      return;
    }
    stats_.bytes_cached += block.size;
    try {
      free_[block.size].push_back(ptr);
    } catch (...) {  // no memory for the list entry: give the block back to the driver
      stats_.bytes_cached -= block.size;
      ++stats_.num_cuda_free;
      (void)cudaFree(ptr);
    }
  }

  // Gives every cached (free) block back to the driver. Blocks in use are untouched.
  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    CBQ_CUDA_CHECK(cudaDeviceSynchronize());
    release_cached();
  }

  AllocatorStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }

 private:
  struct Block {
    std::size_t size;       // bucket size
    std::size_t requested;  // what the caller asked for
  };

  // Called with the mutex held.
  void* cuda_malloc(std::size_t size, std::size_t requested) {
    void* ptr = nullptr;
    cudaError_t status = cudaMalloc(&ptr, size);
    if (status == cudaErrorMemoryAllocation && stats_.bytes_cached > 0) {
      (void)cudaGetLastError();
      CBQ_CUDA_CHECK(cudaDeviceSynchronize());
      release_cached();
      status = cudaMalloc(&ptr, size);
    }
    if (status == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      std::size_t free_bytes = 0, total_bytes = 0;
      (void)cudaMemGetInfo(&free_bytes, &total_bytes);
      fail(
          "cuda allocator: out of memory allocating {} bytes (bucket {}); cbq holds {} bytes in "
          "use, the device has {} of {} bytes free",
          requested, size, stats_.bytes_in_use, free_bytes, total_bytes);
    }
    if (status != cudaSuccess)
      detail::throw_cuda_error(status, "cudaMalloc(&ptr, size)", __FILE__, __LINE__);
    ++stats_.num_cuda_malloc;
    return ptr;
  }

  // Called with the mutex held (or from the destructor).
  void release_cached() noexcept {
    for (auto& [size, blocks] : free_) {
      for (void* p : blocks) {
        (void)cudaFree(p);
        ++stats_.num_cuda_free;
        stats_.bytes_cached -= size;
      }
      blocks.clear();
    }
    free_.clear();
  }

  bool caching_ = true;
  mutable std::mutex mutex_;
  std::unordered_map<void*, Block> live_;
  std::map<std::size_t, std::vector<void*>> free_;  // bucket size -> free blocks
  AllocatorStats stats_;
};

// The process-wide allocator behind cbq::cuda_hooks(). Never destroyed, so that tensors that
// die during static destruction can still be freed; call empty_cache() to return memory early.
inline CachingAllocator& allocator() {
  static CachingAllocator* instance = new CachingAllocator();
  return *instance;
}

}  // namespace cbq::cuda
