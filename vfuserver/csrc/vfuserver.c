/*
 * vfuserver's own C code, compiled into the cffi extension vfuserver._vfu_cffi: _build.py
 * passes this file to cffi's set_source, and vfuserver/decl/libvfio-user.h declares what
 * Python calls here (the region trampolines, the drain loop, the memory barriers).
 * vfuserver_region_cb is the Python entry point (extern "Python" in that header): cffi
 * defines it in the generated module, after this text.
 */

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <syslog.h>
#include "libvfio-user.h"
#include "vfio-user.h"

typedef vfu_region_access_cb_t *vfu_region_access_cb_p;
typedef vfu_log_fn_t *vfu_log_fn_p;
typedef vfu_reset_cb_t *vfu_reset_cb_p;
typedef vfu_device_quiesce_cb_t *vfu_quiesce_cb_p;
typedef vfu_dma_register_cb_t *vfu_dma_cb_p;
typedef vfu_dev_irq_state_cb_t *vfu_irq_state_cb_p;

static ssize_t vfuserver_region_cb(vfu_ctx_t *, int, char *, size_t, loff_t, bool);

/* Like every other callback, the region one gets the context first; the index follows. */
#define TRAMPOLINE(i) \
    static ssize_t trampoline_##i(vfu_ctx_t *c, char *b, size_t n, loff_t o, bool w) \
    { return vfuserver_region_cb(c, i, b, n, o, w); }
TRAMPOLINE(0) TRAMPOLINE(1) TRAMPOLINE(2) TRAMPOLINE(3) TRAMPOLINE(4)
TRAMPOLINE(5) TRAMPOLINE(6) TRAMPOLINE(7) TRAMPOLINE(8) TRAMPOLINE(9)
#undef TRAMPOLINE

static vfu_region_access_cb_p vfuserver_region_trampoline(int i)
{
    static vfu_region_access_cb_p const table[] = {
        trampoline_0, trampoline_1, trampoline_2, trampoline_3, trampoline_4,
        trampoline_5, trampoline_6, trampoline_7, trampoline_8, trampoline_9,
    };
    _Static_assert(sizeof(table) / sizeof(table[0]) == VFU_PCI_DEV_NUM_REGIONS,
                   "one trampoline per region index");
    return (i >= 0 && i < VFU_PCI_DEV_NUM_REGIONS) ? table[i] : NULL;
}

/* Barriers between the device's and the guest driver's accesses to the rings. A full
   barrier is the only one that orders a store before a later load (mfence / lock or on
   x86); the other two cost nothing on x86 but keep the compiler and weaker CPUs honest. */
void vfuserver_smp_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void vfuserver_smp_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
void vfuserver_smp_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }

/* Messages up to this size are only handed to libvfio-user once complete. */
#define VFUSERVER_STREAMED_MESSAGE (64 * 1024)
/* libvfio-user's SERVER_MAX_MSG_SIZE (lib/private.h): a REGION_WRITE of the largest
   transfer. */
#define VFUSERVER_MAX_MESSAGE (VFIO_USER_DEFAULT_MAX_DATA_XFER_SIZE + \
                               sizeof(struct vfio_user_header) + \
                               sizeof(struct vfio_user_region_access))

static void vfuserver_discard(int fd, int queued)
{
    char buf[4096];

    while (queued > 0) {
        ssize_t n = recv(fd, buf, (size_t)queued < sizeof(buf) ? (size_t)queued : sizeof(buf),
                         MSG_DONTWAIT);
        if (n <= 0) {
            break;
        }
        queued -= (int)n;
    }
}

static int vfuserver_message_ready(int fd)
{
    struct vfio_user_header hdr;
    int queued = 0;
    ssize_t n;

    if (ioctl(fd, FIONREAD, &queued) < 0) {
        return -1;
    }
    if (queued == 0) {
        return 2;       /* nothing queued: if the fd polled readable, the peer is gone */
    }
    if ((size_t)queued < sizeof(hdr)) {
        return 0;
    }
    n = recv(fd, &hdr, sizeof(hdr), MSG_PEEK | MSG_DONTWAIT);
    if (n < 0) {
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    }
    if ((size_t)n < sizeof(hdr)) {
        return 0;
    }
    if (hdr.flags.type != VFIO_USER_F_TYPE_COMMAND || hdr.msg_size < sizeof(hdr) ||
        hdr.msg_size > VFUSERVER_MAX_MESSAGE) {
        /* libvfio-user refuses such a header without reading the body behind it
           (get_request_header, is_valid_header): it would parse the rest of the stream
           from inside that body. The stream cannot be trusted any more: drop the client.
           What is queued goes first, or the loop would find the same header again after
           shutting the connection down instead of the EOF that ends the session. */
        vfuserver_discard(fd, queued);
        errno = EPROTO;
        return -1;
    }
    if (hdr.msg_size > VFUSERVER_STREAMED_MESSAGE) {
        /* Larger than a socket buffer can hold: the rest can only arrive while the
           library reads, so let it read. */
        return 1;
    }
    return (size_t)queued >= hdr.msg_size ? 1 : 0;
}

static int vfuserver_drain(vfu_ctx_t *ctx, int fd, int max, int polled)
{
    int handled = 0;

    while (handled < max) {
        int state = vfuserver_message_ready(fd);
        if (state < 0) {
            return -1;  /* errno from ioctl() or recv() */
        }
        if (state == 0 || (state == 2 && !(polled && handled == 0))) {
            break;      /* part of a message, or nothing more */
        }
        int ret = vfu_run_ctx(ctx);
        if (ret < 0) {
            return -1;  /* errno from vfu_run_ctx() */
        }
        if (ret == 0) {
            break;
        }
        handled++;
    }
    return handled;
}
