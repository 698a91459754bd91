/*
 * The native side of a served device: the state the Python model publishes for the fast
 * path, and the fast path itself (included by vfuserver.c; serve.c is the serving loop).
 *
 * The Python device model is the one source of truth. Under its device lock it publishes
 * what the fast path needs (device status, IO decode, whether a legacy read has a side
 * effect) into struct vfuserver_dev; the fast path only reads that, except for two cells
 * the model itself keeps here because both sides change them: the ISR (set by the model
 * when it raises an interrupt, cleared by a read, atomically) and the queues kicked but
 * not yet processed (set here, taken by the model, atomically), which is what QEMU's
 * ioeventfd does for a kick (virtio_queue_host_notifier_read).
 */

#ifndef VFUSERVER_SERVE_H
#define VFUSERVER_SERVE_H

#define FAST_MISS (-2)          /* not a fast-path access: the Python model answers it */
#define VFUSERVER_FAST_REGS 8
#define VFUSERVER_IRQ_WORDS 32      /* 2048 vectors: the MSI-X maximum */

enum vfuserver_fast_kind {
    VFUSERVER_FAST_NOTIFY = 1,      /* write: the 16-bit value names the queue to kick */
    VFUSERVER_FAST_ISR_READ = 2,    /* 1-byte read, read-to-clear (virtio 1.2 §4.1.4.5) */
    VFUSERVER_FAST_STATUS_READ = 3, /* 1-byte read of the device status */
};

struct vfuserver_fast_reg {
    int region;         /* libvfio-user region index */
    uint32_t offset;
    uint32_t width;
    int is_write;
    int kind;           /* enum vfuserver_fast_kind */
    int legacy;         /* legacy BAR: needs IO decode on, and reads need `settled` */
    uint64_t count;     /* accesses served here */
};

struct vfuserver_dev {
    void *handle;                   /* the Python VfuContext (ffi.new_handle) */

    /* published by the model under its device lock */
    uint8_t fast_enabled;           /* 0: every access goes to the model */
    uint8_t status;                 /* device status */
    uint8_t io_enabled;             /* legacy BAR0: PCI_COMMAND IO decode */
    uint8_t settled;                /* a legacy read has no side effect on the mode */
    uint64_t active_queues;         /* bit n: a kick of queue n has work to do */
    int nregs;
    struct vfuserver_fast_reg regs[VFUSERVER_FAST_REGS];

    /* shared cells (atomic) */
    uint8_t isr;
    uint64_t pending_notify;        /* bit n: queue n kicked */
    uint64_t pending_irqs[VFUSERVER_IRQ_WORDS]; /* vectors another thread asked the serving
                                                   thread to raise, one bit each */
    uint64_t any_pending_irq;       /* nonzero: look at pending_irqs */
    int stop;
    int report;                     /* a callback stored an error: return to Python */

    int notify_fd;                  /* eventfd: kicks are pending (the trio side waits on it) */
    int wake_fd;                    /* eventfd: wakes the serving thread */

    /* the serving thread */
    pthread_mutex_t irq_lock;       /* held around vfu_run_ctx: SET_IRQS swaps the eventfds */
    pthread_mutex_t thread_lock;    /* guards `blocked` and `thread` */
    pthread_t thread;
    int blocked;                    /* the thread is in a call only a signal interrupts */
    int serving;

    /* settings */
    int64_t poll_max_ns;            /* adaptive polling ceiling (QEMU's poll-max-ns) */
    int64_t message_timeout_ns;     /* a message may take this long to arrive whole */
    int64_t reply_timeout_ms;       /* SO_SNDTIMEO on the connection */
    int64_t poll_ns;                /* current adaptive polling time */

    /* why serving ended, and counters */
    int drop_reason;                /* enum vfuserver_drop */
    int drop_errno;
    uint32_t drop_size;
    uint64_t messages;              /* messages handled (vfu_run_ctx or direct) */
    uint64_t wakeups;               /* poll() returns */
    uint64_t polled;                /* messages found by adaptive polling (no wake-up) */
    uint64_t kicks;                 /* notify_fd writes */

    /* answering fast-path region accesses on the serving thread (serve.c vfuserver_direct) */
    uint8_t direct_enabled;         /* 0: every message goes through vfu_run_ctx */
    uint8_t held;                   /* vfu_run_ctx holds a request (EBUSY) until quiesced */
    uint64_t direct;                /* messages answered without libvfio-user */
};

static ssize_t fast_access(void *private, int region, char *buf, size_t n, loff_t off,
                           bool is_write)
{
    struct vfuserver_dev *d = private;
    int i;

    if (d == NULL || !__atomic_load_n(&d->fast_enabled, __ATOMIC_ACQUIRE)) {
        return FAST_MISS;
    }
    for (i = 0; i < d->nregs; i++) {
        struct vfuserver_fast_reg *r = &d->regs[i];
        if (r->region != region || r->offset != (uint64_t)off || r->width != n ||
            r->is_write != (int)is_write) {
            continue;
        }
        if (r->legacy && !__atomic_load_n(&d->io_enabled, __ATOMIC_ACQUIRE)) {
            return FAST_MISS;       /* the model refuses it (EIO) and counts why */
        }
        switch (r->kind) {
        case VFUSERVER_FAST_NOTIFY: {
            uint16_t queue;
            memcpy(&queue, buf, sizeof(queue));
            if (queue >= 64) {
                return FAST_MISS;   /* no such queue here: the model logs and ignores it */
            }
            uint64_t bit = 1ULL << queue;
            if (!(__atomic_load_n(&d->active_queues, __ATOMIC_ACQUIRE) & bit)) {
                break;              /* the model would ignore it (VirtioDevice.notify) */
            }
            uint64_t old = __atomic_fetch_or(&d->pending_notify, bit,
                                             __ATOMIC_SEQ_CST);
            if (old == 0) {         /* otherwise the model has not taken the last ones yet */
                uint64_t one = 1;
                if (write(d->notify_fd, &one, sizeof(one)) == sizeof(one)) {
                    __atomic_fetch_add(&d->kicks, 1, __ATOMIC_RELAXED);
                }
            }
            break;
        }
        case VFUSERVER_FAST_ISR_READ:     /* no mode side effect, legacy or not */
            buf[0] = (char)__atomic_exchange_n(&d->isr, 0, __ATOMIC_SEQ_CST);
            break;
        case VFUSERVER_FAST_STATUS_READ:
            if (r->legacy && !__atomic_load_n(&d->settled, __ATOMIC_ACQUIRE)) {
                return FAST_MISS;
            }
            buf[0] = (char)__atomic_load_n(&d->status, __ATOMIC_ACQUIRE);
            break;
        default:
            return FAST_MISS;
        }
        __atomic_fetch_add(&r->count, 1, __ATOMIC_RELAXED);
        return (ssize_t)n;
    }
    return FAST_MISS;
}

#endif
