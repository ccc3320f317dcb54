/* fsbench: the file-system workloads of bench/virtiofs.py, with the number
 * of system calls each one makes (counted here, one per libc call; the
 * clock is read through the vDSO, which makes none).
 *
 *   fsbench SEQDIR FILESDIR MIB FILES
 *
 * seq-write: create SEQDIR/seq, MIB writes of 1 MiB, fsync, close
 * seq-read:  open SEQDIR/seq, MIB reads of 1 MiB, close (then it is
 *            unlinked, outside the count)
 * create:    FILES x (open(O_CREAT|O_EXCL) + close) of empty files in
 *            FILESDIR
 * stat:      FILES x stat
 * unlink:    FILES x unlink
 * (Two directories so that a VMM serving each from its own device can
 * count the FUSE requests of each kind of workload.)
 *
 * Output, one line per workload: "<name> <units> <seconds> <syscalls>"
 * (units: MiB for seq-*, files otherwise). Errors: "fsbench: ..." and
 * exit status 1. Built with `gcc -static` so it runs in any rootfs. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1 << 20)

static long nsys;
/* Counts one system call. */
#define SYS(call) (nsys++, (call))

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path) {
    printf("fsbench: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

static void report(const char *name, long units, double start, long sys_start) {
    printf("%s %ld %.6f %ld\n", name, units, now() - start, nsys - sys_start);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: fsbench SEQDIR FILESDIR MIB FILES\n");
        return 2;
    }
    const char *seqdir = argv[1], *dir = argv[2];
    long mib = atol(argv[3]), files = atol(argv[4]);
    char path[4096];
    char *buf = malloc(BLOCK);
    if (!buf)
        die("malloc", "");
    /* Touch every page before timing: page faults are not the workload. */
    for (long i = 0; i < BLOCK; i++)
        buf[i] = (char)(i * 7);

    snprintf(path, sizeof path, "%s/seq", seqdir);
    double t = now();
    long s = nsys;
    int fd = SYS(open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644));
    if (fd < 0)
        die("open", path);
    for (long i = 0; i < mib; i++)
        if (SYS(write(fd, buf, BLOCK)) != BLOCK)
            die("write", path);
    if (SYS(fsync(fd)) != 0)
        die("fsync", path);
    if (SYS(close(fd)) != 0)
        die("close", path);
    report("seq-write", mib, t, s);

    t = now();
    s = nsys;
    fd = SYS(open(path, O_RDONLY));
    if (fd < 0)
        die("open", path);
    for (long i = 0; i < mib; i++)
        if (SYS(read(fd, buf, BLOCK)) != BLOCK)
            die("read", path);
    if (SYS(close(fd)) != 0)
        die("close", path);
    report("seq-read", mib, t, s);
    if (SYS(unlink(path)) != 0)
        die("unlink", path);

    t = now();
    s = nsys;
    for (long i = 0; i < files; i++) {
        snprintf(path, sizeof path, "%s/f%ld", dir, i);
        fd = SYS(open(path, O_CREAT | O_EXCL | O_WRONLY, 0644));
        if (fd < 0)
            die("open", path);
        if (SYS(close(fd)) != 0)
            die("close", path);
    }
    report("create", files, t, s);

    t = now();
    s = nsys;
    for (long i = 0; i < files; i++) {
        struct stat st;
        snprintf(path, sizeof path, "%s/f%ld", dir, i);
        if (SYS(stat(path, &st)) != 0)
            die("stat", path);
    }
    report("stat", files, t, s);

    t = now();
    s = nsys;
    for (long i = 0; i < files; i++) {
        snprintf(path, sizeof path, "%s/f%ld", dir, i);
        if (SYS(unlink(path)) != 0)
            die("unlink", path);
    }
    report("unlink", files, t, s);
    return 0;
}
