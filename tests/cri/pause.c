/* The CRI tests' pod sandbox process: sleeps until SIGTERM or SIGINT and
 * reaps the children it gets as PID 1 of a shared PID namespace. Built
 * static with musl-gcc, so the image holds this file and nothing else. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    signal(SIGCHLD, reap);
    for (;;) {
        pause();
    }
}
