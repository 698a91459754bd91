/*
 * vfuserver's own C code, compiled into the cffi extension vfuserver._vfu_cffi: _build.py
 * passes this file to cffi's set_source, and vfuserver/decl/libvfio-user.h declares what
 * Python calls here (the region trampolines, the drain loop, the memory barriers).
 * vfuserver_region_cb is the Python entry point (extern "Python" in that header): cffi
 * defines it in the generated module, after this text.
 */

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
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

#include "serve.h"

/* Like every other callback, the region one gets the context first; the index follows.
   The fast path answers the accesses a running driver makes all the time without
   entering Python (see fast_access); every other access goes to the Python model. */
#define TRAMPOLINE(i) \
    static ssize_t trampoline_##i(vfu_ctx_t *c, char *b, size_t n, loff_t o, bool w) \
    { \
        ssize_t r = fast_access(vfu_get_private(c), i, b, n, o, w); \
        return r != FAST_MISS ? r : vfuserver_region_cb(c, i, b, n, o, w); \
    }
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

#include "serve.c"
