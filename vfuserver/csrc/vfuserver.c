/*
 * vfuserver's own C code, compiled into the cffi extension vfuserver._vfu_cffi: _build.py
 * passes this file to cffi's set_source, and vfuserver/decl/libvfio-user.h declares what
 * Python calls here (the region trampolines, the drain loop, the memory barriers, the SIGBUS
 * guard).
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
static int vfuserver_data_cb(vfu_ctx_t *);

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

/*
 * SIGBUS guard for guest memory.
 *
 * A client that shrinks (ftruncate) the file behind one of its DMA maps makes the next
 * host access to a page past the new end raise SIGBUS (mm/filemap.c filemap_fault), which
 * would kill the whole process and every other device in it. The guard, installed once
 * per process, handles a SIGBUS whose address lies inside a registered guest map: it maps
 * a private anonymous zero page (the map's page size) over the faulting page, so the
 * access is retried and succeeds, and counts the fault in that map's
 * vfuserver_lost_pages_t; the device model reads the count at the end of each queue batch
 * and goes NEEDS_RESET (devices/virtqueue.py). Any other SIGBUS goes to the previous
 * disposition (faulthandler's, or the default: the process dies as it would have).
 *
 * The registry is read from a signal handler on any thread, so it is a fixed array of
 * slots, each guarded by a sequence number (odd while the slot changes, as a seqlock):
 * the handler uses a slot only if it read the same even number before and after its
 * fields. Writers claim a free slot with a compare-and-swap on that number.
 */

#include <signal.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    uint64_t count;     /* faults absorbed in the maps of one device */
    uint64_t iova;      /* guest address of the latest one */
} vfuserver_lost_pages_t;

#define VFUSERVER_GUARD_SLOTS 4096

struct vfuserver_guard_slot {
    unsigned long seq;          /* even: stable; odd: being changed */
    uintptr_t start, end;       /* host range; end == 0: free */
    uintptr_t page_mask;        /* ~(page size - 1) of the map (hugetlbfs: 2 MiB, ...) */
    uint64_t iova;              /* guest address of start */
    vfuserver_lost_pages_t *lost;
};

static struct vfuserver_guard_slot vfuserver_guard_slots[VFUSERVER_GUARD_SLOTS];
static struct sigaction vfuserver_guard_previous;
static int vfuserver_guard_state;   /* 0: not installed, 1: installing, 2: installed */

static void vfuserver_guard_pass_on(int sig, siginfo_t *info, void *uctx)
{
    const struct sigaction *prev = &vfuserver_guard_previous;

    if ((prev->sa_flags & SA_SIGINFO) && prev->sa_sigaction != NULL) {
        prev->sa_sigaction(sig, info, uctx);
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
    } else {
        /* Default (an ignored SIGBUS from a fault would just fault again): once this
           returns, the access faults again and the signal kills the process. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
    }
}

static void vfuserver_guard_handler(int sig, siginfo_t *info, void *uctx)
{
    int saved_errno = errno;
    uintptr_t addr = (uintptr_t)info->si_addr;

    /* Only a fault the kernel raised has an address; kill(SIGBUS) (si_code <= 0) and
       BUS_ADRALN/BUS_MCEERR_* are not a lost page. */
    int lost_page = info->si_code == BUS_ADRERR;
    for (int i = 0; lost_page && i < VFUSERVER_GUARD_SLOTS; i++) {
        struct vfuserver_guard_slot *slot = &vfuserver_guard_slots[i];
        unsigned long seq = __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE);
        if (seq & 1) {
            continue;
        }
        uintptr_t start = __atomic_load_n(&slot->start, __ATOMIC_RELAXED);
        uintptr_t end = __atomic_load_n(&slot->end, __ATOMIC_RELAXED);
        uintptr_t page_mask = __atomic_load_n(&slot->page_mask, __ATOMIC_RELAXED);
        uint64_t iova = __atomic_load_n(&slot->iova, __ATOMIC_RELAXED);
        vfuserver_lost_pages_t *lost = __atomic_load_n(&slot->lost, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&slot->seq, __ATOMIC_RELAXED) != seq) {
            continue;
        }
        if (addr < start || addr >= end) {
            continue;
        }
        uintptr_t page = addr & page_mask;
        void *zero = mmap((void *)page, ~page_mask + 1, PROT_READ | PROT_WRITE,
                          MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (zero == MAP_FAILED) {
            break;      /* cannot repair: the default applies */
        }
        __atomic_store_n(&lost->iova, iova + (addr - start), __ATOMIC_RELAXED);
        __atomic_fetch_add(&lost->count, 1, __ATOMIC_RELEASE);
        errno = saved_errno;
        return;
    }
    errno = saved_errno;
    vfuserver_guard_pass_on(sig, info, uctx);
}

static int vfuserver_guard_install(void)
{
    int expected = 0;

    if (!__atomic_compare_exchange_n(&vfuserver_guard_state, &expected, 1, false,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        return 0;   /* installed (or being installed) by another caller */
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = vfuserver_guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &vfuserver_guard_previous) < 0) {
        __atomic_store_n(&vfuserver_guard_state, 0, __ATOMIC_RELEASE);
        return -1;
    }
    __atomic_store_n(&vfuserver_guard_state, 2, __ATOMIC_RELEASE);
    return 0;
}

static int vfuserver_guard_add(void *start, size_t length, size_t page_size, uint64_t iova,
                               vfuserver_lost_pages_t *lost)
{
    if (page_size == 0 || (page_size & (page_size - 1)) != 0 || length == 0) {
        errno = EINVAL;
        return -1;
    }
    for (int i = 0; i < VFUSERVER_GUARD_SLOTS; i++) {
        struct vfuserver_guard_slot *slot = &vfuserver_guard_slots[i];
        unsigned long seq = __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE);
        if ((seq & 1) || __atomic_load_n(&slot->end, __ATOMIC_RELAXED) != 0) {
            continue;
        }
        if (!__atomic_compare_exchange_n(&slot->seq, &seq, seq + 1, false,
                                         __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            continue;
        }
        __atomic_store_n(&slot->start, (uintptr_t)start, __ATOMIC_RELAXED);
        __atomic_store_n(&slot->end, (uintptr_t)start + length, __ATOMIC_RELAXED);
        __atomic_store_n(&slot->page_mask, ~(uintptr_t)(page_size - 1), __ATOMIC_RELAXED);
        __atomic_store_n(&slot->iova, iova, __ATOMIC_RELAXED);
        __atomic_store_n(&slot->lost, lost, __ATOMIC_RELAXED);
        __atomic_store_n(&slot->seq, seq + 2, __ATOMIC_RELEASE);
        return i;
    }
    errno = ENOSPC;
    return -1;
}

static void vfuserver_guard_remove(int index)
{
    if (index < 0 || index >= VFUSERVER_GUARD_SLOTS) {
        return;
    }
    struct vfuserver_guard_slot *slot = &vfuserver_guard_slots[index];
    unsigned long seq = __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE);
    __atomic_store_n(&slot->seq, seq | 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(&slot->end, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->start, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->lost, NULL, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->seq, (seq | 1) + 1, __ATOMIC_RELEASE);
}

#include "serve.c"
#include "netpath.c"
