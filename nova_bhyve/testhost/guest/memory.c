/*
 * Physical memory: multiboot information parsing, the identity map beyond
 * the first 4 GiB, and the layout of the working set.
 *
 * The multiboot information structure, its memory map and the command line
 * are only ever read: the guest must not write outside its own image and
 * the working set.
 */
#include "guest.h"

/* Multiboot v1 information structure (the fields we use). */
struct mb_info {
    uint32_t flags;
    uint32_t mem_lower;         /* KiB below 1 MiB */
    uint32_t mem_upper;         /* KiB above 1 MiB */
    uint32_t boot_device;
    uint32_t cmdline;
    uint32_t mods_count;
    uint32_t mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length;
    uint32_t mmap_addr;
} __attribute__((packed));

/* Size of the complete v1 structure, for the "do not touch" list. */
#define MB_INFO_FULL_SIZE   120

struct mb_mmap_entry {
    uint32_t size;              /* size of the rest of the entry */
    uint64_t addr;
    uint64_t len;
    uint32_t type;
} __attribute__((packed));

#define MB_MMAP_AVAILABLE   1

#define LARGE_PAGE          (1ULL << LARGE_PAGE_SHIFT)
#define ARENA_START         (16 * MiB)
#define MAP_LIMIT           ((uint64_t)MAP_LIMIT_GIB * GiB)

/* Paging structures, defined in boot.S. */
extern uint64_t pml4[512];
extern uint64_t pdpt[512];
extern uint64_t pd_pool[MAP_LIMIT_GIB][512];

struct boot_info boot;

static void loader_range_add(uint64_t addr, uint64_t len)
{
    if (len && boot.nloader < (int)ARRAY_SIZE(boot.loader))
        boot.loader[boot.nloader++] = (struct range){ addr, addr + len };
}

static void ram_add(uint64_t start, uint64_t end)
{
    if (start >= end)
        return;
    if (boot.nram == MAX_RANGES) {
        warn_defer("WARN too many memory map entries, ignoring 0x%lx-0x%lx",
                   start, end);
        return;
    }
    boot.ram[boot.nram++] = (struct range){ start, end };
}

/* Sort boot.ram by start address and merge overlapping/adjacent ranges. */
static void ram_normalize(void)
{
    int n = 0;

    for (int i = 1; i < boot.nram; i++) {
        struct range r = boot.ram[i];
        int j = i - 1;

        for (; j >= 0 && boot.ram[j].start > r.start; j--)
            boot.ram[j + 1] = boot.ram[j];
        boot.ram[j + 1] = r;
    }
    for (int i = 0; i < boot.nram; i++) {
        if (n && boot.ram[i].start <= boot.ram[n - 1].end) {
            if (boot.ram[i].end > boot.ram[n - 1].end)
                boot.ram[n - 1].end = boot.ram[i].end;
        } else {
            boot.ram[n++] = boot.ram[i];
        }
    }
    boot.nram = n;
    boot.mem_bytes = 0;
    for (int i = 0; i < n; i++)
        boot.mem_bytes += boot.ram[i].end - boot.ram[i].start;
}

/*
 * Read the multiboot information: command line and available RAM (from the
 * memory map if present, otherwise from mem_lower/mem_upper).
 */
void multiboot_parse(uint32_t magic, uint32_t mbi_phys)
{
    const struct mb_info *mbi = (const struct mb_info *)(uintptr_t)mbi_phys;

    if (magic != MB_BOOT_MAGIC)
        panic("FAIL boot magic=0x%x (not loaded by a multiboot loader)", magic);
    loader_range_add(mbi_phys, MB_INFO_FULL_SIZE);

    if ((mbi->flags & MBI_FLAG_CMDLINE) && mbi->cmdline) {
        const char *src = (const char *)(uintptr_t)mbi->cmdline;
        size_t len = strlen(src);

        if (len >= sizeof(boot.cmdline)) {
            warn_defer("WARN command line truncated to %zu bytes",
                       sizeof(boot.cmdline) - 1);
        }
        loader_range_add(mbi->cmdline, len + 1);
        if (len >= sizeof(boot.cmdline))
            len = sizeof(boot.cmdline) - 1;
        memcpy(boot.cmdline, src, len);
        boot.cmdline[len] = '\0';
        boot.have_cmdline = true;
    }

    if (mbi->flags & MBI_FLAG_MMAP) {
        uint64_t p = mbi->mmap_addr, end = p + mbi->mmap_length;

        loader_range_add(mbi->mmap_addr, mbi->mmap_length);
        while (p + sizeof(struct mb_mmap_entry) <= end) {
            const struct mb_mmap_entry *e =
                (const struct mb_mmap_entry *)(uintptr_t)p;

            if (e->size < sizeof(*e) - sizeof(e->size))
                break;                  /* malformed entry */
            if (e->type == MB_MMAP_AVAILABLE && e->addr + e->len > e->addr)
                ram_add(e->addr, e->addr + e->len);
            p += e->size + sizeof(e->size);
        }
    } else if (mbi->flags & MBI_FLAG_MEM) {
        warn_defer("WARN no memory map, using mem_lower/mem_upper");
        ram_add(0, (uint64_t)mbi->mem_lower * KiB);
        ram_add(1 * MiB, 1 * MiB + (uint64_t)mbi->mem_upper * KiB);
    } else {
        panic("FAIL no memory information from the boot loader");
    }
    ram_normalize();
}

/*
 * Complete the identity map started by boot.S, which mapped [0, 4 GiB) with
 * [3 GiB, 4 GiB) uncached (PCI hole, IOAPIC, LAPIC):
 *  - map every 2 MiB page that overlaps RAM in [4 GiB, 64 GiB), using the
 *    page directory pd_pool[GiB index] (cleared when first used);
 *  - make 2 MiB pages in [3 GiB, 4 GiB) that lie entirely in RAM
 *    write-back (some loaders put low RAM above 3 GiB).
 */
void paging_init(void)
{
    const uint64_t boot_end = (uint64_t)BOOT_MAP_GIB * GiB;
    const uint64_t uc_start = (uint64_t)UC_FROM_GIB * GiB;
    bool beyond = false;

    for (int i = 0; i < boot.nram; i++) {
        uint64_t start = boot.ram[i].start, end = boot.ram[i].end, a;

        if (end > MAP_LIMIT)
            beyond = true;

        for (a = ALIGN_UP(start > uc_start ? start : uc_start, LARGE_PAGE);
             a + LARGE_PAGE <= end && a < boot_end; a += LARGE_PAGE)
            pd_pool[a / GiB][(a >> LARGE_PAGE_SHIFT) & 511] = a | PTE_LARGE_WB;

        a = ALIGN_DOWN(start > boot_end ? start : boot_end, LARGE_PAGE);
        for (; a < end && a < MAP_LIMIT; a += LARGE_PAGE) {
            unsigned gib = (unsigned)(a / GiB);

            if (!(pdpt[gib] & PTE_P)) {
                memset(pd_pool[gib], 0, sizeof(pd_pool[gib]));
                pdpt[gib] = (uint64_t)(uintptr_t)pd_pool[gib] | PTE_TABLE;
            }
            pd_pool[gib][(a >> LARGE_PAGE_SHIFT) & 511] = a | PTE_LARGE_WB;
        }
    }
    if (beyond)
        warn_defer("WARN RAM above %u GiB is not used", MAP_LIMIT_GIB);

    /* Flush the TLB (no global pages are used). */
    __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" : : : "rax", "memory");
}

/* Remove `hole` from the sorted range list `r` (n entries, capacity max). */
static bool range_subtract(struct range *r, int *n, int max, struct range hole)
{
    bool hit = false;

    for (int i = 0; i < *n; i++) {
        struct range cur = r[i];

        if (hole.end <= cur.start || cur.end <= hole.start)
            continue;
        hit = true;
        if (hole.start > cur.start && hole.end < cur.end) {
            if (*n == max) {            /* no room to split: drop the tail */
                r[i].end = hole.start;
                continue;
            }
            memmove(&r[i + 2], &r[i + 1], (size_t)(*n - i - 1) * sizeof(*r));
            r[i].end = hole.start;
            r[i + 1] = (struct range){ hole.end, cur.end };
            (*n)++;
            i++;
        } else if (hole.start > cur.start) {
            r[i].end = hole.start;
        } else if (hole.end < cur.end) {
            r[i].start = hole.end;
        } else {
            memmove(&r[i], &r[i + 1], (size_t)(*n - i - 1) * sizeof(*r));
            (*n)--;
            i--;
        }
    }
    return hit;
}

/*
 * Lay out the working set.  The arena is all available RAM at or above
 * 16 MiB (and below the 64 GiB map limit), page aligned, in ascending
 * address order with holes skipped.  The working set is arena bytes
 * [wsoff, wsoff + ws), split into physically contiguous ranges written to
 * out[].  Returns the number of ranges; *effective receives the size after
 * clipping to the arena.
 */
int workset_build(uint64_t wsoff, uint64_t ws, struct range *out, int max,
                  uint64_t *effective)
{
    static struct range arena[MAX_RANGES];
    int narena = 0, nout = 0;
    uint64_t skip = wsoff, left = ws;

    for (int i = 0; i < boot.nram; i++) {
        uint64_t s = boot.ram[i].start, e = boot.ram[i].end;

        s = ALIGN_UP(s < ARENA_START ? ARENA_START : s, PAGE_SIZE);
        e = ALIGN_DOWN(e > MAP_LIMIT ? MAP_LIMIT : e, PAGE_SIZE);
        if (s < e)
            arena[narena++] = (struct range){ s, e };
    }

    /* Never hand out pages holding the loader's data (read-only for us). */
    for (int i = 0; i < boot.nloader; i++) {
        struct range h = {
            ALIGN_DOWN(boot.loader[i].start, PAGE_SIZE),
            ALIGN_UP(boot.loader[i].end, PAGE_SIZE),
        };

        if (range_subtract(arena, &narena, MAX_RANGES, h))
            warn_defer("WARN multiboot data at 0x%lx-0x%lx excluded from "
                       "the arena", h.start, h.end);
    }

    for (int i = 0; i < narena && left && nout < max; i++) {
        uint64_t s = arena[i].start, len = arena[i].end - s, take;

        if (skip >= len) {
            skip -= len;
            continue;
        }
        s += skip;
        len -= skip;
        skip = 0;
        take = left < len ? left : len;
        out[nout++] = (struct range){ s, s + take };
        left -= take;
    }
    *effective = ws - left;
    if (left)
        warn_defer("WARN ws clipped to the arena: requested=%lu wsoff=%lu "
                   "effective=%lu", ws, wsoff, *effective);
    return nout;
}
