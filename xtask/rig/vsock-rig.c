/*
 * vsock-rig: both ends of the nested rig's vsock scenario (xtask/src/scenarios.rs,
 * "tern-vsock"), built static by `cargo xtask images` into the guest's initramfs and L1.
 *
 *   vsock-rig listen PORT               guest: accept one vsock connection on PORT, read a
 *                                       line, answer "echo:LINE\n", close
 *   vsock-rig connect PORT MSG          guest: connect to the host (CID 2) on PORT, send
 *                                       "MSG\n", print the answer line
 *   vsock-rig unix-echo PATH            L1: accept one connection on the Unix socket PATH,
 *                                       read a line, answer "echo:LINE\n", close
 *   vsock-rig unix-connect PATH PORT MSG
 *                                       L1: connect to tern's vsock socket PATH, send
 *                                       "CONNECT PORT\n", print tern's "OK ..." line, send
 *                                       "MSG\n", print the answer line
 *
 * Every answer line is printed as "VSOCK-RIG <what>=<line>". Exit status 0 on success.
 */
#define _GNU_SOURCE
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int die(const char *what) {
    perror(what);
    return 1;
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

static int write_all(int fd, const char *s) {
    size_t len = strlen(s);
    while (len > 0) {
        ssize_t w = write(fd, s, len);
        if (w <= 0)
            return -1;
        s += w;
        len -= (size_t)w;
    }
    return 0;
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

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "listen")) {
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                .svm_port = (unsigned)atoi(argv[2])};
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd < 0)
            return die("socket");
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1) < 0)
            return die("bind");
        printf("VSOCK-RIG listening=%s\n", argv[2]);
        fflush(stdout);
        return echo_one(fd);
    }
    if (argc >= 4 && !strcmp(argv[1], "connect")) {
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
                                .svm_port = (unsigned)atoi(argv[2])};
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd < 0)
            return die("socket");
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
            return die("connect");
        return ask(fd, argv[3]);
    }
    if (argc >= 3 && !strcmp(argv[1], "unix-echo")) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        unlink(argv[2]);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1) < 0)
            return die("unix bind");
        printf("VSOCK-RIG listening=%s\n", argv[2]);
        fflush(stdout);
        return echo_one(fd);
    }
    if (argc >= 5 && !strcmp(argv[1], "unix-connect")) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        char line[600], out[64];
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
            return die("unix connect");
        snprintf(out, sizeof out, "CONNECT %s\n", argv[3]);
        if (write_all(fd, out) < 0)
            return die("write");
        if (read_line(fd, line, sizeof line) < 0)
            return die("read OK");
        printf("VSOCK-RIG ok=%s\n", line);
        return ask(fd, argv[4]);
    }
    fprintf(stderr, "usage: vsock-rig listen PORT | connect PORT MSG | unix-echo PATH | "
                    "unix-connect PATH PORT MSG\n");
    return 2;
}
