/*
 * The "vmm port": the small interface through which the migration engine
 * reaches one VM.  Implementations:
 *
 *   vmm_testhost.c  the Linux KVM test host (control socket + memfd)
 *   vmm_bhyve.c     FreeBSD bhyve (/dev/vmm/NAME + checkpoint socket);
 *                   compiled on FreeBSD only
 *   vmm_ckpt.c      a checkpoint file set (RAM file + .kern + .meta), the
 *                   shape `bhyvectl --suspend` and `bhyve -r` use; the
 *                   .meta schema is CHECKPOINT.md (ckpt_meta.c)
 *   vmm_none.c      a stopped guest: no memory, no state, only its disks
 *
 * Every function returns 0 on success or -1 with a message in `err`.
 */
#ifndef NB_VMM_H
#define NB_VMM_H

#include <stddef.h>
#include <stdint.h>

#define NB_ERRLEN 256
#define NB_PAGE 4096u
#define NB_MAX_SEGS 2
#define NB_WRITE_BATCH 64   /* pages per write_pages call, at most */
#define NB_MAX_CPUID_WORDS 24  /* CPUID feature words in a guest spec */
#define NB_DISK_BLOCK 4096u /* a disk's dirty-block log: bytes per bit */

struct nb_seg {
    uint64_t gpa;       /* guest-physical start */
    uint64_t len;       /* bytes */
    uint64_t offset;    /* offset in the memory file / mapping */
};

struct nb_layout {
    int nsegs;
    struct nb_seg seg[NB_MAX_SEGS];
    uint64_t total;     /* bytes of guest RAM */
};

/* What the guest sees of the host: must be compatible across a migration. */
struct nb_guest_spec {
    char arch[16];          /* "x86_64", "aarch64" */
    char cpu_vendor[16];    /* "AuthenticAMD", "GenuineIntel" */
    uint32_t page_size;
    uint32_t ncpus;
    uint32_t nfeat;         /* entries used in feat[] */
    struct { uint32_t leaf, sub, reg, bits; } feat[NB_MAX_CPUID_WORDS];
    char state_format[32];  /* device state format, e.g. "nbvmstat/1" */
    struct nb_layout layout;
};

struct nb_vmm;

struct nb_vmm_ops {
    const char *kind;
    /* guest RAM, mapped shared; never-written memory reads as zero */
    int (*map_memory)(struct nb_vmm *, uint8_t **base, char *err);
    /* Pages ever written in [offset, offset+len) of the memory file, for
     * skipping holes: fills *data_off with the next offset holding data
     * (>= offset) or returns 1 when none is left. */
    int (*next_data)(struct nb_vmm *, uint64_t offset, uint64_t *data_off,
                     uint64_t *data_end);
    int (*has_dirty_log)(struct nb_vmm *);
    /* get-and-clear: one bit per page, segments in layout order */
    int (*dirty_log)(struct nb_vmm *, uint64_t *bitmap, size_t words, char *err);
    int (*pause)(struct nb_vmm *, char *err);
    int (*resume)(struct nb_vmm *, char *err);
    int (*throttle)(struct nb_vmm *, int percent, char *err);
    /* The highest throttle, in percent (0 to 99), under which no vCPU
     * sleeps longer than about 10 ms at a time: the source slows a guest
     * this far, no further, to shorten a pause that already fits the
     * limit (0: it never does). */
    int brief_throttle;
    int (*save_state)(struct nb_vmm *, uint8_t **blob, size_t *len, char *err);
    int (*load_state)(struct nb_vmm *, const uint8_t *blob, size_t len, char *err);
    void (*close)(struct nb_vmm *);
    /* Optional (NULL: the destination copies into the mapping).  Write
     * whole pages at `offset` of the memory file from `n` buffers of
     * NB_PAGE bytes.  A file write fills a page the kernel has not yet
     * allocated without zeroing it first, which a store through the
     * mapping cannot avoid. */
    int (*write_pages)(struct nb_vmm *, uint64_t offset,
                       const uint8_t *const *pages, int n, char *err);
    /* Optional: take the guest over at the commit without running it
     * (keep_paused).  NULL: resume is the commit and runs nothing (a
     * checkpoint file set), so it is called either way. */
    int (*commit_paused)(struct nb_vmm *, char *err);
    /* Optional pair (lazy clearing, as QEMU's clear_bitmap): get-and-clear
     * only the 64-page words [first, first + count), writing just those
     * words of `bitmap`; and read every dirty bit without clearing any.
     * A page written before its word is cleared is then sent once, with
     * the content it has when sent, not once more in the next round. */
    int (*dirty_log_range)(struct nb_vmm *, size_t first, size_t count,
                           uint64_t *bitmap, size_t words, char *err);
    int (*dirty_peek)(struct nb_vmm *, uint64_t *bitmap, size_t words, char *err);
    /* Optional (NULL: the VM's disks cannot move with it): get-and-clear
     * the dirty-block log of the VM's disk `disk` (0-based, the vmm's own
     * order): bit i = bytes [i * NB_DISK_BLOCK, (i + 1) * NB_DISK_BLOCK)
     * written since the last call, into `words` 64-bit words of `bitmap`;
     * *nblocks = the blocks the disk has.  A write the guest makes after
     * its bit was read shows up in the next call; every write made before
     * a pause returned is in the file when the log is read. */
    int (*disk_dirty_log)(struct nb_vmm *, int disk, uint64_t *bitmap,
                          size_t words, uint64_t *nblocks, char *err);
};

struct nb_vmm {
    const struct nb_vmm_ops *ops;
    struct nb_layout layout;
    struct nb_guest_spec spec;
    uint8_t *mem;           /* set by map_memory */
    void *priv;
};

/* Open a port.  `target` is a control socket path (testhost), a VM name
 * (bhyve) or a checkpoint base path (ckpt); `create` makes a checkpoint. */
int nb_vmm_open_testhost(struct nb_vmm *, const char *sock_path, char *err);
int nb_vmm_open_bhyve(struct nb_vmm *, const char *vm_name, char *err);
int nb_vmm_open_ckpt(struct nb_vmm *, const char *base, int create,
                     const struct nb_guest_spec *spec_for_create, char *err);
int nb_vmm_open_none(struct nb_vmm *, const char *name, char *err);

/* Host-side CPUID facts for the guest spec (x86). */
void nb_spec_fill_cpu(struct nb_guest_spec *spec);
/* next_data for a memory file: SEEK_DATA / SEEK_HOLE. */
int nb_file_write_pages(int fd, uint64_t offset, const uint8_t *const *pages,
                        int n, char *err);
int nb_file_next_data(int fd, uint64_t size, uint64_t off, uint64_t *doff,
                      uint64_t *dend);

#endif
