/*
 * CPU setup: IDT and exception reporting, TSC calibration against the PIT,
 * and the LAPIC TSC-deadline timer used to sleep between heartbeats.
 */
#include "guest.h"

/* ---- IDT ------------------------------------------------------------------ */

struct idt_gate {
    uint16_t off_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t off_mid;
    uint32_t off_hi;
    uint32_t reserved;
} __attribute__((packed));

struct idt_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

/* Stack layout built by the stubs in boot.S plus the CPU's frame. */
struct isr_frame {
    uint64_t vector;
    uint64_t error;
    uint64_t rip;
    uint64_t cs;
    uint64_t rflags;
    uint64_t rsp;
    uint64_t ss;
};

#define IDT_INTERRUPT_GATE  0x8E    /* present, DPL 0, 64-bit interrupt gate */
#define ISR_STUB_SIZE       16

/* Legacy 8259 PICs. */
#define PIC1_CMD            0x20
#define PIC1_DATA           0x21
#define PIC2_CMD            0xA0
#define PIC2_DATA           0xA1
#define PIC1_VECTOR         0x20    /* IRQ 0-7  -> vectors 0x20-0x27 */
#define PIC2_VECTOR         0x28    /* IRQ 8-15 -> vectors 0x28-0x2F */

extern char isr_stubs[];
extern char timer_isr[];
extern char spurious_isr[];

static struct idt_gate idt[256] __attribute__((aligned(4096)));

void exception_handler(struct isr_frame *f);

static void idt_set(unsigned vec, const void *handler)
{
    uint64_t addr = (uint64_t)(uintptr_t)handler;

    idt[vec] = (struct idt_gate){
        .off_lo = (uint16_t)addr,
        .selector = GDT_CODE64,
        .ist = 0,
        .type_attr = IDT_INTERRUPT_GATE,
        .off_mid = (uint16_t)(addr >> 16),
        .off_hi = (uint32_t)(addr >> 32),
    };
}

/*
 * Firmware (e.g. SeaBIOS) leaves the 8259 PICs programmed for real mode, with
 * IRQ 0 on vector 8, and the PIT running.  Move the PICs off the exception
 * vectors and mask every IRQ: this guest only takes LAPIC timer interrupts.
 */
static void pic_disable(void)
{
    outb(PIC1_CMD, 0x11);           /* ICW1: initialise, ICW4 follows */
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, PIC1_VECTOR);   /* ICW2: vector base */
    outb(PIC2_DATA, PIC2_VECTOR);
    outb(PIC1_DATA, 0x04);          /* ICW3: slave on IRQ 2 */
    outb(PIC2_DATA, 0x02);
    outb(PIC1_DATA, 0x01);          /* ICW4: 8086 mode */
    outb(PIC2_DATA, 0x01);
    outb(PIC1_DATA, 0xFF);          /* mask all IRQs */
    outb(PIC2_DATA, 0xFF);
}

/*
 * Every vector gets a handler: the LAPIC timer and the spurious vectors
 * (LAPIC, and IRQ 7/15 of the masked PICs) have their own, everything else
 * reports "FAIL exception" and halts.
 */
void idt_init(void)
{
    pic_disable();
    for (unsigned vec = 0; vec < 256; vec++)
        idt_set(vec, isr_stubs + vec * ISR_STUB_SIZE);
    idt_set(VEC_TIMER, timer_isr);
    idt_set(VEC_SPURIOUS, spurious_isr);
    idt_set(PIC1_VECTOR + 7, spurious_isr);
    idt_set(PIC2_VECTOR + 7, spurious_isr);
    idt_load();
}

/* Load the IDT idt_init() filled (each CPU loads its own IDTR). */
void idt_load(void)
{
    struct idt_ptr ptr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };

    __asm__ volatile("lidt %0" : : "m"(ptr));
}

void exception_handler(struct isr_frame *f)
{
    uint64_t cr2;

    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    panic("FAIL exception vec=%lu err=0x%lx rip=0x%lx cr2=0x%lx rsp=0x%lx\n",
          f->vector, f->error, f->rip, cr2, f->rsp);
}

/* ---- TSC calibration against PIT channel 2 --------------------------------- */

#define PIT_HZ              1193182ULL
#define PIT_CAL_MS          10
#define PIT_LATCH           (PIT_HZ * PIT_CAL_MS / 1000)
#define PIT_PORT_CH2        0x42
#define PIT_PORT_MODE       0x43
#define PIT_MODE_CH2_ONESHOT 0xB0   /* channel 2, lo/hi byte, mode 0, binary */
#define PORT_NMI_SC         0x61    /* bit 0: ch2 gate, bit 1: speaker, bit 5: OUT2 */
#define NMI_SC_GATE2        0x01
#define NMI_SC_SPEAKER      0x02
#define NMI_SC_OUT2         0x20
#define PIT_TIMEOUT_TSC     (1ULL << 30)    /* >= 100 ms for TSCs up to 10 GHz */
#define PIT_TRIES           3
#define TSC_KHZ_FALLBACK    1000000UL

/*
 * Count TSC cycles while PIT channel 2 counts down PIT_LATCH ticks in mode 0
 * (OUT2, visible in port 0x61 bit 5, goes high at terminal count).
 *
 * Each port access may be a VM exit of unpredictable length, so both ends
 * are bracketed by TSC reads: the count starts somewhere inside the write
 * of its high byte, and OUT2 rises between the last poll that saw it low
 * and the first that sees it high.  *cycles gets the midpoint estimate and
 * *uncertainty the width of the two brackets.  Returns false if the PIT
 * does not behave.
 */
static bool pit_measure_tsc(uint64_t *cycles, uint64_t *uncertainty)
{
    uint64_t start_lo, start_hi, end_lo, before, after;

    outb(PORT_NMI_SC, (inb(PORT_NMI_SC) & ~NMI_SC_SPEAKER) | NMI_SC_GATE2);
    outb(PIT_PORT_MODE, PIT_MODE_CH2_ONESHOT);
    outb(PIT_PORT_CH2, PIT_LATCH & 0xFF);
    start_lo = rdtsc();
    outb(PIT_PORT_CH2, PIT_LATCH >> 8);         /* counting starts */
    start_hi = rdtsc();

    end_lo = start_lo;
    for (;;) {
        uint8_t v;

        before = rdtsc();
        v = inb(PORT_NMI_SC);
        after = rdtsc();
        if (v & NMI_SC_OUT2)
            break;
        end_lo = before;
        if (after - start_hi > PIT_TIMEOUT_TSC)
            return false;
    }
    if (end_lo == start_lo)
        return false;                   /* OUT2 must be low while counting */
    *cycles = ((end_lo + after) - (start_lo + start_hi)) / 2;
    *uncertainty = (after - end_lo) + (start_hi - start_lo);
    return true;
}

/*
 * Use the best of three measurements, i.e. the one with the tightest
 * brackets (least disturbed by VM exits or host preemption).
 */
uint64_t tsc_calibrate_khz(void)
{
    uint64_t best = 0, best_unc = UINT64_MAX;

    for (int i = 0; i < PIT_TRIES; i++) {
        uint64_t cycles, unc;

        if (pit_measure_tsc(&cycles, &unc) && unc < best_unc) {
            best = cycles;
            best_unc = unc;
        }
    }
    /* Below 1 MHz the PIT (or the TSC) is clearly not working. */
    if (best < PIT_CAL_MS * 1000) {
        warn_defer("WARN tsc calibration failed, assuming tsc_khz=%lu",
                   TSC_KHZ_FALLBACK);
        return TSC_KHZ_FALLBACK;
    }
    return best * PIT_HZ / (PIT_LATCH * 1000);
}

/* ---- KVM paravirtual features ------------------------------------------------- */

#define CPUID_HV_BASE           0x40000000
#define CPUID_KVM_FEATURES      0x40000001
#define KVM_FEATURE_CLOCKSOURCE     (1u << 0)
#define KVM_FEATURE_CLOCKSOURCE2    (1u << 3)
#define KVM_FEATURE_ASYNC_PF        (1u << 4)
#define KVM_FEATURE_STEAL_TIME      (1u << 5)
#define KVM_FEATURE_PV_EOI          (1u << 6)
#define MSR_KVM_SYSTEM_TIME         0x00000012
#define MSR_KVM_SYSTEM_TIME_NEW     0x4B564D01
#define MSR_KVM_ASYNC_PF_EN         0x4B564D02
#define MSR_KVM_STEAL_TIME          0x4B564D03
#define MSR_KVM_PV_EOI_EN           0x4B564D04

/*
 * Firmware (SeaBIOS uses kvmclock) may leave KVM paravirtual features
 * enabled.  The hypervisor then keeps writing guest pages outside this
 * guest's image and working set, which would break the memory-write
 * contract, so switch every advertised one off.  Writing 0 disables each.
 */
void kvm_pv_disable(void)
{
    static const struct {
        uint32_t feature;
        uint32_t msr;
    } pv[] = {
        { KVM_FEATURE_CLOCKSOURCE, MSR_KVM_SYSTEM_TIME },
        { KVM_FEATURE_CLOCKSOURCE2, MSR_KVM_SYSTEM_TIME_NEW },
        { KVM_FEATURE_ASYNC_PF, MSR_KVM_ASYNC_PF_EN },
        { KVM_FEATURE_STEAL_TIME, MSR_KVM_STEAL_TIME },
        { KVM_FEATURE_PV_EOI, MSR_KVM_PV_EOI_EN },
    };
    uint32_t a, b, c, d;

    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & (1u << 31)))              /* no hypervisor */
        return;
    cpuid(CPUID_HV_BASE, 0, &a, &b, &c, &d);
    /* "KVMKVMKVM\0\0\0" */
    if (b != 0x4B4D564B || c != 0x564B4D56 || d != 0x0000004D ||
        a < CPUID_KVM_FEATURES)
        return;
    cpuid(CPUID_KVM_FEATURES, 0, &a, &b, &c, &d);
    for (size_t i = 0; i < ARRAY_SIZE(pv); i++) {
        if (a & pv[i].feature)
            wrmsr(pv[i].msr, 0);
    }
}

/* ---- LAPIC TSC-deadline timer ------------------------------------------------ */

#define CPUID1_ECX_TSC_DEADLINE (1u << 24)
#define CPUID1_EDX_APIC         (1u << 9)
#define APIC_BASE_BSP           (1ULL << 8)
#define APIC_BASE_X2APIC        (1ULL << 10)
#define APIC_BASE_ENABLE        (1ULL << 11)
#define APIC_SVR_ENABLE         0x100
#define LVT_TIMER_TSC_DEADLINE  (2u << 17)
#define LVT_MASKED              (1u << 16)

static bool deadline_timer;

static inline void lapic_write(uint32_t reg, uint32_t val)
{
    *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg) = val;
}

/*
 * Enable the xAPIC at its default base with the timer in TSC-deadline mode.
 * Returns false (and leaves the APIC alone) if the CPU lacks the feature.
 */
bool lapic_deadline_init(void)
{
    uint32_t a, b, c, d;
    uint64_t base;

    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & CPUID1_ECX_TSC_DEADLINE) || !(d & CPUID1_EDX_APIC))
        return false;

    base = rdmsr(MSR_APIC_BASE);
    if (base & APIC_BASE_X2APIC)        /* x2APIC -> xAPIC needs a disable */
        wrmsr(MSR_APIC_BASE, base & ~(APIC_BASE_X2APIC | APIC_BASE_ENABLE));
    wrmsr(MSR_APIC_BASE, LAPIC_BASE | APIC_BASE_ENABLE | (base & APIC_BASE_BSP));

    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);  /* no ExtINT from the PIC */
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, APIC_SVR_ENABLE | VEC_SPURIOUS);
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_TSC_DEADLINE | VEC_TIMER);
    /* Order the LVT write before any IA32_TSC_DEADLINE write (SDM 10.5.4.1). */
    __asm__ volatile("mfence" : : : "memory");
    wrmsr(MSR_TSC_DEADLINE, 0);
    deadline_timer = true;
    return true;
}

/*
 * Wait until the TSC reaches `deadline`.  With the TSC-deadline timer the
 * CPU halts; "sti; hlt" is atomic with respect to interrupts (STI shadow),
 * so a timer that fires before HLT still wakes us.  Wake-ups for other
 * reasons just re-arm and halt again.
 */
void wait_until_tsc(uint64_t deadline)
{
    if (!deadline_timer) {
        while (rdtsc() < deadline)
            cpu_relax();
        return;
    }
    while (rdtsc() < deadline) {
        wrmsr(MSR_TSC_DEADLINE, deadline);
        __asm__ volatile("sti; hlt; cli" : : : "memory");
    }
}
