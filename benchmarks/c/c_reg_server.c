/* The C reference server for the region-access benchmark: the same libvfio-user, the same
 * loop structure as vfuserver's trio loop (non-blocking context, poll() on the context's fd,
 * one vfu_run_ctx() per readiness), and BARs laid out like vfuserver's transitional device
 * with a trivial register file behind them, so each access does comparable, minimal work:
 *   BAR0  32-byte IO BAR, the legacy virtio header (ISR at 19 cleared on read, QUEUE_NOTIFY
 *         at 16 counted per queue, the rest a byte array; host features read-only);
 *   BAR4  16 KiB memory BAR, the modern layout (common cfg 0x0, ISR 0x1000 cleared on read,
 *         device cfg 0x2000, notify 0x3000 counted per queue).
 * Like the kernel's vfio-pci (and vfuserver), a BAR access with its decode bit off in
 * PCI_COMMAND fails with EIO. Config space is libvfio-user's own.
 * usage: c_reg_server SOCK   (serves clients one after the other until killed)
 * Adapted from the spike's c_bar0_server.c. */
#define _GNU_SOURCE
#include <err.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "libvfio-user.h"

#define LEGACY_SIZE 32
#define LEGACY_NOTIFY 16
#define LEGACY_ISR 19
#define MODERN_SIZE 0x4000
#define MODERN_ISR 0x1000
#define MODERN_NOTIFY 0x3000

static uint8_t legacy[LEGACY_SIZE], modern[MODERN_SIZE];
static unsigned long notifies[64], accesses;

static int decode_off(vfu_ctx_t *ctx, int io) {
    vfu_pci_hdr_cmd_t cmd = vfu_pci_get_config_space(ctx)->hdr.cmd;
    return io ? !cmd.iose : !cmd.mse;
}

static void notify(const char *buf, size_t n) {
    uint16_t queue = 0;
    memcpy(&queue, buf, n < 2 ? n : 2);
    notifies[queue % 64]++;
}

static ssize_t bar0(vfu_ctx_t *ctx, char *buf, size_t n, loff_t off, bool is_write) {
    accesses++;
    if (decode_off(ctx, 1)) { errno = EIO; return -1; }
    if ((size_t)off + n > LEGACY_SIZE) { errno = EINVAL; return -1; }
    if (is_write) {
        if (off == LEGACY_NOTIFY) notify(buf, n);
        else if (off >= 4) memcpy(legacy + off, buf, n);  /* 0..3: host features, read-only */
    } else {
        memcpy(buf, legacy + off, n);
        if (off <= LEGACY_ISR && LEGACY_ISR < off + (loff_t)n) legacy[LEGACY_ISR] = 0;
    }
    return n;
}

static ssize_t bar4(vfu_ctx_t *ctx, char *buf, size_t n, loff_t off, bool is_write) {
    accesses++;
    if (decode_off(ctx, 0)) { errno = EIO; return -1; }
    if ((size_t)off + n > MODERN_SIZE) { errno = EINVAL; return -1; }
    if (is_write) {
        if (off >= MODERN_NOTIFY) notify(buf, n);
        else memcpy(modern + off, buf, n);
    } else {
        memcpy(buf, modern + off, n);
        if (off == MODERN_ISR) modern[MODERN_ISR] = 0;
    }
    return n;
}

static void wait_readable(int fd) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    while (poll(&p, 1, -1) < 0)
        if (errno != EINTR) err(1, "poll");
}

int main(int argc, char **argv) {
    if (argc != 2) errx(2, "usage: %s SOCK", argv[0]);
    unlink(argv[1]);
    vfu_ctx_t *c = vfu_create_ctx(VFU_TRANS_SOCK, argv[1], LIBVFIO_USER_FLAG_ATTACH_NB, NULL,
                                  VFU_DEV_TYPE_PCI);
    if (!c) err(1, "vfu_create_ctx");
    if (vfu_pci_init(c, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0))
        err(1, "vfu_pci_init");
    vfu_pci_set_id(c, 0x1af4, 0x1000, 0x1af4, 0x0001);
    if (vfu_setup_region(c, VFU_PCI_DEV_BAR0_REGION_IDX, LEGACY_SIZE, bar0,
                         VFU_REGION_FLAG_RW, NULL, 0, -1, 0))
        err(1, "BAR0");
    if (vfu_setup_region(c, VFU_PCI_DEV_BAR4_REGION_IDX, MODERN_SIZE, bar4,
                         VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM, NULL, 0, -1, 0))
        err(1, "BAR4");
    if (vfu_realize_ctx(c)) err(1, "vfu_realize_ctx");
    memcpy(legacy + 20, "\x52\x54\x00\x12\x34\x56", 6);  /* the MAC in device config */
    for (;;) {
        while (vfu_attach_ctx(c) < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) err(1, "vfu_attach_ctx");
            wait_readable(vfu_get_poll_fd(c));
        }
        int fd = vfu_get_poll_fd(c);
        for (;;) {
            wait_readable(fd);
            if (vfu_run_ctx(c) < 0 && errno != EINTR && errno != EAGAIN) {
                if (errno != ENOTCONN) warn("vfu_run_ctx");
                break;
            }
        }
        fprintf(stderr, "c_reg_server: client gone after %lu accesses\n", accesses);
    }
}
