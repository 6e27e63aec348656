/*
 * The bhyve port's restore-only mode: the destination of a migration into
 * stock bhyve, declared in bhyve.h.  Plain POSIX, so it builds and is
 * tested on Linux too.
 *
 * A running bhyve cannot take guest state; restore is `bhyve -r PATH` at
 * process start, reading PATH (guest RAM, lowmem then highmem), PATH.kern
 * and PATH.meta.  So the incoming VM is that checkpoint set, built in
 * place:
 *
 *   open       PATH.meta and PATH.kern of an older set are removed, PATH is
 *              created afresh (0600, O_NOFOLLOW) and sized to memsize=
 *              bytes, sparse; layout and spec come from memsize= and
 *              ncpus= as libvmmapi lays the VM out, state format
 *              "bhyve-ckpt/1" and this host's CPU, as the bhyve port
 *              reports a running VM;
 *   memory     PATH mapped MAP_SHARED: the engine writes pages into it;
 *              holes read as zero (never-sent pages);
 *   load_state the blob (.meta + .kern from the source's checkpoint) is
 *              validated against memsize= and ncpus= and kept in memory;
 *   resume     the commit: PATH is flushed (msync, fsync), then PATH.kern
 *              and PATH.meta are written atomically, .meta last.  A set
 *              with a .meta is therefore complete and committed; anything
 *              short of a commit leaves no PATH.meta.
 *
 * Starting `bhyve -r PATH` and removing the set afterwards are the
 * driver's job.  pause, throttle, save_state and the dirty log fail: no
 * VM runs here, so nothing can be sent from this port.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif

#include "vmm/bhyve/bhyve.h"

#include <sys/types.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define fail nb_errf
#define sysfail nb_syserrf

struct restore {
    struct nb_bhyve_opts o;
    int ramfd;
    uint8_t *blob;          /* device state held until the commit */
    size_t blob_len;
};

int nb_bhyve_restore_layout(uint64_t memsize, struct nb_layout *l, char *err)
{
    if (memsize == 0 || memsize % NB_PAGE != 0 ||
        memsize > NB_BHYVE_MAX_MEMSIZE)
        return fail(err, "guest RAM of %llu bytes: expected a multiple of %u "
                    "up to %llu", (unsigned long long)memsize, NB_PAGE,
                    (unsigned long long)NB_BHYVE_MAX_MEMSIZE);
    memset(l, 0, sizeof(*l));
    l->nsegs = 1;
    l->seg[0].len = memsize;
    if (memsize > NB_BHYVE_LOWMEM_LIMIT) {
        l->nsegs = 2;
        l->seg[0].len = NB_BHYVE_LOWMEM_LIMIT;
        l->seg[1].gpa = NB_BHYVE_HIGHMEM_BASE;
        l->seg[1].len = memsize - NB_BHYVE_LOWMEM_LIMIT;
        l->seg[1].offset = NB_BHYVE_LOWMEM_LIMIT;
    }
    l->total = memsize;
    return 0;
}

static struct restore *R(struct nb_vmm *vmm)
{
    return vmm->priv;
}

static int no_vm(struct nb_vmm *vmm, const char *what, char *err)
{
    struct restore *r = R(vmm);

    return fail(err, "cannot %s VM %s: it does not run here; the port was "
                "opened to receive it into %s (restore-only mode)", what,
                r->o.name, r->o.restore);
}

static int rs_map(struct nb_vmm *vmm, uint8_t **base, char *err)
{
    struct restore *r = R(vmm);
    void *p;

    if (vmm->mem == NULL) {
        p = mmap(NULL, vmm->layout.total, PROT_READ | PROT_WRITE, MAP_SHARED,
                 r->ramfd, 0);
        if (p == MAP_FAILED)
            return sysfail(err, "cannot map %s as guest RAM", r->o.restore);
        vmm->mem = p;
    }
    *base = vmm->mem;
    return 0;
}

static int rs_next_data(struct nb_vmm *vmm, uint64_t off, uint64_t *doff,
                        uint64_t *dend)
{
    return nb_file_next_data(R(vmm)->ramfd, vmm->layout.total, off, doff,
                             dend);
}

static int rs_has_dirty_log(struct nb_vmm *vmm)
{
    (void)vmm;
    return 0;
}

static int rs_dirty_log(struct nb_vmm *vmm, uint64_t *bitmap, size_t words,
                        char *err)
{
    (void)bitmap;
    (void)words;
    return no_vm(vmm, "track dirty pages of", err);
}

static int rs_pause(struct nb_vmm *vmm, char *err)
{
    return no_vm(vmm, "pause", err);
}

static int rs_throttle(struct nb_vmm *vmm, int percent, char *err)
{
    (void)percent;
    return no_vm(vmm, "throttle", err);
}

static int rs_save_state(struct nb_vmm *vmm, uint8_t **blob, size_t *len,
                         char *err)
{
    (void)blob;
    (void)len;
    return no_vm(vmm, "checkpoint", err);
}

/* Check the source's checkpoint against this VM; keep it for the commit. */
static int rs_load_state(struct nb_vmm *vmm, const uint8_t *blob, size_t len,
                         char *err)
{
    struct restore *r = R(vmm);
    struct nb_bhyve_meta meta;
    size_t mo, ml, ko, kl;
    uint8_t *copy;

    if (nb_bhyve_blob_parse(blob, len, &mo, &ml, &ko, &kl, err) != 0 ||
        nb_bhyve_meta_check((const char *)blob + mo, ml, kl,
                            vmm->layout.total, &meta, err) != 0)
        return -1;
    if (meta.ncpus != (uint32_t)r->o.ncpus)
        return fail(err, "the checkpoint has %u vCPUs, VM %s was prepared "
                    "with %d", meta.ncpus, r->o.name, r->o.ncpus);
    if ((copy = malloc(len)) == NULL)
        return fail(err, "out of memory for a %zu-byte state blob", len);
    memcpy(copy, blob, len);
    free(r->blob);
    r->blob = copy;
    r->blob_len = len;
    return 0;
}

/* The commit: RAM on disk first, then PATH.kern, then PATH.meta. */
static int rs_commit(struct nb_vmm *vmm, char *err)
{
    struct restore *r = R(vmm);

    if (r->blob == NULL)
        return fail(err, "no device state was received for VM %s: nothing "
                    "to restore", r->o.name);
    if (vmm->mem != NULL && msync(vmm->mem, vmm->layout.total, MS_SYNC) != 0)
        return sysfail(err, "flushing guest RAM to %s", r->o.restore);
    if (fsync(r->ramfd) != 0)
        return sysfail(err, "flushing guest RAM to %s", r->o.restore);
    return nb_bhyve_restore_files(&r->o, r->blob, r->blob_len, err);
}

static void rs_close(struct nb_vmm *vmm)
{
    struct restore *r = R(vmm);

    if (vmm->mem != NULL)
        munmap(vmm->mem, vmm->layout.total);
    if (r != NULL) {
        if (r->ramfd >= 0)
            close(r->ramfd);
        free(r->blob);
        free(r);
    }
    vmm->mem = NULL;
    vmm->priv = NULL;
}

static int rs_write_pages(struct nb_vmm *vmm, uint64_t off,
                          const uint8_t *const *pages, int n, char *err)
{
    /* a file write reports a full disk as an error, not a SIGBUS */
    return nb_file_write_pages(R(vmm)->ramfd, off, pages, n, err);
}

static const struct nb_vmm_ops restore_ops = {
    .kind = "bhyve-restore",
    .map_memory = rs_map,
    .next_data = rs_next_data,
    .has_dirty_log = rs_has_dirty_log,
    .dirty_log = rs_dirty_log,
    .pause = rs_pause,
    .resume = rs_commit,
    .throttle = rs_throttle,
    .save_state = rs_save_state,
    .load_state = rs_load_state,
    .close = rs_close,
    .write_pages = rs_write_pages,
};

static int unlink_member(const char *base, const char *ext, char *err)
{
    char path[1100];

    snprintf(path, sizeof(path), "%s%s", base, ext);
    if (unlink(path) != 0 && errno != ENOENT)
        return sysfail(err, "cannot remove the old %s", path);
    return 0;
}

int nb_bhyve_open_restore(struct nb_vmm *vmm, const struct nb_bhyve_opts *o,
                          char *err)
{
    struct restore *r;
    struct stat st;

    memset(vmm, 0, sizeof(*vmm));
    if (o->restore[0] == '\0' || o->ncpus < 1 || o->memsize == 0)
        return fail(err, "VM %s does not run here; to receive it give "
                    "restore=PATH, ncpus= and memsize= (the RAM file `bhyve "
                    "-r PATH` will restore, its vCPUs and bytes of RAM)",
                    o->name);
    if ((r = calloc(1, sizeof(*r))) == NULL)
        return fail(err, "out of memory");
    r->o = *o;
    r->ramfd = -1;
    vmm->ops = &restore_ops;
    vmm->priv = r;
    if (nb_bhyve_restore_layout(o->memsize, &vmm->layout, err) != 0)
        goto bad;
    /* .meta first: a set without it is never taken for a complete one */
    if (unlink_member(o->restore, ".meta", err) != 0 ||
        unlink_member(o->restore, ".kern", err) != 0)
        goto bad;
    r->ramfd = open(o->restore, O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW |
                    O_CLOEXEC, 0600);
    if (r->ramfd < 0) {
        sysfail(err, "cannot create the RAM file %s", o->restore);
        goto bad;
    }
    if (fstat(r->ramfd, &st) != 0 || !S_ISREG(st.st_mode)) {
        fail(err, "%s is not a regular file", o->restore);
        goto bad;
    }
    if (ftruncate(r->ramfd, (off_t)o->memsize) != 0) {
        sysfail(err, "cannot size the RAM file %s to %llu bytes", o->restore,
                (unsigned long long)o->memsize);
        goto bad;
    }
    nb_spec_fill_cpu(&vmm->spec);
    snprintf(vmm->spec.arch, sizeof(vmm->spec.arch), "x86_64");
    snprintf(vmm->spec.state_format, sizeof(vmm->spec.state_format),
             "bhyve-ckpt/1");
    vmm->spec.page_size = NB_PAGE;
    vmm->spec.ncpus = (uint32_t)o->ncpus;
    vmm->spec.layout = vmm->layout;
    return 0;
bad:
    rs_close(vmm);
    memset(vmm, 0, sizeof(*vmm));
    return -1;
}
