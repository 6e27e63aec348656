/*
 * VM creation: guest memory in a memfd, KVM memory slots with dirty
 * logging, in-kernel interrupt controllers and PIT, vCPUs with CPUID, and
 * the dirty-page log.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "testhost.h"

void nb_log(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "nb-testhost: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void nb_die(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "nb-testhost: error: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(NB_EXIT_ERROR);
}

/* Wake the control loop (async-signal safe). */
void nb_vm_notify(struct nb_vm *vm)
{
    uint64_t one = 1;
    if (write(vm->event_fd, &one, sizeof(one)) < 0) {
        /* counter saturated: the loop is awake anyway */
    }
}

uint64_t nb_bitmap_bytes(uint64_t pages)
{
    return ((pages + 63) / 64) * 8;
}

/* Memory slots: 0 = lowmem at GPA 0, 1 = highmem at GPA 4 GiB. */
static int set_slot(struct nb_vm *vm, int slot, uint64_t gpa, uint64_t size,
                    uint64_t offset)
{
    struct kvm_userspace_memory_region r = {
        .slot = (uint32_t)slot,
        .flags = KVM_MEM_LOG_DIRTY_PAGES,
        .guest_phys_addr = gpa,
        .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)(vm->mem + offset),
    };
    return ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
}

/*
 * Clear the new slots' logs, whose bits "initially set" are all 1, with
 * one get-and-clear before any vCPU runs.  No page is mapped yet, so
 * nothing is write-protected, but KVM still visits every page (about 1 ms
 * a GiB here): done now, the first get-and-clear of a migration visits
 * only the pages written since boot, and the guest does not stall while
 * KVM goes through the rest.
 */
static void clear_initial_log(struct nb_vm *vm)
{
    size_t bytes = nb_vm_dirty_log_bytes(vm);
    uint8_t *discard = malloc(bytes);

    if (!discard)
        nb_die("allocating a %zu-byte dirty bitmap", bytes);
    if (nb_vm_dirty_log(vm, discard, bytes) < 0)
        nb_die("clearing the initial dirty log: %s", strerror(errno));
    free(discard);
}

static void setup_memory(struct nb_vm *vm)
{
    struct kvm_enable_cap cap = {
        .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        .args = { KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
                  KVM_DIRTY_LOG_INITIALLY_SET },
    };
    int caps = ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION,
                     KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);

    vm->mem_fd = memfd_create("nb-guest-ram", MFD_CLOEXEC);
    if (vm->mem_fd < 0)
        nb_die("memfd_create: %s", strerror(errno));
    if (ftruncate(vm->mem_fd, (off_t)vm->mem_size) < 0)
        nb_die("sizing guest memory to %llu bytes: %s",
               (unsigned long long)vm->mem_size, strerror(errno));
    vm->mem = mmap(NULL, vm->mem_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                   vm->mem_fd, 0);
    if (vm->mem == MAP_FAILED)
        nb_die("mapping guest memory: %s", strerror(errno));
    madvise(vm->mem, vm->mem_size, MADV_HUGEPAGE);

    /* Manual protection lets get and clear be separate steps; "initially
     * set" avoids write-protecting all memory when logging starts. */
    if (caps & KVM_DIRTY_LOG_INITIALLY_SET) {
        if (ioctl(vm->vm_fd, KVM_ENABLE_CAP, &cap) < 0)
            nb_die("enabling manual dirty-log protection: %s",
                   strerror(errno));
    } else {
        nb_die("this kernel lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 "
               "(Linux 5.8 or newer is needed)");
    }
    if (set_slot(vm, 0, 0, vm->lowmem, 0) < 0)
        nb_die("KVM_SET_USER_MEMORY_REGION lowmem: %s", strerror(errno));
    if (vm->highmem &&
        set_slot(vm, 1, NB_HIGHMEM_BASE, vm->highmem, vm->lowmem) < 0)
        nb_die("KVM_SET_USER_MEMORY_REGION highmem: %s", strerror(errno));
    clear_initial_log(vm);
}

static struct kvm_cpuid2 *supported_cpuid(int kvm_fd)
{
    int n = 64;
    for (;;) {
        struct kvm_cpuid2 *c = calloc(1, sizeof(*c) +
                                      n * sizeof(struct kvm_cpuid_entry2));
        if (!c)
            nb_die("out of memory");
        c->nent = (uint32_t)n;
        if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0)
            return c;
        free(c);
        if (errno != E2BIG || n > 4096)
            nb_die("KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
        n *= 2;
    }
}

static void setup_cpuid(struct nb_vm *vm, struct nb_vcpu *v,
                        const struct kvm_cpuid2 *base)
{
    size_t sz = sizeof(*base) + base->nent * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = malloc(sz);
    if (!c)
        nb_die("out of memory");
    memcpy(c, base, sz);
    for (uint32_t i = 0; i < c->nent; i++) {
        struct kvm_cpuid_entry2 *e = &c->entries[i];
        switch (e->function) {
        case 1:
            /* initial APIC id and logical processor count */
            e->ebx = (e->ebx & 0x0000ffffu) | ((uint32_t)v->index << 24) |
                     ((uint32_t)vm->ncpus << 16);
            break;
        case 0xb:
        case 0x1f:
            e->edx = (uint32_t)v->index;
            break;
        default:
            break;
        }
    }
    if (ioctl(v->fd, KVM_SET_CPUID2, c) < 0)
        nb_die("KVM_SET_CPUID2: %s", strerror(errno));
    free(c);
}

/*
 * MSRs carried in the state blob: the ones a 64-bit guest kernel and its
 * timers depend on.  TSC comes first and TSC_DEADLINE last, so a restored
 * deadline is interpreted against the restored TSC and LAPIC.
 */
static const uint32_t wanted_msrs[] = {
    0x00000010, /* IA32_TSC */
    0x00000174, 0x00000175, 0x00000176, /* SYSENTER_CS/ESP/EIP */
    0x00000277, /* PAT */
    0x000001a0, /* MISC_ENABLE */
    0x000002ff, /* MTRRdefType */
    0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, /* STAR LSTAR CSTAR FMASK */
    0xc0000102, /* KERNEL_GS_BASE */
    0xc0000103, /* TSC_AUX */
    0x4b564d01, /* KVM system time */
    0x4b564d02, /* KVM async PF */
    0x4b564d03, /* KVM steal time */
    0x4b564d04, /* KVM PV EOI */
    0x000006e0, /* TSC_DEADLINE */
};

static void probe_msrs(struct nb_vm *vm)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[1];
    } m;
    vm->nmsrs = 0;
    for (size_t i = 0; i < sizeof(wanted_msrs) / sizeof(wanted_msrs[0]); i++) {
        memset(&m, 0, sizeof(m));
        m.hdr.nmsrs = 1;
        m.e[0].index = wanted_msrs[i];
        if (ioctl(vm->vcpus[0].fd, KVM_GET_MSRS, &m) == 1)
            vm->msr_index[vm->nmsrs++] = wanted_msrs[i];
    }
}

int nb_vm_create(struct nb_vm *vm, int ncpus, uint64_t mem_size)
{
    /* "speaker dummy" makes KVM emulate port 0x61 (PIT channel 2 gate and
     * output) in the kernel, which TSC calibration loops rely on. */
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    struct kvm_cpuid2 *cpuid;
    int xs;

    vm->ncpus = ncpus;
    vm->mem_size = mem_size;
    vm->lowmem = mem_size < NB_LOWMEM_LIMIT ? mem_size : NB_LOWMEM_LIMIT;
    vm->highmem = mem_size - vm->lowmem;

    vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm_fd < 0)
        nb_die("cannot open /dev/kvm: %s (is KVM enabled and are you root?)",
               strerror(errno));
    if (ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        nb_die("unexpected KVM API version");
    if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT) <= 0)
        nb_die("KVM lacks KVM_CAP_IMMEDIATE_EXIT");
    vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
    if (vm->vm_fd < 0)
        nb_die("KVM_CREATE_VM: %s", strerror(errno));
    /* Intel needs these two pages reserved below 4 GiB; AMD ignores them. */
    ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);
    {
        uint64_t ident = 0xfffbc000ULL;
        ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &ident);
    }
    setup_memory(vm);
    if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
        nb_die("KVM_CREATE_IRQCHIP: %s", strerror(errno));
    if (ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit) < 0)
        nb_die("KVM_CREATE_PIT2: %s", strerror(errno));

    vm->run_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (vm->run_size <= 0)
        nb_die("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
    xs = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    vm->xsave_size = xs > (int)sizeof(struct kvm_xsave) ? xs
                                                        : (int)sizeof(struct kvm_xsave);
    cpuid = supported_cpuid(vm->kvm_fd);
    for (int i = 0; i < ncpus; i++) {
        struct nb_vcpu *v = &vm->vcpus[i];
        v->index = i;
        v->vm = vm;
        v->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, i);
        if (v->fd < 0)
            nb_die("KVM_CREATE_VCPU %d: %s", i, strerror(errno));
        v->run = mmap(NULL, (size_t)vm->run_size, PROT_READ | PROT_WRITE,
                      MAP_SHARED, v->fd, 0);
        if (v->run == MAP_FAILED)
            nb_die("mapping kvm_run: %s", strerror(errno));
        setup_cpuid(vm, v, cpuid);
    }
    free(cpuid);
    probe_msrs(vm);
    return 0;
}

/* Multiboot v1 machine state for the boot processor. */
int nb_vm_setup_boot(struct nb_vm *vm, uint64_t entry, uint64_t mbi)
{
    struct nb_vcpu *v = &vm->vcpus[0];
    struct kvm_sregs s;
    struct kvm_regs r;
    struct kvm_segment code = {
        .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 0xb,
        .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
    };
    struct kvm_segment data = code;

    data.selector = 0x18;
    data.type = 0x3;
    if (ioctl(v->fd, KVM_GET_SREGS, &s) < 0)
        return -1;
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.cr0 = 0x11; /* PE | ET */
    s.cr4 = 0;
    s.efer = 0;
    if (ioctl(v->fd, KVM_SET_SREGS, &s) < 0)
        return -1;
    /* Firmware would enable the MTRRs with write-back as default type. */
    {
        struct {
            struct kvm_msrs hdr;
            struct kvm_msr_entry e[1];
        } m = { .hdr.nmsrs = 1 };
        m.e[0].index = 0x2ff;  /* MTRRdefType: enabled, default write-back */
        m.e[0].data = 0xc06;
        if (ioctl(v->fd, KVM_SET_MSRS, &m) != 1)
            nb_log("cannot enable guest MTRRs; guest memory may be uncached");
    }
    memset(&r, 0, sizeof(r));
    r.rip = entry;
    r.rax = 0x2badb002;
    r.rbx = mbi;
    r.rflags = 0x2;
    return ioctl(v->fd, KVM_SET_REGS, &r);
}

size_t nb_vm_dirty_log_bytes(const struct nb_vm *vm)
{
    return nb_bitmap_bytes(vm->lowmem / NB_PAGE_SIZE) +
           nb_bitmap_bytes(vm->highmem / NB_PAGE_SIZE);
}

/* Pages re-protected per KVM_CLEAR_DIRTY_LOG call: 64 MiB of guest memory. */
#define CLEAR_CHUNK_WORDS   256

/*
 * Read a slot's dirty bitmap, keep the 64-page words [keep0, keep1) of it
 * (zero the others), and unless `peek` clear exactly the bits kept.
 */
static int slot_get_and_clear(struct nb_vm *vm, int slot, uint64_t pages,
                              uint8_t *bitmap, uint64_t keep0, uint64_t keep1,
                              int peek)
{
    struct kvm_dirty_log log = { .slot = (uint32_t)slot };
    struct kvm_clear_dirty_log clr = { .slot = (uint32_t)slot };
    uint64_t *w = (uint64_t *)bitmap, nw = nb_bitmap_bytes(pages) / 8;

    if (keep1 <= keep0)
        return 0;               /* nothing of this slot asked for */
    log.dirty_bitmap = bitmap;
    if (ioctl(vm->vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
        return -1;
    for (uint64_t i = 0; i < nw; i++)
        if (i < keep0 || i >= keep1)
            w[i] = 0;
    if (peek)
        return 0;
    /*
     * KVM re-protects the pages cleared under its MMU lock, which a vCPU
     * faulting on a page waits for: clear a chunk at a time, and only the
     * chunks with a bit set, so a large guest's first get-and-clear (every
     * bit set) stalls it for one chunk's time, not its whole memory's.
     */
    for (uint64_t w0 = 0; w0 < nw; w0 += CLEAR_CHUNK_WORDS) {
        uint64_t w1 = w0 + CLEAR_CHUNK_WORDS < nw ? w0 + CLEAR_CHUNK_WORDS : nw;
        uint64_t any = 0;

        for (uint64_t i = w0; i < w1; i++)
            any |= w[i];
        if (!any)
            continue;
        clr.first_page = w0 * 64;
        clr.num_pages = (uint32_t)((w1 * 64 < pages ? w1 * 64 : pages) - w0 * 64);
        clr.dirty_bitmap = &w[w0];
        if (ioctl(vm->vm_fd, KVM_CLEAR_DIRTY_LOG, &clr) < 0)
            return -1;
    }
    return 0;
}

/*
 * Get-and-clear the dirty log: the bitmap of lowmem pages followed by the
 * bitmap of highmem pages, each padded to a multiple of 64 bits.  A page
 * written after its bit was read is reported by the next call.  Only the
 * 64-page words [first, first + count) of that bitmap are read and
 * cleared (the others come back zero and stay pending); `peek` reads
 * without clearing.
 */
int nb_vm_dirty_log_range(struct nb_vm *vm, uint8_t *out, size_t out_len,
                          uint64_t first, uint64_t count, int peek)
{
    uint64_t lp = vm->lowmem / NB_PAGE_SIZE, hp = vm->highmem / NB_PAGE_SIZE;
    uint64_t lb = nb_bitmap_bytes(lp), lw = lb / 8;
    uint64_t end = count > UINT64_MAX - first ? UINT64_MAX : first + count;

    if (out_len < nb_vm_dirty_log_bytes(vm)) {
        errno = EINVAL;
        return -1;
    }
    memset(out, 0, out_len);
    if (slot_get_and_clear(vm, 0, lp, out, first, end, peek) < 0)
        return -1;
    if (hp && slot_get_and_clear(vm, 1, hp, out + lb, first > lw ? first - lw : 0,
                                 end > lw ? end - lw : 0, peek) < 0)
        return -1;
    return 0;
}

int nb_vm_dirty_log(struct nb_vm *vm, uint8_t *out, size_t out_len)
{
    return nb_vm_dirty_log_range(vm, out, out_len, 0, UINT64_MAX, 0);
}
