#pragma once
// One owner of the CPU threads: a small persistent pool. parallel_for splits [0, n) into one
// contiguous chunk per thread; results are deterministic for a given thread count because each
// index is always processed by the same chunk arithmetic.
//
// cbq also owns the GEMM threads: blas.hpp runs OpenBLAS single-threaded and splits large GEMMs
// over this pool, so there is never a second set of threads spinning against ours.
//
// Waiting: a worker spins (with a pause instruction) for a short while after each job before it
// blocks on a condition variable, and the caller spins the same way for the workers to finish.
// A training step issues hundreds of parallel regions a few microseconds apart; a blocking
// hand-off costs a futex wake-up and a context switch (tens of microseconds on a VM) each, a spin
// costs nothing when the next job comes soon. After kSpinMicros without work a thread sleeps,
// so an idle pool takes no CPU.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace cbq {

namespace detail {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::this_thread::yield();
#endif
}

// Spins until pred() holds or about `micros` have passed; returns pred().
template <class Pred>
bool spin_until(Pred&& pred, int64_t micros) {
  if (pred()) return true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(micros);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      cpu_relax();
      if (pred()) return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return pred();
  }
}
}  // namespace detail

class ThreadPool {
 public:
  // How long an idle thread spins before it blocks.
  static constexpr int64_t kSpinMicros = 100;

  explicit ThreadPool(int threads) { resize(threads); }
  ~ThreadPool() { stop(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int threads) {
    stop();
    threads = std::max(1, threads);
    quit_.store(false);
    // New workers must wait for the *next* job, not replay a finished one (generation_ keeps
    // counting across resizes; no job is in flight while resize runs).
    const uint64_t current = generation_.load();
    for (int i = 1; i < threads; ++i)
      workers_.emplace_back([this, i, current] { worker(i, current); });
  }

  // Runs job(t) for t in [0, size()) on the pool; the caller runs t = 0. Rethrows the first
  // exception a worker raised. `job` is any callable taking an int; it is not copied (no
  // allocation per call).
  template <class F>
  void run(F&& job) {
    using Fn = std::remove_reference_t<F>;
    if (workers_.empty()) {
      job(0);
      return;
    }
    job_object_ = const_cast<void*>(static_cast<const void*>(&job));
    job_call_ = [](void* object, int t) { (*static_cast<Fn*>(object))(t); };
    error_ = nullptr;
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    {
      // Under the mutex so that a worker about to block cannot miss the new generation.
      std::lock_guard<std::mutex> lock(mutex_);
      if (sleeping_workers_ > 0) start_.notify_all();
    }
    std::exception_ptr mine;
    try {
      job(0);
    } catch (...) {
      mine = std::current_exception();
    }
    auto finished = [this] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!detail::spin_until(finished, kSpinMicros)) {
      std::unique_lock<std::mutex> lock(mutex_);
      caller_waiting_ = true;
      done_.wait(lock, finished);
      caller_waiting_ = false;
    }
    job_object_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void worker(int index, uint64_t seen) {
    for (;;) {
      auto has_work = [&] {
        return quit_.load(std::memory_order_acquire) ||
               generation_.load(std::memory_order_acquire) != seen;
      };
      if (!detail::spin_until(has_work, kSpinMicros)) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleeping_workers_;
        start_.wait(lock, has_work);
        --sleeping_workers_;
      }
      if (quit_.load(std::memory_order_acquire)) return;
      seen = generation_.load(std::memory_order_acquire);
      try {
        job_call_(job_object_, index);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (caller_waiting_) done_.notify_one();
      }
    }
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      quit_.store(true);
      start_.notify_all();
    }
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  void* job_object_ = nullptr;
  void (*job_call_)(void*, int) = nullptr;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> quit_{false};
  int sleeping_workers_ = 0;     // guarded by mutex_
  bool caller_waiting_ = false;  // guarded by mutex_
  std::exception_ptr error_;     // written under mutex_ by workers
};

namespace detail {
inline int default_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}
inline ThreadPool& pool() {
  static ThreadPool p(default_threads());
  return p;
}
inline thread_local bool in_parallel_region = false;

// Marks the calling thread as inside a parallel region for its lifetime (exception-safe).
struct ParallelRegion {
  bool previous = in_parallel_region;
  ParallelRegion() { in_parallel_region = true; }
  ~ParallelRegion() { in_parallel_region = previous; }
  ParallelRegion(const ParallelRegion&) = delete;
  ParallelRegion& operator=(const ParallelRegion&) = delete;
};
}  // namespace detail

// The calling thread's scratch of at least n values of T, grown once and kept for the thread's
// life (no allocation in the steady state). Each Tag names its own buffer, so that buffers in
// use at once (a region's shared one on the calling thread, and each worker's own inside it,
// the caller's included) never alias; pool workers may write into the caller's through the
// pointer.
template <class T, class Tag>
T* thread_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<std::size_t>(n));
  return buffer.data();
}

inline int num_threads() { return detail::pool().size(); }
// Sets the pool size (blas.hpp's set_num_threads calls this and keeps OpenBLAS at one thread).
inline void set_pool_threads(int threads) { detail::pool().resize(threads); }

// Calls body(begin, end) over chunks of [0, n). Runs inline when n is below `grain` per thread
// or when already inside a parallel region (no nested fan-out).
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& body) {
  if (n <= 0) return;
  const int threads = num_threads();
  if (detail::in_parallel_region || threads == 1 || n < 2 * std::max<int64_t>(grain, 1)) {
    body(int64_t{0}, n);
    return;
  }
  const int64_t chunks = std::min<int64_t>(threads, (n + grain - 1) / std::max<int64_t>(grain, 1));
  auto job = [&](int t) {
    if (t >= chunks) return;
    const int64_t begin = n * t / chunks, end = n * (t + 1) / chunks;
    detail::ParallelRegion region;
    body(begin, end);
  };
  detail::pool().run(job);
}

}  // namespace cbq
