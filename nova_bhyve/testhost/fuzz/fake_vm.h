/*
 * The test host's targets: a VM as nb_vm_create leaves it, without KVM
 * (every descriptor -1, so that a state load that passes validation fails
 * in its first ioctl), and a valid state blob for it, built with state.c's
 * own section writer.  Include after state.c.
 */
#ifndef NB_FUZZ_FAKE_VM_H
#define NB_FUZZ_FAKE_VM_H

#include "fuzz_util.h"

static const uint32_t FAKE_MSRS[] = { 0x10, 0x174, 0xc0000080 };

/* `ncpus` vCPUs, 4 MiB of lowmem and, with `high`, 1 MiB of highmem. */
static void fake_vm_init(struct nb_vm *vm, int ncpus, int high)
{
    memset(vm, 0, sizeof(*vm));
    strcpy(vm->name, "fuzz");
    vm->ncpus = ncpus;
    vm->lowmem = 4u << 20;
    vm->highmem = high ? 1u << 20 : 0;
    vm->mem_size = vm->lowmem + vm->highmem;
    vm->kvm_fd = vm->vm_fd = vm->mem_fd = vm->event_fd = -1;
    vm->console_fd = vm->tlog_fd = -1;
    vm->xsave_size = 512;
    vm->nmsrs = (int)(sizeof(FAKE_MSRS) / sizeof(FAKE_MSRS[0]));
    memcpy(vm->msr_index, FAKE_MSRS, sizeof(FAKE_MSRS));
    for (int i = 0; i < NB_MAX_VCPUS; i++)
        vm->vcpus[i] = (struct nb_vcpu){ .index = i, .fd = -1, .vm = vm };
    pthread_mutex_init(&vm->lock, NULL);
    pthread_cond_init(&vm->cond, NULL);
    pthread_mutex_init(&vm->console_lock, NULL);
    nb_ata_init(&vm->ata);
}

/* Give the fake VM a 1 MiB disk: a dirty-block log, no file behind it. */
static void fake_vm_add_disk(struct nb_vm *vm)
{
    static uint64_t dirty[4];

    vm->ata.present = 1;
    vm->ata.sectors = 2048;
    vm->ata.nblocks = 256;
    vm->ata.dirty = dirty;
}

/* Fill in a blob's header: section count, payload length, checksums. */
static void fake_blob_seal(uint8_t *blob, size_t len, uint32_t nsec)
{
    memcpy(blob, BLOB_MAGIC, 8);
    put16(blob + 8, BLOB_VERSION);
    put16(blob + 10, HDR_LEN);
    put32(blob + 12, nsec);
    put64(blob + 16, len - HDR_LEN);
    put32(blob + 24, nb_crc32(blob + HDR_LEN, len - HDR_LEN));
    put32(blob + 28, nb_crc32(blob, 28));
}

/* A blob nb_state_load accepts for `vm` (malloc()ed, *len bytes). */
static uint8_t *fake_blob(const struct nb_vm *vm, size_t *len)
{
    struct builder b = { 0 };
    char meta[META_MAX];
    int mlen = meta_text(vm, meta, sizeof(meta));

    b.len = HDR_LEN;
    memcpy(add_section(&b, K_META, 0, (size_t)mlen), meta, (size_t)mlen);
    for (size_t k = 1; k < NKINDS; k++) {
        for (int i = 0; i < (kinds[k].per_vcpu ? vm->ncpus : 1); i++) {
            uint8_t *d = add_section(&b, kinds[k].kind, i, kind_size(vm, kinds[k].kind));
            if (kinds[k].kind == K_ATA)
                nb_ata_save((struct nb_ata *)&vm->ata, d);
            if (kinds[k].kind != K_MSRS)
                continue;
            put32(d, (uint32_t)vm->nmsrs);
            for (int m = 0; m < vm->nmsrs; m++)
                put32(d + 8 + (size_t)m * 16, vm->msr_index[m]);
        }
    }
    fake_blob_seal(b.buf, b.len, b.nsec);
    *len = b.len;
    return b.buf;
}

#endif
