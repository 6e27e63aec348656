/*
 * Test guest main program: command line, banner, working-set layout and the
 * idle / stress workloads with their heartbeat and self-checks.
 *
 * Output lines (see README.md for the full contract):
 *   NBGUEST 1 mode=.. pattern=.. ws=.. wsoff=.. hb=.. tsc_khz=.. mem=.. cpus=..
 *   WS 0x<start> 0x<end>          (one per contiguous range)
 *   READY
 *   DISK sectors=.. blocks=..      (with disk=1)
 *   HB <seq> <passes> <errors> [<disk passes>]
 *   FAIL <what> addr=0x.. want=0x.. got=0x..
 */
#include "guest.h"

#define CANARY_MAX          (64 * KiB)
#define CANARY_SLICE        256
#define HB_RECORDS          512
#define FAIL_PRINT_LIMIT    16
#define SIZE_LIMIT          (1ULL << 40)    /* sanity bound for ws/wsoff */

enum mode { MODE_IDLE, MODE_STRESS };
enum pattern { PATTERN_TOUCH, PATTERN_RANDOM, PATTERN_TIGHT, PATTERN_FILL };

static const char *const mode_names[] = { "idle", "stress" };
static const char *const pattern_names[] = { "touch", "random", "tight",
                                              "fill" };

static struct {
    enum mode mode;
    enum pattern pattern;
    uint64_t ws;                /* requested working-set size, bytes */
    uint64_t wsoff;             /* offset into the arena, bytes */
    uint64_t hb_us;             /* heartbeat interval, microseconds */
    uint64_t canary_slice;      /* idle: canary bytes checked per heartbeat */
    uint64_t cpus;              /* stress touch/tight/fill: CPUs that write */
    uint64_t cycle;             /* stress/tight: values byte 0 cycles through */
    bool selftest_corrupt;      /* flip one byte after pass 2 */
    bool disk;                  /* run the disk writer too */
    uint64_t disksize;          /* disk writer region, bytes (0: all) */
} cfg = {
    .mode = MODE_IDLE,
    .pattern = PATTERN_TOUCH,
    .ws = 64 * MiB,
    .wsoff = 0,
    .hb_us = 1000,
    .canary_slice = CANARY_SLICE,
    .cpus = 1,
    .cycle = 256,
};

/* Working set. */
static struct range ws_ranges[MAX_RANGES];
static int ws_nranges;
static uint64_t ws_bytes;

/* Writers: CPU c writes its share of the working set (pages
 * [c * P / n, (c + 1) * P / n)), w_ranges[c], and counts its passes and
 * errors; CPU 0 alone also keeps the heartbeat. */
static int writers = 1;
static struct range w_ranges[MAX_CPUS][MAX_RANGES];
static int w_nranges[MAX_CPUS];
static uint64_t w_first[MAX_CPUS];          /* index of the share's first page */
static volatile uint64_t w_passes[MAX_CPUS];
static volatile uint64_t w_errors[MAX_CPUS];

/* Heartbeat and self-check state. */
static uint64_t tsc_khz;
static uint64_t hb_ticks;
static uint64_t hb_next;
static uint64_t hb_seq;
static unsigned fails_printed;
static bool corrupted;
static bool disk_on;            /* the disk writer has a region */
static uint64_t disk_next;      /* TSC of the memory writer's next disk step */
static volatile uint64_t hb_rec[HB_RECORDS];

/* ---- Command line ------------------------------------------------------------ */

/* Parse "<number>[K|M|G]" (decimal, or hex with 0x) into bytes. */
static bool parse_size(const char *s, uint64_t *out)
{
    uint64_t v = 0, base = 10, shift = 0;
    bool any = false;

    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        unsigned d;

        if (*s >= '0' && *s <= '9')
            d = (unsigned)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (unsigned)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (unsigned)(*s - 'A' + 10);
        else
            break;
        if (v > (UINT64_MAX - d) / base)
            return false;
        v = v * base + d;
        any = true;
    }
    switch (*s) {
    case 'k': case 'K': shift = 10; s++; break;
    case 'm': case 'M': shift = 20; s++; break;
    case 'g': case 'G': shift = 30; s++; break;
    }
    if (!any || *s != '\0' || (shift && v > (UINT64_MAX >> shift)))
        return false;
    *out = v << shift;
    return true;
}

static bool parse_choice(const char *val, const char *const *names, int n,
                         int *out)
{
    for (int i = 0; i < n; i++) {
        if (strncmp(val, names[i], strlen(names[i]) + 1) == 0) {
            *out = i;
            return true;
        }
    }
    return false;
}

/* Apply one key=value token; returns false if the value is invalid. */
static bool apply_option(const char *key, size_t klen, const char *val)
{
    uint64_t num;
    int choice;

#define KEY_IS(k) (klen == sizeof(k) - 1 && strncmp(key, k, klen) == 0)
    if (KEY_IS("mode")) {
        if (!parse_choice(val, mode_names, 2, &choice))
            return false;
        cfg.mode = (enum mode)choice;
    } else if (KEY_IS("pattern")) {
        if (!parse_choice(val, pattern_names, 4, &choice))
            return false;
        cfg.pattern = (enum pattern)choice;
    } else if (KEY_IS("ws")) {
        if (!parse_size(val, &num) || num > SIZE_LIMIT)
            return false;
        cfg.ws = ALIGN_UP(num, PAGE_SIZE);
    } else if (KEY_IS("wsoff")) {
        if (!parse_size(val, &num) || num > SIZE_LIMIT)
            return false;
        cfg.wsoff = ALIGN_DOWN(num, PAGE_SIZE);
    } else if (KEY_IS("hb")) {
        if (!parse_size(val, &num) || num == 0 || num > 3600ULL * 1000000)
            return false;
        cfg.hb_us = num;
    } else if (KEY_IS("canary_slice")) {
        if (!parse_size(val, &num) || num == 0 || num > CANARY_MAX)
            return false;
        cfg.canary_slice = ALIGN_UP(num, 8);
    } else if (KEY_IS("cpus")) {
        if (!parse_size(val, &num) || num == 0 || num > MAX_CPUS)
            return false;
        cfg.cpus = num;
    } else if (KEY_IS("cycle")) {
        if (!parse_size(val, &num) || num < 2 || num > 256)
            return false;
        cfg.cycle = num;
    } else if (KEY_IS("disk")) {
        if (!parse_size(val, &num) || num > 1)
            return false;
        cfg.disk = num == 1;
    } else if (KEY_IS("disksize")) {
        if (!parse_size(val, &num) || num > SIZE_LIMIT)
            return false;
        cfg.disksize = num;
    } else if (KEY_IS("selftest_corrupt")) {
        if (!parse_size(val, &num) || num > 1)
            return false;
        cfg.selftest_corrupt = num == 1;
    } else {
        warn_defer("WARN unknown key %s", key);
    }
#undef KEY_IS
    return true;
}

/*
 * Space-separated key=value tokens.  A leading token without '=' is the
 * kernel image path that boot loaders (GRUB, QEMU) prepend, and is skipped.
 */
static void parse_cmdline(const char *p)
{
    bool first = true;

    while (*p) {
        char tok[128];
        size_t len = 0;
        const char *eq;

        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        while (*p && *p != ' ' && *p != '\t') {
            if (len < sizeof(tok) - 1)
                tok[len++] = *p;
            p++;
        }
        tok[len] = '\0';

        eq = tok;
        while (*eq && *eq != '=')
            eq++;
        if (!*eq) {
            if (!first)
                warn_defer("WARN unknown key %s", tok);
        } else if (!apply_option(tok, (size_t)(eq - tok), eq + 1)) {
            warn_defer("WARN bad value %s", tok);
        }
        first = false;
    }
}

/* ---- Heartbeat and failure reporting ------------------------------------------ */

static void report_fail_on(int cpu, const char *what, uint64_t addr,
                           uint64_t want, uint64_t got)
{
    w_errors[cpu]++;
    if (__atomic_fetch_add(&fails_printed, 1, __ATOMIC_RELAXED) < FAIL_PRINT_LIMIT)
        kprintf("FAIL %s addr=0x%lx want=0x%lx got=0x%lx\n", what, addr, want,
                got);
}

/* Count and print a self-check failure of CPU 0's workloads. */
void report_fail(const char *what, uint64_t addr, uint64_t want, uint64_t got)
{
    report_fail_on(0, what, addr, want, got);
}

/*
 * Emit the next heartbeat.  The schedule advances by whole intervals so the
 * long-term rate is exact; if we fell more than an interval behind (e.g.
 * the VM was paused) it restarts from now instead of bursting to catch up.
 */
static void heartbeat(uint64_t now)
{
    uint64_t passes = w_passes[0], errors = 0;

    /* the passes every writer has finished, all writers' errors */
    for (int c = 0; c < writers; c++) {
        if (w_passes[c] < passes)
            passes = w_passes[c];
        errors += w_errors[c];
    }
    hb_seq++;
    if (cfg.disk)
        kprintf("HB %lu %lu %lu %lu\n", hb_seq, passes, errors, disk_passes());
    else
        kprintf("HB %lu %lu %lu\n", hb_seq, passes, errors);
    hb_next += hb_ticks;
    if (hb_next <= now)
        hb_next = now + hb_ticks;
}

/*
 * Between heartbeats: a step of disk work if the disk writer runs, paced
 * so that it takes at most half of the CPU's time from the memory writer.
 * A step's time counts up to one heartbeat period: a step the host paused
 * the VM in (the TSC runs on) must not idle the writer as long again.
 */
static inline void hb_poll(void)
{
    uint64_t now = rdtsc();

    if (disk_on && now >= disk_next) {
        uint64_t start = now;

        disk_step();
        now = rdtsc();
        disk_next = now + (now - start < hb_ticks ? now - start : hb_ticks);
    }
    if (now >= hb_next)
        heartbeat(now);
}

/* Physical address of working-set page `idx` (idx < ws_bytes / PAGE_SIZE). */
static uint64_t ws_page_addr(uint64_t idx)
{
    uint64_t off = idx * PAGE_SIZE;

    for (int i = 0; i < ws_nranges; i++) {
        uint64_t len = ws_ranges[i].end - ws_ranges[i].start;

        if (off < len)
            return ws_ranges[i].start + off;
        off -= len;
    }
    panic("FAIL internal ws_page_addr idx=0x%lx", idx);
}

/* Flip one byte behind the checker's back (selftest_corrupt=1). */
static void selftest_corrupt(uint64_t addr)
{
    volatile uint8_t *b = (volatile uint8_t *)(uintptr_t)addr;

    *b ^= 0xFF;
    corrupted = true;
    kprintf("SELFTEST corrupt addr=0x%lx\n", addr);
}

static bool selftest_due(void)
{
    return cfg.selftest_corrupt && !corrupted && w_passes[0] == 2 && ws_bytes;
}

/* ---- Pseudo-random streams ------------------------------------------------------ */

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Seed of the xorshift64* stream for page `i` in pass `p` (never 0). */
static inline uint64_t stream_seed(uint64_t i, uint64_t p)
{
    uint64_t s = splitmix64((p << 32) ^ i);

    return s ? s : 1;
}

static inline uint64_t xorshift64star(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* ---- stress/touch: one byte per page per pass ---------------------------------- */

/*
 * tag(i, p) = (uint8_t)(p * 151 + i * 7 + 1).  The loop below computes it
 * incrementally: tag(i + 1, p) = tag(i, p) + 7.
 */
static inline uint8_t touch_tag(uint64_t i, uint64_t p)
{
    return (uint8_t)(p * 151 + i * 7 + 1);
}

static NORETURN void run_touch(int cpu)
{
    for (uint64_t p = 1;; p++) {
        uint8_t want = touch_tag(w_first[cpu], p - 1);
        uint8_t tag = touch_tag(w_first[cpu], p);

        for (int r = 0; r < w_nranges[cpu]; r++) {
            uint64_t a = w_ranges[cpu][r].start, end = w_ranges[cpu][r].end;

            for (; a < end; a += PAGE_SIZE, want += 7, tag += 7) {
                volatile uint8_t *b = (volatile uint8_t *)(uintptr_t)a;

                if (p > 1) {
                    uint8_t got = *b;

                    if (got != want)
                        report_fail_on(cpu, "touch", a, want, got);
                }
                *b = tag;
                if (cpu == 0)
                    hb_poll();
            }
        }
        w_passes[cpu] = p;
        if (cpu == 0 && selftest_due())
            selftest_corrupt(ws_page_addr(ws_bytes / PAGE_SIZE / 2));
    }
}

/* ---- stress/tight: one byte per page per pass, as fast as a loop can --------- */

/* Pages written between two looks at the clock. */
#define TIGHT_CLOCK_PAGES   64

/*
 * Byte 0 of every page holds p % cfg.cycle after pass p (with the default
 * 256, (uint8_t)p): every cycle-th pass leaves the page zero.  The check reads the
 * byte the store is about to replace: the store needs that cache line
 * anyway, so verifying every page costs the loop almost nothing, and the
 * clock is read once per TIGHT_CLOCK_PAGES pages, not once per page.
 */
static NORETURN void run_tight(int cpu)
{
    for (uint64_t p = 1;; p++) {
        const uint8_t want = (uint8_t)((p - 1) % cfg.cycle),
                      tag = (uint8_t)(p % cfg.cycle);

        for (int r = 0; r < w_nranges[cpu]; r++) {
            uint64_t a = w_ranges[cpu][r].start, end = w_ranges[cpu][r].end;

            while (a < end) {
                uint64_t stop = end - a > TIGHT_CLOCK_PAGES * PAGE_SIZE
                                ? a + TIGHT_CLOCK_PAGES * PAGE_SIZE : end;

                for (; a < stop; a += PAGE_SIZE) {
                    volatile uint8_t *b = (volatile uint8_t *)(uintptr_t)a;
                    uint8_t got = *b;

                    if (p > 1 && got != want)
                        report_fail_on(cpu, "tight", a, want, got);
                    *b = tag;
                }
                if (cpu == 0)
                    hb_poll();
            }
        }
        w_passes[cpu] = p;
        if (cpu == 0 && selftest_due())
            selftest_corrupt(ws_page_addr(ws_bytes / PAGE_SIZE / 2));
    }
}

/* ---- stress/fill: whole pages of fresh data, as fast as a loop can ------------- */

/* The source the pages are copied from: pseudo-random words. */
#define FILL_SRC_WORDS      (64 * KiB / 8)
#define PAGE_WORDS          (PAGE_SIZE / 8)

static uint64_t fill_src[FILL_SRC_WORDS];

static void fill_src_init(void)
{
    uint64_t x = stream_seed(0, 0);

    for (unsigned j = 0; j < FILL_SRC_WORDS; j++)
        fill_src[j] = xorshift64star(&x);
}

/* First source word of page i in pass p: a fresh window each pass. */
static inline const uint64_t *fill_window(uint64_t i, uint64_t p)
{
    return fill_src + splitmix64((p << 32) ^ i) % (FILL_SRC_WORDS - PAGE_WORDS + 1);
}

/* One instruction copies the page (KVM's emulator, too, takes it whole). */
static inline void copy_page(uint64_t a, const uint64_t *from)
{
    void *to = (void *)(uintptr_t)a;
    uint64_t n = PAGE_WORDS;

    __asm__ volatile("rep movsq" : "+D"(to), "+S"(from), "+c"(n) : : "memory");
}

/*
 * Page i after pass p is the source window fill_window(i, p).  Before the
 * copy, word i % 512 of the page is checked against pass p - 1's window.
 * A page's copy is long enough to look at the clock after each.
 */
static NORETURN void run_fill(int cpu)
{
    for (uint64_t p = 1;; p++) {
        uint64_t i = w_first[cpu];

        for (int r = 0; r < w_nranges[cpu]; r++) {
            uint64_t end = w_ranges[cpu][r].end;

            for (uint64_t a = w_ranges[cpu][r].start; a < end; a += PAGE_SIZE, i++) {
                unsigned k = (unsigned)(i % PAGE_WORDS);

                if (p > 1) {
                    uint64_t want = fill_window(i, p - 1)[k];
                    uint64_t got = ((volatile uint64_t *)(uintptr_t)a)[k];

                    if (got != want)
                        report_fail_on(cpu, "fill", a + 8 * k, want, got);
                }
                copy_page(a, fill_window(i, p));
                if (cpu == 0)
                    hb_poll();
            }
        }
        w_passes[cpu] = p;
        if (cpu == 0 && selftest_due()) {
            uint64_t mid = ws_bytes / PAGE_SIZE / 2;

            selftest_corrupt(ws_page_addr(mid) + 8 * (mid % PAGE_WORDS));
        }
    }
}

/* ---- stress/random: whole pages of pseudo-random data ------------------------ */

/*
 * Words per clock check (one cache line).  Generating and checking a page
 * takes a few thousand instructions; checking the clock several times per
 * page keeps heartbeats on time even where guest instructions are very
 * expensive (nested or emulated virtualization).
 */
#define RANDOM_CHUNK_WORDS  8

/*
 * Verify page `a` against the stream seeded from (i, p - 1) (unless p == 1)
 * and refill it from the stream seeded from (i, p), in one pass.  After the
 * first mismatch the rest of the page is only refilled.
 */
static void random_page(uint64_t a, uint64_t i, uint64_t p)
{
    volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)a;
    uint64_t old = stream_seed(i, p - 1), cur = stream_seed(i, p);
    bool verify = p > 1;

    for (unsigned k = 0; k < PAGE_SIZE / 8; k += RANDOM_CHUNK_WORDS) {
        for (unsigned j = k; j < k + RANDOM_CHUNK_WORDS; j++) {
            if (verify) {
                uint64_t want = xorshift64star(&old), got = w[j];

                if (got != want) {
                    report_fail("random", a + 8 * j, want, got);
                    verify = false;
                }
            }
            w[j] = xorshift64star(&cur);
        }
        hb_poll();
    }
}

static NORETURN void run_random(void)
{
    for (uint64_t p = 1;; p++) {
        uint64_t i = 0;

        for (int r = 0; r < ws_nranges; r++) {
            for (uint64_t a = ws_ranges[r].start; a < ws_ranges[r].end;
                 a += PAGE_SIZE, i++)
                random_page(a, i, p);
        }
        w_passes[0] = p;
        if (selftest_due())
            selftest_corrupt(ws_page_addr(ws_bytes / PAGE_SIZE / 2) + 0x80B);
    }
}

/* ---- idle: sleep between heartbeats, check canary and heartbeat records ------- */

#define CANARY_KEY          0x4E42475545535431ULL   /* "NBGUEST1" */

static uint64_t canary_len;     /* bytes, multiple of 8 */
static uint64_t canary_pos;

/* The canary word at physical address a is a ^ CANARY_KEY. */
static void canary_fill(void)
{
    canary_len = ws_bytes < CANARY_MAX ? ws_bytes : CANARY_MAX;
    for (uint64_t off = 0; off < canary_len; off += PAGE_SIZE) {
        uint64_t a = ws_page_addr(off / PAGE_SIZE), end = a + PAGE_SIZE;

        for (; a < end; a += 8)
            *(volatile uint64_t *)(uintptr_t)a = a ^ CANARY_KEY;
    }
}

/* First word in [a, end) that does not hold its canary value, or end. */
static uint64_t canary_scan(uint64_t a, uint64_t end)
{
    const uint64_t key = CANARY_KEY;

#pragma GCC unroll 4
    for (; a < end; a += 8) {
        if (*(volatile uint64_t *)(uintptr_t)a != (a ^ key))
            break;
    }
    return a;
}

/*
 * Verify the next canary_slice bytes of the canary (wrapping; finishing the
 * last slice of the canary completes a pass).  A bad word is reported and
 * repaired, so one corruption counts as one error.
 */
static void canary_check_slice(void)
{
    uint64_t left = cfg.canary_slice;

    while (canary_len && left) {
        uint64_t page_off = canary_pos % PAGE_SIZE;
        uint64_t n = PAGE_SIZE - page_off;
        uint64_t a, end;

        if (n > left)
            n = left;
        if (n > canary_len - canary_pos)
            n = canary_len - canary_pos;
        a = ws_page_addr(canary_pos / PAGE_SIZE) + page_off;
        end = a + n;
        while ((a = canary_scan(a, end)) < end) {
            volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)a;

            report_fail("canary", a, a ^ CANARY_KEY, *w);
            *w = a ^ CANARY_KEY;
            a += 8;
        }
        left -= n;
        canary_pos += n;
        if (canary_pos == canary_len) {
            canary_pos = 0;
            w_passes[0]++;
            break;
        }
    }
}

static NORETURN void run_idle(void)
{
    for (;;) {
        uint64_t seq, got;

        if (disk_on) {
            while (rdtsc() < hb_next)
                disk_step();
        } else {
            wait_until_tsc(hb_next);
        }
        seq = hb_seq + 1;
        if (seq > 1) {
            got = hb_rec[(seq - 1) % HB_RECORDS];
            if (got != seq - 1)
                report_fail("hbrec",
                            (uint64_t)(uintptr_t)&hb_rec[(seq - 1) % HB_RECORDS],
                            seq - 1, got);
        }
        hb_rec[seq % HB_RECORDS] = seq;
        canary_check_slice();
        if (selftest_due())
            selftest_corrupt(ws_page_addr(canary_len / PAGE_SIZE / 2) + 0x123);
        heartbeat(rdtsc());
    }
}

/* Stress mode with an empty working set: nothing to do but heartbeats. */
static NORETURN void run_empty(void)
{
    for (;;) {
        while (rdtsc() < hb_next) {
            if (disk_on)
                disk_step();
            else
                cpu_relax();
        }
        heartbeat(rdtsc());
    }
}

/* ---- Writers on several CPUs ------------------------------------------------------ */

/* Split the working set's pages into `n` shares, in order, as w_ranges. */
static void split_shares(int n)
{
    uint64_t pages = ws_bytes / PAGE_SIZE, idx = 0;
    int r = 0;
    uint64_t a = ws_nranges ? ws_ranges[0].start : 0;

    for (int c = 0; c < n; c++) {
        uint64_t left = (uint64_t)(c + 1) * pages / (uint64_t)n - idx;

        w_first[c] = idx;
        w_nranges[c] = 0;
        while (left && r < ws_nranges) {
            uint64_t take = (ws_ranges[r].end - a) / PAGE_SIZE;

            if (take > left)
                take = left;
            w_ranges[c][w_nranges[c]++] = (struct range){ a, a + take * PAGE_SIZE };
            a += take * PAGE_SIZE;
            idx += take;
            left -= take;
            if (a == ws_ranges[r].end && ++r < ws_nranges)
                a = ws_ranges[r].start;
        }
    }
}

static NORETURN void run_writer(int cpu)
{
    if (cfg.pattern == PATTERN_TIGHT)
        run_tight(cpu);
    if (cfg.pattern == PATTERN_FILL)
        run_fill(cpu);
    run_touch(cpu);
}

/*
 * Stress touch/tight/fill on cfg.cpus CPUs: each writes its share.  A CPU that
 * does not start leaves its share unwritten, and the heartbeat's passes
 * (every writer's) at 0: the failure shows.
 */
static void start_writers(void)
{
    int up;

    writers = cfg.mode == MODE_STRESS && ws_bytes &&
              cfg.pattern != PATTERN_RANDOM ? (int)cfg.cpus : 1;
    split_shares(writers);
    if (writers > 1 && (up = smp_start(writers, tsc_khz, run_writer)) < writers)
        kprintf("WARN %d of %d cpus started", up, writers);
}

/*
 * disk=1: find the disk and announce the writer's region; without a
 * usable disk the writer does nothing (its passes stay 0: the failure
 * shows).
 */
static void start_disk(void)
{
    uint64_t blocks = disk_init(cfg.disksize, tsc_khz);

    if (!disk_sectors())
        kprintf("WARN no ATA disk on the primary IDE channel\n");
    else if (!blocks)
        kprintf("WARN disk region smaller than one block\n");
    kprintf("DISK sectors=%lu blocks=%lu block=4096\n", disk_sectors(), blocks);
    disk_on = blocks != 0;
}

/* ---- Entry ---------------------------------------------------------------------- */

/* Called from boot.S in long mode with the multiboot registers. */
void kmain(uint32_t magic, uint32_t mbi);

void kmain(uint32_t magic, uint32_t mbi)
{
    idt_init();
    kvm_pv_disable();
    multiboot_parse(magic, mbi);
    if (boot.have_cmdline)
        parse_cmdline(boot.cmdline);
    paging_init();
    tsc_khz = tsc_calibrate_khz();
    ws_nranges = workset_build(cfg.wsoff, cfg.ws, ws_ranges, MAX_RANGES,
                               &ws_bytes);
    if (!ws_bytes)
        warn_defer("WARN empty working set");

    kprintf("NBGUEST 1 mode=%s pattern=%s ws=%lu wsoff=%lu hb=%lu tsc_khz=%lu "
            "mem=%lu cpus=%lu disk=%d\n", mode_names[cfg.mode],
            pattern_names[cfg.pattern], ws_bytes, cfg.wsoff, cfg.hb_us, tsc_khz,
            boot.mem_bytes, cfg.cpus, cfg.disk);
    if (cfg.mode == MODE_IDLE && !lapic_deadline_init())
        warn_defer("WARN no TSC-deadline timer, idle busy-waits");
    warn_flush();
    for (int i = 0; i < ws_nranges; i++)
        kprintf("WS 0x%lx 0x%lx\n", ws_ranges[i].start, ws_ranges[i].end);
    if (cfg.mode == MODE_IDLE)
        canary_fill();
    if (cfg.disk)
        start_disk();
    hb_ticks = cfg.hb_us * tsc_khz / 1000;
    if (!hb_ticks)
        hb_ticks = 1;
    if (cfg.pattern == PATTERN_FILL)
        fill_src_init();
    start_writers();
    kprintf("READY\n");
    hb_next = rdtsc() + hb_ticks;

    if (cfg.mode == MODE_IDLE)
        run_idle();
    if (!ws_bytes)
        run_empty();
    if (cfg.pattern == PATTERN_RANDOM)
        run_random();
    run_writer(0);
}
