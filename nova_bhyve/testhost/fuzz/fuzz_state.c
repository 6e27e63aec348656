/*
 * Target "state": the test host's state-blob loader (state.c,
 * nb_state_load, included so that its section writer makes the seeds),
 * as `load-state` runs it on a blob from the control socket.  Without
 * KVM a blob that passes validation fails in its first ioctl (-2), so a
 * load must never report success.
 *
 * Input: u8 mode, then the blob.
 *   mode bit 0: recompute the header's and the payload's CRC-32 (so that
 *               mutations reach the section checks)
 *        bit 1: the VM has 2 vCPUs (else 1)
 *        bit 2: the VM has a 1 MiB disk (else none)
 */
#include "../src/state.c"

#include "fake_vm.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct nb_vm vms[4];
    struct fz in = { data, size };
    uint8_t mode = fz_u8(&in);
    struct nb_vm *vm = &vms[(mode >> 1) & 3];
    uint8_t *blob = malloc(in.n + 1);
    char err[256];
    int rc;

    if (!vm->ncpus) {
        fake_vm_init(vm, 1 + ((mode >> 1) & 1), 0);
        if (mode & 4)
            fake_vm_add_disk(vm);
    }
    memcpy(blob, in.p, in.n);
    if (mode & 1 && in.n >= HDR_LEN) {
        put32(blob + 24, nb_crc32(blob + HDR_LEN, in.n - HDR_LEN));
        put32(blob + 28, nb_crc32(blob, 28));
    }
    memset(err, 'X', sizeof(err));
    rc = nb_state_load(vm, blob, in.n, err, sizeof(err));
    if (fz_debug("state_load", rc, err) == 0 || (rc != -1 && rc != -2))
        abort();
    free(blob);
    return 0;
}

/* Seeds: a valid blob for each VM, checksums fixed or not; with a disk,
 * one with a write half-way through a sector. */
static void fuzz_seeds(const char *dir)
{
    for (int n = 0; n < 3; n++) {
        int cpus = n == 1 ? 2 : 1, disk = n == 2;
        struct nb_vm vm;
        size_t len;
        uint8_t *blob, *seed;
        char name[32];

        fake_vm_init(&vm, cpus, 0);
        if (disk) {
            fake_vm_add_disk(&vm);
            vm.ata.xfer = 2;
            vm.ata.lba = 100;
            vm.ata.remaining = 3;
            vm.ata.pos = 128;
            vm.ata.status = 0x58;
        }
        blob = fake_blob(&vm, &len);
        seed = malloc(len + 1);
        seed[0] = (uint8_t)((cpus - 1) << 1 | (cpus == 2) | disk << 2);
        memcpy(seed + 1, blob, len);
        snprintf(name, sizeof(name), disk ? "blob-disk-in-flight" :
                 "blob-%d-vcpus", cpus);
        fz_seed(dir, name, seed, len + 1);
        free(seed);
        free(blob);
    }
}
