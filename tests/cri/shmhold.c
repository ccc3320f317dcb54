/* shmhold KEY: makes a System V shared memory segment with KEY, stays
 * attached to it (so that kernel.shm_rmid_forced=1 keeps it), prints
 * "shmid ID key KEY" and sleeps. busybox has no ipcmk; the segment is
 * listed in /proc/sysvipc/shm of every process of the same IPC namespace. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: shmhold KEY\n");
        return 2;
    }
    key_t key = (key_t)strtol(argv[1], 0, 0);
    int id = shmget(key, 4096, IPC_CREAT | IPC_EXCL | 0600);
    if (id < 0) {
        perror("shmget");
        return 1;
    }
    if (shmat(id, 0, 0) == (void *)-1) {
        perror("shmat");
        return 1;
    }
    printf("shmid %d key %d\n", id, (int)key);
    fflush(stdout);
    for (;;) {
        pause();
    }
}
