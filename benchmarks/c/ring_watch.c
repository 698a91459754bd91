/*
 * ring_watch: watch a guest's split virtqueues from outside both QEMU and vfuserver.
 *
 * It maps the guest's RAM itself, through the memfd QEMU holds (/proc/<qemu pid>/fd/N of a
 * "memory-backend-memfd,share=on" backend), and spins on every queue vfuserver journals:
 *
 *   ring_watch --match SOCKET_PATH --journal DIR [--seconds S]
 *
 * SOCKET_PATH picks the QEMU process (the one whose command line names it); DIR holds the
 * ring journals vfuserver writes when VFUSERVER_RING_JOURNAL=DIR is set (one file per queue,
 * see devices/virtqueue.py RingJournal: a 64-byte header with the ring addresses and a
 * generation, then 65536 entries of {u32 id, u32 len}: what the device stored in the used
 * ring for each 16-bit used index, written before the element itself).
 *
 * For every queue it checks, as fast as it can sample (figures in the summary):
 *   USED_BACK   used.idx in memory is not what the device published: it lies behind the
 *               journal's "published" index read just before, or ahead of the one read
 *               just after by more than a queue's worth (an index the device never
 *               stored, e.g. a transient 0);
 *   USED_ELEM   the element memory exposes for a published index is neither the one the
 *               device journalled for that index nor, already, the one of the next lap
 *               (the device stores pushed elements before it publishes them);
 *   GUEST_AHEAD (receive queues, where the guest's used_event is its last_used_idx) the
 *               guest announced it had consumed used entries memory does not yet publish:
 *               the guest read a used.idx that memory never held.
 * Each event is one line on stdout; SIGTERM/SIGINT or --seconds ends the run with a summary
 * line "ring_watch: summary samples=... events=...".
 *
 * Guest-physical addresses are taken as offsets into the memfd, which holds for a q35 or
 * i440fx guest whose RAM (-m) lies below the PCI hole, as the test guest's 512 MiB does.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define JOURNAL_MAGIC 0x4a525656u /* "VVRJ" little-endian */
#define JOURNAL_HEADER 64
#define JOURNAL_ENTRIES 65536
#define MAX_QUEUES 64

struct journal_header {
    uint32_t magic;
    uint32_t generation; /* odd while the device rewrites the header */
    uint32_t queue;
    uint32_t size;
    uint64_t desc;
    uint64_t avail;
    uint64_t used;
    uint32_t event_idx;
    uint32_t receive; /* 1: used_event is the guest's last_used_idx (receive queue) */
    uint32_t published; /* used idx the device last stored, written after the store */
};

struct queue {
    char name[NAME_MAX + 1];
    volatile struct journal_header *hdr;
    volatile uint32_t *entries;
    uint32_t generation;
    struct journal_header ring; /* the header as of generation */
    int active;
    uint16_t last;
    uint64_t advances, published, unchecked;
};

static volatile sig_atomic_t stop;
static uint8_t *ram;
static size_t ram_size;
static struct queue queues[MAX_QUEUES];
static int nqueues;
static unsigned long events;

static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint16_t load16(uint64_t gpa)
{
    return __atomic_load_n((uint16_t *)(ram + gpa), __ATOMIC_ACQUIRE);
}

static uint32_t load32(uint64_t gpa)
{
    return __atomic_load_n((uint32_t *)(ram + gpa), __ATOMIC_ACQUIRE);
}

static int in_ram(uint64_t gpa, uint64_t len) { return gpa < ram_size && len <= ram_size - gpa; }

static int find_qemu(const char *match)
{
    DIR *proc = opendir("/proc");
    struct dirent *d;
    int found = -1;
    if (!proc)
        return -1;
    while (found < 0 && (d = readdir(proc)) != NULL) {
        char path[64], buf[8192];
        int pid = atoi(d->d_name), fd;
        ssize_t n;
        if (pid <= 0 || pid == getpid())
            continue;
        snprintf(path, sizeof(path), "/proc/%d/cmdline", pid);
        fd = open(path, O_RDONLY);
        if (fd < 0)
            continue;
        n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (n <= 0)
            continue;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] == '\0')
                buf[i] = ' ';
        buf[n] = '\0';
        if (strstr(buf, "qemu-system") && strstr(buf, match) && !strstr(buf, "vfuserver-qemu"))
            found = pid;
    }
    closedir(proc);
    return found;
}

/* The largest memfd the process holds: its guest RAM backend. */
static int open_guest_ram(int pid)
{
    char dir[64], link[PATH_MAX], target[PATH_MAX];
    DIR *fds;
    struct dirent *d;
    int best = -1;
    off_t best_size = 0;
    snprintf(dir, sizeof(dir), "/proc/%d/fd", pid);
    fds = opendir(dir);
    if (!fds)
        return -1;
    while ((d = readdir(fds)) != NULL) {
        struct stat st;
        ssize_t n;
        int fd;
        snprintf(link, sizeof(link), "%s/%s", dir, d->d_name);
        n = readlink(link, target, sizeof(target) - 1);
        if (n <= 0)
            continue;
        target[n] = '\0';
        if (strncmp(target, "/memfd:", 7) != 0)
            continue;
        fd = open(link, O_RDWR);
        if (fd < 0)
            continue;
        if (fstat(fd, &st) == 0 && st.st_size > best_size) {
            if (best >= 0)
                close(best);
            best = fd;
            best_size = st.st_size;
        } else {
            close(fd);
        }
    }
    closedir(fds);
    ram_size = (size_t)best_size;
    return best;
}

static void scan_journals(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    if (!d)
        return;
    while ((e = readdir(d)) != NULL && nqueues < MAX_QUEUES) {
        char path[PATH_MAX];
        struct queue *q;
        void *map;
        int fd, known = 0;
        if (!strstr(e->d_name, ".journal"))
            continue;
        for (int i = 0; i < nqueues; i++)
            known |= !strcmp(queues[i].name, e->d_name);
        if (known)
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        fd = open(path, O_RDONLY);
        if (fd < 0)
            continue;
        map = mmap(NULL, JOURNAL_HEADER + 8 * JOURNAL_ENTRIES, PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        if (map == MAP_FAILED)
            continue;
        q = &queues[nqueues++];
        snprintf(q->name, sizeof(q->name), "%s", e->d_name);
        q->hdr = map;
        q->entries = (volatile uint32_t *)((char *)map + JOURNAL_HEADER);
        q->generation = UINT32_MAX;
    }
    closedir(d);
}

static void event(struct queue *q, const char *kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void event(struct queue *q, const char *kind, const char *fmt, ...)
{
    va_list ap;
    events++;
    printf("ring_watch: %s t=%llu queue=%s ", kind, (unsigned long long)now_ns(), q->name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* (Re)arm a queue whose header changed; 0 while the device is rewriting it. */
static int refresh(struct queue *q)
{
    uint32_t gen = __atomic_load_n(&q->hdr->generation, __ATOMIC_ACQUIRE);
    if (gen == q->generation)
        return q->active;
    if (gen & 1 || q->hdr->magic != JOURNAL_MAGIC)
        return 0;
    memcpy(&q->ring, (const void *)q->hdr, sizeof(q->ring));
    /* a seqlock: the copy counts only if no rewrite began meanwhile */
    if (__atomic_load_n(&q->hdr->generation, __ATOMIC_ACQUIRE) != gen)
        return 0;
    q->generation = gen;
    q->active = q->ring.used && q->ring.size &&
                in_ram(q->ring.used, 6 + 8ull * q->ring.size) &&
                in_ram(q->ring.avail, 6 + 2ull * q->ring.size);
    if (q->active)
        q->last = load16(q->ring.used + 2);
    return q->active;
}

static void check(struct queue *q)
{
    uint64_t used = q->ring.used, avail = q->ring.avail;
    uint32_t size = q->ring.size;
    uint16_t before = (uint16_t)__atomic_load_n(&q->hdr->published, __ATOMIC_ACQUIRE);
    uint16_t idx = load16(used + 2), delta = (uint16_t)(idx - q->last);
    uint16_t after = (uint16_t)__atomic_load_n(&q->hdr->published, __ATOMIC_ACQUIRE);
    /* The device rewrote the header meanwhile (a reset: published back to 0): this sample
       belongs to no one generation; refresh() re-arms on the next pass. */
    if (__atomic_load_n(&q->hdr->generation, __ATOMIC_ACQUIRE) != q->generation)
        return;
    /* The device stores used.idx, then the journal's copy: memory is never behind the copy
       read before it and at most one batch (<= size) ahead of the copy read after it. */
    if ((uint16_t)(idx - before) > (uint16_t)(after - before) + size) {
        event(q, "USED_BACK", "from=%u to=%u published=%u..%u size=%u", q->last, idx, before,
              after, size);
        q->last = idx;
        return;
    }
    if (delta) {
        /* Slots of indices more than a lap behind were reused while we were not
           looking (the watcher was descheduled): only the last lap can be checked. */
        uint16_t first = q->last;
        if (delta > size) {
            first = (uint16_t)(idx - size);
            q->unchecked += (uint16_t)(first - q->last);
        }
        for (uint16_t i = first; i != idx; i++) {
            uint64_t slot = i & (size - 1);
            uint32_t id = load32(used + 4 + 8 * slot), len = load32(used + 8 + 8 * slot);
            uint32_t jid = q->entries[2 * i], jlen = q->entries[2 * i + 1];
            uint16_t next = (uint16_t)(i + size);
            /* The device stores elements before it publishes them: the slot may
               already hold the element of index i + size (journalled before it was
               stored), or have been reused by an even later lap. */
            int next_lap = id == q->entries[2 * next] && len == q->entries[2 * next + 1];
            if ((id != jid || len != jlen) && !next_lap) {
                uint16_t now = load16(used + 2);
                if ((uint16_t)(now - i) < size)
                    event(q, "USED_ELEM", "index=%u slot=%llu memory=%u/%u journal=%u/%u "
                          "used_idx=%u", i, (unsigned long long)slot, id, len, jid, jlen,
                          now);
            }
        }
        q->published += delta;
        q->advances++;
        q->last = idx;
    }
    if (q->ring.receive && q->ring.event_idx) {
        uint16_t used_event = load16(avail + 4 + 2 * size);
        uint16_t ahead = (uint16_t)(used_event - idx);
        /* 0 is what virtqueue_disable_cb_split writes, not an index */
        if (used_event && ahead && ahead < 0x8000) {
            uint16_t again = load16(used + 2);
            if ((uint16_t)(used_event - again) && (uint16_t)(used_event - again) < 0x8000)
                event(q, "GUEST_AHEAD", "used_event=%u used_idx=%u", used_event, again);
        }
    }
}

int main(int argc, char **argv)
{
    const char *match = NULL, *dir = NULL;
    double seconds = 0;
    int pid = -1, fd;
    uint64_t samples = 0, start, deadline, next_scan = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--match"))
            match = argv[i + 1];
        else if (!strcmp(argv[i], "--journal"))
            dir = argv[i + 1];
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
    }
    if (!match || !dir) {
        fprintf(stderr, "usage: ring_watch --match SOCKET_PATH --journal DIR [--seconds S]\n");
        return 2;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    start = now_ns();
    deadline = seconds > 0 ? start + (uint64_t)(seconds * 1e9) : UINT64_MAX;
    while (!stop && pid < 0 && now_ns() < start + 60000000000ull) {
        pid = find_qemu(match);
        if (pid < 0)
            usleep(20000);
    }
    if (pid < 0) {
        fprintf(stderr, "ring_watch: no QEMU names %s\n", match);
        return 1;
    }
    fd = -1;
    while (!stop && fd < 0 && now_ns() < start + 60000000000ull) {
        fd = open_guest_ram(pid);
        if (fd < 0)
            usleep(20000);
    }
    if (fd < 0) {
        fprintf(stderr, "ring_watch: QEMU %d holds no memfd (share=on?)\n", pid);
        return 1;
    }
    ram = mmap(NULL, ram_size, PROT_READ, MAP_SHARED, fd, 0);
    if (ram == MAP_FAILED) {
        perror("ring_watch: mmap guest RAM");
        return 1;
    }
    printf("ring_watch: watching qemu=%d ram=%zu\n", pid, ram_size);
    fflush(stdout);
    while (!stop && now_ns() < deadline) {
        if (samples % 4096 == 0 && now_ns() >= next_scan) {
            scan_journals(dir);
            next_scan = now_ns() + 50000000;
        }
        for (int i = 0; i < nqueues; i++)
            if (refresh(&queues[i]))
                check(&queues[i]);
        samples++;
    }
    {
        double secs = (now_ns() - start) / 1e9;
        printf("ring_watch: summary samples=%llu seconds=%.1f sample_ns=%.0f events=%lu",
               (unsigned long long)samples, secs, secs * 1e9 / (samples ? samples : 1), events);
        for (int i = 0; i < nqueues; i++)
            printf(" %s:published=%llu,advances=%llu,unchecked=%llu", queues[i].name,
                   (unsigned long long)queues[i].published,
                   (unsigned long long)queues[i].advances,
                   (unsigned long long)queues[i].unchecked);
        putchar('\n');
    }
    return 0;
}
