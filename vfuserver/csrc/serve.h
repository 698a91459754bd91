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
#define VFUSERVER_FAST_REGS 16
#define VFUSERVER_IRQ_WORDS 32      /* 2048 vectors: the MSI-X maximum */
#define VFUSERVER_IMAGE_QUEUES 64   /* queues whose legacy registers the image holds */
#define VFUSERVER_IMAGE_CONFIG 256  /* device config bytes the image holds at most */
#define VFUSERVER_LEGACY_SLOTS 25   /* per-register counters: offsets 0..23, 24 = config */
#define VFUSERVER_LEGACY_CONFIG_SLOT 24
#define VFUSERVER_LEGACY_QUEUE_MAX 1024 /* QEMU's VIRTIO_QUEUE_MAX */

enum vfuserver_fast_kind {
    VFUSERVER_FAST_NOTIFY = 1,      /* write: the 16-bit value names the queue to kick */
    VFUSERVER_FAST_ISR_READ = 2,    /* 1-byte read, read-to-clear (virtio 1.2 §4.1.4.5) */
    VFUSERVER_FAST_STATUS_READ = 3, /* 1-byte read of the device status */
    /* The next three match any access inside [offset, offset + width) of the region and
       are answered from the register image (struct vfuserver_image), or missed. */
    VFUSERVER_FAST_LEGACY_READ = 4, /* a legacy BAR0 read without side effect */
    VFUSERVER_FAST_LEGACY_WRITE = 5,/* QUEUE_SEL, and a STATUS write that changes nothing */
    VFUSERVER_FAST_CONFIG_READ = 6, /* a modern device config read (offset: config start) */
};

/*
 * What the model publishes of its registers (vfuserver/native.py NativeDevice.publish,
 * only when they may have changed): the device config bytes as the model's read_config
 * returns them, and for a transitional function the legacy common header registers whose
 * reads have no side effect (devices/legacy.py LegacyInterface), per queue where QUEUE_SEL
 * selects. Read and written field by field with atomics under image_seq (a seqlock): a
 * reader that sees it change misses and the model answers.
 */
struct vfuserver_image {
    uint32_t config_len;                /* 0: no config reads here */
    uint8_t config[VFUSERVER_IMAGE_CONFIG];
    uint8_t legacy;                     /* 1: the legacy_ fields hold a transitional BAR0 */
    uint8_t legacy_config_offset;       /* 20 (MSI-X off) or 24 (VIRTIO_PCI_CONFIG_OFF) */
    uint8_t legacy_bus_master;          /* PCI_COMMAND master on: STATUS = ACK|DRIVER is a
                                           no-op (virtio_ioport_write sets it otherwise) */
    uint8_t legacy_absent_vectors;      /* queues without a size hold vectors: miss */
    uint32_t legacy_host_features;      /* HOST_FEATURES as read (with BAD_FEATURE) */
    uint32_t legacy_guest_features;
    uint16_t legacy_config_vector;
    uint16_t legacy_queues;             /* queues the device has (a size), any number */
    uint32_t legacy_queue_pfn[VFUSERVER_IMAGE_QUEUES];
    uint16_t legacy_queue_num[VFUSERVER_IMAGE_QUEUES];
    uint16_t legacy_queue_vector[VFUSERVER_IMAGE_QUEUES];
};

struct vfuserver_net_run;            /* netpath.c: a virtio-net's whole data run in C */
#define VFUSERVER_RUN_PYTHON (-2)   /* a data run (or the rest of it) is Python's */

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
    uint32_t image_seq;             /* seqlock of `image`: odd while it is rewritten */
    struct vfuserver_image image;   /* register image (vfuserver_publish_image) */
    uint16_t legacy_queue_sel;      /* shared cell (atomic): the legacy QUEUE_SEL, which
                                       the model keeps here and the fast path writes */
    uint64_t legacy_fast_reads[VFUSERVER_LEGACY_SLOTS];  /* image reads by register */
    uint64_t legacy_fast_writes[VFUSERVER_LEGACY_SLOTS]; /* fast writes by register */

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
    uint64_t interrupts;            /* interrupts signalled (vfuserver_irq) */

    /* the data path on the serving thread (vfuserver_data_cb), set while no thread serves */
    int inline_kicks;               /* kicks go to vfuserver_data_cb, not notify_fd */
    int data_fd;                    /* -1, or a backend fd whose input vfuserver_data_cb reads */
    int data_armed;                 /* poll data_fd (0 while the guest has no buffers) */
    int data_again;                 /* vfuserver_data_cb has more to do: call it again */
    int data_requested;             /* another thread asked for a call (atomic) */
    int64_t data_timer_ns;          /* a run that asks for it is followed by one this late */
    int64_t data_deadline;          /* CLOCK_MONOTONIC ns of that run; 0: none */
    uint64_t data_runs;             /* data path runs (vfuserver_data_cb or net_run) */
    struct vfuserver_net_run *net_run;  /* NULL, or the run that goes first, without
                                           Python (vfuserver_native_data_run) */

    /* answering fast-path region accesses on the serving thread (serve.c vfuserver_direct) */
    uint8_t direct_enabled;         /* 0: every message goes through vfu_run_ctx */
    uint8_t held;                   /* vfu_run_ctx holds a request (EBUSY) until quiesced */
    uint64_t direct;                /* messages answered without libvfio-user */
};

/* Legacy common header (virtio_pci.h VIRTIO_PCI_*): the register each byte belongs to,
   as its start offset; the width follows from the next start. */
static const uint8_t legacy_register_start[24] = {
    0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 14, 14, 16, 16, 18, 19, 20, 20, 22, 22,
};
static const uint8_t legacy_register_width[24] = {
    4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 2, 1, 1, 2, 2, 2, 2,
};
#define LEGACY_HOST_FEATURES 0
#define LEGACY_GUEST_FEATURES 4
#define LEGACY_QUEUE_PFN 8
#define LEGACY_QUEUE_NUM 12
#define LEGACY_QUEUE_SEL 14
#define LEGACY_STATUS 18
#define LEGACY_MSI_CONFIG_VECTOR 20
#define LEGACY_MSI_QUEUE_VECTOR 22
#define LEGACY_STATUS_ACKNOWLEDGE_DRIVER 0x3
#define LEGACY_NO_VECTOR 0xFFFF

#define IMAGE_LOAD(d, field) __atomic_load_n(&(d)->image.field, __ATOMIC_RELAXED)

/* Start a read of the image: its sequence number, or an odd one while it changes. */
static uint32_t image_read_begin(struct vfuserver_dev *d)
{
    return __atomic_load_n(&d->image_seq, __ATOMIC_ACQUIRE);
}

/* Whether what was read since image_read_begin returned `seq` is one image. */
static int image_read_valid(struct vfuserver_dev *d, uint32_t seq)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return !(seq & 1) && __atomic_load_n(&d->image_seq, __ATOMIC_RELAXED) == seq;
}

/* Copy `n` config bytes at `at` out of the image; 0 if they are not all in it (the model
   answers: read_config refuses them). */
static int image_config(struct vfuserver_dev *d, char *buf, size_t n, uint64_t at)
{
    uint32_t len = IMAGE_LOAD(d, config_len);
    if (len > VFUSERVER_IMAGE_CONFIG || n == 0 || n > len || at > len - n) {
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        buf[i] = (char)__atomic_load_n(&d->image.config[at + i], __ATOMIC_RELAXED);
    }
    return 1;
}

/* The value of the per-queue register at `reg` for the selected queue, as
   LegacyInterface._queue_pfn/_queue_num/_queue_vector give it; -1: the model answers. */
static int64_t legacy_queue_register(struct vfuserver_dev *d, uint32_t reg)
{
    uint16_t sel = __atomic_load_n(&d->legacy_queue_sel, __ATOMIC_ACQUIRE);
    if (sel >= IMAGE_LOAD(d, legacy_queues)) {
        /* a queue the device lacks: no address, size 0, and the vector QEMU keeps for it */
        if (reg != LEGACY_MSI_QUEUE_VECTOR) {
            return 0;
        }
        return IMAGE_LOAD(d, legacy_absent_vectors) ? -1 : LEGACY_NO_VECTOR;
    }
    if (sel >= VFUSERVER_IMAGE_QUEUES) {
        return -1;
    }
    switch (reg) {
    case LEGACY_QUEUE_PFN: return IMAGE_LOAD(d, legacy_queue_pfn[sel]);
    case LEGACY_QUEUE_NUM: return IMAGE_LOAD(d, legacy_queue_num[sel]);
    default: return IMAGE_LOAD(d, legacy_queue_vector[sel]);
    }
}

/* A legacy BAR0 read (devices/legacy.py legacy_common_read, legacy_device_read): the
   register's low bytes, all ones inside a register, config bytes; ISR, QUEUE_NOTIFY and
   anything the owner refuses miss. Only while settled: otherwise the read makes a fresh
   device a legacy one, which the model does. */
static ssize_t fast_legacy_read(struct vfuserver_dev *d, char *buf, size_t n, uint64_t off)
{
    if (!__atomic_load_n(&d->settled, __ATOMIC_ACQUIRE)) {
        return FAST_MISS;
    }
    uint32_t seq = image_read_begin(d);
    if (!IMAGE_LOAD(d, legacy)) {
        return FAST_MISS;
    }
    uint64_t start = IMAGE_LOAD(d, legacy_config_offset);
    uint64_t slot;
    if (start > VFUSERVER_LEGACY_CONFIG_SLOT) {
        return FAST_MISS;
    }
    if (off >= start) {
        if (!image_config(d, buf, n, off - start)) {
            return FAST_MISS;
        }
        slot = VFUSERVER_LEGACY_CONFIG_SLOT;
    } else {
        uint32_t reg = legacy_register_start[off];
        if (n == 0 || off + n > reg + legacy_register_width[off]) {
            return FAST_MISS;       /* not within one register: the owner fails it */
        }
        int64_t value;
        if (off != reg) {
            value = -1;             /* QEMU: an offset that starts no register, all ones */
        } else {
            switch (reg) {
            case LEGACY_HOST_FEATURES: value = IMAGE_LOAD(d, legacy_host_features); break;
            case LEGACY_GUEST_FEATURES: value = IMAGE_LOAD(d, legacy_guest_features); break;
            case LEGACY_QUEUE_SEL:
                value = __atomic_load_n(&d->legacy_queue_sel, __ATOMIC_ACQUIRE);
                break;
            case LEGACY_STATUS: value = __atomic_load_n(&d->status, __ATOMIC_ACQUIRE); break;
            case LEGACY_MSI_CONFIG_VECTOR: value = IMAGE_LOAD(d, legacy_config_vector); break;
            case LEGACY_QUEUE_PFN:
            case LEGACY_QUEUE_NUM:
            case LEGACY_MSI_QUEUE_VECTOR:
                value = legacy_queue_register(d, reg);
                if (value < 0) {
                    return FAST_MISS;
                }
                break;
            default:
                return FAST_MISS;   /* QUEUE_NOTIFY (the notify address), ISR (clears) */
            }
        }
        for (size_t i = 0; i < n; i++) {
            buf[i] = (char)((uint64_t)value >> (8 * i));   /* little-endian, truncated */
        }
        slot = off;
    }
    if (!image_read_valid(d, seq)) {
        return FAST_MISS;
    }
    __atomic_fetch_add(&d->legacy_fast_reads[slot], 1, __ATOMIC_RELAXED);
    return (ssize_t)n;
}

/* A legacy BAR0 write the fast path can do (devices/legacy.py legacy_common_write):
   QUEUE_SEL below VIRTIO_QUEUE_MAX while settled (otherwise the write makes a fresh
   device a legacy one), and a STATUS write of the current nonzero status, which
   virtio_set_status stores unchanged (ACK|DRIVER only with bus mastering on: QEMU
   turns it on). Everything else misses. */
static ssize_t fast_legacy_write(struct vfuserver_dev *d, const char *buf, size_t n,
                                 uint64_t off)
{
    uint32_t seq = image_read_begin(d);
    if (!IMAGE_LOAD(d, legacy)) {
        return FAST_MISS;
    }
    if (off == LEGACY_QUEUE_SEL && (n == 1 || n == 2)) {
        uint16_t value = (uint8_t)buf[0] | (n == 2 ? (uint16_t)((uint8_t)buf[1] << 8) : 0);
        if (value >= VFUSERVER_LEGACY_QUEUE_MAX ||
            !__atomic_load_n(&d->settled, __ATOMIC_ACQUIRE)) {
            return FAST_MISS;       /* ignored and counted by the model, or a mode change */
        }
        __atomic_store_n(&d->legacy_queue_sel, value, __ATOMIC_RELEASE);
    } else if (off == LEGACY_STATUS && n == 1) {
        uint8_t value = (uint8_t)buf[0];
        if (value == 0 || value != __atomic_load_n(&d->status, __ATOMIC_ACQUIRE) ||
            (value == LEGACY_STATUS_ACKNOWLEDGE_DRIVER && !IMAGE_LOAD(d, legacy_bus_master)) ||
            !image_read_valid(d, seq)) {
            return FAST_MISS;
        }
    } else {
        return FAST_MISS;
    }
    __atomic_fetch_add(&d->legacy_fast_writes[off], 1, __ATOMIC_RELAXED);
    return (ssize_t)n;
}

/* Copy the image the model built in `src` to the device, under the seqlock (the caller
   holds the device lock: one writer). */
static void vfuserver_publish_image(struct vfuserver_dev *d, const struct vfuserver_image *src)
{
    struct vfuserver_image *dst = &d->image;
    uint32_t seq = __atomic_load_n(&d->image_seq, __ATOMIC_RELAXED);
    __atomic_store_n(&d->image_seq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
#define IMAGE_STORE(field) __atomic_store_n(&dst->field, src->field, __ATOMIC_RELAXED)
    IMAGE_STORE(config_len);
    for (size_t i = 0; i < VFUSERVER_IMAGE_CONFIG; i++) {
        IMAGE_STORE(config[i]);
    }
    IMAGE_STORE(legacy);
    IMAGE_STORE(legacy_config_offset);
    IMAGE_STORE(legacy_bus_master);
    IMAGE_STORE(legacy_absent_vectors);
    IMAGE_STORE(legacy_host_features);
    IMAGE_STORE(legacy_guest_features);
    IMAGE_STORE(legacy_config_vector);
    IMAGE_STORE(legacy_queues);
    for (size_t i = 0; i < VFUSERVER_IMAGE_QUEUES; i++) {
        IMAGE_STORE(legacy_queue_pfn[i]);
        IMAGE_STORE(legacy_queue_num[i]);
        IMAGE_STORE(legacy_queue_vector[i]);
    }
#undef IMAGE_STORE
    __atomic_store_n(&d->image_seq, seq + 2, __ATOMIC_RELEASE);
}

static uint16_t vfuserver_legacy_queue_sel_load(struct vfuserver_dev *d)
{
    return __atomic_load_n(&d->legacy_queue_sel, __ATOMIC_ACQUIRE);
}

static void vfuserver_legacy_queue_sel_store(struct vfuserver_dev *d, uint16_t value)
{
    __atomic_store_n(&d->legacy_queue_sel, value, __ATOMIC_RELEASE);
}

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
        if (r->region != region || r->is_write != (int)is_write) {
            continue;
        }
        if (r->kind >= VFUSERVER_FAST_LEGACY_READ) {
            /* a range: any access that starts inside it */
            if ((uint64_t)off < r->offset || (uint64_t)off - r->offset >= r->width) {
                continue;
            }
        } else if (r->offset != (uint64_t)off || r->width != n) {
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
            if (old == 0 && !d->inline_kicks) {  /* else not taken yet, or the serving
                                                    thread runs them (vfuserver_data_cb) */
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
        case VFUSERVER_FAST_LEGACY_READ:
            if (fast_legacy_read(d, buf, n, (uint64_t)off) == FAST_MISS) {
                return FAST_MISS;
            }
            break;
        case VFUSERVER_FAST_LEGACY_WRITE:
            if (fast_legacy_write(d, buf, n, (uint64_t)off) == FAST_MISS) {
                return FAST_MISS;
            }
            break;
        case VFUSERVER_FAST_CONFIG_READ: {     /* no side effect, no mode (virtio 1.x) */
            uint32_t seq = image_read_begin(d);
            if (!image_config(d, buf, n, (uint64_t)off - r->offset) ||
                !image_read_valid(d, seq)) {
                return FAST_MISS;
            }
            break;
        }
        default:
            return FAST_MISS;
        }
        __atomic_fetch_add(&r->count, 1, __ATOMIC_RELAXED);
        return (ssize_t)n;
    }
    return FAST_MISS;
}

#endif
