#pragma once
// Read-only memory-mapped files (POSIX mmap) plus the small file helpers every loader shares:
// a bounds-checked little-endian byte cursor and whole-file text reads (atomic writes:
// atomic_file.hpp).
// Errors are cbq::Error and name the path and, for system calls, the errno text.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "cbq/core/atomic_file.hpp"
#include "cbq/core/error.hpp"

namespace cbq::io {

static_assert(std::endian::native == std::endian::little,
              "cbq::io reads little-endian files and assumes a little-endian host");

// A whole file mapped read-only. Move-only; the mapping is released by the destructor.
// Empty files are valid and have size() == 0 and data() == nullptr.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(std::string path) : path_(std::move(path)) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail("{}: cannot open: {}", path_, std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      fail("{}: cannot stat: {}", path_, std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      fail("{}: is {}, not a regular file", path_, file_type_name(st.st_mode));
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        int e = errno;
        ::close(fd);
        fail("{}: cannot map {} bytes: {}", path_, size_, std::strerror(e));
      }
      data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);  // the mapping stays valid after close
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept
      : path_(std::move(o.path_)),
        data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)) {}
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      release();
      path_ = std::move(o.path_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~MappedFile() { release(); }

  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::span<const std::byte> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }
  bool is_open() const { return !path_.empty(); }

 private:
  void release() noexcept {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  std::string path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// Sequential little-endian reader over a byte range that never reads past its end; a short
// read throws naming the file, what was being read, the offset and the byte counts.
class ByteReader {
 public:
  ByteReader(std::span<const std::byte> bytes, std::string path)
      : bytes_(bytes), path_(std::move(path)) {}

  std::size_t offset() const { return pos_; }
  std::size_t remaining() const { return bytes_.size() - pos_; }
  std::size_t size() const { return bytes_.size(); }
  bool at_end() const { return pos_ == bytes_.size(); }
  const std::string& path() const { return path_; }

  // `n` bytes starting at the cursor; advances it.
  std::span<const std::byte> take(std::size_t n, std::string_view what) {
    if (n > remaining())
      fail(
          "{}: truncated while reading {}: need {} bytes at offset {}, only {} left (file is {} "
          "bytes)",
          path_, what, n, pos_, remaining(), bytes_.size());
    auto out = bytes_.subspan(pos_, n);
    pos_ += n;
    return out;
  }
  template <class T>
  T read(std::string_view what) {
    static_assert(std::is_trivially_copyable_v<T>);
    T v;
    std::memcpy(&v, take(sizeof(T), what).data(), sizeof(T));
    return v;
  }

 private:
  std::span<const std::byte> bytes_;
  std::string path_;
  std::size_t pos_ = 0;
};

// a * b for non-negative sizes, throwing (with `what`) instead of overflowing.
inline uint64_t checked_mul(uint64_t a, uint64_t b, std::string_view what) {
  uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) fail("{}: size overflows 64 bits ({} x {})", what, a, b);
  return r;
}
inline uint64_t checked_add(uint64_t a, uint64_t b, std::string_view what) {
  uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) fail("{}: size overflows 64 bits ({} + {})", what, a, b);
  return r;
}

// The whole file as a string (for JSON and text).
inline std::string read_text_file(const std::string& path) {
  MappedFile f(path);
  return std::string(reinterpret_cast<const char*>(f.data()), f.size());
}

// Writes the raw bytes of a trivially copyable value.
template <class T>
void write_pod(std::ostream& out, const T& v) {
  static_assert(std::is_trivially_copyable_v<T>);
  out.write(reinterpret_cast<const char*>(&v), sizeof(T));
}

}  // namespace cbq::io
