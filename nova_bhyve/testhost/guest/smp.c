/*
 * Application processors: start them with INIT and two SIPIs through the
 * local APIC (xAPIC), one at a time, each on its own stack; each calls
 * the function smp_start() was given with its CPU number (1, 2, ...).
 * The trampoline is in boot.S.  Interrupts stay off on every AP.
 */
#include "guest.h"

#define AP_TRAMP_ADDR       0x8000          /* below the multiboot info */
#define AP_STACK_SIZE       16384
#define LAPIC_ICR_LOW       0x300
#define LAPIC_ICR_HIGH      0x310
#define ICR_INIT            0x00004500      /* INIT, level assert */
#define ICR_STARTUP         0x00004600      /* SIPI; | vector */
#define ICR_PENDING         (1u << 12)
#define APIC_BASE_X2APIC    (1ULL << 10)
#define APIC_BASE_ENABLE    (1ULL << 11)
#define APIC_SVR_ENABLE     0x100

extern const char ap_tramp[], ap_tramp_end[];
void ap_main(void);

/* Read by the AP in boot.S and ap_main(), written before its SIPI. */
uint64_t ap_stack_top;
static volatile int ap_cpu;
static volatile int ap_up;
static void (*ap_fn)(int cpu);
static uint8_t ap_stacks[MAX_CPUS - 1][AP_STACK_SIZE] __attribute__((aligned(16)));

static void icr_send(uint32_t apic_id, uint32_t low)
{
    volatile uint32_t *hi = (volatile uint32_t *)(uintptr_t)(LAPIC_BASE + LAPIC_ICR_HIGH);
    volatile uint32_t *lo = (volatile uint32_t *)(uintptr_t)(LAPIC_BASE + LAPIC_ICR_LOW);

    *hi = apic_id << 24;
    *lo = low;
    while (*lo & ICR_PENDING)
        cpu_relax();
}

static void delay_us(uint64_t tsc_khz, uint64_t us)
{
    uint64_t until = rdtsc() + tsc_khz * us / 1000;

    while (rdtsc() < until)
        cpu_relax();
}

/* Where an AP lands in C, on its own stack, interrupts off. */
void ap_main(void)
{
    int cpu = ap_cpu;

    idt_load();
    __atomic_store_n(&ap_up, 1, __ATOMIC_RELEASE);
    ap_fn(cpu);
    halt_forever();
}

/*
 * Start CPUs 1 .. ncpus - 1 (APIC IDs 1 .. ncpus - 1) running fn(cpu).
 * Returns how many CPUs run, the BSP included.
 */
int smp_start(int ncpus, uint64_t tsc_khz, void (*fn)(int cpu))
{
    uint64_t base = rdmsr(MSR_APIC_BASE);
    int up = 1;

    if (ncpus > MAX_CPUS)
        ncpus = MAX_CPUS;
    if (base & APIC_BASE_X2APIC)        /* x2APIC -> xAPIC needs a disable */
        wrmsr(MSR_APIC_BASE, base & ~(APIC_BASE_X2APIC | APIC_BASE_ENABLE));
    wrmsr(MSR_APIC_BASE, LAPIC_BASE | APIC_BASE_ENABLE | (base & (1ULL << 8)));
    *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + LAPIC_SVR) =
        APIC_SVR_ENABLE | VEC_SPURIOUS;
    memcpy((void *)(uintptr_t)AP_TRAMP_ADDR, ap_tramp,
           (size_t)(ap_tramp_end - ap_tramp));
    ap_fn = fn;
    for (int cpu = 1; cpu < ncpus; cpu++) {
        uint64_t until;

        ap_cpu = cpu;
        ap_up = 0;
        ap_stack_top = (uint64_t)(uintptr_t)(ap_stacks[cpu - 1] + AP_STACK_SIZE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        icr_send((uint32_t)cpu, ICR_INIT);
        delay_us(tsc_khz, 10000);
        for (int i = 0; i < 2 && !ap_up; i++) {
            icr_send((uint32_t)cpu, ICR_STARTUP | (AP_TRAMP_ADDR >> 12));
            delay_us(tsc_khz, 200);
        }
        until = rdtsc() + tsc_khz * 1000;       /* one second */
        while (!__atomic_load_n(&ap_up, __ATOMIC_ACQUIRE) && rdtsc() < until)
            cpu_relax();
        if (!ap_up) {
            kprintf("WARN cpu %d did not start", cpu);
            break;
        }
        up++;
    }
    return up;
}
