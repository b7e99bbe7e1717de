#pragma once
// Where the pass keeps a set of N calibration activations of shape (L, d): X_fp, X_q and the two
// window targets are four such sets (pass_activation_bytes). In host memory by default; with a
// directory, in a file mapping there (MAP_SHARED on an unlinked temporary file), so the kernel
// pages the sets to disk when they do not fit in RAM — a 7B model at 128 × 2048 tokens needs
// 4 × 4 GiB. The file is unlinked at once, so nothing is left behind, even after a crash, and
// its blocks are reserved (posix_fallocate) before use, so a full disk is an error, not SIGBUS.
// A pass on the GPU may keep a set in device memory instead (one allocation for the N samples).
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cbq/core/error.hpp"
#include "cbq/core/tensor.hpp"

namespace cbq {

template <class T>
class ActivationSet {
 public:
  ActivationSet() = default;
  // N tensors of (L, d); `dir` empty → memory on `device`, else a file-backed mapping in `dir`
  // (host memory: `device` must be the CPU then).
  ActivationSet(int64_t n, int64_t L, int64_t d, const std::string& dir, const std::string& what,
                Device device = Device::cpu)
      : n_(n) {
    const std::size_t per_sample = static_cast<std::size_t>(L * d) * sizeof(T);
    const std::size_t bytes = per_sample * static_cast<std::size_t>(n);
    std::shared_ptr<Storage> storage;
    CBQ_CHECK(dir.empty() || device == Device::cpu,
              "activation store: {} cannot be both on {} and file-backed in {}", what,
              device_name(device), dir);
    if (dir.empty()) {
      storage = std::make_shared<Storage>(bytes, device);
    } else {
      storage = map_file(dir, bytes, what);
    }
    for (int64_t i = 0; i < n; ++i)
      samples_.push_back(
          Tensor<T>::view_of(storage, Shape{L, d}, per_sample * static_cast<std::size_t>(i)));
  }
  int64_t size() const { return n_; }
  Device device() const { return samples_.empty() ? Device::cpu : samples_.front().device(); }
  // Sample i; write with copy_from (the tensor views the set's memory).
  Tensor<T>& operator[](int64_t i) { return samples_[static_cast<std::size_t>(i)]; }
  const Tensor<T>& operator[](int64_t i) const { return samples_[static_cast<std::size_t>(i)]; }
  const std::vector<Tensor<T>>& tensors() const { return samples_; }

 private:
  static std::shared_ptr<Storage> map_file(const std::string& dir, std::size_t bytes,
                                           const std::string& what) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    CBQ_CHECK(!ec, "activation store: cannot create directory {} for {}: {}", dir, what,
              ec.message());
    std::string name = (std::filesystem::path(dir) / "cbq-activations-XXXXXX").string();
    const int fd = ::mkstemp(name.data());
    CBQ_CHECK(fd >= 0, "activation store: cannot create a file in {} for {}: {}", dir, what,
              std::strerror(errno));
    ::unlink(name.c_str());  // the mapping keeps the space; nothing outlives the process
    const std::size_t size = bytes == 0 ? 1 : bytes;
    // Reserve the blocks now: a sparse file on a disk that fills up would turn a later store
    // into SIGBUS; a full disk is an error here instead.
    const int reserve_err = ::posix_fallocate(fd, 0, static_cast<off_t>(size));
    if (reserve_err != 0) {
      ::close(fd);
      fail("activation store: cannot reserve {} bytes ({:.1f} MiB) in {} for {}: {}", size,
           static_cast<double>(size) / (1 << 20), dir, what, std::strerror(reserve_err));
    }
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int err = errno;
    ::close(fd);
    CBQ_CHECK(p != MAP_FAILED, "activation store: cannot map {} bytes in {} for {}: {}", size, dir,
              what, std::strerror(err));
    return std::make_shared<Storage>(p, size, Device::cpu, [p, size] { ::munmap(p, size); });
  }

  int64_t n_ = 0;
  std::vector<Tensor<T>> samples_;
};

}  // namespace cbq
