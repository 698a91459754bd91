/* vfio-user region-access loop: one outstanding request at a time, as a vCPU waits for
 * its IO port access to complete.
 *
 * usage: vfu_region_client SOCK SECONDS [-p OP]... OP...
 *   OP  r:REGION:OFFSET:WIDTH          VFIO_USER_REGION_READ
 *       w:REGION:OFFSET:WIDTH:VALUE    VFIO_USER_REGION_WRITE (waits for the reply)
 *   -p OP runs once before the timed loop (e.g. PCI_COMMAND through the config region,
 *         index 7: a function comes out of reset with IO and memory decode off);
 *   the OPs after it are issued in turn, round-robin, until SECONDS have passed.
 * Prints one line: ops=N seconds=S ops_per_s=R us_per_op=U last=0xV
 * Adapted from the spike's vfu_bench_client.c; speaks include/vfio-user.h's wire format. */
#define _GNU_SOURCE
#include <err.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include "vfio-user.h"

#define MAX_OPS 64

struct op {
    int write;
    uint32_t region, width;
    uint64_t offset, value;
};

struct request {
    struct vfio_user_header h;
    struct vfio_user_region_access a;
    uint8_t data[8];
} __attribute__((packed));

static int sock;
static uint16_t next_id = 1;
static uint64_t last_value;

static void xsend(const void *b, size_t n) {
    if (send(sock, b, n, MSG_NOSIGNAL) != (ssize_t)n) err(1, "send");
}

static void xrecv(void *b, size_t n) {
    ssize_t r = recv(sock, b, n, MSG_WAITALL);
    if (r != (ssize_t)n) errx(1, "recv: got %zd of %zu bytes", r, n);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void parse_op(const char *text, struct op *op) {
    char kind;
    unsigned long long region, offset, width, value = 0;
    int n = sscanf(text, "%c:%lli:%lli:%lli:%lli", &kind, &region, &offset, &width, &value);
    if (!((kind == 'r' && n == 4) || (kind == 'w' && n == 5)) || width < 1 || width > 8)
        errx(2, "bad operation %s (r:REGION:OFFSET:WIDTH or w:REGION:OFFSET:WIDTH:VALUE)", text);
    op->write = kind == 'w';
    op->region = region;
    op->offset = offset;
    op->width = width;
    op->value = value;
}

static void access_region(const struct op *op) {
    struct request req = {0};
    struct { struct vfio_user_header h; struct vfio_user_region_access a; uint8_t d[8]; }
        __attribute__((packed)) rep;
    size_t data = op->write ? op->width : 0;
    req.h.msg_id = next_id++;
    req.h.cmd = op->write ? VFIO_USER_REGION_WRITE : VFIO_USER_REGION_READ;
    req.h.msg_size = sizeof(req.h) + sizeof(req.a) + data;
    req.a.offset = op->offset;
    req.a.region = op->region;
    req.a.count = op->width;
    memcpy(req.data, &op->value, data);
    xsend(&req, req.h.msg_size);
    xrecv(&rep.h, sizeof(rep.h));
    if (rep.h.flags.error)
        errx(1, "%s of region %u offset %#llx width %u failed: %s",
             op->write ? "write" : "read", op->region, (unsigned long long)op->offset,
             op->width, strerror(rep.h.error_no));
    size_t expect = sizeof(rep.h) + sizeof(rep.a) + (op->write ? 0 : op->width);
    if (rep.h.msg_size != expect || rep.h.msg_id != req.h.msg_id)
        errx(1, "unexpected reply: id %u size %u (expected id %u size %zu)", rep.h.msg_id,
             rep.h.msg_size, req.h.msg_id, expect);
    xrecv(&rep.a, rep.h.msg_size - sizeof(rep.h));
    if (!op->write) {
        last_value = 0;
        memcpy(&last_value, rep.d, op->width);
    }
}

static void negotiate(void) {
    /* VFIO_USER_VERSION: header + {major 0, minor 1} + JSON capabilities + NUL */
    const char caps[] = "{\"capabilities\":{\"max_msg_fds\":8}}";
    struct { struct vfio_user_header h; struct vfio_user_version v; char j[sizeof(caps)]; }
        __attribute__((packed)) ver = {0};
    ver.h.msg_id = next_id++;
    ver.h.cmd = VFIO_USER_VERSION;
    ver.h.msg_size = sizeof(ver);
    ver.v.major = 0;
    ver.v.minor = 1;
    memcpy(ver.j, caps, sizeof(caps));
    xsend(&ver, sizeof(ver));
    struct vfio_user_header rh;
    char rest[4096];
    xrecv(&rh, sizeof(rh));
    if (rh.flags.type != VFIO_USER_F_TYPE_REPLY || rh.flags.error)
        errx(1, "version rejected");
    if (rh.msg_size < sizeof(rh) || rh.msg_size - sizeof(rh) > sizeof(rest))
        errx(1, "bad version reply size %u", rh.msg_size);
    xrecv(rest, rh.msg_size - sizeof(rh));
}

int main(int argc, char **argv) {
    if (argc < 4)
        errx(2, "usage: %s SOCK SECONDS [-p OP]... OP...", argv[0]);
    double seconds = atof(argv[2]);
    struct op pre[MAX_OPS], ops[MAX_OPS];
    int npre = 0, nops = 0;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "-p") && i + 1 < argc) {
            if (npre == MAX_OPS) errx(2, "too many -p operations");
            parse_op(argv[++i], &pre[npre++]);
        } else {
            if (nops == MAX_OPS) errx(2, "too many operations");
            parse_op(argv[i], &ops[nops++]);
        }
    }
    if (nops == 0) errx(2, "no operation to time");

    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", argv[1]);
    if ((sock = socket(AF_UNIX, SOCK_STREAM, 0)) < 0) err(1, "socket");
    if (connect(sock, (void *)&sa, sizeof(sa)) < 0) err(1, "connect %s", argv[1]);
    negotiate();
    for (int i = 0; i < npre; i++)
        access_region(&pre[i]);

    unsigned long n = 0;
    double t0 = now(), t;
    for (;;) {
        for (int i = 0; i < 1000; i++)
            access_region(&ops[(n + i) % nops]);
        n += 1000;
        if ((t = now()) - t0 >= seconds) break;
    }
    printf("ops=%lu seconds=%.6f ops_per_s=%.1f us_per_op=%.3f last=%#llx\n", n, t - t0,
           n / (t - t0), (t - t0) / n * 1e6, (unsigned long long)last_value);
    close(sock);
    return 0;
}
