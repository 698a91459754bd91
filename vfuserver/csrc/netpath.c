/*
 * The per-frame work of virtio-net's data path in C: the split-ring walk, the copies
 * between guest buffers and a tap, the used ring and the interrupt decision, for the
 * frames a running Linux driver sends and receives all the time. Included by
 * vfuserver.c; called from Python (vfuserver/netpath.py) on the serving thread, under the
 * device lock, with the state of each queue copied in from and back to its VirtQueue
 * (devices/virtqueue.py), which stays the one source of truth.
 *
 * The rule that keeps the two paths the same: C takes a chain only if it can complete it
 * exactly as VirtQueue and VirtioNet would, and otherwise stops *before* touching it
 * (VFUSERVER_NET_STOPPED): the Python model then goes on from the same state, pops that
 * chain itself and raises its error (a descriptor loop, a buffer outside the maps, a
 * transmit chain shorter than the header), handles the case C leaves out (a buffer across
 * two maps, an indirect table across maps, a checksum to finish, a GSO frame the guest
 * cannot take, a filtered frame) or, for a tap that would block, queues the frame.
 * tests/server/test_netpath.py drives both paths with the same rings and compares guest
 * memory, queue state, frames and counters.
 *
 * Guest memory is reached through the maps Python publishes (struct vfuserver_memory); a
 * page the client took away is covered by the SIGBUS guard, and the lost count is checked
 * before a batch is published, as VirtQueue.flush does.
 */

#include <sys/uio.h>

#define VFUSERVER_NET_MAPS 64           /* more maps than this: the Python path */
#define VFUSERVER_CHAIN_IOV 32          /* buffers of one chain taken here (Linux: at most
                                           MAX_SKB_FRAGS + 2) */

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_F_DATA_VALID 2
#define VIRTIO_NET_HDR_GSO_ECN 0x80
#define VFUSERVER_NET_HDR_LEN 12
#define VFUSERVER_ETH_HLEN 14

struct vfuserver_map {
    uint64_t iova;
    uint64_t size;
    uintptr_t host;
    uint32_t writable;
};

struct vfuserver_memory {
    uint32_t nmaps;
    struct vfuserver_map maps[VFUSERVER_NET_MAPS];
    vfuserver_lost_pages_t *lost;   /* the device's SIGBUS guard count (may be NULL) */
};

/* One split virtqueue as VirtQueue holds it (its attribute of the same name). */
struct vfuserver_vq {
    uint32_t size;
    uint64_t desc_addr, avail_addr, used_addr;
    uint8_t event_idx;
    uint8_t notification;           /* _notification */
    uint64_t max_chain_bytes;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint16_t signalled_used;        /* _signalled_used */
    uint8_t signalled_used_valid;   /* _signalled_used_valid */
    uint64_t lost_seen;             /* _lost_seen */
    uint32_t pending_used;          /* _pending_used: pushed, not yet published */
    /* its RingJournal (devices/ring_journal.py), or NULL: the element stored for each
       16-bit used index, and the used index last published */
    uint64_t *journal_entries;
    uint32_t *journal_published;
};

struct vfuserver_chain {
    uint16_t head;
    uint32_t nr, nw;
    uint64_t rlen, wlen;
    struct iovec rd[VFUSERVER_CHAIN_IOV];
    struct iovec wr[VFUSERVER_CHAIN_IOV];
};

struct vfuserver_net_tx {
    int fd;                         /* the tap */
    uint32_t hdr_len;               /* the guest's virtio-net header: 10 or 12 */
    uint8_t peer_vnet_hdr;          /* the tap takes a 12-byte virtio_net_hdr */
    uint8_t link_up;
    uint8_t publish;                /* publish the used entries at the end (else they
                                       wait for the model's next flush) */
};

struct vfuserver_net_rx {
    int fd;                         /* the tap */
    uint8_t *buf;                   /* NET_BUFSIZE bytes: the frame read last */
    uint32_t buf_size;
    struct vfuserver_chain *chains; /* scratch: the chains of one frame */
    uint32_t max_chains;            /* a frame needing more is Python's */
    uint32_t hdr_len;               /* the guest's virtio-net header: 10 or 12 */
    uint8_t peer_vnet_hdr;
    uint8_t mergeable;              /* VIRTIO_NET_F_MRG_RXBUF */
    uint8_t guest_csum;             /* the guest takes partial checksums */
    uint8_t promisc;                /* RxFilter: accept every frame */
    uint8_t vlan_filter;            /* CTRL_VLAN filtering: a tagged frame is Python's */
    uint8_t nouni, nobcast;
    uint8_t mac[6];
    uint32_t max_frame;             /* MTU in use: a longer non-GSO frame is Python's (0:
                                       none) */
    uint32_t gso_types;             /* bit t: the guest takes GSO type t (guest_gso_types);
                                       another GSO frame is Python's (it drops it) */
    uint8_t gso_ecn;                /* ... with the ECN bit too */
};

/* What vfuserver_net_tx / vfuserver_net_rx return. */
#define VFUSERVER_NET_DONE 0        /* the ring (or the tap) has nothing more, or limit */
#define VFUSERVER_NET_STOPPED 1     /* the next chain is Python's: go on from the state */
#define VFUSERVER_NET_FRAME 2       /* receive: the frame in buf (frame_len) is Python's */
#define VFUSERVER_NET_ERROR 3       /* receive: read() failed (error) */

struct vfuserver_net_result {
    uint32_t done;                  /* frames (tx: chains) completed here */
    uint8_t interrupt;              /* the batch was published and the driver wants to
                                       be told (VirtQueue.flush's answer) */
    uint32_t frame_len;             /* VFUSERVER_NET_FRAME: bytes read into buf */
    int error;                      /* VFUSERVER_NET_ERROR: errno */
    uint64_t packets, bytes;        /* the model's counters (tx_ or rx_) */
    uint64_t dropped;               /* tx: empty frames (tx_dropped) */
    uint64_t peer_frames, peer_bytes, peer_dropped;  /* the backend's counters */
    uint8_t gso;                    /* receive: a GSO frame was placed (VirtioNet.rx_busy) */
};

/* The host address of [addr, addr + len) inside one map, or NULL (GuestMemory.view). */
static void *vfuserver_gpa(const struct vfuserver_memory *m, uint64_t addr, uint64_t len,
                           int writable)
{
    for (uint32_t i = 0; i < m->nmaps; i++) {
        const struct vfuserver_map *map = &m->maps[i];
        if (addr >= map->iova && addr - map->iova <= map->size &&
            len <= map->size - (addr - map->iova)) {
            if (writable && !map->writable) {
                return NULL;
            }
            return (void *)(map->host + (addr - map->iova));
        }
    }
    return NULL;
}

static uint16_t vfuserver_load16(const void *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

static void vfuserver_store16(void *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}

/* The three ring areas, each inside one map (else the queue is Python's). */
struct vfuserver_rings {
    const uint8_t *desc;
    const uint8_t *avail;
    uint8_t *used;
};

static int vfuserver_rings(const struct vfuserver_memory *m, const struct vfuserver_vq *vq,
                           struct vfuserver_rings *r)
{
    uint64_t n = vq->size;
    if (n == 0 || (n & (n - 1)) != 0) {
        return 0;
    }
    r->desc = vfuserver_gpa(m, vq->desc_addr, 16 * n, 0);
    r->avail = vfuserver_gpa(m, vq->avail_addr, 6 + 2 * n, 0);
    r->used = vfuserver_gpa(m, vq->used_addr, 6 + 8 * n, 1);
    return r->desc && r->avail && r->used;
}

/* Chains available (VirtQueue._pending_in), or -1 for an index the Python path refuses. */
static int vfuserver_pending(const struct vfuserver_vq *vq, const struct vfuserver_rings *r)
{
    uint16_t avail_idx = vfuserver_load16(r->avail + 2);
    uint16_t pending = (uint16_t)(avail_idx - vq->last_avail_idx);
    if (pending > vq->size) {
        return -1;
    }
    if (pending) {
        vfuserver_smp_rmb();
    }
    return pending;
}

/* Walk the chain at head as VirtQueue._walk does; 0 where it would raise, or where it
   would need more than one map for a buffer or a table (the Python path's). */
static int vfuserver_walk(const struct vfuserver_memory *m, const struct vfuserver_vq *vq,
                          const struct vfuserver_rings *r, uint16_t head,
                          struct vfuserver_chain *c)
{
    const uint8_t *table = r->desc;
    uint32_t limit = vq->size, steps = 0, descriptors = 0, idx = head;
    int in_indirect = 0, seen_writable = 0;
    uint64_t total = 0;

    c->head = head;
    c->nr = c->nw = 0;
    c->rlen = c->wlen = 0;
    for (;;) {
        if (++steps > limit) {
            /* a loop (or longer than the table): Python names it. A count, where the model
               keeps the set of entries seen: a driver that rewrites the table during the
               walk can get a revisit through that the model would refuse, still bounded
               by the table and inside the maps (its own chain, its own mistake). */
            return 0;
        }
        struct { uint64_t addr; uint32_t len; uint16_t flags, next; } d;
        memcpy(&d, table + 16 * (uint64_t)idx, sizeof(d));     /* loaded once */
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (in_indirect || (d.flags & VRING_DESC_F_NEXT) || d.len == 0 || d.len % 16) {
                return 0;
            }
            table = vfuserver_gpa(m, d.addr, d.len, 0);
            if (table == NULL) {
                return 0;
            }
            limit = d.len / 16;
            in_indirect = 1;
            steps = 0;
            idx = 0;
            continue;
        }
        if (++descriptors > vq->size) {
            return 0;
        }
        int writable = (d.flags & VRING_DESC_F_WRITE) != 0;
        if (writable) {
            seen_writable = 1;
        } else if (seen_writable) {
            return 0;
        }
        if (d.len) {
            total += d.len;
            if (total > vq->max_chain_bytes) {
                return 0;
            }
            void *p = vfuserver_gpa(m, d.addr, d.len, writable);
            if (p == NULL) {
                return 0;
            }
            if (writable) {
                if (c->nw == VFUSERVER_CHAIN_IOV) {
                    return 0;
                }
                c->wr[c->nw++] = (struct iovec){ p, d.len };
                c->wlen += d.len;
            } else {
                if (c->nr == VFUSERVER_CHAIN_IOV) {
                    return 0;
                }
                c->rd[c->nr++] = (struct iovec){ p, d.len };
                c->rlen += d.len;
            }
        }
        if (!(d.flags & VRING_DESC_F_NEXT)) {
            return 1;
        }
        if (d.next >= limit) {
            return 0;
        }
        idx = d.next;
    }
}

/* The used ring's avail_event field (virtio 1.x §2.7.10). */
static uint8_t *vfuserver_avail_event(const struct vfuserver_vq *vq,
                                      const struct vfuserver_rings *r)
{
    return r->used + 4 + 8 * (uint64_t)vq->size;
}

/* VirtQueue.rewind of what was popped since last_avail_idx was saved_avail, and
   avail_event back to saved_event where a pop moved it: the model pops it all again. */
static void vfuserver_unpop(struct vfuserver_vq *vq, const struct vfuserver_rings *r,
                            uint16_t saved_avail, uint16_t saved_event)
{
    vq->last_avail_idx = saved_avail;
    if (vq->event_idx && vq->notification) {
        vfuserver_store16(vfuserver_avail_event(vq, r), saved_event);
    }
}

/* Pop the next chain (VirtQueue.pop): 1, 0 if none is available, -1 if it is Python's. */
static int vfuserver_pop(const struct vfuserver_memory *m, struct vfuserver_vq *vq,
                         const struct vfuserver_rings *r, struct vfuserver_chain *c)
{
    int pending = vfuserver_pending(vq, r);
    if (pending <= 0) {
        return pending;
    }
    uint32_t slot = vq->last_avail_idx & (vq->size - 1);
    uint16_t head = vfuserver_load16(r->avail + 4 + 2 * slot);
    if (head >= vq->size || !vfuserver_walk(m, vq, r, head, c)) {
        return -1;
    }
    vq->last_avail_idx++;
    if (vq->event_idx && vq->notification) {
        vfuserver_store16(vfuserver_avail_event(vq, r), vq->last_avail_idx);
    }
    return 1;
}

/* VirtQueue.push: the used element, one 64-bit store, visible at the next flush. */
static void vfuserver_push(struct vfuserver_vq *vq, const struct vfuserver_rings *r,
                           uint16_t head, uint32_t written)
{
    uint16_t index = (uint16_t)(vq->used_idx + vq->pending_used);
    uint64_t element = (uint64_t)head | ((uint64_t)written << 32);
    if (vq->journal_entries) {
        /* RingJournal.record: before the element reaches guest memory */
        __atomic_store_n(&vq->journal_entries[index], element, __ATOMIC_RELAXED);
    }
    __atomic_store_n((uint64_t *)(r->used + 4 + 8 * (uint64_t)(index & (vq->size - 1))),
                     element, __ATOMIC_RELEASE);
    vq->pending_used++;
}

/* Whether guest pages were lost under the maps since the queue last looked (the SIGBUS
   guard's count; VirtQueue._lost_seen). */
static int vfuserver_lost(const struct vfuserver_memory *m, const struct vfuserver_vq *vq)
{
    return m->lost && __atomic_load_n(&m->lost->count, __ATOMIC_ACQUIRE) != vq->lost_seen;
}

/* VirtQueue.flush and _should_interrupt: publish the used index; whether to interrupt.
   -1 (nothing published) if pages were lost since the queue looked: Python raises. */
static int vfuserver_flush(const struct vfuserver_memory *m, struct vfuserver_vq *vq,
                           const struct vfuserver_rings *r)
{
    if (!vq->pending_used) {
        return 0;
    }
    if (vfuserver_lost(m, vq)) {
        return -1;
    }
    uint16_t old = vq->used_idx;
    uint16_t new = (uint16_t)(old + vq->pending_used);
    vq->pending_used = 0;
    vfuserver_smp_wmb();
    vfuserver_store16(r->used + 2, new);
    vq->used_idx = new;
    if (vq->journal_published) {
        __atomic_store_n(vq->journal_published, new, __ATOMIC_RELEASE);  /* .published */
    }
    int16_t since = (int16_t)(uint16_t)(new - vq->signalled_used);
    if ((int32_t)since < (int32_t)(uint16_t)(new - old)) {
        vq->signalled_used_valid = 0;
    }
    vfuserver_smp_mb();
    if (!vq->event_idx) {
        return !(vfuserver_load16(r->avail) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    int valid = vq->signalled_used_valid;
    uint16_t prev = vq->signalled_used;
    vq->signalled_used = new;
    vq->signalled_used_valid = 1;
    uint16_t used_event = vfuserver_load16(r->avail + 4 + 2 * vq->size);
    return !valid || (uint16_t)(new - used_event - 1) < (uint16_t)(new - prev);
}

/* Publish what was pushed; the result's interrupt, or STOPPED for Python's flush. */
static int vfuserver_net_finish(const struct vfuserver_memory *m, struct vfuserver_vq *vq,
                                const struct vfuserver_rings *r,
                                struct vfuserver_net_result *res, int status)
{
    int should = vfuserver_flush(m, vq, r);
    if (should < 0) {
        return VFUSERVER_NET_STOPPED;   /* pending_used stays: VirtQueue.flush raises */
    }
    res->interrupt |= should;
    return status;
}

/* The end of a transmit run: DONE publishes unless the caller coalesces (tx->publish);
   STOPPED leaves what was pushed to the model's flush, which comes after its own next
   chain (or never, if that chain is an error: VirtioNet._drain_tx raises first). */
static int vfuserver_tx_finish(const struct vfuserver_memory *m, struct vfuserver_vq *vq,
                               const struct vfuserver_net_tx *tx,
                               const struct vfuserver_rings *r,
                               struct vfuserver_net_result *res, int status)
{
    if (status == VFUSERVER_NET_DONE && tx->publish) {
        return vfuserver_net_finish(m, vq, r, res, status);
    }
    return status;
}

/*
 * Transmit up to limit chains (VirtioNet._drain_tx with _transmit and QueuedBackend.send
 * on an empty queue): each chain's device-readable bytes, less the guest's header, are
 * written to the tap in one writev, with the 12-byte header the tap takes when it has
 * IFF_VNET_HDR. DONE: the ring is empty or limit chains went, and the batch is published
 * (unless tx->publish is off: the model's next flush publishes it). STOPPED: the next
 * chain (or the publishing) is Python's; nothing of it was touched.
 * Python calls this only while the backend's own queue is empty and connected, the link
 * is up, and the queue holds no chain in flight.
 */
static int vfuserver_net_tx(const struct vfuserver_memory *m, struct vfuserver_vq *vq,
                            const struct vfuserver_net_tx *tx, uint32_t limit,
                            struct vfuserver_net_result *res)
{
    static const uint8_t zeros[2];
    struct vfuserver_chain c;
    struct vfuserver_rings r;
    struct iovec iov[VFUSERVER_CHAIN_IOV + 2];  /* the 10-byte header split: 2 more */

    memset(res, 0, sizeof(*res));
    if (!tx->link_up || !vfuserver_rings(m, vq, &r)) {
        return VFUSERVER_NET_STOPPED;
    }
    while (res->done < limit) {
        int pending = vfuserver_pending(vq, &r);
        if (pending == 0) {
            if (vfuserver_lost(m, vq)) {
                /* VirtQueue.pop raises when the ring runs dry after pages were lost */
                return vfuserver_tx_finish(m, vq, tx, &r, res, VFUSERVER_NET_STOPPED);
            }
            break;
        }
        if (vq->pending_used >= vq->size) {
            /* as many entries unpublished as the ring holds: the model publishes them */
            return vfuserver_tx_finish(m, vq, tx, &r, res, VFUSERVER_NET_STOPPED);
        }
        uint16_t saved_avail = vq->last_avail_idx;
        uint16_t saved_event = vfuserver_load16(vfuserver_avail_event(vq, &r));
        if (pending < 0 || vfuserver_pop(m, vq, &r, &c) != 1) {
            return vfuserver_tx_finish(m, vq, tx, &r, res, VFUSERVER_NET_STOPPED);
        }
        /* the guest's header is skipped (or kept, for a tap with a vnet header) */
        uint32_t skip = tx->peer_vnet_hdr ? 0 : tx->hdr_len;
        int n = 0;
        if (c.rlen >= tx->hdr_len) {
            uint64_t off = skip;
            for (uint32_t i = 0; i < c.nr; i++) {
                uint64_t len = c.rd[i].iov_len;
                if (off >= len) {
                    off -= len;
                    continue;
                }
                iov[n++] = (struct iovec){ (uint8_t *)c.rd[i].iov_base + off, len - off };
                off = 0;
            }
        }
        int unsupported = c.rlen < tx->hdr_len;    /* VirtQueueError: Python's */
        if (!unsupported && !tx->peer_vnet_hdr && c.rlen > tx->hdr_len) {
            uint8_t flags = *(volatile uint8_t *)c.rd[0].iov_base;
            unsupported = (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0;  /* finished there */
        }
        if (!unsupported && tx->peer_vnet_hdr && tx->hdr_len != VFUSERVER_NET_HDR_LEN &&
            c.rlen > tx->hdr_len) {
            /* a 10-byte legacy header: num_buffers 0 after it (VirtioNet._transmit) */
            struct iovec out[VFUSERVER_CHAIN_IOV + 2];
            int k = 0;      /* n + 2 at most: one buffer is split around the 2 bytes */
            uint64_t left = tx->hdr_len;
            for (int i = 0; i < n; i++) {
                uint64_t len = iov[i].iov_len;
                if (left && len > left) {
                    out[k++] = (struct iovec){ iov[i].iov_base, left };
                    out[k++] = (struct iovec){ (void *)zeros, 2 };
                    out[k++] = (struct iovec){ (uint8_t *)iov[i].iov_base + left, len - left };
                    left = 0;
                } else {
                    out[k++] = iov[i];
                    if (left) {
                        left -= len;
                        if (left == 0) {
                            out[k++] = (struct iovec){ (void *)zeros, 2 };
                        }
                    }
                }
            }
            memcpy(iov, out, sizeof(struct iovec) * (size_t)k);
            n = k;
        }
        if (unsupported) {
            vfuserver_unpop(vq, &r, saved_avail, saved_event);
            return vfuserver_tx_finish(m, vq, tx, &r, res, VFUSERVER_NET_STOPPED);
        }
        uint64_t frame_len = c.rlen - tx->hdr_len;
        if (frame_len == 0) {
            res->dropped++;
        } else {
            ssize_t sent = writev(tx->fd, iov, n);
            if (sent < 0) {
                /* EAGAIN (the backend queues it) or an error it counts: Python's */
                vfuserver_unpop(vq, &r, saved_avail, saved_event);
                return vfuserver_tx_finish(m, vq, tx, &r, res, VFUSERVER_NET_STOPPED);
            }
            res->packets++;
            res->bytes += frame_len;
            res->peer_frames++;
            res->peer_bytes += frame_len;
        }
        vfuserver_push(vq, &r, c.head, 0);
        res->done++;
    }
    return vfuserver_tx_finish(m, vq, tx, &r, res, VFUSERVER_NET_DONE);
}

/* Whether a frame passes the receive filter without the Python path (RxFilter.accepts
   for the cases decided here: promiscuous, unicast to the device, broadcast, no VLAN
   tag to look up). */
static int vfuserver_rx_accepts(const struct vfuserver_net_rx *rx, const uint8_t *frame,
                                uint64_t len)
{
    static const uint8_t broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    if (rx->promisc) {
        return 1;
    }
    if (len < VFUSERVER_ETH_HLEN) {
        return 0;
    }
    if (rx->vlan_filter && frame[12] == 0x81 && frame[13] == 0x00) {
        return 0;   /* net.vlan_id: a tag (if the frame holds one) to look up */
    }
    if (frame[0] & 1) {
        return !rx->nobcast && memcmp(frame, broadcast, 6) == 0;
    }
    return !rx->nouni && memcmp(frame, rx->mac, 6) == 0;
}

/* Copy len bytes into the writable buffers of c from byte offset at (QEMU iov_from_buf). */
static uint64_t vfuserver_scatter(const struct vfuserver_chain *c, uint64_t at,
                                  const uint8_t *src, uint64_t len)
{
    uint64_t done = 0;
    for (uint32_t i = 0; i < c->nw && done < len; i++) {
        uint64_t blen = c->wr[i].iov_len;
        if (at >= blen) {
            at -= blen;
            continue;
        }
        uint64_t take = blen - at < len - done ? blen - at : len - done;
        memcpy((uint8_t *)c->wr[i].iov_base + at, src + done, take);
        done += take;
        at = 0;
    }
    return done;
}

/*
 * Receive up to limit frames from the tap into the receive queue (QueuedBackend.receive_now
 * with VirtioNet.receive): DONE when the tap has nothing more (or limit frames went),
 * FRAME when the frame in buf is Python's (res->frame_len bytes as read, vnet header
 * included: a filter, an offload, an MTU, a chain or a lack of buffers the Python path
 * decides), ERROR for a failed read. Every frame taken here is published (and the interrupt decided) as it is placed,
 * as _place_rx does; STOPPED if pages were lost (Python's flush raises).
 */
static int vfuserver_net_rx(const struct vfuserver_memory *m, struct vfuserver_vq *vq,
                            const struct vfuserver_net_rx *rx, uint32_t limit,
                            struct vfuserver_net_result *res)
{
    struct vfuserver_chain *chains = rx->chains;
    struct vfuserver_rings r;
    uint32_t vnet = rx->peer_vnet_hdr ? VFUSERVER_NET_HDR_LEN : 0;

    memset(res, 0, sizeof(*res));
    if (!vfuserver_rings(m, vq, &r)) {
        return VFUSERVER_NET_STOPPED;
    }
    for (uint32_t reads = 0; reads < limit; reads++) {     /* dropped ones count */
        ssize_t n = read(rx->fd, rx->buf, rx->buf_size);
        if (n < 0) {
            if (errno == EINTR) {
                reads--;
                continue;
            }
            int status = errno == EAGAIN || errno == EWOULDBLOCK ? VFUSERVER_NET_DONE
                                                                 : VFUSERVER_NET_ERROR;
            res->error = errno;
            return vfuserver_net_finish(m, vq, &r, res, status);
        }
        if ((uint64_t)n <= vnet) {
            res->peer_dropped++;    /* QueuedBackend._read_frame */
            continue;
        }
        res->frame_len = (uint32_t)n;
        uint8_t *hdr = rx->buf;
        uint8_t *frame = rx->buf + vnet;
        uint64_t frame_len = (uint64_t)n - vnet;
        uint8_t header[VFUSERVER_NET_HDR_LEN] = { 0 };
        if (vnet) {
            hdr[10] = 1;    /* tun_put_user leaves num_buffers: 1 (as _read_frame) */
            memcpy(header, hdr, VFUSERVER_NET_HDR_LEN);
        }
        header[10] = 1;
        header[11] = 0;
        uint8_t flags = header[0], gso_type = header[1];
        uint8_t gso = gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN;
        int python = !vfuserver_rx_accepts(rx, frame, frame_len) ||
                     (gso ? gso >= 32 || !(rx->gso_types & (1u << gso)) ||
                                ((gso_type & VIRTIO_NET_HDR_GSO_ECN) && !rx->gso_ecn)
                          : rx->max_frame && frame_len > rx->max_frame);
        if (!python && !rx->guest_csum) {
            python = (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0;
            header[0] = flags & ~(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID);
        }
        uint64_t total = rx->hdr_len + frame_len;
        uint32_t nchains = 0;
        uint64_t capacity = 0;
        uint16_t saved_avail = vq->last_avail_idx;
        uint16_t saved_event = vfuserver_load16(vfuserver_avail_event(vq, &r));
        while (!python && capacity < total) {
            if (nchains == rx->max_chains) {
                python = 1;
                break;
            }
            struct vfuserver_chain *c = &chains[nchains];
            int got = vfuserver_pop(m, vq, &r, c);
            if (got <= 0) {
                python = 1;     /* no room (or a chain Python refuses): it decides */
                break;
            }
            nchains++;
            if (c->rlen || !c->wlen || (rx->mergeable && c->wlen < rx->hdr_len)) {
                python = 1;     /* VirtQueueError */
                break;
            }
            for (uint32_t i = 0; i + 1 < nchains; i++) {
                if (chains[i].head == c->head) {
                    python = 1; /* offered twice: VirtQueue.pop refuses it */
                }
            }
            capacity += c->wlen;
            if (!rx->mergeable) {
                if (capacity < total) {
                    python = 1; /* dropped there (a buffer too small) */
                }
                break;
            }
        }
        if (python) {
            if (nchains) {
                vfuserver_unpop(vq, &r, saved_avail, saved_event);
            }
            return vfuserver_net_finish(m, vq, &r, res, VFUSERVER_NET_FRAME);
        }
        /* set_notification(False) */
        vq->notification = 0;
        if (!vq->event_idx) {
            vfuserver_store16(r.used, VRING_USED_F_NO_NOTIFY);
        }
        if (rx->hdr_len == VFUSERVER_NET_HDR_LEN) {
            header[10] = (uint8_t)nchains;
            header[11] = (uint8_t)(nchains >> 8);
        }
        uint64_t pos = 0;
        for (uint32_t i = 0; i < nchains; i++) {
            struct vfuserver_chain *c = &chains[i];
            uint64_t written = 0;
            if (i == 0) {
                written = vfuserver_scatter(c, 0, header, rx->hdr_len);
            }
            uint64_t take = c->wlen - written < frame_len - pos ? c->wlen - written
                                                                 : frame_len - pos;
            written += vfuserver_scatter(c, written, frame + pos, take);
            pos += take;
            vfuserver_push(vq, &r, c->head, (uint32_t)written);
        }
        if (gso) {
            res->gso = 1;
        }
        res->frame_len = 0;
        res->done++;
        res->peer_frames++;         /* the backend counts what it handed over */
        res->peer_bytes += frame_len;
        /* published per frame, as _place_rx does */
        int should = vfuserver_flush(m, vq, &r);
        if (should < 0) {
            return VFUSERVER_NET_STOPPED;   /* VirtQueue.flush raises: not a packet */
        }
        res->interrupt |= should;
        res->packets++;
        res->bytes += frame_len;
    }
    return vfuserver_net_finish(m, vq, &r, res, VFUSERVER_NET_DONE);
}

/*
 * The whole data-path run of the serving thread in C, for a running driver's steady
 * state: what VfuContext._on_data does through NetRun.run (vfuserver/netpath.py) with
 * the kicks of the receive and transmit queues, the transmit bottom half with its
 * lingering and coalescing (VirtioNet._process_tx with linger), the frames from the tap,
 * and the interrupts the run ends with. No Python runs, no GIL is taken.
 *
 * Python hands the state over (NetRun.hand_over, when the device lock is released and the
 * device is in a state this code covers): both queues' VirtQueue state, the bottom half's
 * two flags, how each queue's interrupt is raised. While C owns it, the copies here are
 * the model's state; the next time Python takes the device lock it takes them back
 * (NetRun.take_back: vfuserver_net_run_claim, then the copies into the model), so the
 * model stays the one source of truth whoever runs. `owner` says who holds it.
 *
 * A run C cannot finish as the model would (a kick of another queue, a chain or frame the
 * model decides, a tap that would block, lost pages) is handed to Python at that point:
 * vfuserver_net_run returns VFUSERVER_RUN_PYTHON with resume_* saying where the run
 * stopped, and NetRun.run goes on from there, so a run is the same run whoever did which
 * part (tests/server/test_netpath.py drives both and compares).
 */

#define VFUSERVER_OWNER_PYTHON 0    /* the model holds the state */
#define VFUSERVER_OWNER_C 1         /* the copies in struct vfuserver_net_run do */
#define VFUSERVER_OWNER_RUNNING 2   /* ... and a run is using them */
#define VFUSERVER_RX_QUEUE 0
#define VFUSERVER_TX_QUEUE 1
#define VFUSERVER_NO_VECTOR 0xFFFF

struct vfuserver_net_run {
    int owner;                      /* VFUSERVER_OWNER_* (atomic) */
    const struct vfuserver_memory *memory;
    const struct vfuserver_net_tx *tx;
    const struct vfuserver_net_rx *rx;
    struct vfuserver_vq rxq, txq;   /* VirtQueue state of queues 0 and 1 */
    uint32_t tx_burst;              /* VirtioNet.tx_burst */
    uint32_t rx_batch;              /* RX_BATCH */
    uint8_t tx_due;                 /* NetRun.tx_due: the bottom half is scheduled */
    uint8_t tx_lingering;           /* NetRun.tx_lingering */
    uint8_t rx_busy;                /* VirtioNet.rx_busy */
    /* how queue_interrupt raises each queue's (VirtioPciTransport._raise) */
    uint8_t msix;                   /* MSI-X on: the queue's vector; else ISR bit + INTx */
    uint8_t intx;                   /* INTx not disabled (PCI_COMMAND) */
    uint16_t vector[2];             /* MSI-X vectors of queues 0 and 1 */
    /* the run's outcome */
    uint32_t irq_queues;            /* queues (bit n: queue n) to interrupt */
    /* what that means, worked out before the state is released (serving thread only) */
    uint8_t irq_isr;                /* set VIRTIO_PCI_ISR_QUEUE */
    uint8_t irq_count;              /* vectors to trigger */
    uint16_t irq_vectors[2];
    int32_t resume_tx_budget;       /* >= 0: the transmit drain stopped with this budget */
    uint32_t resume_tx_done;        /* ... and this many chains sent by it */
    uint8_t unfinished;             /* the last run was handed to Python (resume_*) */
    uint8_t tx_ran;                 /* the transmit step of this run is done */
    int32_t resume_rx_left;         /* >= 0: receiving stopped with this many frames left */
    int rx_status;                  /* ... VFUSERVER_NET_FRAME, _STOPPED or _ERROR */
    uint32_t rx_frame_len;          /* FRAME: the frame read into rx->buf */
    int rx_error;                   /* ERROR: errno */
    /* counters of the runs while C owned the state, taken by Python with it */
    uint64_t tx_packets, tx_bytes, tx_dropped, rx_packets, rx_bytes;
    uint64_t peer_tx_frames, peer_tx_bytes, peer_rx_frames, peer_rx_bytes, peer_rx_dropped;
    uint64_t runs;                  /* runs done here whole */
    uint64_t runs_left;             /* runs handed to Python */
};

/* VirtQueue.set_notification: used.flags NO_NOTIFY, or avail_event with EVENT_IDX (only
   when enabling), then a full barrier before the caller looks at the ring again. */
static void vfuserver_set_notification(struct vfuserver_vq *vq,
                                       const struct vfuserver_rings *r, int enabled)
{
    vq->notification = (uint8_t)enabled;
    if (vq->event_idx) {
        if (!enabled) {
            return;
        }
        vfuserver_store16(vfuserver_avail_event(vq, r), vfuserver_load16(r->avail + 2));
    } else {
        vfuserver_store16(r->used, enabled ? 0 : VRING_USED_F_NO_NOTIFY);
    }
    if (enabled) {
        vfuserver_smp_mb();
    }
}

/* VirtioNet._publish_tx: flush, and the queue's interrupt if the driver wants it. 0 if
   pages were lost (VirtQueue.flush raises: the model's). */
static int vfuserver_run_publish(struct vfuserver_net_run *run, struct vfuserver_vq *vq,
                                 const struct vfuserver_rings *r, int queue)
{
    int should = vfuserver_flush(run->memory, vq, r);
    if (should < 0) {
        return 0;
    }
    if (should) {
        run->irq_queues |= 1u << queue;
    }
    return 1;
}

/* VirtioNet._process_tx(queue, linger=True) with the tx engine: 1 if the run lingers, 0
   if not (tx_due set again when a burst was cut), VFUSERVER_RUN_PYTHON where the model
   goes on: from the drain (resume_tx_budget >= 0) or from the start. */
static int vfuserver_run_tx(struct vfuserver_net_run *run, const struct vfuserver_rings *r)
{
    struct vfuserver_vq *vq = &run->txq;
    struct vfuserver_net_tx tx = *run->tx;
    struct vfuserver_net_result res;
    uint32_t budget = run->tx_burst;

    tx.publish = 0;     /* lingering runs hold their completions back */
    if (vq->pending_used && vq->pending_used >= vq->size / 2 &&
        !vfuserver_run_publish(run, vq, r, VFUSERVER_TX_QUEUE)) {
        return VFUSERVER_RUN_PYTHON;    /* from the start: the publish raises there */
    }
    for (;;) {
        vfuserver_set_notification(vq, r, 0);
        int status = vfuserver_net_tx(run->memory, vq, &tx, budget, &res);
        run->tx_packets += res.packets;
        run->tx_bytes += res.bytes;
        run->tx_dropped += res.dropped;
        run->peer_tx_frames += res.peer_frames;
        run->peer_tx_bytes += res.peer_bytes;
        /* where the model goes on if this round stops: after its drain, `budget` being
           what the round began with and res.done what it sent (read only while the
           transmit step has not finished: tx_ran) */
        run->resume_tx_budget = (int32_t)budget;
        run->resume_tx_done = res.done;
        if (status != VFUSERVER_NET_DONE) {
            return VFUSERVER_RUN_PYTHON;
        }
        budget -= res.done;
        if (budget == 0) {
            int more = vfuserver_pending(vq, r);
            if (more < 0) {
                return VFUSERVER_RUN_PYTHON;    /* available() raises */
            }
            if (more > 0) {
                /* notifications stay off; the bottom half runs again soon */
                if (!vfuserver_run_publish(run, vq, r, VFUSERVER_TX_QUEUE)) {
                    return VFUSERVER_RUN_PYTHON;    /* the publish raises */
                }
                run->tx_due = 1;
                break;
            }
        }
        if (res.done) {
            return 1;   /* notifications stay off until a run finds nothing */
        }
        if (vq->pending_used && !vfuserver_run_publish(run, vq, r, VFUSERVER_TX_QUEUE)) {
            return VFUSERVER_RUN_PYTHON;
        }
        if (run->rx_busy) {
            run->rx_busy = 0;
            return 1;   /* a stream comes in: its acknowledgements are looked for */
        }
        vfuserver_set_notification(vq, r, 1);
        int more = vfuserver_pending(vq, r);
        if (more < 0) {
            return VFUSERVER_RUN_PYTHON;        /* the model's drain pops and raises */
        }
        if (more == 0) {
            break;
        }
    }
    return 0;
}

/* NetPath.receive: up to rx_batch frames from the tap. 1 (keep polling the tap), or
   VFUSERVER_RUN_PYTHON with resume_rx_* for the model. */
static int vfuserver_run_rx(struct vfuserver_net_run *run)
{
    struct vfuserver_net_result res;
    uint32_t left = run->rx_batch;
    int status = vfuserver_net_rx(run->memory, &run->rxq, run->rx, left, &res);
    run->rx_packets += res.packets;
    run->rx_bytes += res.bytes;
    run->peer_rx_frames += res.peer_frames;
    run->peer_rx_bytes += res.peer_bytes;
    run->peer_rx_dropped += res.peer_dropped;
    left -= res.done + res.peer_dropped;
    if (res.gso) {
        run->rx_busy = 1;
    }
    if (res.interrupt) {
        run->irq_queues |= 1u << VFUSERVER_RX_QUEUE;
    }
    if (status == VFUSERVER_NET_DONE) {
        return 1;
    }
    run->resume_rx_left = (int32_t)left;
    run->rx_status = status;
    run->rx_frame_len = res.frame_len;
    run->rx_error = res.error;
    return VFUSERVER_RUN_PYTHON;
}

/* The interrupts of irq_queues as VirtioPciTransport._raise raises them: the queues'
   MSI-X vectors (once each), or the ISR bit and INTx (once). */
static void vfuserver_run_route(struct vfuserver_net_run *run)
{
    uint32_t queues = run->irq_queues;
    run->irq_isr = 0;
    run->irq_count = 0;
    if (!queues) {
        return;
    }
    if (!run->msix) {
        run->irq_isr = 1;
        if (run->intx) {
            run->irq_vectors[run->irq_count++] = 0;
        }
        return;
    }
    for (int queue = VFUSERVER_RX_QUEUE; queue <= VFUSERVER_TX_QUEUE; queue++) {
        uint16_t vector = run->vector[queue];
        if ((queues & (1u << queue)) && vector != VFUSERVER_NO_VECTOR &&
            !(run->irq_count && run->irq_vectors[0] == vector)) {
            run->irq_vectors[run->irq_count++] = vector;
        }
    }
}

/*
 * One run (NetRun.run) on the state Python handed over, with the queues kicked in
 * *pending (taken atomically; put back untouched if the run is Python's from the start).
 * Returns the run's DATA_* flags, or VFUSERVER_RUN_PYTHON: the run, or the rest of it
 * (resume_*), is Python's. Either way irq_queues names the queues to interrupt.
 */
static int vfuserver_net_run(struct vfuserver_net_run *run, uint64_t *pending)
{
    int expected = VFUSERVER_OWNER_C;
    run->irq_queues = 0;    /* nothing to raise, whoever runs */
    run->irq_isr = 0;
    run->irq_count = 0;
    if (!__atomic_compare_exchange_n(&run->owner, &expected, VFUSERVER_OWNER_RUNNING, 0,
                                     __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        return VFUSERVER_RUN_PYTHON;    /* the model holds the state */
    }
    run->resume_tx_budget = -1;
    run->resume_rx_left = -1;
    run->tx_ran = 0;
    run->unfinished = 0;
    int flags = VFUSERVER_RUN_PYTHON;
    struct vfuserver_rings r;
    uint64_t kicks = __atomic_exchange_n(pending, 0, __ATOMIC_ACQ_REL);
    if ((kicks & ~(uint64_t)3) || vfuserver_lost(run->memory, &run->txq) ||
        vfuserver_lost(run->memory, &run->rxq) ||
        !vfuserver_rings(run->memory, &run->txq, &r)) {
        /* another queue's kick (the control queue's), lost pages: the model's run */
        __atomic_fetch_or(pending, kicks, __ATOMIC_ACQ_REL);
        goto out;
    }
    if (kicks & (1u << VFUSERVER_TX_QUEUE)) {
        /* VirtioNet._handle_queue: the kick schedules the bottom half (which turns the
           notifications off first thing, as the kick does) */
        run->tx_due = 1;
    }
    /* a kick of the receive queue (buffers) needs nothing more: receiving comes next */
    if (run->tx_due || run->tx_lingering) {
        uint8_t due = run->tx_due;
        run->tx_due = 0;
        int lingering = vfuserver_run_tx(run, &r);
        if (lingering == VFUSERVER_RUN_PYTHON) {
            run->tx_due = due;
            goto out;
        }
        run->tx_lingering = (uint8_t)lingering;
    }
    run->tx_ran = 1;
    if (vfuserver_run_rx(run) == VFUSERVER_RUN_PYTHON) {
        goto out;
    }
    flags = 1 | (run->tx_due ? 2 : 0) | (run->tx_lingering ? 4 : 0);   /* DATA_* */
out:
    vfuserver_run_route(run);
    if (flags == VFUSERVER_RUN_PYTHON) {
        run->unfinished = 1;
        run->runs_left++;
    } else {
        run->runs++;
    }
    __atomic_store_n(&run->owner, VFUSERVER_OWNER_C, __ATOMIC_RELEASE);
    return flags;
}

/* Python takes the state back (the device lock is held): 1 if C held it (the copies are
   the model's now), 0 if Python did already. Waits out a run in progress. */
static int vfuserver_net_run_claim(struct vfuserver_net_run *run)
{
    for (;;) {
        int expected = VFUSERVER_OWNER_C;
        if (__atomic_compare_exchange_n(&run->owner, &expected, VFUSERVER_OWNER_PYTHON, 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE)) {
            return 1;
        }
        if (expected == VFUSERVER_OWNER_PYTHON) {
            return 0;
        }
        sched_yield();  /* a run on the serving thread: microseconds, never blocked */
    }
}

/* Python hands the state it wrote into run over to C. */
static void vfuserver_net_run_give(struct vfuserver_net_run *run)
{
    __atomic_store_n(&run->owner, VFUSERVER_OWNER_C, __ATOMIC_RELEASE);
}

/* The serving thread's data run (serve.c vfuserver_run_data) on the device's native run,
   if it has one: its flags, with its interrupts raised (VirtioPciTransport._raise, once
   per vector), or VFUSERVER_RUN_PYTHON for vfuserver_data_cb. */
static int vfuserver_native_data_run(vfu_ctx_t *ctx, struct vfuserver_dev *d)
{
    struct vfuserver_net_run *run = d->net_run;
    if (run == NULL) {
        return VFUSERVER_RUN_PYTHON;
    }
    int flags = vfuserver_net_run(run, &d->pending_notify);
    if (run->irq_isr) {
        vfuserver_isr_set(d, 1);    /* VIRTIO_PCI_ISR_QUEUE */
    }
    for (uint8_t i = 0; i < run->irq_count; i++) {
        vfuserver_trigger(ctx, d, run->irq_vectors[i]);
    }
    return flags;
}
