#pragma once
// What the machine lets this process use, read before any work so that a run that cannot fit
// is refused in its first second with the numbers instead of being OOM-killed later:
//   memory_limits()   MemAvailable (+ free swap), the cgroup's limit minus its use (v1 and v2,
//                     the tightest of the process's cgroup and its ancestors) and the address
//                     space left under RLIMIT_AS (ulimit -v) after what is already mapped.
//   reserve_blas_buffers()   OpenBLAS maps a fixed buffer (128 MiB + 8 KiB in Debian's 0.3.21)
//                     per thread that calls it concurrently, the first time, and when that mmap
//                     fails it retries forever (driver/others/memory.c, blas_memory_alloc: a
//                     do { … } while (map_address == -1) loop with no exit) — under ulimit -v the
//                     run spins silently. So before any large allocation every pool thread runs
//                     GEMMs at the same moment, which maps every buffer the run will need, and
//                     that only after checking that the address space for them is there. (The
//                     pthread build's own worker threads, started when the library loads, map
//                     theirs at once: the tools start with OPENBLAS_NUM_THREADS=1,
//                     examples/cli.hpp.)
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "cbq/core/blas.hpp"
#include "cbq/core/error.hpp"
#include "cbq/core/parallel.hpp"

namespace cbq {

inline std::string format_size(uint64_t b) {
  const double v = static_cast<double>(b);
  if (b >= (uint64_t{1} << 30)) return fmt::format("{:.1f} GiB", v / (1 << 30));
  if (b >= (uint64_t{1} << 20)) return fmt::format("{:.1f} MiB", v / (1 << 20));
  if (b >= (uint64_t{1} << 10)) return fmt::format("{:.1f} KiB", v / (1 << 10));
  return fmt::format("{} bytes", b);
}

struct MemoryLimits {
  uint64_t mem_available = 0;                // /proc/meminfo MemAvailable + SwapFree
  std::optional<uint64_t> cgroup_available;  // limit − (usage − page cache), tightest level
  std::string cgroup;                        // which cgroup limits (its path)
  uint64_t cgroup_limit = 0;
  std::optional<uint64_t> address_space_left;  // RLIMIT_AS − VmSize
  uint64_t address_space_limit = 0, vm_size = 0;

  // The memory a run can count on.
  uint64_t usable() const {
    uint64_t u = mem_available;
    if (cgroup_available) u = std::min(u, *cgroup_available);
    return u;
  }
  // Where `usable()` comes from, for messages.
  std::string describe() const {
    std::string s = fmt::format("MemAvailable + free swap {}", format_size(mem_available));
    if (cgroup_available)
      s += fmt::format("; cgroup {} limit {}, {} of it free", cgroup, format_size(cgroup_limit),
                       format_size(*cgroup_available));
    return s;
  }
};

namespace detail {

// The value of `key` (in kB) in a /proc file of "Key:   value kB" lines, or nullopt.
inline std::optional<uint64_t> proc_kb(const std::string& file, const std::string& key) {
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) {
      std::istringstream v(line.substr(key.size() + 1));
      uint64_t kb = 0;
      if (v >> kb) return kb * 1024;
    }
  return std::nullopt;
}

inline std::optional<uint64_t> read_number(const std::string& file) {
  std::ifstream in(file);
  std::string s;
  if (!(in >> s) || s == "max") return std::nullopt;
  try {
    return std::stoull(s);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

inline std::optional<uint64_t> stat_value(const std::string& file, const std::string& key) {
  std::ifstream in(file);
  std::string k;
  uint64_t v = 0;
  while (in >> k >> v)
    if (k == key) return v;
  return std::nullopt;
}

// Every (controller root, path) of this process's memory cgroup: v2 "0::/p", v1 "N:memory:/p".
inline std::vector<std::pair<std::string, std::string>> memory_cgroups(
    const std::string& cgroup_list, const std::string& root) {
  std::vector<std::pair<std::string, std::string>> out;
  std::ifstream in(cgroup_list);
  std::string line;
  while (std::getline(in, line)) {
    const auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (controllers.empty()) {
      for (const std::string& r : {root, root + "/unified"}) out.emplace_back(r, path);
    } else {
      std::istringstream list(controllers);
      std::string c;
      while (std::getline(list, c, ','))
        if (c == "memory") out.emplace_back(root + "/memory", path);
    }
  }
  return out;
}

}  // namespace detail

// Where memory_limits() reads (tests point it at fixture files).
struct MemoryLimitFiles {
  std::string meminfo = "/proc/meminfo", cgroup_list = "/proc/self/cgroup",
              status = "/proc/self/status", cgroup_root = "/sys/fs/cgroup";
};

// Reads the limits now (cheap: a few small /proc and /sys files).
inline MemoryLimits memory_limits(const MemoryLimitFiles& files = {}) {
  MemoryLimits m;
  m.mem_available = detail::proc_kb(files.meminfo, "MemAvailable").value_or(0) +
                    detail::proc_kb(files.meminfo, "SwapFree").value_or(0);
  for (const auto& [root, leaf] : detail::memory_cgroups(files.cgroup_list, files.cgroup_root)) {
    // The limit of the process's cgroup and of each ancestor applies.
    for (std::string path = leaf;;) {
      const std::string dir = root + (path == "/" ? "" : path);
      const bool v2 = root != files.cgroup_root + "/memory";
      const auto limit = detail::read_number(dir + (v2 ? "/memory.max" : "/memory.limit_in_bytes"));
      const auto usage =
          detail::read_number(dir + (v2 ? "/memory.current" : "/memory.usage_in_bytes"));
      // v1 reports "no limit" as a huge number (2^63 rounded to pages).
      if (limit && usage && *limit < (uint64_t{1} << 60)) {
        const uint64_t cache =
            detail::stat_value(dir + "/memory.stat", v2 ? "file" : "total_cache").value_or(0);
        const uint64_t used = *usage > cache ? *usage - cache : 0;
        const uint64_t free = *limit > used ? *limit - used : 0;
        if (!m.cgroup_available || free < *m.cgroup_available) {
          m.cgroup_available = free;
          m.cgroup = dir;
          m.cgroup_limit = *limit;
        }
      }
      if (path.empty() || path == "/") break;
      const auto slash = path.rfind('/');
      path = slash == 0 ? "/" : path.substr(0, slash);
    }
  }
  rlimit as{};
  if (::getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY) {
    m.address_space_limit = as.rlim_cur;
    m.vm_size = detail::proc_kb(files.status, "VmSize").value_or(0);
    m.address_space_left =
        m.address_space_limit > m.vm_size ? m.address_space_limit - m.vm_size : 0;
  }
  return m;
}

// Address space OpenBLAS maps per thread that calls it: BUFFER_SIZE (32 << 22 = 128 MiB on
// x86-64 since 0.3.x; smaller elsewhere) plus its page of bookkeeping, rounded up.
inline constexpr uint64_t kBlasBufferBytes = (uint64_t{128} << 20) + (uint64_t{1} << 20);

// Makes OpenBLAS map now the buffer of every pool thread (see the header comment), after checking
// under RLIMIT_AS that they fit beside `other_bytes` the run will allocate. Throws cbq::Error
// with the numbers instead of letting a later GEMM spin forever. Idempotent per thread count.
inline void reserve_blas_buffers(uint64_t other_bytes = 0) {
  static int reserved_for = 0;
  const int threads = num_threads();
  if (threads <= reserved_for) return;
  const MemoryLimits m = memory_limits();
  if (m.address_space_left) {
    const uint64_t need = static_cast<uint64_t>(threads) * kBlasBufferBytes + other_bytes;
    if (*m.address_space_left < need)
      fail(
          "the address-space limit (ulimit -v) {} leaves {} beside the {} already mapped, but this "
          "run needs at least {}: {} for OpenBLAS's GEMM buffers ({} threads × {}) and {} for "
          "the model and its data; raise the limit (ulimit -v) or use fewer --threads",
          format_size(m.address_space_limit), format_size(*m.address_space_left),
          format_size(m.vm_size), format_size(need),
          format_size(static_cast<uint64_t>(threads) * kBlasBufferBytes), threads,
          format_size(kBlasBufferBytes), format_size(other_bytes));
    // The check above counts what is mapped; make sure the buffers' mappings really succeed
    // (a GEMM whose mmap fails would never return).
    void* p = ::mmap(nullptr, static_cast<std::size_t>(threads) * kBlasBufferBytes, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CBQ_CHECK(p != MAP_FAILED,
              "cannot map {} of address space for OpenBLAS's GEMM buffers ({} threads; ulimit -v "
              "{}, {} mapped)",
              format_size(static_cast<uint64_t>(threads) * kBlasBufferBytes), threads,
              format_size(m.address_space_limit), format_size(m.vm_size));
    ::munmap(p, static_cast<std::size_t>(threads) * kBlasBufferBytes);
  }
  // Every thread enters its GEMMs together and they last milliseconds, so each holds a buffer of
  // its own at once (512³ is far above OpenBLAS's small-matrix path, which takes no buffer). The
  // mappings show in VmSize; on a machine so loaded that the threads never overlapped, a few more
  // rounds are run (a buffer not mapped here is mapped by the first GEMM that needs it).
  constexpr int n = 512;
  std::vector<std::vector<float>> a(static_cast<std::size_t>(threads),
                                    std::vector<float>(static_cast<std::size_t>(n) * n, 1.f));
  std::vector<std::vector<float>> c(static_cast<std::size_t>(threads),
                                    std::vector<float>(static_cast<std::size_t>(n) * n));
  blas::detail::owns_blas_threads();  // OpenBLAS at one thread first
  auto vm = [] { return detail::proc_kb("/proc/self/status", "VmSize").value_or(0); };
  const uint64_t before = vm();
  const uint64_t want = static_cast<uint64_t>(threads) * (kBlasBufferBytes - (uint64_t{1} << 20));
  uint64_t last = before;
  for (int round = 0; round < 8; ++round) {
    std::atomic<int> arrived{0};
    detail::pool().run([&](int t) {
      arrived.fetch_add(1);
      while (arrived.load() < threads) std::this_thread::yield();
      const float* x = a[static_cast<std::size_t>(t)].data();
      for (int k = 0; k < 2; ++k)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.f, x, n, x, n, 0.f,
                    c[static_cast<std::size_t>(t)].data(), n);
    });
    const uint64_t now = vm();
    // Done when every buffer is mapped, or when a round maps nothing new (the buffers existed
    // already, or this OpenBLAS maps smaller ones).
    if (now >= before + want || (round > 0 && now <= last)) break;
    last = now;
  }
  reserved_for = threads;
}

}  // namespace cbq
