/* The floor of the region-access benchmark: a raw AF_UNIX request/response with
 * vfio-user-sized messages (32-byte request: 16 header + 16 region_access; 36-byte reply:
 * + 4 data bytes), no libvfio-user, no device.
 * usage: pingpong server SOCK          (serves clients one after the other until killed)
 *        pingpong client SOCK SECONDS  (prints ops=N seconds=S ops_per_s=R us_per_op=U)
 * From the spike's pingpong.c. */
#define _GNU_SOURCE
#include <err.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "server") && (strcmp(argv[1], "client") || argc != 4)))
        errx(2, "usage: %s server SOCK | %s client SOCK SECONDS", argv[0], argv[0]);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", argv[2]);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) err(1, "socket");
    char req[32] = {0}, rep[36] = {0};
    if (!strcmp(argv[1], "server")) {
        unlink(argv[2]);
        if (bind(s, (void *)&sa, sizeof(sa)) || listen(s, 1)) err(1, "bind/listen");
        for (;;) {
            int c = accept(s, 0, 0);
            if (c < 0) err(1, "accept");
            while (recv(c, req, sizeof(req), MSG_WAITALL) == sizeof(req))
                if (send(c, rep, sizeof(rep), MSG_NOSIGNAL) != sizeof(rep)) break;
            close(c);
        }
    }
    if (connect(s, (void *)&sa, sizeof(sa))) err(1, "connect %s", argv[2]);
    double seconds = atof(argv[3]), t0 = now(), t;
    unsigned long n = 0;
    for (;;) {
        for (int i = 0; i < 1000; i++) {
            if (send(s, req, sizeof(req), 0) != sizeof(req)) err(1, "send");
            if (recv(s, rep, sizeof(rep), MSG_WAITALL) != sizeof(rep)) errx(1, "recv");
        }
        n += 1000;
        if ((t = now()) - t0 >= seconds) break;
    }
    printf("ops=%lu seconds=%.6f ops_per_s=%.1f us_per_op=%.3f\n", n, t - t0, n / (t - t0),
           (t - t0) / n * 1e6);
    return 0;
}
