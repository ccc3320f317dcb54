/* fsprobe: what busybox cannot do, for the virtio-fs end-to-end test
 * (tests/tests/virtio_fs.rs). Built with `gcc -static` on the host and
 * copied into the container rootfs.
 *
 *   fsprobe mmap FILE    maps FILE shared (>= 8 KiB), prints its first
 *                        line, writes "guest-mmap\n" at offset 4096
 *                        through the mapping, msync()s and unmaps it
 *   fsprobe xattr FILE   prints user.host, sets user.guest, lists the
 *                        names, removes user.host
 *
 * Every line is "<what>: <value>"; on error "fsprobe: <call>: <errno
 * text>" and exit status 1. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

static int fail(const char *what) {
    printf("fsprobe: %s: %s\n", what, strerror(errno));
    return 1;
}

static int do_mmap(const char *path) {
    int fd = open(path, O_RDWR);
    if (fd < 0)
        return fail("open");
    struct stat st;
    if (fstat(fd, &st) != 0)
        return fail("fstat");
    if (st.st_size < 8192) {
        errno = EINVAL;
        return fail("size");
    }
    char *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return fail("mmap");
    const char *nl = memchr(p, '\n', 64);
    printf("mmap-read: %.*s\n", nl ? (int)(nl - p) : 64, p);
    memcpy(p + 4096, "guest-mmap\n", 11);
    if (msync(p, (size_t)st.st_size, MS_SYNC) != 0)
        return fail("msync");
    if (munmap(p, (size_t)st.st_size) != 0)
        return fail("munmap");
    close(fd);
    printf("mmap: ok\n");
    return 0;
}

static int do_xattr(const char *path) {
    char buf[256];
    ssize_t n = getxattr(path, "user.host", buf, sizeof buf - 1);
    if (n < 0)
        return fail("getxattr");
    buf[n] = 0;
    printf("xattr-get: %s\n", buf);
    if (setxattr(path, "user.guest", "guest-value", 11, 0) != 0)
        return fail("setxattr");
    n = listxattr(path, buf, sizeof buf);
    if (n < 0)
        return fail("listxattr");
    printf("xattr-list:");
    for (ssize_t i = 0; i < n; i += (ssize_t)strlen(buf + i) + 1)
        printf(" %s", buf + i);
    printf("\n");
    if (removexattr(path, "user.host") != 0)
        return fail("removexattr");
    printf("xattr: ok\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "mmap") == 0)
        return do_mmap(argv[2]);
    if (argc == 3 && strcmp(argv[1], "xattr") == 0)
        return do_xattr(argv[2]);
    fprintf(stderr, "usage: fsprobe mmap|xattr FILE\n");
    return 2;
}
