/*
 * vsock-rig: both ends of the nested rig's vsock scenarios (xtask/src/scenarios.rs,
 * "tern-vsock" and the bench-vsock pair), built static by `cargo xtask images` into the
 * guest's initramfs and L1.
 *
 * Guest side (AF_VSOCK, the host is CID 2):
 *   vsock-rig listen PORT          accept one connection on PORT, read a line, answer
 *                                  "echo:LINE\n", close
 *   vsock-rig connect PORT MSG     connect to the host on PORT, send "MSG\n", print the answer
 *   vsock-rig hold PORT            connect to the host on PORT, print "held", then read until
 *                                  the connection ends and print how it ended
 *   vsock-rig sink PORT            accept one connection on PORT, read to its end, answer
 *                                  "got BYTES\n"
 *   vsock-rig source PORT MIB      connect to the host on PORT, write MIB MiB, shut down the
 *                                  writing side, print the receiver's "got" line
 *
 * L1 side, through tern's hybrid socket PATH (Firecracker's protocol):
 *   vsock-rig unix-echo PATH       accept one connection on the Unix socket PATH, read a line,
 *                                  answer "echo:LINE\n", close
 *   vsock-rig unix-hold PATH       accept one connection on PATH and read until it ends
 *   vsock-rig unix-connect PATH PORT MSG
 *                                  connect to PATH, send "CONNECT PORT\n", print tern's "OK"
 *                                  line, send "MSG\n", print the answer
 *   vsock-rig unix-send PATH PORT MIB
 *                                  CONNECT PORT through PATH, then as `source`, timed
 *   vsock-rig unix-recv PATH       as `sink` on the Unix socket PATH, timed
 *
 * L1 side, through the host kernel's vsock (QEMU's vhost-vsock):
 *   vsock-rig vsock-send CID PORT MIB   connect to CID:PORT, then as `source`, timed
 *   vsock-rig vsock-recv PORT           as `sink` on vsock PORT, timed
 *
 * Every result line is printed as "VSOCK-RIG <what>=<value>"; the timed modes print
 * "VSOCK-RIG rate=<MiB/s> bytes=<n> seconds=<s>", timed from the connection's start to the
 * receiver's answer (send) or to the end of the data (recv). Exit status 0 on success.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)

static int die(const char *what) {
    perror(what);
    return 1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Reads one line (without its newline) into buf; -1 on error or end before a newline. */
static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r <= 0)
            return -1;
        if (c == '\n') {
            buf[n] = 0;
            return 0;
        }
        buf[n++] = c;
    }
    return -1;
}

static int write_buf(int fd, const char *s, size_t len) {
    while (len > 0) {
        ssize_t w = write(fd, s, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        s += w;
        len -= (size_t)w;
    }
    return 0;
}

static int write_all(int fd, const char *s) { return write_buf(fd, s, strlen(s)); }

static int vsock_listen(const char *port) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                            .svm_port = (unsigned)atoi(port)};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1) < 0)
        return -1;
    printf("VSOCK-RIG listening=%s\n", port);
    fflush(stdout);
    return fd;
}

static int vsock_connect(unsigned cid, const char *port) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid,
                            .svm_port = (unsigned)atoi(port)};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int unix_listen(const char *path) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    unlink(path);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1) < 0)
        return -1;
    printf("VSOCK-RIG listening=%s\n", path);
    fflush(stdout);
    return fd;
}

/* Connects to tern's hybrid socket PATH and asks for the guest's PORT; prints tern's answer. */
static int unix_connect_port(const char *path, const char *port) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    char line[600], out[64];
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        return -1;
    snprintf(out, sizeof out, "CONNECT %s\n", port);
    if (write_all(fd, out) < 0 || read_line(fd, line, sizeof line) < 0) {
        close(fd);
        return -1;
    }
    printf("VSOCK-RIG ok=%s\n", line);
    return fd;
}

/* Accepts one connection on the listening fd and echoes one line. */
static int echo_one(int lfd) {
    char line[512], out[600];
    int c = accept(lfd, NULL, NULL);
    if (c < 0)
        return die("accept");
    if (read_line(c, line, sizeof line) < 0)
        return die("read");
    snprintf(out, sizeof out, "echo:%s\n", line);
    if (write_all(c, out) < 0)
        return die("write");
    printf("VSOCK-RIG served=%s\n", line);
    fflush(stdout);
    close(c);
    return 0;
}

/* Sends "MSG\n" on fd and prints the answer. */
static int ask(int fd, const char *msg) {
    char line[600], out[520];
    snprintf(out, sizeof out, "%s\n", msg);
    if (write_all(fd, out) < 0)
        return die("write");
    if (read_line(fd, line, sizeof line) < 0)
        return die("read");
    printf("VSOCK-RIG answer=%s\n", line);
    return 0;
}

/* Reads fd until it ends; prints how it ended ("eof" or the error's name). */
static int hold(int fd) {
    char buf[4096];
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r > 0)
            continue;
        if (r < 0 && errno == EINTR)
            continue;
        printf("VSOCK-RIG hold-ended=%s\n", r == 0 ? "eof" : strerrorname_np(errno));
        return 0;
    }
}

static void rate(double t0, unsigned long long bytes) {
    double s = now() - t0;
    printf("VSOCK-RIG rate=%.1f bytes=%llu seconds=%.3f\n", (double)bytes / 1048576.0 / s, bytes,
           s);
}

/* Accepts one connection, reads it to its end and answers "got BYTES\n"; timed if asked. */
static int sink(int lfd, int timed) {
    static char buf[CHUNK];
    unsigned long long got = 0;
    char out[64];
    double t0;
    int c = accept(lfd, NULL, NULL);
    if (c < 0)
        return die("accept");
    t0 = now();
    for (;;) {
        ssize_t r = read(c, buf, sizeof buf);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return die("read");
        if (r == 0)
            break;
        got += (unsigned long long)r;
    }
    if (timed)
        rate(t0, got);
    snprintf(out, sizeof out, "got %llu\n", got);
    if (write_all(c, out) < 0)
        return die("write");
    printf("VSOCK-RIG got=%llu\n", got);
    close(c);
    return 0;
}

/* Writes MIB MiB on fd, shuts down its writing side and prints the receiver's answer. */
static int source(int fd, const char *mib, double t0, int timed) {
    static char buf[CHUNK];
    unsigned long long total = strtoull(mib, NULL, 10) * 1048576ULL, sent = 0;
    char line[128];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (char)('a' + i % 26);
    while (sent < total) {
        size_t n = total - sent < sizeof buf ? (size_t)(total - sent) : sizeof buf;
        if (write_buf(fd, buf, n) < 0)
            return die("write");
        sent += n;
    }
    if (shutdown(fd, SHUT_WR) < 0)
        return die("shutdown");
    if (read_line(fd, line, sizeof line) < 0)
        return die("read answer");
    if (timed)
        rate(t0, sent);
    printf("VSOCK-RIG answer=%s\n", line);
    return strncmp(line, "got ", 4) || strtoull(line + 4, NULL, 10) != sent;
}

int main(int argc, char **argv) {
    const char *cmd = argc >= 2 ? argv[1] : "";
    int fd;
    double t0;
    /* A peer that reset the connection is an error to report, not a silent death. */
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && !strcmp(cmd, "listen")) {
        if ((fd = vsock_listen(argv[2])) < 0)
            return die("vsock listen");
        return echo_one(fd);
    }
    if (argc >= 4 && !strcmp(cmd, "connect")) {
        if ((fd = vsock_connect(VMADDR_CID_HOST, argv[2])) < 0)
            return die("vsock connect");
        return ask(fd, argv[3]);
    }
    if (argc >= 3 && !strcmp(cmd, "hold")) {
        if ((fd = vsock_connect(VMADDR_CID_HOST, argv[2])) < 0)
            return die("vsock connect");
        printf("VSOCK-RIG held=%s\n", argv[2]);
        fflush(stdout);
        return hold(fd);
    }
    if (argc >= 3 && !strcmp(cmd, "sink")) {
        if ((fd = vsock_listen(argv[2])) < 0)
            return die("vsock listen");
        return sink(fd, 0);
    }
    if (argc >= 4 && !strcmp(cmd, "source")) {
        if ((fd = vsock_connect(VMADDR_CID_HOST, argv[2])) < 0)
            return die("vsock connect");
        return source(fd, argv[3], now(), 0);
    }
    if (argc >= 3 && !strcmp(cmd, "unix-echo")) {
        if ((fd = unix_listen(argv[2])) < 0)
            return die("unix listen");
        return echo_one(fd);
    }
    if (argc >= 3 && !strcmp(cmd, "unix-hold")) {
        int c;
        if ((fd = unix_listen(argv[2])) < 0)
            return die("unix listen");
        if ((c = accept(fd, NULL, NULL)) < 0)
            return die("accept");
        return hold(c);
    }
    if (argc >= 5 && !strcmp(cmd, "unix-connect")) {
        if ((fd = unix_connect_port(argv[2], argv[3])) < 0)
            return die("unix connect");
        return ask(fd, argv[4]);
    }
    if (argc >= 5 && !strcmp(cmd, "unix-send")) {
        t0 = now();
        if ((fd = unix_connect_port(argv[2], argv[3])) < 0)
            return die("unix connect");
        return source(fd, argv[4], t0, 1);
    }
    if (argc >= 3 && !strcmp(cmd, "unix-recv")) {
        if ((fd = unix_listen(argv[2])) < 0)
            return die("unix listen");
        return sink(fd, 1);
    }
    if (argc >= 5 && !strcmp(cmd, "vsock-send")) {
        t0 = now();
        if ((fd = vsock_connect((unsigned)atoi(argv[2]), argv[3])) < 0)
            return die("vsock connect");
        return source(fd, argv[4], t0, 1);
    }
    if (argc >= 3 && !strcmp(cmd, "vsock-recv")) {
        if ((fd = vsock_listen(argv[2])) < 0)
            return die("vsock listen");
        return sink(fd, 1);
    }
    fprintf(stderr, "usage: vsock-rig listen PORT | connect PORT MSG | hold PORT | sink PORT | "
                    "source PORT MIB | unix-echo PATH | unix-hold PATH | "
                    "unix-connect PATH PORT MSG | unix-send PATH PORT MIB | unix-recv PATH | "
                    "vsock-send CID PORT MIB | vsock-recv PORT\n");
    return 2;
}
