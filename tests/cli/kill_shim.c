// An LD_PRELOAD library for tests/cli/hostile.sh: counts every call that writes under one
// folder (creating opens, write, pwrite, ftruncate, fallocate, fsync, rename, mkdir, unlink,
// rmdir, remove) and sends the process SIGKILL just before the N-th, so a test can kill a writer at
// every step of every write and check that the old or the new output is left, complete. It
// works on any binary (the tools of any commit), which is what the before/after table needs.
//
//   CBQ_SHIM_DIR=/abs/folder   only calls on paths (or descriptors) under it count
//   CBQ_SHIM_KILL_AT=N         SIGKILL before the N-th counted call (1-based; unset: never)
//   CBQ_SHIM_TRACE=FILE        append "N CALL PATH" for every counted call
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static atomic_long counter;
static __thread int inside;

static const char* shim_dir(void) {
  static const char* dir;
  static int init;
  if (!init) {
    dir = getenv("CBQ_SHIM_DIR");
    init = 1;
  }
  return dir;
}

static int under_dir(const char* path) {
  const char* dir = shim_dir();
  if (!dir || !path) return 0;
  char abs[PATH_MAX];
  if (path[0] != '/') {
    if (!getcwd(abs, sizeof abs)) return 0;
    size_t n = strlen(abs);
    snprintf(abs + n, sizeof abs - n, "/%s", path);
    path = abs;
  }
  size_t n = strlen(dir);
  return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

static int fd_under_dir(int fd, char* out, size_t size) {
  char link[64];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, out, size - 1);
  if (n < 0) return 0;
  out[n] = '\0';
  return under_dir(out);
}

// `path` relative to the folder `dirfd` (the *at calls) as an absolute path in `out`.
static const char* at_path(int dirfd, const char* path, char* out, size_t size) {
  if (!path || path[0] == '/' || dirfd == AT_FDCWD) return path;
  char link[64];
  snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
  ssize_t n = readlink(link, out, size - 1);
  if (n < 0) return path;
  snprintf(out + n, size - (size_t)n, "/%s", path);
  return out;
}

static void event(const char* call, const char* path) {
  if (inside) return;
  inside = 1;
  long n = atomic_fetch_add(&counter, 1) + 1;
  const char* trace = getenv("CBQ_SHIM_TRACE");
  if (trace) {
    char line[PATH_MAX + 64];
    int len = snprintf(line, sizeof line, "%ld %s %s\n", n, call, path);
    int fd = (int)syscall(SYS_open, trace, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      syscall(SYS_write, fd, line, (size_t)len);
      syscall(SYS_close, fd);
    }
  }
  const char* at = getenv("CBQ_SHIM_KILL_AT");
  if (at && atol(at) == n) syscall(SYS_kill, getpid(), SIGKILL);
  inside = 0;
}

#define NEXT(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

static void path_event(const char* call, const char* path) {
  if (under_dir(path)) event(call, path);
}
static void fd_event(const char* call, int fd) {
  char path[PATH_MAX];
  if (!inside && fd > 2 && fd_under_dir(fd, path, sizeof path)) event(call, path);
}

static int writes(int flags) { return (flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC)) != 0; }

int open(const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t mode = (mode_t)va_arg(ap, int);
  va_end(ap);
  if (writes(flags)) path_event("open", path);
  return NEXT(open)(path, flags, mode);
}
int open64(const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t mode = (mode_t)va_arg(ap, int);
  va_end(ap);
  if (writes(flags)) path_event("open", path);
  return NEXT(open64)(path, flags, mode);
}
int openat(int dirfd, const char* path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  mode_t mode = (mode_t)va_arg(ap, int);
  va_end(ap);
  char abs[PATH_MAX];
  if (writes(flags)) path_event("open", at_path(dirfd, path, abs, sizeof abs));
  return NEXT(openat)(dirfd, path, flags, mode);
}
FILE* fopen(const char* path, const char* mode) {
  if (strpbrk(mode, "wa+")) path_event("fopen", path);
  return NEXT(fopen)(path, mode);
}
FILE* fopen64(const char* path, const char* mode) {
  if (strpbrk(mode, "wa+")) path_event("fopen", path);
  return NEXT(fopen64)(path, mode);
}
ssize_t write(int fd, const void* buf, size_t n) {
  fd_event("write", fd);
  return NEXT(write)(fd, buf, n);
}
ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) {
  fd_event("pwrite", fd);
  return NEXT(pwrite)(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void* buf, size_t n, off_t off) {
  fd_event("pwrite", fd);
  return NEXT(pwrite64)(fd, buf, n, off);
}
int ftruncate(int fd, off_t len) {
  fd_event("ftruncate", fd);
  return NEXT(ftruncate)(fd, len);
}
int ftruncate64(int fd, off_t len) {
  fd_event("ftruncate", fd);
  return NEXT(ftruncate64)(fd, len);
}
int posix_fallocate(int fd, off_t off, off_t len) {
  fd_event("fallocate", fd);
  return NEXT(posix_fallocate)(fd, off, len);
}
int posix_fallocate64(int fd, off_t off, off_t len) {
  fd_event("fallocate", fd);
  return NEXT(posix_fallocate64)(fd, off, len);
}
int fsync(int fd) {
  fd_event("fsync", fd);
  return NEXT(fsync)(fd);
}
int fdatasync(int fd) {
  fd_event("fsync", fd);
  return NEXT(fdatasync)(fd);
}
int rename(const char* from, const char* to) {
  if (under_dir(from) || under_dir(to)) event("rename", to);
  return NEXT(rename)(from, to);
}
int renameat(int a, const char* from, int b, const char* to) {
  char f[PATH_MAX], t[PATH_MAX];
  const char* af = at_path(a, from, f, sizeof f);
  const char* at = at_path(b, to, t, sizeof t);
  if (under_dir(af) || under_dir(at)) event("rename", at);
  return NEXT(renameat)(a, from, b, to);
}
int renameat2(int a, const char* from, int b, const char* to, unsigned flags) {
  char f[PATH_MAX], t[PATH_MAX];
  const char* af = at_path(a, from, f, sizeof f);
  const char* at = at_path(b, to, t, sizeof t);
  if (under_dir(af) || under_dir(at)) event("rename", at);
  return NEXT(renameat2)(a, from, b, to, flags);
}
int mkdirat(int dirfd, const char* path, mode_t mode) {
  char abs[PATH_MAX];
  path_event("mkdir", at_path(dirfd, path, abs, sizeof abs));
  return NEXT(mkdirat)(dirfd, path, mode);
}
int mkdir(const char* path, mode_t mode) {
  path_event("mkdir", path);
  return NEXT(mkdir)(path, mode);
}
int unlink(const char* path) {
  path_event("unlink", path);
  return NEXT(unlink)(path);
}
int unlinkat(int dirfd, const char* path, int flags) {
  char abs[PATH_MAX];
  path_event("unlink", at_path(dirfd, path, abs, sizeof abs));
  return NEXT(unlinkat)(dirfd, path, flags);
}
int rmdir(const char* path) {
  path_event("rmdir", path);
  return NEXT(rmdir)(path);
}
// std::filesystem::remove / remove_all (libstdc++) call remove(3), which reaches the unlink and
// rmdir system calls inside libc, past the wrappers above.
int remove(const char* path) {
  path_event("remove", path);
  return NEXT(remove)(path);
}
