/*
 * Shared definitions for the nova_bhyve test guest kernel.
 *
 * This header is included from both C and assembly (boot.S); everything
 * that is not a plain #define is guarded by __ASSEMBLER__.
 */
#ifndef NBGUEST_GUEST_H
#define NBGUEST_GUEST_H

/* ---- Multiboot v1 -------------------------------------------------- */
#define MB_HEADER_MAGIC     0x1BADB002
#define MB_HEADER_FLAGS     0x00000002      /* bit 1: want memory info */
#define MB_BOOT_MAGIC       0x2BADB002      /* in EAX at entry */

#define MBI_FLAG_MEM        (1u << 0)       /* mem_lower/mem_upper valid */
#define MBI_FLAG_CMDLINE    (1u << 2)       /* cmdline valid */
#define MBI_FLAG_MMAP       (1u << 6)       /* mmap_addr/mmap_length valid */

/* ---- Segments (see the GDT in boot.S) ------------------------------- */
#define GDT_CODE64          0x08
#define GDT_DATA            0x10
#define GDT_CODE32          0x18

/* ---- Control registers and MSRs ------------------------------------- */
#define CR0_PE              (1 << 0)
#define CR0_NW              (1 << 29)
#define CR0_CD              (1 << 30)
#define CR0_PG              (1 << 31)
#define CR4_PAE             (1 << 5)

#define MSR_APIC_BASE       0x0000001B
#define MSR_TSC_DEADLINE    0x000006E0
#define MSR_EFER            0xC0000080
#define EFER_LME            (1 << 8)

/* ---- Paging (4-level, 2 MiB leaf pages) ----------------------------- */
#define PTE_P               0x001
#define PTE_RW              0x002
#define PTE_PWT             0x008
#define PTE_PCD             0x010
#define PTE_A               0x020
#define PTE_D               0x040
#define PTE_PS              0x080
/*
 * Accessed and Dirty are preset in every entry we create, so the CPU never
 * has to write a paging-structure page after boot.  (In non-leaf entries
 * bit 6 is ignored by the CPU; setting it is harmless.)
 */
#define PTE_TABLE           (PTE_P | PTE_RW | PTE_A | PTE_D)
#define PTE_LARGE_WB        (PTE_P | PTE_RW | PTE_A | PTE_D | PTE_PS)
#define PTE_LARGE_UC        (PTE_LARGE_WB | PTE_PCD | PTE_PWT)

#define LARGE_PAGE_SHIFT    21
#define MAP_LIMIT_GIB       64              /* identity map covers [0, 64 GiB) */
#define BOOT_MAP_GIB        4               /* mapped by boot.S */
#define UC_FROM_GIB         3               /* boot.S maps [3 GiB, 4 GiB) UC */

/* ---- Local APIC (xAPIC, MMIO) -------------------------------------- */
#define LAPIC_BASE          0xFEE00000
#define LAPIC_TPR           0x080
#define LAPIC_EOI           0x0B0
#define LAPIC_SVR           0x0F0
#define LAPIC_LVT_TIMER     0x320
#define LAPIC_LVT_LINT0     0x350
#define LAPIC_EOI_ADDR      (LAPIC_BASE + LAPIC_EOI)

#define VEC_TIMER           0x40
#define VEC_SPURIOUS        0xFF

#define BOOT_STACK_SIZE     16384

#ifndef __ASSEMBLER__

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PAGE_SIZE           4096ULL
#define KiB                 1024ULL
#define MiB                 (1024ULL * KiB)
#define GiB                 (1024ULL * MiB)

#define ALIGN_DOWN(x, a)    ((x) & ~((uint64_t)(a) - 1))
#define ALIGN_UP(x, a)      ALIGN_DOWN((x) + (uint64_t)(a) - 1, (a))
#define ARRAY_SIZE(a)       (sizeof(a) / sizeof((a)[0]))
#define NORETURN            __attribute__((noreturn))
#define PRINTF(f, a)        __attribute__((format(printf, f, a)))

/* A half-open physical address range [start, end). */
struct range {
    uint64_t start;
    uint64_t end;
};

/* ---- Port I/O and CPU primitives ------------------------------------ */
static inline void outb(uint16_t port, uint8_t val)
{
    __asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t val;
    __asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
    return val;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}

static inline void wrmsr(uint32_t msr, uint64_t val)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)val),
                     "d"((uint32_t)(val >> 32)) : "memory");
}

static inline void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *a,
                         uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d)
                     : "a"(leaf), "c"(subleaf));
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" : : : "memory");
}

static inline NORETURN void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" : : : "memory");
}

/* ---- lib.c ----------------------------------------------------------- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);
int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int ksnprintf(char *buf, size_t size, const char *fmt, ...) PRINTF(3, 4);

/* ---- console.c -------------------------------------------------------- */
void con_write(const char *buf, size_t len);
void kprintf(const char *fmt, ...) PRINTF(1, 2);
void warn_defer(const char *fmt, ...) PRINTF(1, 2);
void warn_flush(void);
NORETURN void panic(const char *fmt, ...) PRINTF(1, 2);

/* ---- cpu.c ------------------------------------------------------------ */
void idt_init(void);
void idt_load(void);
void kvm_pv_disable(void);
uint64_t tsc_calibrate_khz(void);
bool lapic_deadline_init(void);
void wait_until_tsc(uint64_t deadline);

/* ---- smp.c ------------------------------------------------------------ */
#define MAX_CPUS            8
int smp_start(int ncpus, uint64_t tsc_khz, void (*fn)(int cpu));

/* ---- disk.c ----------------------------------------------------------- */
#define DISK_MAX_BLOCKS     16384           /* 64 MiB region of 4 KiB blocks */
uint64_t disk_init(uint64_t region, uint64_t tsc_khz);
uint64_t disk_sectors(void);
uint64_t disk_passes(void);
void disk_step(void);

/* ---- main.c ----------------------------------------------------------- */
void report_fail(const char *what, uint64_t addr, uint64_t want, uint64_t got);

/* ---- memory.c --------------------------------------------------------- */
#define MAX_RANGES          64

struct boot_info {
    char cmdline[1024];
    bool have_cmdline;
    struct range ram[MAX_RANGES];   /* available RAM, sorted and merged */
    int nram;
    uint64_t mem_bytes;             /* total available RAM */
    struct range loader[3];         /* multiboot info, mmap, cmdline */
    int nloader;
};

extern struct boot_info boot;

void multiboot_parse(uint32_t magic, uint32_t mbi_phys);
void paging_init(void);
int workset_build(uint64_t wsoff, uint64_t ws, struct range *out, int max,
                  uint64_t *effective);

#endif /* !__ASSEMBLER__ */
#endif /* NBGUEST_GUEST_H */
