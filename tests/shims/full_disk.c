/* A full disk without mounting one: preloaded (LD_PRELOAD) into `kiln`, it fails every write to a
 * file under $KILN_FULL_DISK_DIR with ENOSPC once $KILN_FULL_DISK_BYTES bytes have been written
 * there, as a small filesystem would. tests/train.rs uses it where a tmpfs cannot be mounted, and
 * always, so the path is tested on every machine. Only the write calls Rust's std makes are
 * wrapped; copy offloads are refused, so std falls back to read + write. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static _Atomic long long written;

/* Whether fd is a file under the full directory. */
static int under_dir(int fd) {
    const char *dir = getenv("KILN_FULL_DISK_DIR");
    if (!dir || !*dir) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    size_t len = strlen(dir);
    return strncmp(path, dir, len) == 0 && path[len] == '/';
}

/* Claims `count` bytes of the disk for fd; 0 (errno = ENOSPC) when they do not fit. */
static int fits(int fd, size_t count) {
    if (!under_dir(fd)) return 1;
    const char *limit = getenv("KILN_FULL_DISK_BYTES");
    long long cap = limit ? atoll(limit) : 0;
    long long before = atomic_fetch_add(&written, (long long)count);
    if (before + (long long)count <= cap) return 1;
    atomic_fetch_sub(&written, (long long)count);
    errno = ENOSPC;
    return 0;
}

static size_t iov_bytes(const struct iovec *iov, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += iov[i].iov_len;
    return total;
}

typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef ssize_t (*pwritev_fn)(int, const struct iovec *, int, off_t);

/* The C library's own function of that name, looked up once. */
#define REAL(type, name) \
    static type real; \
    if (!real) real = (type)dlsym(RTLD_NEXT, name)

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write_fn, "write");
    return fits(fd, count) ? real(fd, buf, count) : -1;
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite_fn, "pwrite");
    return fits(fd, count) ? real(fd, buf, count, offset) : -1;
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite_fn, "pwrite64");
    return fits(fd, count) ? real(fd, buf, count, offset) : -1;
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
    REAL(writev_fn, "writev");
    return fits(fd, iov_bytes(iov, n)) ? real(fd, iov, n) : -1;
}

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t offset) {
    REAL(pwritev_fn, "pwritev");
    return fits(fd, iov_bytes(iov, n)) ? real(fd, iov, n, offset) : -1;
}

/* In-kernel copies would write without passing through the wrappers above. */
ssize_t copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t len, unsigned flags) {
    (void)in, (void)in_off, (void)out, (void)out_off, (void)len, (void)flags;
    errno = ENOSYS;
    return -1;
}

ssize_t sendfile(int out, int in, off_t *offset, size_t count) {
    (void)out, (void)in, (void)offset, (void)count;
    errno = ENOSYS;
    return -1;
}

ssize_t sendfile64(int out, int in, off_t *offset, size_t count) {
    return sendfile(out, in, offset, count);
}
