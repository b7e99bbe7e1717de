#pragma once
// Writing outputs so that nothing is ever destroyed: every file and folder cbq writes appears
// complete under its name or not at all, and the checks that keep an output from replacing an
// input, a device or someone's folder.
//
//   AtomicFile      a temporary ".NAME.cbq-tmp-PID-N" in the target's folder, created with
//                   O_CREAT | O_EXCL | O_NOFOLLOW (a planted symlink is never followed), written
//                   through a buffered stream, fsynced, renamed onto the target, the folder
//                   fsynced. Not committed (an exception, a full disk) → the temporary is removed.
//   AtomicDir       the same for a folder (a GPTQ export): the files are written into
//                   ".NAME.cbq-tmpdir-PID-N", which replaces the target in one step
//                   (renameat2 RENAME_EXCHANGE, then the old folder is removed), so a reader sees
//                   the old folder or the new one, never a mixture.
//   remove_stale_temporaries   what a killed run left beside a target (its PID is gone) is
//                   removed the next time that target is written (an old folder set aside by the
//                   two-rename fallback is put back when the target is missing).
//   check_output_file / check_output_folder / check_input_file   refusals before any work:
//                   an output that is an input (same inode: through symlinks and hard links
//                   too), a device, FIFO or socket, a folder that holds an input, a non-empty
//                   folder that is not a previous cbq export (unless forced), a missing folder.
//
// tests/cli/hostile.sh (ctest cli_hostile) kills the tools before every write, fsync, rename,
// mkdir and unlink of every writer (an LD_PRELOAD shim) and checks that the old or the new
// output is left.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <streambuf>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "cbq/core/error.hpp"

namespace cbq::io {

// ---- small file-system helpers ----

inline std::string file_type_name(mode_t m) {
  if (S_ISREG(m)) return "a regular file";
  if (S_ISDIR(m)) return "a folder";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISFIFO(m)) return "a FIFO (named pipe)";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISLNK(m)) return "a symbolic link";
  return "not a regular file";
}

// stat() following symlinks; nullopt when the path does not exist (other errors throw).
inline std::optional<struct stat> stat_path(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) return st;
  if (errno == ENOENT || errno == ENOTDIR) return std::nullopt;
  fail("{}: cannot stat: {}", path, std::strerror(errno));
}

inline bool same_inode(const struct stat& a, const struct stat& b) {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// fsync of a file or directory (durability of atomic writes); errors name the path.
inline void sync_path(const std::string& path, bool directory) {
  const int fd =
      ::open(path.c_str(), (directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open to sync: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) fail("{}: fsync failed: {}", path, std::strerror(err));
}

// Bytes a non-root writer may still use on the file system holding `path` (a folder).
inline uint64_t free_disk_bytes(const std::string& path) {
  struct statvfs v {};
  if (::statvfs(path.c_str(), &v) != 0)
    fail("{}: cannot query free space: {}", path, std::strerror(errno));
  return static_cast<uint64_t>(v.f_bavail) * static_cast<uint64_t>(v.f_frsize);
}

inline std::string format_bytes(uint64_t b) {
  const double v = static_cast<double>(b);
  if (b >= (uint64_t{1} << 30)) return fmt::format("{:.1f} GiB", v / (1 << 30));
  if (b >= (uint64_t{1} << 20)) return fmt::format("{:.1f} MiB", v / (1 << 20));
  if (b >= (uint64_t{1} << 10)) return fmt::format("{:.1f} KiB", v / (1 << 10));
  return fmt::format("{} bytes", b);
}

// The path writes should go to: symlinks at the end resolved (an output that is a link to a
// file replaces that file), the folder made absolute. The last component need not exist.
inline std::string resolve_output_path(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p(path);
  for (int hops = 0; hops < 40 && fs::is_symlink(fs::symlink_status(p, ec)); ++hops) {
    fs::path target = fs::read_symlink(p, ec);
    if (ec) break;
    p = target.is_absolute() ? target : p.parent_path() / target;
  }
  fs::path parent = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  fs::path canon = fs::weakly_canonical(parent, ec);
  return ((ec ? parent : canon) / p.filename()).string();
}

inline std::string parent_folder(const std::string& path) {
  const auto parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// ---- temporaries ----

namespace detail {

enum class TempKind { file, dir, old };
inline const char* temp_tag(TempKind k) {
  return k == TempKind::file ? ".cbq-tmp-" : k == TempKind::dir ? ".cbq-tmpdir-" : ".cbq-old-";
}
// ".NAME.cbq-tmp-PID-N" beside `target`.
inline std::string temp_name(const std::string& target, TempKind kind) {
  static std::atomic<unsigned> counter{0};
  const std::filesystem::path t(target);
  return (t.parent_path() / fmt::format(".{}{}{}-{}", t.filename().string(), temp_tag(kind),
                                        static_cast<long>(::getpid()), counter++))
      .string();
}

inline bool process_alive(long pid) {
  if (pid <= 0) return false;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

// A buffered stream over a file descriptor: every flush is a loop of write(2); an error (a full
// disk: ENOSPC, a file-size limit: EFBIG) throws naming the file.
class FdStreamBuf : public std::streambuf {
 public:
  FdStreamBuf(int fd, std::string path) : fd_(fd), path_(std::move(path)), buf_(1 << 20) {
    setp(buf_.data(), buf_.data() + buf_.size());
  }
  void flush_all() {
    const char* p = pbase();
    std::size_t n = static_cast<std::size_t>(pptr() - pbase());
    if (n == 0) return;
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        fail("{}: write of {} bytes failed after {} bytes: {}", path_, n, written_,
             std::strerror(err));
      }
      p += w;
      n -= static_cast<std::size_t>(w);
      written_ += static_cast<uint64_t>(w);
    }
    setp(buf_.data(), buf_.data() + buf_.size());
  }
  uint64_t written() const { return written_ + static_cast<uint64_t>(pptr() - pbase()); }

 protected:
  int_type overflow(int_type c) override {
    flush_all();
    if (!traits_type::eq_int_type(c, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(c);
      pbump(1);
    }
    return traits_type::not_eof(c);
  }
  int sync() override {
    flush_all();
    return 0;
  }

 private:
  int fd_;
  std::string path_;
  std::vector<char> buf_;
  uint64_t written_ = 0;
};

}  // namespace detail

// Removes what killed runs left beside `target` (temporaries whose PID is gone). An old folder
// set aside by AtomicDir's two-rename fallback is renamed back when the target is missing.
inline void remove_stale_temporaries(const std::string& target) {
  namespace fs = std::filesystem;
  const fs::path t(target);
  const std::string folder = parent_folder(target);
  const std::string base = "." + t.filename().string();
  DIR* d = ::opendir(folder.c_str());
  if (!d) return;  // nothing to clean where nothing can be listed
  std::vector<std::pair<std::string, detail::TempKind>> stale;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind(base, 0) != 0) continue;
    for (auto kind : {detail::TempKind::file, detail::TempKind::dir, detail::TempKind::old}) {
      const std::string prefix = base + detail::temp_tag(kind);
      if (name.rfind(prefix, 0) != 0) continue;
      const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
      if (pid != static_cast<long>(::getpid()) && !detail::process_alive(pid))
        stale.emplace_back((fs::path(folder) / name).string(), kind);
    }
  }
  ::closedir(d);
  std::error_code ec;
  for (const auto& [path, kind] : stale) {
    if (kind == detail::TempKind::old && !fs::exists(fs::symlink_status(target, ec))) {
      if (::rename(path.c_str(), target.c_str()) == 0) continue;  // the old folder back
    }
    fs::remove_all(path, ec);  // never follows a symlink
  }
}

// A file written under a temporary name and renamed onto `target` by commit(). The target's
// final symlinks are resolved first (see resolve_output_path).
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& target) : target_(resolve_output_path(target)) {
    remove_stale_temporaries(target_);
    for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
      tmp_ = detail::temp_name(target_, detail::TempKind::file);
      fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
      if (fd_ < 0 && errno != EEXIST)
        fail("{}: cannot create the temporary {} in its folder: {}", target_, tmp_,
             std::strerror(errno));
    }
    CBQ_CHECK(fd_ >= 0, "{}: cannot create a temporary file beside it (100 names taken)", target_);
    buf_.emplace(fd_, tmp_);
    // An ofstream whose buffer is ours: writers written against std::ofstream& keep working.
    static_cast<std::ios&>(stream_).rdbuf(&*buf_);
    stream_.exceptions(std::ios::badbit);  // rethrows the buffer's cbq::Error
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_ && !tmp_.empty()) ::unlink(tmp_.c_str());
  }

  std::ofstream& stream() { return stream_; }
  const std::string& target() const { return target_; }
  const std::string& temporary() const { return tmp_; }

  // Flush, fsync, close, rename onto the target, fsync the folder.
  void commit() {
    buf_->flush_all();
    if (::fsync(fd_) != 0) fail("{}: fsync failed: {}", tmp_, std::strerror(errno));
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail("{}: close failed: {}", tmp_, std::strerror(errno));
    if (::rename(tmp_.c_str(), target_.c_str()) != 0)
      fail("{}: cannot rename {} onto it: {}", target_, tmp_, std::strerror(errno));
    committed_ = true;
    sync_path(parent_folder(target_), true);
  }

 private:
  std::string target_, tmp_;
  int fd_ = -1;
  std::optional<detail::FdStreamBuf> buf_;
  std::ofstream stream_;
  bool committed_ = false;
};

// Writes `path` atomically and durably: `write(out)` fills a temporary beside it, which is
// flushed, fsynced and renamed onto `path`, then the folder is fsynced. On any failure
// (including an exception from `write`) the temporary is removed and `path` is left untouched.
inline void write_file_atomic(const std::string& path,
                              const std::function<void(std::ofstream&)>& write) {
  AtomicFile file(path);
  write(file.stream());
  file.commit();
}

// A folder built under a temporary name and put in place of `target` by commit(): the old
// folder (if any) and the new one are exchanged in one step, then the old one is removed.
class AtomicDir {
 public:
  explicit AtomicDir(const std::string& target) : target_(resolve_output_path(target)) {
    remove_stale_temporaries(target_);
    tmp_ = detail::temp_name(target_, detail::TempKind::dir);
    if (::mkdir(tmp_.c_str(), 0777) != 0)
      fail("{}: cannot create the temporary folder {}: {}", target_, tmp_, std::strerror(errno));
  }
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;
  ~AtomicDir() {
    std::error_code ec;
    if (!committed_) std::filesystem::remove_all(tmp_, ec);
  }

  // Where to write the folder's files.
  const std::string& path() const { return tmp_; }
  const std::string& target() const { return target_; }

  void commit() {
    namespace fs = std::filesystem;
    sync_path(tmp_, true);
    const auto existing = stat_path(target_);
    if (!existing) {
      if (::rename(tmp_.c_str(), target_.c_str()) != 0)
        fail("{}: cannot rename {} onto it: {}", target_, tmp_, std::strerror(errno));
    } else {
      CBQ_CHECK(S_ISDIR(existing->st_mode), "{}: is {}, not a folder; refusing to replace it",
                target_, file_type_name(existing->st_mode));
      if (::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, target_.c_str(), RENAME_EXCHANGE) != 0) {
        if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
          fail("{}: cannot exchange it with {}: {}", target_, tmp_, std::strerror(errno));
        // No RENAME_EXCHANGE on this file system: set the old folder aside, then rename. A
        // kill in between leaves it at ".NAME.cbq-old-…", put back by the next write.
        const std::string old = detail::temp_name(target_, detail::TempKind::old);
        if (::rename(target_.c_str(), old.c_str()) != 0)
          fail("{}: cannot move it aside to {}: {}", target_, old, std::strerror(errno));
        if (::rename(tmp_.c_str(), target_.c_str()) != 0) {
          const int err = errno;
          ::rename(old.c_str(), target_.c_str());
          fail("{}: cannot rename {} onto it: {}", target_, tmp_, std::strerror(err));
        }
        tmp_ = old;
      }
      // tmp_ now names the old folder.
      std::error_code ec;
      fs::remove_all(tmp_, ec);
    }
    committed_ = true;
    sync_path(parent_folder(target_), true);
  }

 private:
  std::string target_, tmp_;
  bool committed_ = false;
};

// ---- checks before any work ----

// An input of the run: a path and the option that named it.
struct InputPath {
  std::string path;
  std::string option;
};

namespace detail {

// Every regular file an input stands for (a folder: the files directly in it).
inline std::vector<std::pair<std::string, struct stat>> input_files(const InputPath& in) {
  std::vector<std::pair<std::string, struct stat>> out;
  const auto st = stat_path(in.path);
  if (!st) return out;
  out.emplace_back(in.path, *st);
  if (S_ISDIR(st->st_mode)) {
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(in.path, ec))
      if (auto s = stat_path(e.path().string())) out.emplace_back(e.path().string(), *s);
  }
  return out;
}

inline std::string canonical_or(const std::string& path) {
  std::error_code ec;
  auto c = std::filesystem::weakly_canonical(path, ec);
  return ec ? path : c.string();
}

// `inner` lies inside the folder `outer` (or is it), by canonical paths.
inline bool path_within(const std::string& inner, const std::string& outer) {
  const std::string i = canonical_or(inner), o = canonical_or(outer);
  if (i == o) return true;
  return i.size() > o.size() && i.compare(0, o.size(), o) == 0 &&
         (o.back() == '/' || i[o.size()] == '/');
}

inline bool is_safetensors_or_gguf(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char head[9] = {};
  in.read(head, 9);
  if (in.gcount() >= 4 && std::string_view(head, 4) == "GGUF") return true;
  return in.gcount() == 9 && head[8] == '{';  // u64 header length, then the JSON header
}

}  // namespace detail

// Refuses (cbq::Error naming `option`, the path and why) an output file that is an input (the
// same inode, through any symlink or hard link), is not a regular file (a device, FIFO,
// socket or folder), lies in a missing folder or one that cannot be written, or is an existing
// file that is not a model file (safetensors / GGUF) — the last only unless `force`.
// Returns the path writes will go to.
inline std::string check_output_file(const std::string& path, const std::vector<InputPath>& inputs,
                                     bool force, const std::string& option) {
  CBQ_CHECK(!path.empty(), "{}: empty output path", option);
  const std::string target = resolve_output_path(path);
  const std::string folder = parent_folder(target);
  const auto fst = stat_path(folder);
  CBQ_CHECK(fst && S_ISDIR(fst->st_mode), "{} {}: the folder {} does not exist", option, path,
            folder);
  CBQ_CHECK(::access(folder.c_str(), W_OK | X_OK) == 0, "{} {}: cannot write in the folder {}: {}",
            option, path, folder, std::strerror(errno));
  if (const auto st = stat_path(target)) {
    for (const InputPath& in : inputs)
      for (const auto& [file, ist] : detail::input_files(in))
        CBQ_CHECK(!same_inode(*st, ist),
                  "{} {}: is the same file as the input {} ({}); refusing to overwrite an input",
                  option, path, file, in.option);
    CBQ_CHECK(S_ISREG(st->st_mode),
              "{} {}: is {}, not a regular file; refusing to replace it (cbq writes regular "
              "files only)",
              option, path, file_type_name(st->st_mode));
    CBQ_CHECK(force || st->st_size == 0 || detail::is_safetensors_or_gguf(target),
              "{} {}: exists and is not a model file (safetensors or GGUF); refusing to replace "
              "it (pass --force to replace it)",
              option, path);
  }
  return target;
}

// Refuses an output folder that is or contains an input (a GPTQ export onto its source folder),
// exists as something else than a folder, lies in a missing or unwritable folder, or is a
// non-empty folder that does not look like an earlier export (no config.json +
// model.safetensors) — the last only unless `force`. Returns the path writes will go to.
inline std::string check_output_folder(const std::string& path,
                                       const std::vector<InputPath>& inputs, bool force,
                                       const std::string& option) {
  namespace fs = std::filesystem;
  CBQ_CHECK(!path.empty(), "{}: empty output path", option);
  const std::string target = resolve_output_path(path);
  const std::string folder = parent_folder(target);
  const auto fst = stat_path(folder);
  CBQ_CHECK(fst && S_ISDIR(fst->st_mode), "{} {}: the folder {} does not exist", option, path,
            folder);
  CBQ_CHECK(::access(folder.c_str(), W_OK | X_OK) == 0, "{} {}: cannot write in the folder {}: {}",
            option, path, folder, std::strerror(errno));
  for (const InputPath& in : inputs) {
    if (in.path.empty() || !stat_path(in.path)) continue;
    CBQ_CHECK(!detail::path_within(in.path, target),
              "{} {}: the folder holds the input {} ({}); refusing to replace it", option, path,
              in.path, in.option);
  }
  if (const auto st = stat_path(target)) {
    CBQ_CHECK(S_ISDIR(st->st_mode), "{} {}: is {}, not a folder; refusing to replace it", option,
              path, file_type_name(st->st_mode));
    std::error_code ec;
    const bool empty = fs::is_empty(target, ec);
    const bool earlier_export = fs::exists(fs::path(target) / "config.json") &&
                                fs::exists(fs::path(target) / "model.safetensors");
    CBQ_CHECK(force || empty || earlier_export,
              "{} {}: is a non-empty folder that is not an earlier export (no config.json + "
              "model.safetensors); refusing to replace it and everything in it (pass --force to "
              "replace it)",
              option, path);
  }
  return target;
}

// Refuses an input that is missing, unreadable, a FIFO, device or socket (reading one could
// block forever), a folder where a file is expected (`folder_ok` allows one), or an empty file
// (unless `empty_ok`).
inline void check_input_path(const std::string& path, const std::string& option, bool folder_ok,
                             bool empty_ok) {
  CBQ_CHECK(!path.empty(), "{}: empty path", option);
  const auto st = stat_path(path);
  CBQ_CHECK(st.has_value(), "{} {}: does not exist", option, path);
  if (S_ISDIR(st->st_mode)) {
    CBQ_CHECK(folder_ok, "{} {}: is a folder, expected a file", option, path);
  } else {
    CBQ_CHECK(S_ISREG(st->st_mode),
              "{} {}: is {}, not a regular file (reading it could block forever)", option, path,
              file_type_name(st->st_mode));
    CBQ_CHECK(empty_ok || st->st_size > 0, "{} {}: is empty", option, path);
  }
  CBQ_CHECK(::access(path.c_str(), R_OK) == 0, "{} {}: cannot be read: {}", option, path,
            std::strerror(errno));
}

// The nearest existing folder at or above `path` (where a missing folder would be created).
inline std::string existing_ancestor(const std::string& path) {
  std::filesystem::path p = std::filesystem::absolute(path);
  while (!stat_path(p.string()) && p.has_parent_path() && p != p.parent_path()) p = p.parent_path();
  return p.string();
}

// A folder that will be written into (checkpoints, --offload-dir): refused when it is something
// else than a folder, or cannot be written (a read-only folder fails here, not after the first
// window; a file is created and removed, since access(W_OK) says yes to root on a read-only
// mount). A missing folder is not created: its nearest existing ancestor must be writable.
inline void check_writable_folder(const std::string& path, const std::string& option) {
  CBQ_CHECK(!path.empty(), "{}: empty path", option);
  const auto st = stat_path(path);
  const std::string folder = st ? path : existing_ancestor(path);
  const auto fst = st ? st : stat_path(folder);
  CBQ_CHECK(fst && S_ISDIR(fst->st_mode), "{} {}: {} is {}, not a folder", option, path, folder,
            fst ? file_type_name(fst->st_mode) : std::string("missing"));
  const std::string probe = (std::filesystem::path(folder) /
                             fmt::format(".cbq-write-test-{}", static_cast<long>(::getpid())))
                                .string();
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  CBQ_CHECK(fd >= 0, "{} {}: cannot write in the folder {}: {}", option, path, folder,
            std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

}  // namespace cbq::io
