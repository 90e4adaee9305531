/*
 * net_tool: the guest side of the multiqueue TAP guest test (built static, run from the
 * initramfs; busybox has no ethtool).
 *
 *   net_tool channels IFNAME N      set the interface's combined channels (queue pairs) to N
 *                                   with the ethtool ioctl, then print "max=M now=N".
 *   net_tool udp ADDR PORT COUNT    send one 64-byte UDP datagram to each of ADDR:PORT ..
 *                                   ADDR:PORT+COUNT-1, each from a socket of its own: COUNT
 *                                   flows, which the guest spreads over its transmit queues.
 *
 * Exit status 0 on success; the reason is printed on failure.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>

static int fail(const char *what)
{
    printf("net_tool: %s: %s\n", what, strerror(errno));
    return 1;
}

static int channels(const char *ifname, unsigned wanted)
{
    struct ethtool_channels ch;
    struct ifreq ifr;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);

    if (fd < 0)
        return fail("socket");
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    memset(&ch, 0, sizeof(ch));
    ch.cmd = ETHTOOL_GCHANNELS;
    ifr.ifr_data = (void *)&ch;
    if (ioctl(fd, SIOCETHTOOL, &ifr) < 0)
        return fail("ETHTOOL_GCHANNELS");
    ch.cmd = ETHTOOL_SCHANNELS;
    ch.combined_count = wanted;
    if (ioctl(fd, SIOCETHTOOL, &ifr) < 0)
        return fail("ETHTOOL_SCHANNELS");
    memset(&ch, 0, sizeof(ch));
    ch.cmd = ETHTOOL_GCHANNELS;
    if (ioctl(fd, SIOCETHTOOL, &ifr) < 0)
        return fail("ETHTOOL_GCHANNELS");
    printf("max=%u now=%u\n", ch.max_combined, ch.combined_count);
    close(fd);
    return ch.combined_count == wanted ? 0 : 1;
}

static int udp(const char *addr, unsigned port, unsigned count)
{
    struct sockaddr_in to;
    char payload[64];
    unsigned i;

    memset(&to, 0, sizeof(to));
    to.sin_family = AF_INET;
    if (inet_pton(AF_INET, addr, &to.sin_addr) != 1) {
        printf("net_tool: bad address %s\n", addr);
        return 1;
    }
    memset(payload, 'v', sizeof(payload));
    for (i = 0; i < count; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);

        if (fd < 0)
            return fail("socket");
        to.sin_port = htons((unsigned short)(port + i));
        if (sendto(fd, payload, sizeof(payload), 0, (struct sockaddr *)&to, sizeof(to)) < 0)
            return fail("sendto");
        close(fd);
    }
    printf("sent=%u\n", count);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "channels") == 0)
        return channels(argv[2], (unsigned)strtoul(argv[3], NULL, 0));
    if (argc == 5 && strcmp(argv[1], "udp") == 0)
        return udp(argv[2], (unsigned)strtoul(argv[3], NULL, 0),
                   (unsigned)strtoul(argv[4], NULL, 0));
    printf("usage: net_tool channels IFNAME N | net_tool udp ADDR PORT COUNT\n");
    return 2;
}
