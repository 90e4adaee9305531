/*
 * vsock_tool: the guest side of the vsock guest test (built static, run from the initramfs).
 *
 *   vsock_tool client PORT SEND RECV  connect to the host (CID 2) port PORT, send SEND bytes
 *                                     of pattern 1, shut the write side, then read until EOF
 *                                     and check RECV bytes of pattern 2 arrived.
 *   vsock_tool echo PORT              listen on PORT, accept one connection, send back what
 *                                     arrives until EOF, then close.
 *
 * Pattern byte i of seed s is (i * 7 + s + (i >> 8)) & 0xff (tests/guest/vsock.py agrees).
 * Exit status 0 on success; the reason is printed on failure.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static unsigned char pattern_byte(unsigned long i, unsigned seed)
{
    return (unsigned char)((i * 7 + seed + (i >> 8)) & 0xff);
}

static int fail(const char *what)
{
    printf("vsock_tool: %s: %s\n", what, strerror(errno));
    return 1;
}

static int client(unsigned port, unsigned long send_n, unsigned long recv_n)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
    static unsigned char buf[65536];
    unsigned long done = 0, got = 0;
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        return fail("socket");
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return fail("connect");
    while (done < send_n) {
        size_t n = send_n - done < sizeof(buf) ? send_n - done : sizeof(buf);
        for (size_t k = 0; k < n; k++)
            buf[k] = pattern_byte(done + k, 1);
        ssize_t w = write(fd, buf, n);
        if (w <= 0)
            return fail("write");
        done += (unsigned long)w;
    }
    if (shutdown(fd, SHUT_WR) < 0)
        return fail("shutdown");
    for (;;) {
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r < 0)
            return fail("read");
        if (r == 0)
            break;
        for (ssize_t k = 0; k < r; k++) {
            if (buf[k] != pattern_byte(got + (unsigned long)k, 2)) {
                printf("vsock_tool: byte %lu differs\n", got + (unsigned long)k);
                return 1;
            }
        }
        got += (unsigned long)r;
    }
    close(fd);
    printf("VHSM-KV vsock_client_sent=%lu\nVHSM-KV vsock_client_received=%lu\n", done, got);
    return got == recv_n ? 0 : 1;
}

static int echo(unsigned port)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    static unsigned char buf[65536];
    unsigned long total = 0;
    int srv = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (srv < 0)
        return fail("socket");
    if (bind(srv, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return fail("bind");
    if (listen(srv, 4) < 0)
        return fail("listen");
    printf("VHSM-KV vsock_echo_listening=%u\n", port);
    fflush(stdout);
    int fd = accept(srv, NULL, NULL);
    if (fd < 0)
        return fail("accept");
    for (;;) {
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r < 0)
            return fail("read");
        if (r == 0)
            break;
        for (ssize_t off = 0; off < r;) {
            ssize_t w = write(fd, buf + off, (size_t)(r - off));
            if (w <= 0)
                return fail("write");
            off += w;
        }
        total += (unsigned long)r;
    }
    close(fd);
    close(srv);
    printf("VHSM-KV vsock_echoed=%lu\n", total);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 5 && strcmp(argv[1], "client") == 0)
        return client((unsigned)strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0),
                      strtoul(argv[4], NULL, 0));
    if (argc == 3 && strcmp(argv[1], "echo") == 0)
        return echo((unsigned)strtoul(argv[2], NULL, 0));
    fprintf(stderr, "usage: vsock_tool client PORT SEND RECV | echo PORT\n");
    return 2;
}
