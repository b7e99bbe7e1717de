#pragma once
// One owner of the CPU threads: a small persistent pool that blocks (no busy-wait) between
// jobs, so it does not fight OpenBLAS's own threads on small machines. parallel_for splits
// [0, n) into one contiguous chunk per thread; results are deterministic for a given thread
// count because each index is always processed by the same chunk arithmetic.
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace cbq {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) { resize(threads); }
  ~ThreadPool() { stop(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int threads) {
    stop();
    threads = std::max(1, threads);
    quit_ = false;
    // New workers must wait for the *next* job, not replay a finished one (generation_ keeps
    // counting across resizes; no job is in flight while resize runs).
    const uint64_t current = generation_;
    for (int i = 1; i < threads; ++i)
      workers_.emplace_back([this, i, current] { worker(i, current); });
  }

  // Runs job(t) for t in [0, size()) on the pool; the caller runs t = 0. Rethrows the first
  // exception a worker raised.
  void run(const std::function<void(int)>& job) {
    if (workers_.empty()) {
      job(0);
      return;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &job;
    pending_ = static_cast<int>(workers_.size());
    error_ = nullptr;
    ++generation_;
    lock.unlock();
    start_.notify_all();
    std::exception_ptr mine;
    try {
      job(0);
    } catch (...) {
      mine = std::current_exception();
    }
    lock.lock();
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void worker(int index, uint64_t seen) {
    for (;;) {
      std::unique_lock<std::mutex> lock(mutex_);
      start_.wait(lock, [&] { return quit_ || generation_ != seen; });
      if (quit_) return;
      seen = generation_;
      const auto* job = job_;
      lock.unlock();
      std::exception_ptr err;
      try {
        (*job)(index);
      } catch (...) {
        err = std::current_exception();
      }
      lock.lock();
      if (err && !error_) error_ = err;
      if (--pending_ == 0) done_.notify_one();
    }
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      quit_ = true;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool quit_ = false;
  std::exception_ptr error_;
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
}  // namespace detail

inline int num_threads() { return detail::pool().size(); }
// Sets the pool size (and OpenBLAS's, see blas.hpp: set_num_threads there calls this).
inline void set_pool_threads(int threads) { detail::pool().resize(threads); }

// Calls body(begin, end) over chunks of [0, n). Runs inline when n is below `grain` per thread
// or when already inside a parallel region (no nested fan-out).
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& body) {
  if (n <= 0) return;
  int threads = num_threads();
  if (detail::in_parallel_region || threads == 1 || n < 2 * std::max<int64_t>(grain, 1)) {
    body(int64_t{0}, n);
    return;
  }
  int64_t chunks = std::min<int64_t>(threads, (n + grain - 1) / std::max<int64_t>(grain, 1));
  std::function<void(int)> job = [&](int t) {
    if (t >= chunks) return;
    int64_t begin = n * t / chunks, end = n * (t + 1) / chunks;
    detail::in_parallel_region = true;
    try {
      body(begin, end);
    } catch (...) {
      detail::in_parallel_region = false;
      throw;
    }
    detail::in_parallel_region = false;
  };
  detail::pool().run(job);
}

}  // namespace cbq
