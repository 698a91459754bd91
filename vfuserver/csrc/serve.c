/*
 * The serving loop of one attached client, run on a thread of its own with the GIL
 * released (vfuserver/context.py VfuContext.serve_client). Included by vfuserver.c.
 *
 * libvfio-user reads a message with blocking recv() calls and takes a short read for a
 * broken connection, so the loop hands it a message only once the whole message is queued
 * on the socket. A client that stops in the middle of a message therefore holds nothing
 * but its own device's thread, and only for message_timeout_ns; one that closes the socket
 * in the middle is noticed at once (POLLRDHUP). Either way the client is dropped: the
 * connection is shut down, its queued bytes (and any file descriptors they carry) are
 * discarded, and the next vfu_run_ctx sees EOF, resets the device (VFU_RESET_LOST_CONN)
 * and lets the next client attach.
 *
 * A whole REGION_READ or REGION_WRITE that the fast path answers is not handed to
 * libvfio-user at all: the thread reads it and sends the reply itself (vfuserver_direct),
 * one recv and one send per access instead of libvfio-user's recvmsg, recv and sendmsg
 * with its allocations. Anything else, and any access the fast path does not take, goes
 * through vfu_run_ctx, so libvfio-user's checks and error replies stay the authority.
 *
 * Messages already queued are handled back to back without a wake-up; between messages
 * the thread may poll the socket for up to poll_ns before it sleeps in poll(), with
 * poll_ns adapted as QEMU adapts an IOThread's (util/aio-posix.c adjust_polling_time).
 *
 * With inline_kicks, the thread also runs the device's data path (net_run in C where the
 * device has one and the model handed its state over, netpath.c vfuserver_net_run; else,
 * or for the rest of a run C handed back, vfuserver_data_cb in Python): the queues the
 * fast path saw kicked, and input on data_fd (a tap) while data_armed. A kick is then
 * handled without waking the event loop, and a frame the host answers at once (an ICMP
 * echo from the tap's own stack) is read right after the write that caused it, as QEMU's
 * main loop does for its own virtio-net. vfuserver_data_cb (or the run in C) says
 * whether data_fd stays armed (not while the guest has no receive buffers: its next kick
 * brings them) and whether it has more to do (a transmit burst cut at its budget: called
 * again after the next message, so a guest that transmits without pause cannot starve its
 * own register accesses).
 *
 * Other threads reach the serving thread through wake_fd: stop, and interrupts to raise
 * (vfu_irq_trigger must not race with the SET_IRQS handling inside vfu_run_ctx, which
 * replaces the eventfds; irq_lock guards that, and a thread that finds it taken leaves the
 * vector in pending_irqs for the serving thread).
 */

#include <sched.h>
#include <sys/prctl.h>

#define VFUSERVER_PEEK_BYTES 512
/* libvfio-user's SERVER_MAX_MSG_SIZE (lib/private.h): 1 MiB of data, the header and a
   region access header. It refuses a larger message without reading its body, which
   would leave the stream out of step; such a client is dropped here instead. */
#define VFUSERVER_MAX_MESSAGE (1024 * 1024 + 16 + 16)
#define VFUSERVER_POLL_GROW_START_NS 4000

enum vfuserver_serve_result {
    VFUSERVER_SERVE_DETACHED = 0,   /* the client left, or was dropped: see drop_reason */
    VFUSERVER_SERVE_STOPPED = 1,    /* vfuserver_stop() */
    VFUSERVER_SERVE_QUIESCING = 2,  /* vfu_run_ctx holds a request until quiesced */
    VFUSERVER_SERVE_REPORT = 3,     /* a callback stored an error for Python to log */
};

enum vfuserver_drop {
    VFUSERVER_DROP_NONE = 0,
    VFUSERVER_DROP_CLOSED_IN_MESSAGE = 1,   /* EOF with part of a message queued */
    VFUSERVER_DROP_STALLED = 2,             /* part of a message, nothing more for too long */
    VFUSERVER_DROP_TOO_LARGE = 3,           /* a header announcing more than the maximum */
    VFUSERVER_DROP_RUN_ERROR = 4,           /* vfu_run_ctx failed (drop_errno) */
    VFUSERVER_DROP_MALFORMED = 5,           /* a header libvfio-user cannot skip */
    VFUSERVER_DROP_REPLY_TIMEOUT = 6,       /* a reply waited reply_timeout_ms */
    VFUSERVER_DROP_SPURIOUS = 7,            /* readable without data, again and again */
};

enum vfuserver_ready {
    READY_ERROR = -1,
    READY_EMPTY = 0,
    READY_PARTIAL = 1,
    READY_WHOLE = 2,
    READY_EOF = 3,
    READY_TOO_LARGE = 4,
    READY_MALFORMED = 5,        /* a header libvfio-user cannot take: drop the client */
};

static int vfuserver_interrupt_signal(void) { return SIGRTMIN + 4; }

static void vfuserver_on_interrupt_signal(int signo) { (void)signo; }

static pthread_once_t vfuserver_once = PTHREAD_ONCE_INIT;

static void vfuserver_install_signal(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = vfuserver_on_interrupt_signal;  /* no SA_RESTART: the call fails EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(vfuserver_interrupt_signal(), &sa, NULL);
}

static int64_t vfuserver_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int vfuserver_dev_init(struct vfuserver_dev *d)
{
    pthread_once(&vfuserver_once, vfuserver_install_signal);
    d->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    d->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (d->notify_fd < 0 || d->wake_fd < 0) {
        int saved = errno;
        if (d->notify_fd >= 0) close(d->notify_fd);
        if (d->wake_fd >= 0) close(d->wake_fd);
        errno = saved;
        return -1;
    }
    pthread_mutex_init(&d->irq_lock, NULL);
    pthread_mutex_init(&d->thread_lock, NULL);
    d->data_fd = -1;
    return 0;
}

static void vfuserver_dev_destroy(struct vfuserver_dev *d)
{
    close(d->notify_fd);
    close(d->wake_fd);
    d->notify_fd = d->wake_fd = -1;
    pthread_mutex_destroy(&d->irq_lock);
    pthread_mutex_destroy(&d->thread_lock);
}

static void vfuserver_signal_eventfd(int fd)
{
    uint64_t one = 1;
    ssize_t n = write(fd, &one, sizeof(one));
    (void)n;    /* EAGAIN: the counter is full, so the reader wakes anyway */
}

static uint64_t vfuserver_take_eventfd(int fd)
{
    uint64_t value = 0;
    ssize_t n = read(fd, &value, sizeof(value));
    return n == sizeof(value) ? value : 0;
}

/* Blocking calls that only a signal interrupts (the handshake, a reply to a client that
   does not read) run between these two, so vfuserver_interrupt can reach them. */
static void vfuserver_enter_blocking(struct vfuserver_dev *d)
{
    pthread_mutex_lock(&d->thread_lock);
    d->thread = pthread_self();
    d->blocked = 1;
    pthread_mutex_unlock(&d->thread_lock);
}

static void vfuserver_leave_blocking(struct vfuserver_dev *d)
{
    pthread_mutex_lock(&d->thread_lock);
    d->blocked = 0;
    pthread_mutex_unlock(&d->thread_lock);
}

/* Interrupt the thread's blocking call, if it is in one (EINTR there). */
static int vfuserver_interrupt(struct vfuserver_dev *d)
{
    int sent = 0;
    pthread_mutex_lock(&d->thread_lock);
    if (d->blocked) {
        sent = pthread_kill(d->thread, vfuserver_interrupt_signal()) == 0;
    }
    pthread_mutex_unlock(&d->thread_lock);
    return sent;
}

static void vfuserver_stop(struct vfuserver_dev *d)
{
    __atomic_store_n(&d->stop, 1, __ATOMIC_SEQ_CST);
    vfuserver_signal_eventfd(d->wake_fd);
    vfuserver_interrupt(d);
}

/* vfu_attach_ctx, interruptible: the handshake reads the client's VERSION with blocking
   calls, so a silent client is cut off by vfuserver_interrupt after a timeout. */
static int vfuserver_attach(vfu_ctx_t *ctx, struct vfuserver_dev *d)
{
    vfuserver_enter_blocking(d);
    int ret = vfu_attach_ctx(ctx);
    int saved = errno;
    vfuserver_leave_blocking(d);
    errno = saved;
    return ret;
}

/* vfu_irq_trigger, counted when it signalled the client's eventfd. */
static int vfuserver_irq(vfu_ctx_t *ctx, struct vfuserver_dev *d, uint32_t vector)
{
    int ret = vfu_irq_trigger(ctx, vector);
    if (ret == 0) {
        __atomic_fetch_add(&d->interrupts, 1, __ATOMIC_RELAXED);
    }
    return ret;
}

/* Raise an interrupt from any thread (see the file comment). */
static int vfuserver_trigger(vfu_ctx_t *ctx, struct vfuserver_dev *d, uint32_t vector)
{
    int ret;
    if (__atomic_load_n(&d->serving, __ATOMIC_ACQUIRE) &&
        pthread_equal(pthread_self(), d->thread)) {
        return vfuserver_irq(ctx, d, vector);       /* inside vfu_run_ctx: lock held */
    }
    if (pthread_mutex_trylock(&d->irq_lock) == 0) {
        ret = vfuserver_irq(ctx, d, vector);
        pthread_mutex_unlock(&d->irq_lock);
        return ret;
    }
    if (vector >= 64 * VFUSERVER_IRQ_WORDS) {
        errno = EINVAL;
        return -1;
    }
    __atomic_fetch_or(&d->pending_irqs[vector / 64], 1ULL << (vector % 64), __ATOMIC_SEQ_CST);
    __atomic_store_n(&d->any_pending_irq, 1, __ATOMIC_SEQ_CST);
    vfuserver_signal_eventfd(d->wake_fd);
    return 0;
}

static void vfuserver_raise_pending(vfu_ctx_t *ctx, struct vfuserver_dev *d)
{
    if (!__atomic_exchange_n(&d->any_pending_irq, 0, __ATOMIC_SEQ_CST)) {
        return;
    }
    for (int word = 0; word < VFUSERVER_IRQ_WORDS; word++) {
        uint64_t vectors = __atomic_exchange_n(&d->pending_irqs[word], 0, __ATOMIC_SEQ_CST);
        while (vectors) {
            int bit = __builtin_ctzll(vectors);
            vectors &= vectors - 1;
            vfuserver_irq(ctx, d, (uint32_t)(word * 64 + bit));
        }
    }
}

/* The latest peek, when it holds a whole message from its first byte (len: that
   message's size; 0: none): what vfuserver_direct answers from. Per thread, because every
   peek of the serving loop (vfuserver_wait's adaptive polling too) goes through
   vfuserver_message_ready on the serving thread, the only reader of its socket. */
static __thread struct {
    uint32_t len;
    char buf[VFUSERVER_PEEK_BYTES];
} vfuserver_peeked;

/* Whether a whole message is queued on fd, with one peek in the common case. */
static int vfuserver_message_ready(int fd, uint32_t *size)
{
    char *buf = vfuserver_peeked.buf;
    struct vfio_user_header hdr;
    ssize_t n = recv(fd, buf, sizeof(vfuserver_peeked.buf), MSG_PEEK | MSG_DONTWAIT);
    int queued;

    vfuserver_peeked.len = 0;
    if (n < 0) {
        return errno == EAGAIN || errno == EWOULDBLOCK ? READY_EMPTY : READY_ERROR;
    }
    if (n == 0) {
        return READY_EOF;
    }
    if ((size_t)n < sizeof(hdr)) {
        /* a peek stops at a buffer of file descriptors: count what is queued */
        if (ioctl(fd, FIONREAD, &queued) < 0) {
            return READY_ERROR;
        }
        /* a header cut by file descriptors: libvfio-user reads it in one recvmsg and would
           take the short read for a reset connection */
        return (size_t)queued < sizeof(hdr) ? READY_PARTIAL : READY_MALFORMED;
    }
    memcpy(&hdr, buf, sizeof(hdr));
    *size = hdr.msg_size;
    if (hdr.msg_size > VFUSERVER_MAX_MESSAGE) {
        return READY_TOO_LARGE;
    }
    /* libvfio-user's is_valid_header refuses these without reading the body, which would
       leave the body to be read as the next header: the stream can only be dropped. */
    if (hdr.flags.type != VFIO_USER_F_TYPE_COMMAND || hdr.msg_size < sizeof(hdr) ||
        (hdr.msg_size == sizeof(hdr) && hdr.cmd != VFIO_USER_DEVICE_RESET)) {
        return READY_MALFORMED;
    }
    if (hdr.msg_size <= (size_t)n) {
        vfuserver_peeked.len = hdr.msg_size;
        return READY_WHOLE;     /* a size below the header's is libvfio-user's to refuse */
    }
    /* A peek stops at a buffer of file descriptors and at its own size: count it all. */
    if (ioctl(fd, FIONREAD, &queued) < 0) {
        return READY_ERROR;
    }
    return (size_t)queued >= hdr.msg_size ? READY_WHOLE : READY_PARTIAL;
}

/* Cut the client off: shut the connection down and discard what it queued, so that the
   next vfu_run_ctx reads EOF and libvfio-user resets the device. */
static void vfuserver_cut_off(int fd)
{
    char scratch[4096];
    shutdown(fd, SHUT_RDWR);
    while (recv(fd, scratch, sizeof(scratch), MSG_DONTWAIT) > 0) {
        /* file descriptors in the discarded messages are closed by the kernel */
    }
}

static int vfuserver_run_one(vfu_ctx_t *ctx, struct vfuserver_dev *d)
{
    vfuserver_enter_blocking(d);    /* the reply may block on a client that does not read */
    pthread_mutex_lock(&d->irq_lock);
    int ret = vfu_run_ctx(ctx);
    int saved = errno;
    if (ret < 0 && saved == EBUSY) {
        d->held = 1;    /* nothing is answered before the held request: vfuserver_direct */
    }
    pthread_mutex_unlock(&d->irq_lock);
    vfuserver_leave_blocking(d);
    errno = saved;
    return ret;
}

enum vfuserver_direct_result {
    DIRECT_DECLINED = 0,        /* not taken: the message is vfu_run_ctx's */
    DIRECT_ANSWERED = 1,        /* read and answered; a reply cut short by vfuserver_stop
                                   (EINTR) is lost, as it is in vfu_run_ctx */
    DIRECT_PEER_GONE = 2,       /* the reply found the connection closed */
    DIRECT_REPLY_TIMEOUT = 3,   /* the reply waited reply_timeout_ms */
    DIRECT_FAILED = 4,          /* recv or send failed otherwise (drop_errno) */
};

/* The largest access answered here; the fast registers are 1, 2 or 4 bytes wide. */
#define VFUSERVER_DIRECT_DATA 8
#define VFUSERVER_DIRECT_ACCESS (sizeof(struct vfio_user_header) + \
                                 sizeof(struct vfio_user_region_access))

/* Answer the whole message vfuserver_message_ready just peeked, if it is a region access
   the fast path takes, as libvfio-user would answer it: get_request (the header and body
   reads), handle_region_access (the region callback: the trampoline, fast_access first),
   tran_sock_reply (the header with the request's msg_id and cmd, the request's {offset,
   region, count}, the data of a read), do_reply (nothing for No_reply). What this does not
   copy exactly it declines, before fast_access has changed anything. */
static int vfuserver_direct(vfu_ctx_t *ctx, struct vfuserver_dev *d, int fd)
{
    struct vfio_user_header hdr;
    struct vfio_user_region_access access;
    char data[VFUSERVER_DIRECT_DATA] = { 0 };   /* a read's buffer is calloc'ed there too */
    const char *msg = vfuserver_peeked.buf;
    uint32_t len = vfuserver_peeked.len;

    vfuserver_peeked.len = 0;
    if (!d->direct_enabled || d->held || len < VFUSERVER_DIRECT_ACCESS) {
        return DIRECT_DECLINED;
    }
    memcpy(&hdr, msg, sizeof(hdr));
    memcpy(&access, msg + sizeof(hdr), sizeof(access));
    bool is_write = hdr.cmd == VFIO_USER_REGION_WRITE;
    if (hdr.cmd != VFIO_USER_REGION_READ && !is_write) {
        return DIRECT_DECLINED;
    }
    /* a plain command, posted (No_reply) or not; libvfio-user ignores the other bits */
    if (hdr.flags.type != VFIO_USER_F_TYPE_COMMAND || hdr.flags.error || hdr.flags.resvd ||
        hdr.error_no != 0) {
        return DIRECT_DECLINED;
    }
    /* exactly one access of count bytes: is_valid_region_access also takes a read with
       more bytes, and answers count 0 without the callback */
    if (access.count == 0 || access.count > sizeof(data) ||
        hdr.msg_size != VFUSERVER_DIRECT_ACCESS + (is_write ? access.count : 0)) {
        return DIRECT_DECLINED;
    }
    /* A BAR, whose callback is the trampoline: config space and the migration region are
       handled inside libvfio-user (region_access), and only accesses to those can need a
       quiesce (command_needs_quiesce). No migration region is set up, so no device state
       refuses a BAR access (is_valid_region_access, should_exec_command). The fast
       registers name their function's BARs, so the access is within the region. */
    if (access.region > VFU_PCI_DEV_BAR5_REGION_IDX) {
        return DIRECT_DECLINED;
    }
    if (is_write) {
        memcpy(data, msg + VFUSERVER_DIRECT_ACCESS, access.count);
    }
    pthread_mutex_lock(&d->irq_lock);   /* as around vfu_run_ctx, where the trampoline runs */
    ssize_t done = fast_access(vfu_get_private(ctx), (int)access.region, data, access.count,
                               (loff_t)access.offset, is_write);
    int access_errno = errno;
    pthread_mutex_unlock(&d->irq_lock);
    if (done == FAST_MISS) {
        return DIRECT_DECLINED;
    }

    /* Take the message off the socket: one recv, as it is queued whole. Without a control
       buffer the kernel closes the file descriptors a message carries (scm_recv), which
       libvfio-user would close after its reply (free_msg). */
    char scratch[VFUSERVER_DIRECT_ACCESS + VFUSERVER_DIRECT_DATA];
    size_t got = 0;
    while (got < hdr.msg_size) {
        ssize_t n = recv(fd, scratch + got, hdr.msg_size - got, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            d->drop_errno = n < 0 ? errno : ECONNRESET;
            return DIRECT_FAILED;
        }
        got += (size_t)n;
    }
    d->messages++;
    d->direct++;
    if (hdr.flags.no_reply) {
        return DIRECT_ANSWERED;
    }

    /* handle_region_access: a short count is EINVAL, a failure its errno; either way the
       body goes out as it is, under an error header (tran_sock_send_iovec) */
    int reply_errno = done == (ssize_t)access.count ? 0 : done >= 0 ? EINVAL : access_errno;
    struct vfio_user_header reply_hdr = { .msg_id = hdr.msg_id, .cmd = hdr.cmd };
    struct vfio_user_region_access reply_access = {
        .offset = access.offset, .region = access.region, .count = access.count,
    };
    char reply[VFUSERVER_DIRECT_ACCESS + VFUSERVER_DIRECT_DATA];
    size_t size = VFUSERVER_DIRECT_ACCESS + (is_write ? 0 : access.count);
    reply_hdr.msg_size = (uint32_t)size;
    reply_hdr.flags.type = VFIO_USER_F_TYPE_REPLY;
    if (reply_errno != 0) {
        reply_hdr.flags.error = 1;
        reply_hdr.error_no = (uint32_t)reply_errno;
    }
    memcpy(reply, &reply_hdr, sizeof(reply_hdr));
    memcpy(reply + sizeof(reply_hdr), &reply_access, sizeof(reply_access));
    memcpy(reply + VFUSERVER_DIRECT_ACCESS, data, size - VFUSERVER_DIRECT_ACCESS);

    vfuserver_enter_blocking(d);    /* a client that does not read: vfuserver_stop cuts in */
    ssize_t sent = send(fd, reply, size, MSG_NOSIGNAL);
    int send_errno = errno;
    vfuserver_leave_blocking(d);
    if (sent == (ssize_t)size || (sent < 0 && send_errno == EINTR)) {
        return DIRECT_ANSWERED;
    }
    /* tran_sock_send_iovec: EPIPE or a short write is ECONNRESET, and do_reply resets */
    if (sent >= 0 || send_errno == EPIPE || send_errno == ECONNRESET) {
        return DIRECT_PEER_GONE;
    }
    if (send_errno == EAGAIN || send_errno == EWOULDBLOCK) {
        return DIRECT_REPLY_TIMEOUT;
    }
    d->drop_errno = send_errno;
    return DIRECT_FAILED;
}

static void vfuserver_set_reply_timeout(int fd, int64_t ms)
{
    struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

/* The data path's timer (DATA_TIMER: a lingering transmit queue) has run out. */
static int vfuserver_data_timer_due(struct vfuserver_dev *d)
{
    return d->data_deadline && vfuserver_now_ns() >= d->data_deadline;
}

/* Wait for the socket or wake_fd; adaptive polling first. Returns READY_* of the socket
   as last seen, or READY_EMPTY when woken for something else. */
static int vfuserver_wait(int fd, struct vfuserver_dev *d, int partial, int64_t deadline,
                          int backoff_ms, uint32_t *size, int *fd_readable,
                          int *data_readable)
{
    int data = d->inline_kicks && d->data_fd >= 0 && d->data_armed;
    struct pollfd fds[3] = {
        { .fd = fd, .events = partial ? POLLRDHUP : (POLLIN | POLLRDHUP) },
        { .fd = d->wake_fd, .events = POLLIN },
        { .fd = data ? d->data_fd : -1, .events = POLLIN },
    };
    int64_t start = vfuserver_now_ns();
    int64_t timeout_ns = -1;    /* ppoll's: -1 waits without end */

    *data_readable = 0;
    if (!partial && d->poll_ns > 0 && !d->data_again) {
        int64_t until = start + d->poll_ns;
        do {
            /* the caller has just looked: a client on this CPU gets to send first */
            sched_yield();
            int state = vfuserver_message_ready(fd, size);
            if (state != READY_EMPTY) {
                d->polled++;
                return state;
            }
            if (__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE) ||
                __atomic_load_n(&d->any_pending_irq, __ATOMIC_ACQUIRE)) {
                return READY_EMPTY;
            }
            if (data && poll(&fds[2], 1, 0) == 1) {
                *data_readable = 1;
                return READY_EMPTY;
            }
            if (vfuserver_data_timer_due(d)) {
                return READY_EMPTY;
            }
        } while (vfuserver_now_ns() < until);
    }
    if (partial) {
        /* poll() cannot wait for "more bytes" on AF_UNIX (no SO_RCVLOWAT there): look
           again after backoff_ms until the deadline; EOF still wakes it at once */
        int64_t left_ms = (deadline - start) / 1000000;
        timeout_ns = (left_ms <= 0 ? 0 : (left_ms < backoff_ms ? left_ms : backoff_ms))
                     * 1000000;
    }
    if (d->data_again) {
        timeout_ns = 0; /* the data path has more to do: only look whether a message came */
    }
    if (d->data_deadline) {
        int64_t left = d->data_deadline - vfuserver_now_ns();
        left = left < 0 ? 0 : left;
        timeout_ns = timeout_ns < 0 || left < timeout_ns ? left : timeout_ns;
    }
    struct timespec ts = { .tv_sec = timeout_ns / 1000000000,
                           .tv_nsec = timeout_ns % 1000000000 };
    *fd_readable = 0;
    int n = ppoll(fds, 3, timeout_ns < 0 ? NULL : &ts, NULL);
    d->wakeups++;
    if (n < 0) {
        return errno == EINTR ? READY_EMPTY : READY_ERROR;
    }
    if (!partial && d->poll_max_ns > 0) {
        int64_t block_ns = vfuserver_now_ns() - start;
        if (block_ns > d->poll_max_ns) {
            d->poll_ns = 0;
        } else if (d->poll_ns < d->poll_max_ns) {
            d->poll_ns = d->poll_ns ? d->poll_ns * 2 : VFUSERVER_POLL_GROW_START_NS;
            if (d->poll_ns > d->poll_max_ns) {
                d->poll_ns = d->poll_max_ns;
            }
        }
    }
    if (fds[1].revents & POLLIN) {
        vfuserver_take_eventfd(d->wake_fd);
    }
    *fd_readable = (fds[0].revents & POLLIN) != 0;
    *data_readable = (fds[2].revents & (POLLIN | POLLERR | POLLHUP)) != 0;
    if (partial && (fds[0].revents & (POLLRDHUP | POLLHUP | POLLERR))) {
        return READY_EOF;
    }
    return READY_EMPTY;
}

static int vfuserver_finish(struct vfuserver_dev *d, int result)
{
    __atomic_store_n(&d->serving, 0, __ATOMIC_RELEASE);
    return result;
}

static int vfuserver_drop(vfu_ctx_t *ctx, struct vfuserver_dev *d, int fd, int reason)
{
    d->drop_reason = reason;
    if (vfu_get_poll_fd(ctx) == fd) {   /* still the connection (not closed and reused) */
        vfuserver_cut_off(fd);
        vfuserver_run_one(ctx, d);      /* EOF: libvfio-user resets the device, detaches */
    }
    return vfuserver_finish(d, VFUSERVER_SERVE_DETACHED);
}

/* vfu_device_quiesced under irq_lock (it may run a held reset, which closes the interrupt
   eventfds): 0, -1 with errno, or 1 if the connection went with it. */
static int vfuserver_quiesced(vfu_ctx_t *ctx, struct vfuserver_dev *d)
{
    int fd = vfu_get_poll_fd(ctx);
    vfuserver_enter_blocking(d);
    pthread_mutex_lock(&d->irq_lock);
    int ret = vfu_device_quiesced(ctx, 0);
    int saved = errno;
    d->held = 0;        /* libvfio-user ran (or dropped) the held request */
    pthread_mutex_unlock(&d->irq_lock);
    vfuserver_leave_blocking(d);
    if (vfu_get_poll_fd(ctx) != fd) {
        vfuserver_finish(d, VFUSERVER_SERVE_DETACHED);
        return 1;
    }
    errno = saved;
    return ret < 0 ? -1 : 0;
}

/* Whether the data path has work: kicks taken by the fast path, or a call asked for. */
static int vfuserver_data_due(struct vfuserver_dev *d)
{
    return d->inline_kicks && (__atomic_load_n(&d->pending_notify, __ATOMIC_ACQUIRE) ||
                               d->data_again ||
                               __atomic_load_n(&d->data_requested, __ATOMIC_ACQUIRE) ||
                               vfuserver_data_timer_due(d));
}

/* Ask the serving thread for a call of the data path (from any thread). */
static void vfuserver_request_data(struct vfuserver_dev *d)
{
    __atomic_store_n(&d->data_requested, 1, __ATOMIC_RELEASE);
    vfuserver_signal_eventfd(d->wake_fd);
}

static int vfuserver_native_data_run(vfu_ctx_t *ctx, struct vfuserver_dev *d);

/* One run of the device's data path: in C (net_run) where it can, else, or for the rest
   of it, the Python callback (with the GIL). Returns nonzero if a callback stored an
   error for Python to report. */
static int vfuserver_run_data(vfu_ctx_t *ctx, struct vfuserver_dev *d)
{
    __atomic_store_n(&d->data_requested, 0, __ATOMIC_RELEASE);
    int flags = vfuserver_native_data_run(ctx, d);
    if (flags == VFUSERVER_RUN_PYTHON) {
        flags = vfuserver_data_cb(ctx);
    }
    d->data_runs++;
    if (flags < 0) {
        /* a bug, logged by the callback: stop reading input rather than spin on it */
        d->data_armed = 0;
        d->data_again = 0;
    } else {
        d->data_armed = (flags & 1) != 0;
        d->data_again = (flags & 2) != 0;
    }
    /* bit 2: run again after data_timer_ns even if nothing else comes (a transmit queue
       left without notifications, as QEMU's tx timer: virtio_net_handle_tx_timer) */
    d->data_deadline = flags > 0 && (flags & 4) ? vfuserver_now_ns() + d->data_timer_ns : 0;
    return __atomic_exchange_n(&d->report, 0, __ATOMIC_ACQ_REL);
}

/* Serve the attached client until it leaves (or is dropped), vfuserver_stop() is called,
   a deferred quiesce holds a request, or a callback stored an error (enum
   vfuserver_serve_result). Called again after QUIESCING and REPORT. */
static int vfuserver_serve(vfu_ctx_t *ctx, struct vfuserver_dev *d)
{
    int fd = vfu_get_poll_fd(ctx);
    /* The data timer (150 us) and the poll backoff are ns timeouts of ppoll: Linux lets
       a timer expire up to the thread's timer slack late, 50 us by default, a third of
       the tx timer, and a guest's next frame waits that long. QEMU takes the slack to
       1 ns for the same reason (util/qemu-timer.c, init_clocks). The thread keeps it
       after the session (a pooled worker thread): only its timers fire sooner. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    int64_t partial_deadline = 0;
    uint32_t size = 0;

    pthread_mutex_lock(&d->thread_lock);
    d->thread = pthread_self();
    pthread_mutex_unlock(&d->thread_lock);
    __atomic_store_n(&d->serving, 1, __ATOMIC_RELEASE);
    vfuserver_set_reply_timeout(fd, d->reply_timeout_ms);
    /* out-of-band data (AF_UNIX has it since Linux 5.15) would keep poll() readable with
       nothing to peek: keep it in the stream, where it is just a malformed message */
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof(one));
    int spurious = 0;
    int backoff_ms = 1;

    for (;;) {
        if (__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE)) {
            return vfuserver_finish(d, VFUSERVER_SERVE_STOPPED);
        }
        vfuserver_raise_pending(ctx, d);
        if (vfuserver_data_due(d) && vfuserver_run_data(ctx, d)) {
            return VFUSERVER_SERVE_REPORT;
        }
        int state = vfuserver_message_ready(fd, &size);
        for (;;) {
            if (state == READY_WHOLE || state == READY_EOF) {
                partial_deadline = 0;
                spurious = 0;
                backoff_ms = 1;
                int direct = state == READY_WHOLE ? vfuserver_direct(ctx, d, fd)
                                                  : DIRECT_DECLINED;
                if (direct == DIRECT_ANSWERED) {
                    break;
                }
                if (direct == DIRECT_PEER_GONE) {
                    /* what libvfio-user's reset does: the device is reset, the client gone */
                    return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_NONE);
                }
                if (direct == DIRECT_REPLY_TIMEOUT) {
                    return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_REPLY_TIMEOUT);
                }
                if (direct == DIRECT_FAILED) {
                    return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_RUN_ERROR);
                }
                int ret = vfuserver_run_one(ctx, d);
                int err = errno;
                d->messages++;
                if (vfu_get_poll_fd(ctx) != fd) {
                    /* libvfio-user closed the connection (a reply to a client that had
                       gone, EOF): the fd number is no longer ours to touch */
                    return vfuserver_finish(d, VFUSERVER_SERVE_DETACHED);
                }
                if (ret < 0) {
                    if (err == ENOTCONN) {
                        return vfuserver_finish(d, VFUSERVER_SERVE_DETACHED);
                    }
                    if (err == EBUSY) {
                        return VFUSERVER_SERVE_QUIESCING;
                    }
                    if (err == EAGAIN || err == EWOULDBLOCK) {
                        /* only the reply can time out: the message was queued whole */
                        return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_REPLY_TIMEOUT);
                    }
                    if (err != EINTR) {
                        d->drop_errno = err;
                        return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_RUN_ERROR);
                    }
                }
                if (__atomic_exchange_n(&d->report, 0, __ATOMIC_ACQ_REL)) {
                    return VFUSERVER_SERVE_REPORT;
                }
                break;  /* back to the top: stop, pending interrupts, the next message */
            }
            if (state == READY_MALFORMED) {
                return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_MALFORMED);
            }
            if (state == READY_TOO_LARGE) {
                d->drop_size = size;
                return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_TOO_LARGE);
            }
            if (state == READY_ERROR) {
                d->drop_errno = errno;
                return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_RUN_ERROR);
            }
            int partial = state == READY_PARTIAL;
            if (partial) {
                int64_t now = vfuserver_now_ns();
                if (partial_deadline == 0) {
                    partial_deadline = now + d->message_timeout_ns;
                } else if (now >= partial_deadline) {
                    return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_STALLED);
                }
            }
            int readable = 0;
            int data_readable = 0;
            int seen = vfuserver_wait(fd, d, partial, partial_deadline, backoff_ms, &size,
                                      &readable, &data_readable);
            if (data_readable || vfuserver_data_due(d)) {
                /* between messages (a partial one waits in the kernel, untouched) */
                if (vfuserver_run_data(ctx, d)) {
                    return VFUSERVER_SERVE_REPORT;
                }
            }
            if (partial && backoff_ms < 64) {
                backoff_ms *= 2;    /* 1, 2, 4 ... 64 ms: a stalled client costs ~20 wake-ups/s */
            }
            if (!partial && seen == READY_EMPTY && readable &&
                vfuserver_message_ready(fd, &size) == READY_EMPTY && ++spurious > 1000) {
                /* poll() says readable and there is nothing to read, over and over */
                return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_SPURIOUS);
            }
            if (partial && seen == READY_EOF) {
                /* the client closed with part of a message queued */
                if (vfuserver_message_ready(fd, &size) != READY_WHOLE) {
                    return vfuserver_drop(ctx, d, fd, VFUSERVER_DROP_CLOSED_IN_MESSAGE);
                }
                state = READY_WHOLE;
                continue;
            }
            if (seen == READY_ERROR) {
                state = READY_ERROR;
                continue;
            }
            if (seen != READY_EMPTY) {
                state = seen;
                continue;
            }
            break;      /* woken: re-check stop and interrupts, then the socket */
        }
    }
}

static void vfuserver_isr_set(struct vfuserver_dev *d, uint8_t bits)
{
    __atomic_fetch_or(&d->isr, bits, __ATOMIC_SEQ_CST);
}

static uint8_t vfuserver_isr_take(struct vfuserver_dev *d)
{
    return __atomic_exchange_n(&d->isr, 0, __ATOMIC_SEQ_CST);
}

static uint8_t vfuserver_isr_peek(struct vfuserver_dev *d)
{
    return __atomic_load_n(&d->isr, __ATOMIC_SEQ_CST);
}

static void vfuserver_isr_store(struct vfuserver_dev *d, uint8_t value)
{
    __atomic_store_n(&d->isr, value, __ATOMIC_SEQ_CST);
}

static uint64_t vfuserver_take_notifies(struct vfuserver_dev *d)
{
    return __atomic_exchange_n(&d->pending_notify, 0, __ATOMIC_SEQ_CST);
}

static void vfuserver_publish(struct vfuserver_dev *d, uint8_t status, uint8_t io_enabled,
                              uint8_t settled, uint64_t active_queues, uint8_t fast_enabled)
{
    __atomic_store_n(&d->status, status, __ATOMIC_RELEASE);
    __atomic_store_n(&d->io_enabled, io_enabled, __ATOMIC_RELEASE);
    __atomic_store_n(&d->settled, settled, __ATOMIC_RELEASE);
    __atomic_store_n(&d->active_queues, active_queues, __ATOMIC_RELEASE);
    __atomic_store_n(&d->fast_enabled, fast_enabled, __ATOMIC_RELEASE);
}
