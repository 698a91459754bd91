/*
 * cffi declarations for libvfio-user (API mode), written against the tree pinned by
 * Debian's QEMU source package: upstream nutanix/libvfio-user 0b28d205 (June 2022).
 *
 * API mode: every "..." (enum values, #define values, struct layouts) is filled in by the
 * C compiler from the real <libvfio-user.h> when the extension is built, so a header that
 * drifts breaks the build instead of mis-binding at run time.
 */

typedef int... loff_t;
struct iovec { void *iov_base; size_t iov_len; };

typedef struct vfu_ctx vfu_ctx_t;
typedef struct dma_sg dma_sg_t;
typedef void *vfu_dma_addr_t;

typedef enum { VFU_TRANS_SOCK, ... } vfu_trans_t;
typedef enum { VFU_DEV_TYPE_PCI, ... } vfu_dev_type_t;
typedef enum { VFU_PCI_TYPE_CONVENTIONAL, VFU_PCI_TYPE_PCI_X_1, VFU_PCI_TYPE_PCI_X_2,
               VFU_PCI_TYPE_EXPRESS, ... } vfu_pci_type_t;
typedef enum vfu_reset_type { VFU_RESET_DEVICE, VFU_RESET_LOST_CONN, VFU_RESET_PCI_FLR,
                              ... } vfu_reset_type_t;
enum vfu_dev_irq_type { VFU_DEV_INTX_IRQ, VFU_DEV_MSI_IRQ, VFU_DEV_MSIX_IRQ,
                        VFU_DEV_ERR_IRQ, VFU_DEV_REQ_IRQ, VFU_DEV_NUM_IRQS, ... };

#define LIBVFIO_USER_FLAG_ATTACH_NB ...
#define VFU_REGION_FLAG_READ ...
#define VFU_REGION_FLAG_WRITE ...
#define VFU_REGION_FLAG_RW ...
#define VFU_REGION_FLAG_MEM ...
#define VFU_REGION_FLAG_ALWAYS_CB ...
#define PCI_HEADER_TYPE_NORMAL ...
#define VFU_PCI_DEV_BAR0_REGION_IDX ...
#define VFU_PCI_DEV_ROM_REGION_IDX ...
#define VFU_PCI_DEV_CFG_REGION_IDX ...
#define VFU_PCI_DEV_VGA_REGION_IDX ...
#define VFU_PCI_DEV_MIGR_REGION_IDX ...
#define VFU_PCI_DEV_NUM_REGIONS ...
#define LOG_ERR ...
#define LOG_WARNING ...
#define LOG_NOTICE ...
#define LOG_INFO ...
#define LOG_DEBUG ...
#define PROT_READ ...
#define PROT_WRITE ...

typedef struct vfu_dma_info {
    struct iovec iova;
    void *vaddr;
    struct iovec mapping;
    size_t page_size;
    uint32_t prot;
    ...;
} vfu_dma_info_t;

/* Pointer-to-function typedefs (the header declares function types). */
typedef ssize_t (*vfu_region_access_cb_p)(vfu_ctx_t *, char *, size_t, loff_t, bool);
typedef void (*vfu_log_fn_p)(vfu_ctx_t *, int, const char *);
typedef int (*vfu_reset_cb_p)(vfu_ctx_t *, vfu_reset_type_t);
typedef int (*vfu_quiesce_cb_p)(vfu_ctx_t *);
typedef void (*vfu_dma_cb_p)(vfu_ctx_t *, vfu_dma_info_t *);
typedef void (*vfu_irq_state_cb_p)(vfu_ctx_t *, uint32_t, uint32_t, bool);

vfu_ctx_t *vfu_create_ctx(vfu_trans_t trans, const char *path, int flags, void *pvt,
                          vfu_dev_type_t dev_type);
int vfu_realize_ctx(vfu_ctx_t *vfu_ctx);
int vfu_attach_ctx(vfu_ctx_t *vfu_ctx);
int vfu_get_poll_fd(vfu_ctx_t *vfu_ctx);
int vfu_run_ctx(vfu_ctx_t *vfu_ctx);
void vfu_destroy_ctx(vfu_ctx_t *vfu_ctx);
void *vfu_get_private(vfu_ctx_t *vfu_ctx);
int vfu_setup_log(vfu_ctx_t *vfu_ctx, vfu_log_fn_p log, int level);
int vfu_setup_region(vfu_ctx_t *vfu_ctx, int region_idx, size_t size,
                     vfu_region_access_cb_p region_access, int flags,
                     struct iovec *mmap_areas, uint32_t nr_mmap_areas, int fd, uint64_t offset);
void vfu_setup_device_quiesce_cb(vfu_ctx_t *vfu_ctx, vfu_quiesce_cb_p quiesce_cb);
int vfu_device_quiesced(vfu_ctx_t *vfu_ctx, int quiesce_errno);
int vfu_setup_device_reset_cb(vfu_ctx_t *vfu_ctx, vfu_reset_cb_p reset);
int vfu_setup_device_dma(vfu_ctx_t *vfu_ctx, vfu_dma_cb_p dma_register,
                         vfu_dma_cb_p dma_unregister);
int vfu_setup_device_nr_irqs(vfu_ctx_t *vfu_ctx, enum vfu_dev_irq_type type, uint32_t count);
int vfu_setup_irq_state_callback(vfu_ctx_t *vfu_ctx, enum vfu_dev_irq_type type,
                                 vfu_irq_state_cb_p cb);
int vfu_irq_trigger(vfu_ctx_t *vfu_ctx, uint32_t subindex);
int vfu_pci_init(vfu_ctx_t *vfu_ctx, vfu_pci_type_t pci_type, int hdr_type, int revision);

/* --- vfuserver's own C helpers (defined in vfuserver/csrc/vfuserver.c) --- */

/* libvfio-user's region callback carries no region index: one C trampoline per index
   forwards to the single Python entry point vfuserver_region_cb. */
vfu_region_access_cb_p vfuserver_region_trampoline(int region_idx);

/* The native side of a served device (vfuserver/csrc/serve.h, serve.c): the state the
   Python model publishes for the fast path, the shared ISR and kick cells, and the serving
   thread's loop. */
#define FAST_MISS ...
#define VFUSERVER_FAST_REGS ...
#define VFUSERVER_FAST_NOTIFY ...
#define VFUSERVER_FAST_ISR_READ ...
#define VFUSERVER_FAST_STATUS_READ ...
#define VFUSERVER_FAST_LEGACY_READ ...
#define VFUSERVER_FAST_LEGACY_WRITE ...
#define VFUSERVER_FAST_CONFIG_READ ...
#define VFUSERVER_IMAGE_QUEUES ...
#define VFUSERVER_IMAGE_CONFIG ...
#define VFUSERVER_LEGACY_SLOTS ...
#define VFUSERVER_SERVE_DETACHED ...
#define VFUSERVER_SERVE_STOPPED ...
#define VFUSERVER_SERVE_QUIESCING ...
#define VFUSERVER_SERVE_REPORT ...
#define VFUSERVER_DROP_NONE ...
#define VFUSERVER_DROP_CLOSED_IN_MESSAGE ...
#define VFUSERVER_DROP_STALLED ...
#define VFUSERVER_DROP_TOO_LARGE ...
#define VFUSERVER_DROP_RUN_ERROR ...
#define VFUSERVER_DROP_MALFORMED ...
#define VFUSERVER_DROP_REPLY_TIMEOUT ...
#define VFUSERVER_DROP_SPURIOUS ...
#define VFUSERVER_MAX_MESSAGE ...

struct vfuserver_fast_reg {
    int region;
    uint32_t offset;
    uint32_t width;
    int is_write;
    int kind;
    int legacy;
    uint64_t count;
    ...;
};

struct vfuserver_image {
    uint32_t config_len;
    uint8_t config[...];
    uint8_t legacy;
    uint8_t legacy_config_offset;
    uint8_t legacy_bus_master;
    uint8_t legacy_absent_vectors;
    uint32_t legacy_host_features;
    uint32_t legacy_guest_features;
    uint16_t legacy_config_vector;
    uint16_t legacy_queues;
    uint32_t legacy_queue_pfn[...];
    uint16_t legacy_queue_num[...];
    uint16_t legacy_queue_vector[...];
    ...;
};

struct vfuserver_dev {
    void *handle;
    uint8_t fast_enabled;
    uint8_t status;
    uint8_t io_enabled;
    uint8_t settled;
    int nregs;
    struct vfuserver_fast_reg regs[...];
    uint32_t image_seq;
    uint16_t legacy_queue_sel;
    uint64_t legacy_fast_reads[...];
    uint64_t legacy_fast_writes[...];
    uint8_t isr;
    uint64_t pending_notify;
    int stop;
    int report;
    int serving;
    int notify_fd;
    int wake_fd;
    int64_t poll_max_ns;
    int64_t message_timeout_ns;
    int64_t reply_timeout_ms;
    int64_t poll_ns;
    int drop_reason;
    int drop_errno;
    uint32_t drop_size;
    uint64_t messages;
    uint64_t wakeups;
    uint64_t polled;
    uint64_t kicks;
    uint64_t interrupts;
    int inline_kicks;
    int data_fd;
    int data_armed;
    int data_again;
    uint64_t data_runs;
    int64_t data_timer_ns;
    int64_t data_deadline;
    uint8_t direct_enabled;
    uint64_t direct;
    struct vfuserver_net_run *net_run;
    ...;
};

/* Set up / tear down the eventfds and locks of a zeroed struct (-1 + errno). */
int vfuserver_dev_init(struct vfuserver_dev *d);
void vfuserver_dev_destroy(struct vfuserver_dev *d);
/* The fast path alone, as the region trampolines run it: bytes handled, or FAST_MISS. */
ssize_t fast_access(void *private, int region, char *buf, size_t n, loff_t off, bool is_write);
/* vfu_attach_ctx that vfuserver_interrupt can cut short (EINTR). */
int vfuserver_attach(vfu_ctx_t *ctx, struct vfuserver_dev *d);
/* Serve the attached client (GIL released): a VFUSERVER_SERVE_* value. */
int vfuserver_serve(vfu_ctx_t *ctx, struct vfuserver_dev *d);
/* vfu_device_quiesced under the interrupt lock: 0, -1 + errno, or 1 when the request it
   let through ended the connection. */
int vfuserver_quiesced(vfu_ctx_t *ctx, struct vfuserver_dev *d);
/* Ask the serving thread to return STOPPED; interrupts its blocking call, if any. */
void vfuserver_stop(struct vfuserver_dev *d);
int vfuserver_interrupt(struct vfuserver_dev *d);
/* vfu_irq_trigger from any thread (the serving thread raises it if it must). */
int vfuserver_trigger(vfu_ctx_t *ctx, struct vfuserver_dev *d, uint32_t vector);
/* ISR cell: OR bits in; take (read-to-clear); read. */
void vfuserver_isr_set(struct vfuserver_dev *d, uint8_t bits);
uint8_t vfuserver_isr_take(struct vfuserver_dev *d);
uint8_t vfuserver_isr_peek(struct vfuserver_dev *d);
void vfuserver_isr_store(struct vfuserver_dev *d, uint8_t value);
/* Kicked queues not yet processed (bit n: queue n), taken atomically. */
uint64_t vfuserver_take_notifies(struct vfuserver_dev *d);
/* Have the serving thread call the data path (vfuserver_data_cb) soon, from any thread. */
void vfuserver_request_data(struct vfuserver_dev *d);
/* Publish one byte of fast-path state with release order. */
void vfuserver_publish(struct vfuserver_dev *d, uint8_t status, uint8_t io_enabled,
                       uint8_t settled, uint64_t active_queues, uint8_t fast_enabled);

/* Publish the register image built in `image` (seqlock; the caller holds the device lock). */
void vfuserver_publish_image(struct vfuserver_dev *d, const struct vfuserver_image *image);
/* The legacy QUEUE_SEL cell the model keeps in the native state. */
uint16_t vfuserver_legacy_queue_sel_load(struct vfuserver_dev *d);
void vfuserver_legacy_queue_sel_store(struct vfuserver_dev *d, uint16_t value);

/* CPU memory barriers for the rings shared with the guest (QEMU's smp_mb/smp_wmb/smp_rmb):
   __atomic_thread_fence with SEQ_CST, RELEASE and ACQUIRE. */
void vfuserver_smp_mb(void);
void vfuserver_smp_wmb(void);
void vfuserver_smp_rmb(void);

/* SIGBUS guard for guest memory (a client that shrinks the file behind a DMA map): a
   SIGBUS inside a registered host range gets a zero page mapped over the faulting page
   and is counted in that range's vfuserver_lost_pages_t; any other SIGBUS goes to the
   previous disposition. install: once per process (later calls do nothing), 0 or -1 with
   errno. add: register [start, +length) (page_size: the map's page size, a power of two;
   iova: guest address of start) and return its slot, or -1 with errno ENOSPC (no free
   slot) or EINVAL. remove: forget a slot, before the range is unmapped. lost must stay
   valid while its slots are registered. */
typedef struct {
    uint64_t count;
    uint64_t iova;
} vfuserver_lost_pages_t;
int vfuserver_guard_install(void);
int vfuserver_guard_add(void *start, size_t length, size_t page_size, uint64_t iova,
                        vfuserver_lost_pages_t *lost);
void vfuserver_guard_remove(int index);

/* virtio-net's per-frame data path in C (csrc/netpath.c; vfuserver/netpath.py). */
struct vfuserver_map {
    uint64_t iova;
    uint64_t size;
    uintptr_t host;
    uint32_t writable;
};
struct vfuserver_memory {
    uint32_t nmaps;
    struct vfuserver_map maps[...];
    vfuserver_lost_pages_t *lost;
};
struct vfuserver_vq {
    uint32_t size;
    uint64_t desc_addr, avail_addr, used_addr;
    uint8_t event_idx;
    uint8_t notification;
    uint64_t max_chain_bytes;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint16_t signalled_used;
    uint8_t signalled_used_valid;
    uint64_t lost_seen;
    uint32_t pending_used;
    uint64_t *journal_entries;
    uint32_t *journal_published;
};
struct vfuserver_chain { ...; };
struct vfuserver_net_tx {
    int fd;
    uint32_t hdr_len;
    uint8_t peer_vnet_hdr;
    uint8_t link_up;
    uint8_t publish;
};
struct vfuserver_net_rx {
    int fd;
    uint8_t *buf;
    uint32_t buf_size;
    struct vfuserver_chain *chains;
    uint32_t max_chains;
    uint32_t hdr_len;
    uint8_t peer_vnet_hdr;
    uint8_t mergeable;
    uint8_t guest_csum;
    uint8_t promisc;
    uint8_t vlan_filter;
    uint8_t nouni, nobcast;
    uint8_t mac[6];
    uint32_t max_frame;
    uint32_t gso_types;
    uint8_t gso_ecn;
};
struct vfuserver_net_result {
    uint32_t done;
    uint8_t interrupt;
    uint32_t frame_len;
    int error;
    uint64_t packets, bytes;
    uint64_t dropped;
    uint64_t peer_frames, peer_bytes, peer_dropped;
    uint8_t gso;
};
#define VFUSERVER_NET_MAPS ...
#define VFUSERVER_NET_DONE ...
#define VFUSERVER_NET_STOPPED ...
#define VFUSERVER_NET_FRAME ...
#define VFUSERVER_NET_ERROR ...
/* Transmit / receive on a split ring (see netpath.c): a VFUSERVER_NET_* status. */
int vfuserver_net_tx(const struct vfuserver_memory *m, struct vfuserver_vq *vq,
                     const struct vfuserver_net_tx *tx, uint32_t limit,
                     struct vfuserver_net_result *res);
int vfuserver_net_rx(const struct vfuserver_memory *m, struct vfuserver_vq *vq,
                     const struct vfuserver_net_rx *rx, uint32_t limit,
                     struct vfuserver_net_result *res);

/* The whole data run in C (see netpath.c): the state Python hands over, a run, and
   taking the state back. */
struct vfuserver_net_run {
    int owner;
    const struct vfuserver_memory *memory;
    const struct vfuserver_net_tx *tx;
    const struct vfuserver_net_rx *rx;
    struct vfuserver_vq rxq, txq;
    uint32_t tx_burst;
    uint32_t rx_batch;
    uint8_t tx_due;
    uint8_t tx_lingering;
    uint8_t rx_busy;
    uint8_t msix;
    uint8_t intx;
    uint16_t vector[2];
    uint32_t irq_queues;
    uint8_t irq_isr;
    uint8_t irq_count;
    uint16_t irq_vectors[2];
    int32_t resume_tx_budget;
    uint32_t resume_tx_done;
    uint8_t unfinished;
    uint8_t tx_ran;
    int32_t resume_rx_left;
    int rx_status;
    uint32_t rx_frame_len;
    int rx_error;
    uint64_t tx_packets, tx_bytes, tx_dropped, rx_packets, rx_bytes;
    uint64_t peer_tx_frames, peer_tx_bytes, peer_rx_frames, peer_rx_bytes, peer_rx_dropped;
    uint64_t runs;
    uint64_t runs_left;
};
#define VFUSERVER_RUN_PYTHON ...
/* One run with the queues kicked in *pending: its DATA_* flags, or VFUSERVER_RUN_PYTHON. */
int vfuserver_net_run(struct vfuserver_net_run *run, uint64_t *pending);
/* Take the state back (1: C held it), waiting out a run; hand it over. */
int vfuserver_net_run_claim(struct vfuserver_net_run *run);
void vfuserver_net_run_give(struct vfuserver_net_run *run);

extern "Python" ssize_t vfuserver_region_cb(vfu_ctx_t *, int, char *, size_t, loff_t, bool);
/* The device's data path on the serving thread (serve.c): bit 0 keep polling data_fd,
   bit 1 call again soon; -1 on a bug (logged). */
extern "Python" int vfuserver_data_cb(vfu_ctx_t *);
extern "Python" void vfuserver_log_cb(vfu_ctx_t *, int, const char *);
extern "Python" int vfuserver_reset_cb(vfu_ctx_t *, vfu_reset_type_t);
extern "Python" int vfuserver_quiesce_cb(vfu_ctx_t *);
extern "Python" void vfuserver_dma_register_cb(vfu_ctx_t *, vfu_dma_info_t *);
extern "Python" void vfuserver_dma_unregister_cb(vfu_ctx_t *, vfu_dma_info_t *);
