/*
 * The vCPU + device state blob.  Format (little endian), specified in
 * ../STATE_FORMAT.md:
 *
 *   header  "NBVMSTAT" u16 version u16 header_len u32 nsections
 *           u64 payload_len u32 payload_crc32 u32 header_crc32
 *   section u16 kind u16 kind_version u16 instance u16 zero u32 length
 *           u32 zero, then `length` bytes padded to 8
 *
 * A blob is validated completely (checksums, bounds, section sizes,
 * every required section present exactly once, host layout match)
 * before any of it touches the VM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "testhost.h"

#define BLOB_MAGIC "NBVMSTAT"
#define BLOB_VERSION 2
#define HDR_LEN 32
#define SEC_LEN 16
#define MAX_BLOB (16u << 20)
#define META_MAX 1024

enum kind {
    K_META = 1,
    K_REGS = 2, K_SREGS = 3, K_XSAVE = 5, K_XCRS = 6, K_MSRS = 7,
    K_EVENTS = 8, K_MPSTATE = 9, K_LAPIC = 10, K_DEBUGREGS = 11,
    K_PIC_MASTER = 20, K_PIC_SLAVE = 21, K_IOAPIC = 22, K_PIT = 23,
    K_CLOCK = 24, K_ATA = 25,
};

struct kind_desc {
    enum kind kind;
    const char *name;
    int per_vcpu;
};

static const struct kind_desc kinds[] = {
    { K_META, "meta", 0 },
    { K_REGS, "regs", 1 }, { K_SREGS, "sregs", 1 }, { K_XSAVE, "xsave", 1 },
    { K_XCRS, "xcrs", 1 }, { K_MSRS, "msrs", 1 }, { K_EVENTS, "events", 1 },
    { K_MPSTATE, "mp_state", 1 }, { K_LAPIC, "lapic", 1 },
    { K_DEBUGREGS, "debugregs", 1 },
    { K_PIC_MASTER, "pic_master", 0 }, { K_PIC_SLAVE, "pic_slave", 0 },
    { K_IOAPIC, "ioapic", 0 }, { K_PIT, "pit", 0 }, { K_CLOCK, "clock", 0 },
    { K_ATA, "ata", 0 },
};
#define NKINDS (sizeof(kinds) / sizeof(kinds[0]))

struct msr_rec {
    uint32_t index, zero;
    uint64_t value;
};

uint32_t nb_crc32(const uint8_t *buf, size_t len)
{
    static uint32_t table[256];
    static int ready;
    uint32_t c = 0xffffffffu;

    if (!ready) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t v = i;
            for (int k = 0; k < 8; k++)
                v = (v & 1) ? 0xedb88320u ^ (v >> 1) : v >> 1;
            table[i] = v;
        }
        ready = 1;
    }
    for (size_t i = 0; i < len; i++)
        c = table[(c ^ buf[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static const struct kind_desc *find_kind(unsigned k)
{
    for (size_t i = 0; i < NKINDS; i++)
        if ((unsigned)kinds[i].kind == k)
            return &kinds[i];
    return NULL;
}

/* Exact payload size of a section of this kind on this host. */
static size_t kind_size(const struct nb_vm *vm, enum kind k)
{
    switch (k) {
    case K_REGS: return sizeof(struct kvm_regs);
    case K_SREGS: return sizeof(struct kvm_sregs);
    case K_XSAVE: return (size_t)vm->xsave_size;
    case K_XCRS: return sizeof(struct kvm_xcrs);
    case K_MSRS: return 8 + (size_t)vm->nmsrs * sizeof(struct msr_rec);
    case K_EVENTS: return sizeof(struct kvm_vcpu_events);
    case K_MPSTATE: return sizeof(struct kvm_mp_state);
    case K_LAPIC: return sizeof(struct kvm_lapic_state);
    case K_DEBUGREGS: return sizeof(struct kvm_debugregs);
    case K_PIC_MASTER: case K_PIC_SLAVE: case K_IOAPIC:
        return sizeof(struct kvm_irqchip);
    case K_PIT: return sizeof(struct kvm_pit_state2);
    case K_CLOCK: return sizeof(struct kvm_clock_data);
    case K_ATA: return NB_ATA_STATE_LEN;
    case K_META: return 0; /* variable */
    }
    return 0;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t get32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = (v << 8) | p[i]; return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | p[i]; return v; }

static int meta_text(const struct nb_vm *vm, char *out, size_t len)
{
    return snprintf(out, len,
                    "arch=x86_64\nncpus=%d\nmem=%" PRIu64 "\nlowmem=%" PRIu64
                    "\nhighmem=%" PRIu64 "\nhighbase=%" PRIu64 "\npage_size=%" PRIu64 "\n"
                    "xsave_size=%d\nnmsrs=%d\nname=%s\n",
                    vm->ncpus, vm->mem_size, vm->lowmem, vm->highmem,
                    NB_HIGHMEM_BASE, NB_PAGE_SIZE, vm->xsave_size, vm->nmsrs,
                    vm->name);
}

struct builder {
    uint8_t *buf;
    size_t len, cap;
    uint32_t nsec;
};

static uint8_t *add_section(struct builder *b, enum kind k, int inst, size_t len)
{
    size_t need = b->len + SEC_LEN + ((len + 7) & ~(size_t)7);
    uint8_t *sec;
    if (need > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < need)
            cap *= 2;
        uint8_t *nb = realloc(b->buf, cap);
        if (!nb)
            return NULL;
        b->buf = nb;
        b->cap = cap;
    }
    sec = b->buf + b->len;
    memset(sec, 0, need - b->len);
    put16(sec, (uint16_t)k);
    put16(sec + 2, 1);
    put16(sec + 4, (uint16_t)inst);
    put32(sec + 8, (uint32_t)len);
    b->len = need;
    b->nsec++;
    return sec + SEC_LEN;
}

#define SAVE(kind, inst, fd, req, type)                                     \
    do {                                                                    \
        uint8_t *d_ = add_section(&b, kind, inst, sizeof(type));            \
        if (!d_ || ioctl(fd, req, d_) < 0) {                                \
            snprintf(err, errlen, "saving %s of vcpu %d: %s",               \
                     find_kind(kind)->name, inst, strerror(errno));         \
            goto fail;                                                      \
        }                                                                   \
    } while (0)

static int save_irqchip(struct nb_vm *vm, struct builder *b, enum kind k,
                        uint32_t chip)
{
    uint8_t *d = add_section(b, k, 0, sizeof(struct kvm_irqchip));
    if (!d)
        return -1;
    ((struct kvm_irqchip *)d)->chip_id = chip;
    return ioctl(vm->vm_fd, KVM_GET_IRQCHIP, d);
}

static int save_msrs(struct nb_vm *vm, struct nb_vcpu *v, uint8_t *d)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[NB_MAX_MSRS];
    } m;
    memset(&m, 0, sizeof(m));
    m.hdr.nmsrs = (uint32_t)vm->nmsrs;
    for (int i = 0; i < vm->nmsrs; i++)
        m.e[i].index = vm->msr_index[i];
    if (ioctl(v->fd, KVM_GET_MSRS, &m) != vm->nmsrs)
        return -1;
    put32(d, (uint32_t)vm->nmsrs);
    for (int i = 0; i < vm->nmsrs; i++) {
        uint8_t *r = d + 8 + (size_t)i * sizeof(struct msr_rec);
        put32(r, m.e[i].index);
        put64(r + 8, m.e[i].data);
    }
    return 0;
}

/* Serialise the state of a paused VM into a newly allocated blob. */
int nb_state_save(struct nb_vm *vm, uint8_t **blob, size_t *len,
                  char *err, size_t errlen)
{
    struct builder b = { 0 };
    char meta[META_MAX];
    int mlen = meta_text(vm, meta, sizeof(meta));
    uint8_t *d;

    b.cap = 65536;
    b.buf = calloc(1, b.cap);
    if (!b.buf)
        goto nomem;
    b.len = HDR_LEN;
    d = add_section(&b, K_META, 0, (size_t)mlen);
    if (!d)
        goto nomem;
    memcpy(d, meta, (size_t)mlen);
    for (int i = 0; i < vm->ncpus; i++) {
        struct nb_vcpu *v = &vm->vcpus[i];
        SAVE(K_REGS, i, v->fd, KVM_GET_REGS, struct kvm_regs);
        SAVE(K_SREGS, i, v->fd, KVM_GET_SREGS, struct kvm_sregs);
        d = add_section(&b, K_XSAVE, i, (size_t)vm->xsave_size);
        if (!d || ioctl(v->fd, vm->xsave_size > (int)sizeof(struct kvm_xsave)
                                   ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, d) < 0) {
            snprintf(err, errlen, "saving xsave of vcpu %d: %s", i, strerror(errno));
            goto fail;
        }
        SAVE(K_XCRS, i, v->fd, KVM_GET_XCRS, struct kvm_xcrs);
        d = add_section(&b, K_MSRS, i, kind_size(vm, K_MSRS));
        if (!d || save_msrs(vm, v, d) < 0) {
            snprintf(err, errlen, "saving MSRs of vcpu %d failed", i);
            goto fail;
        }
        SAVE(K_EVENTS, i, v->fd, KVM_GET_VCPU_EVENTS, struct kvm_vcpu_events);
        SAVE(K_MPSTATE, i, v->fd, KVM_GET_MP_STATE, struct kvm_mp_state);
        SAVE(K_LAPIC, i, v->fd, KVM_GET_LAPIC, struct kvm_lapic_state);
        SAVE(K_DEBUGREGS, i, v->fd, KVM_GET_DEBUGREGS, struct kvm_debugregs);
    }
    if (save_irqchip(vm, &b, K_PIC_MASTER, KVM_IRQCHIP_PIC_MASTER) < 0 ||
        save_irqchip(vm, &b, K_PIC_SLAVE, KVM_IRQCHIP_PIC_SLAVE) < 0 ||
        save_irqchip(vm, &b, K_IOAPIC, KVM_IRQCHIP_IOAPIC) < 0) {
        snprintf(err, errlen, "saving interrupt controllers: %s", strerror(errno));
        goto fail;
    }
    SAVE(K_PIT, 0, vm->vm_fd, KVM_GET_PIT2, struct kvm_pit_state2);
    SAVE(K_CLOCK, 0, vm->vm_fd, KVM_GET_CLOCK, struct kvm_clock_data);
    d = add_section(&b, K_ATA, 0, NB_ATA_STATE_LEN);
    if (!d)
        goto nomem;
    nb_ata_save(&vm->ata, d);

    memcpy(b.buf, BLOB_MAGIC, 8);
    put16(b.buf + 8, BLOB_VERSION);
    put16(b.buf + 10, HDR_LEN);
    put32(b.buf + 12, b.nsec);
    put64(b.buf + 16, b.len - HDR_LEN);
    put32(b.buf + 24, nb_crc32(b.buf + HDR_LEN, b.len - HDR_LEN));
    put32(b.buf + 28, nb_crc32(b.buf, 28));
    *blob = b.buf;
    *len = b.len;
    return 0;
nomem:
    snprintf(err, errlen, "out of memory");
fail:
    free(b.buf);
    return -1;
}

/* Check the META section against this VM: the layout must match. */
static int check_meta(const struct nb_vm *vm, const uint8_t *d, size_t len,
                      char *err, size_t errlen)
{
    char mine[META_MAX], theirs[META_MAX];
    static const char *keys[] = { "arch", "ncpus", "lowmem", "highmem",
                                  "highbase", "page_size", "xsave_size",
                                  "nmsrs" };
    if (len >= sizeof(theirs)) {
        snprintf(err, errlen, "meta section too long (%zu bytes)", len);
        return -1;
    }
    memcpy(theirs, d, len);
    theirs[len] = 0;
    meta_text(vm, mine, sizeof(mine));
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        char want[128] = "", got[128] = "";
        size_t kl = strlen(keys[i]);
        for (int pass = 0; pass < 2; pass++) {
            const char *s = pass ? theirs : mine;
            char *dst = pass ? got : want;
            for (const char *p = s; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : p) {
                if (strncmp(p, keys[i], kl) == 0 && p[kl] == '=') {
                    const char *e = strchr(p, '\n');
                    size_t vl = e ? (size_t)(e - p - (long)kl - 1) : strlen(p + kl + 1);
                    if (vl >= 128)
                        vl = 127;
                    memcpy(dst, p + kl + 1, vl);
                    dst[vl] = 0;
                    break;
                }
            }
        }
        if (strcmp(want, got) != 0) {
            snprintf(err, errlen, "state is for a different VM: %s=%s in the "
                     "blob, %s here", keys[i], got[0] ? got : "(missing)", want);
            return -1;
        }
    }
    return 0;
}

struct parsed {
    const uint8_t *data[32][NB_MAX_VCPUS];
};

static int validate(const struct nb_vm *vm, const uint8_t *blob, size_t len,
                    struct parsed *p, char *err, size_t errlen)
{
    uint32_t nsec;
    uint64_t plen;
    size_t off = HDR_LEN;

    memset(p, 0, sizeof(*p));
    if (len < HDR_LEN || memcmp(blob, BLOB_MAGIC, 8) != 0) {
        snprintf(err, errlen, "not a VM state blob (bad magic or shorter "
                 "than its header)");
        return -1;
    }
    if (get32(blob + 28) != nb_crc32(blob, 28)) {
        snprintf(err, errlen, "state header checksum mismatch (corrupted)");
        return -1;
    }
    if (get16(blob + 8) != BLOB_VERSION || get16(blob + 10) != HDR_LEN) {
        snprintf(err, errlen, "unsupported state format version %u "
                 "(this host reads version %d)", get16(blob + 8), BLOB_VERSION);
        return -1;
    }
    nsec = get32(blob + 12);
    plen = get64(blob + 16);
    if (plen != len - HDR_LEN) {
        snprintf(err, errlen, "state blob truncated or padded: header says "
                 "%" PRIu64 " payload bytes, got %zu", plen, len - HDR_LEN);
        return -1;
    }
    if (get32(blob + 24) != nb_crc32(blob + HDR_LEN, len - HDR_LEN)) {
        snprintf(err, errlen, "state payload checksum mismatch (corrupted)");
        return -1;
    }
    for (uint32_t s = 0; s < nsec; s++) {
        const struct kind_desc *kd;
        unsigned kind, kver, inst;
        uint32_t slen;
        if (len - off < SEC_LEN) {
            snprintf(err, errlen, "section %u header past end of blob", s);
            return -1;
        }
        kind = get16(blob + off);
        kver = get16(blob + off + 2);
        inst = get16(blob + off + 4);
        slen = get32(blob + off + 8);
        off += SEC_LEN;
        if (slen > len - off || ((slen + 7u) & ~7u) > len - off) {
            snprintf(err, errlen, "section %u length %u past end of blob", s, slen);
            return -1;
        }
        kd = find_kind(kind);
        if (!kd || kver != 1) {
            snprintf(err, errlen, "unknown state section kind %u version %u",
                     kind, kver);
            return -1;
        }
        if ((kd->per_vcpu && inst >= (unsigned)vm->ncpus) ||
            (!kd->per_vcpu && inst != 0)) {
            snprintf(err, errlen, "section %s for vcpu %u, VM has %d vcpus",
                     kd->name, inst, vm->ncpus);
            return -1;
        }
        if (kind != K_META && slen != kind_size(vm, kd->kind)) {
            snprintf(err, errlen, "section %s is %u bytes, expected %zu",
                     kd->name, slen, kind_size(vm, kd->kind));
            return -1;
        }
        if (p->data[kind][inst]) {
            snprintf(err, errlen, "duplicate section %s for instance %u",
                     kd->name, inst);
            return -1;
        }
        if (kind == K_META && check_meta(vm, blob + off, slen, err, errlen) < 0)
            return -1;
        p->data[kind][inst] = blob + off;
        off += (slen + 7u) & ~7u;
    }
    if (off != len) {
        snprintf(err, errlen, "%zu trailing bytes after the last section", len - off);
        return -1;
    }
    for (size_t k = 0; k < NKINDS; k++) {
        int n = kinds[k].per_vcpu ? vm->ncpus : 1;
        for (int i = 0; i < n; i++) {
            if (!p->data[kinds[k].kind][i]) {
                snprintf(err, errlen, "state blob lacks section %s for "
                         "instance %d", kinds[k].name, i);
                return -1;
            }
        }
    }
    /* MSR indices must be the ones this host carries. */
    for (int i = 0; i < vm->ncpus; i++) {
        const uint8_t *d = p->data[K_MSRS][i];
        if (get32(d) != (uint32_t)vm->nmsrs) {
            snprintf(err, errlen, "MSR count mismatch for vcpu %d", i);
            return -1;
        }
        for (int m = 0; m < vm->nmsrs; m++) {
            if (get32(d + 8 + (size_t)m * 16) != vm->msr_index[m]) {
                snprintf(err, errlen, "MSR list of vcpu %d differs from this "
                         "host's", i);
                return -1;
            }
        }
    }
    return 0;
}

#define APPLY(fd, req, ptr, what)                                           \
    do {                                                                    \
        if (ioctl(fd, req, ptr) < 0) {                                      \
            snprintf(err, errlen, "restoring %s of vcpu %d: %s", what, i,   \
                     strerror(errno));                                      \
            return -2;                                                      \
        }                                                                   \
    } while (0)

static int apply(struct nb_vm *vm, const struct parsed *p, char *err, size_t errlen)
{
    int i = 0;
    for (i = 0; i < vm->ncpus; i++) {
        int fd = vm->vcpus[i].fd;
        struct kvm_vcpu_events ev;
        struct {
            struct kvm_msrs hdr;
            struct kvm_msr_entry e[NB_MAX_MSRS];
        } m;
        void *xs;

        APPLY(fd, KVM_SET_SREGS, p->data[K_SREGS][i], "sregs");
        APPLY(fd, KVM_SET_REGS, p->data[K_REGS][i], "regs");
        /* an aligned copy, allocated after the returns above (no leak) */
        if (!(xs = malloc((size_t)vm->xsave_size))) {
            snprintf(err, errlen, "out of memory");
            return -2;
        }
        memcpy(xs, p->data[K_XSAVE][i], (size_t)vm->xsave_size);
        if (ioctl(fd, KVM_SET_XSAVE, xs) < 0) {
            free(xs);
            snprintf(err, errlen, "restoring xsave of vcpu %d: %s", i, strerror(errno));
            return -2;
        }
        free(xs);
        APPLY(fd, KVM_SET_XCRS, p->data[K_XCRS][i], "xcrs");
        APPLY(fd, KVM_SET_LAPIC, p->data[K_LAPIC][i], "lapic");
        memset(&m, 0, sizeof(m));
        m.hdr.nmsrs = (uint32_t)vm->nmsrs;
        for (int k = 0; k < vm->nmsrs; k++) {
            const uint8_t *r = p->data[K_MSRS][i] + 8 + (size_t)k * 16;
            m.e[k].index = get32(r);
            m.e[k].data = get64(r + 8);
        }
        if (ioctl(fd, KVM_SET_MSRS, &m) != vm->nmsrs) {
            snprintf(err, errlen, "restoring MSRs of vcpu %d failed", i);
            return -2;
        }
        memcpy(&ev, p->data[K_EVENTS][i], sizeof(ev));
        ev.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        APPLY(fd, KVM_SET_VCPU_EVENTS, &ev, "events");
        APPLY(fd, KVM_SET_MP_STATE, p->data[K_MPSTATE][i], "mp_state");
        APPLY(fd, KVM_SET_DEBUGREGS, p->data[K_DEBUGREGS][i], "debugregs");
    }
    i = 0;
    APPLY(vm->vm_fd, KVM_SET_IRQCHIP, p->data[K_PIC_MASTER][0], "pic_master");
    APPLY(vm->vm_fd, KVM_SET_IRQCHIP, p->data[K_PIC_SLAVE][0], "pic_slave");
    APPLY(vm->vm_fd, KVM_SET_IRQCHIP, p->data[K_IOAPIC][0], "ioapic");
    APPLY(vm->vm_fd, KVM_SET_PIT2, p->data[K_PIT][0], "pit");
    {
        struct kvm_clock_data c;
        memcpy(&c, p->data[K_CLOCK][0], sizeof(c));
        c.flags = 0;
        APPLY(vm->vm_fd, KVM_SET_CLOCK, &c, "clock");
    }
    nb_ata_restore(&vm->ata, p->data[K_ATA][0]);
    return 0;
}

/*
 * Validate a blob and load it into this (incoming) VM.  Returns 0, -1 if
 * the blob was refused (VM untouched) or -2 if KVM refused a valid blob
 * half-way (the VM must never run).
 */
int nb_state_load(struct nb_vm *vm, const uint8_t *blob, size_t len,
                  char *err, size_t errlen)
{
    struct parsed *p;
    int rc;

    if (len > MAX_BLOB) {
        snprintf(err, errlen, "state blob of %zu bytes exceeds %u", len, MAX_BLOB);
        return -1;
    }
    p = malloc(sizeof(*p));
    if (!p) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    rc = validate(vm, blob, len, p, err, errlen);
    if (rc == 0)
        rc = nb_ata_check(&vm->ata, p->data[K_ATA][0], err, errlen);
    if (rc == 0)
        rc = apply(vm, p, err, errlen);
    free(p);
    return rc;
}
