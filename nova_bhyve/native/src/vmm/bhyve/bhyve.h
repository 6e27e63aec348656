/*
 * Portable pieces of the bhyve vmm port (vmm_bhyve.c): everything that
 * can be computed without a FreeBSD kernel, so it builds and is unit
 * tested on Linux as well.
 *
 *   - a packer for FreeBSD libnv's nvlist wire format and the checkpoint
 *     request bhyve's checkpoint socket expects;
 *   - the UPB VM_GET_DIRTY_PAGE_LIST byte list -> engine bitmap conversion
 *     and the dirty-log capability decision;
 *   - the guest memory layout built from VM_MMAP_GETNEXT results;
 *   - a validator for bhyve's checkpoint .meta file (untrusted input);
 *   - the save_state blob container and the port's target-string options.
 *
 *   - the checkpoint socket client and the files `bhyve -r` reads;
 *   - the restore-only port: an incoming VM's RAM file mapped as guest RAM.
 *
 * Implemented in bhyve_msg.c (nvlist, dirty log, layout, options),
 * bhyve_meta.c (.meta validator, blob), bhyve_ckpt.c (checkpoint socket,
 * restore files) and bhyve_restore.c (restore-only port); build all four
 * (and vmm_common.c) into the engine.
 * Every function that can fail returns 0 on success or -1 with a message
 * in `err` (NB_ERRLEN bytes).
 */
#ifndef NB_BHYVE_H
#define NB_BHYVE_H

#include <stddef.h>
#include <stdint.h>

#include "vmm/vmm.h"

/* libnv (sys/contrib/libnv): nvpair types and header flags on the wire. */
#define NB_NV_TYPE_BOOL         2
#define NB_NV_TYPE_NUMBER       3
#define NB_NV_TYPE_STRING       4
#define NB_NV_TYPE_DESCRIPTOR   6
#define NB_NV_FLAG_BIG_ENDIAN   0x80
#define NB_NV_HEADER_MAGIC      0x6c
#define NB_NV_HEADER_VERSION    0x00
#define NB_NV_LIST_HEADER_SIZE  19  /* magic, version, flags, u64 ndesc, u64 size */
#define NB_NV_PAIR_HEADER_SIZE  19  /* type, u16 namesize, u64 datasize, u64 nitems */
#define NB_NV_NAME_MAX          2048

/* Name bhyve gives the checkpoint in save_state's private directory. */
#define NB_BHYVE_CKPT_NAME      "ckpt"

/* Limits applied to checkpoint files (bhyve checks only with assert()). */
#define NB_BHYVE_MAX_META       (1u << 20)      /* .meta bytes */
#define NB_BHYVE_MAX_KERN       (256u << 20)    /* .kern bytes */
#define NB_BHYVE_MAX_MEMSIZE    (1ull << 44)    /* 16 TiB of guest RAM */
#define NB_BHYVE_MAX_CPUS       1024
#define NB_BHYVE_MAX_ENTRIES    4096            /* kern_structs + devices */

/* Guest-physical layout bhyve's libvmmapi uses on amd64. */
#define NB_BHYVE_LOWMEM_LIMIT   (3ull << 30)    /* VM_LOWMEM_LIMIT */
#define NB_BHYVE_HIGHMEM_BASE   (4ull << 30)    /* VM_HIGHMEM_BASE */

/* save_state blob: magic, u32 LE .meta length, u32 LE .kern length, data. */
#define NB_BHYVE_BLOB_MAGIC     "NBBHYVE1"
#define NB_BHYVE_BLOB_HEADER    16

/* An nvlist being packed into a caller buffer, pairs in insertion order. */
struct nb_nvbuf {
    uint8_t *buf;
    size_t cap;
    size_t len;
    uint64_t ndesc;     /* descriptors added so far (the next index) */
    int overflow;       /* set when a pair did not fit */
    int bad_name;       /* set when a pair name was empty or too long */
};

/* Start an nvlist in buf (cap bytes); the header is written by finish. */
void nb_nv_init(struct nb_nvbuf *nv, uint8_t *buf, size_t cap);
/* Append a string pair (NUL included, as nvlist_add_string does). */
int nb_nv_add_string(struct nb_nvbuf *nv, const char *name, const char *value);
/* Append a bool pair (one byte, 0 or 1). */
int nb_nv_add_bool(struct nb_nvbuf *nv, const char *name, int value);
/* Append a number pair (u64). */
int nb_nv_add_number(struct nb_nvbuf *nv, const char *name, uint64_t value);
/* Append a descriptor pair: the packed value is the descriptor's index
 * among the SCM_RIGHTS descriptors sent after the data, as libnv does. */
int nb_nv_add_descriptor(struct nb_nvbuf *nv, const char *name);
/* Write the nvlist header; *len is the number of bytes to send. */
int nb_nv_finish(struct nb_nvbuf *nv, size_t *len, char *err);

/* The request `bhyvectl --checkpoint=FILE` (suspend=0) or `--suspend=FILE`
 * (suspend=1) sends: {cmd="checkpoint", filename, suspend, fddir}.  The
 * directory descriptor travels as SCM_RIGHTS; the message holds index 0. */
int nb_bhyve_checkpoint_msg(uint8_t *out, size_t cap, size_t *len,
                            const char *filename, int suspend, char *err);

/* Convert a UPB dirty-page byte list (one byte per page, lowmem pages then
 * highmem pages) to the engine's bitmap (one bit per page, segments in
 * layout order); words beyond the pages are zeroed. */
int nb_bhyve_dirty_to_bitmap(const struct nb_layout *layout,
                             const uint8_t *list, size_t npages,
                             uint64_t *bitmap, size_t words,
                             uint64_t *ndirty, char *err);

/* Decide has_dirty_log from the probe ioctl's result (rc, errno), whether
 * guest memory is wired, whether the CPU has SMAP, and the layout; returns
 * 1 or 0 and explains the decision in reason (NB_ERRLEN bytes). */
int nb_bhyve_probe_decide(int ioctl_rc, int err_no, int mem_wired,
                          int cpu_smap, const struct nb_layout *layout,
                          char *reason);

/* One VM_MMAP_GETNEXT mapping: guest-physical range and its segment kind. */
struct nb_bhyve_map {
    uint64_t gpa;
    uint64_t len;
    int sysmem;         /* VM_GET_MEMSEG returned no name: guest RAM */
    int wired;          /* VM_MEMMAP_F_WIRED */
};

/* Build the engine layout (lowmem at 0, highmem at 4 GiB, offsets
 * contiguous in that order) from the VM's mappings; devmem is ignored. */
int nb_bhyve_layout(const struct nb_bhyve_map *maps, int nmaps,
                    struct nb_layout *layout, int *wired, char *err);

/* What the validator learned from a checkpoint .meta file. */
struct nb_bhyve_meta {
    uint64_t memsize;
    uint32_t ncpus;
    int32_t memflags;
    uint32_t nkern;         /* entries in "kern_structs" */
    uint32_t ndev;          /* entries in "devices" */
    uint64_t kern_used;     /* end of the last .kern range referenced */
    char vmname[256];
};

/* Validate a .meta file (JSON written by bhyve's snapshot.c via libxo)
 * against the .kern size and, when ram_len != 0, the RAM file size. */
int nb_bhyve_meta_check(const char *json, size_t len, uint64_t kern_len,
                        uint64_t ram_len, struct nb_bhyve_meta *meta,
                        char *err);

/* Pack .meta and .kern into the save_state blob (needs 16 + both lengths). */
int nb_bhyve_blob_pack(uint8_t *out, size_t cap, size_t *len,
                       const uint8_t *meta, size_t meta_len,
                       const uint8_t *kern, size_t kern_len, char *err);

/* Check a blob (header, lengths, and the .meta against the .kern) and
 * return where its two files start. */
int nb_bhyve_blob_parse(const uint8_t *blob, size_t len,
                        size_t *meta_off, size_t *meta_len,
                        size_t *kern_off, size_t *kern_len, char *err);

/* Options of the port, given as "NAME[,key=value...]" in the open call. */
struct nb_bhyve_opts {
    char name[230];         /* VM name: /dev/vmm/NAME */
    char rundir[256];       /* checkpoint socket directory */
    char scratch[256];      /* where save_state lets bhyve write a checkpoint */
    char restore[1024];     /* RAM file path load_state writes .kern/.meta for */
    char pidfile[256];      /* file holding the bhyve process id */
    int pid;                /* bhyve process id (0: pidfile or socket peer) */
    int timeout;            /* seconds to wait for a checkpoint */
    int exit_on_save;       /* save_state asks bhyve to exit (suspend=true) */
    int ncpus;              /* restore-only mode: vCPUs of the incoming VM */
    uint64_t memsize;       /* restore-only mode: bytes of its guest RAM */
};

/* Parse the target string; unknown keys and bad values are errors. */
int nb_bhyve_parse_target(const char *target, struct nb_bhyve_opts *opts,
                          char *err);

/* Connect to bhyve's checkpoint socket RUNDIR/NAME; returns the socket. */
int nb_bhyve_connect(const struct nb_bhyve_opts *opts, char *err);

/* The directory an exit_on_save checkpoint is kept in:
 * SCRATCH/nb-bhyve-NAME.ckpt (restore with `bhyve -r DIR/ckpt`). */
int nb_bhyve_keep_dir(const struct nb_bhyve_opts *opts, char *dir, size_t cap);

/* Have bhyve checkpoint into a private directory under opts->scratch
 * (what `bhyvectl --checkpoint` does), wait for it, call after(ctx) as
 * soon as bhyve is done, validate the files against ram_total bytes of
 * guest RAM and return .meta + .kern as one malloc()ed blob.  The
 * directory is removed, except with exit_on_save (nb_bhyve_keep_dir). */
int nb_bhyve_checkpoint(const struct nb_bhyve_opts *opts, uint64_t ram_total,
                        int (*after)(void *ctx, char *err), void *ctx,
                        uint8_t **blob, size_t *len, char *err);

/* Validate a blob and write RESTORE.kern and RESTORE.meta atomically
 * (0600) for `bhyve -r RESTORE`; checks RESTORE's size if it exists. */
int nb_bhyve_restore_files(const struct nb_bhyve_opts *opts,
                           const uint8_t *blob, size_t len, char *err);

/* The layout libvmmapi gives memsize bytes of guest RAM: lowmem at GPA 0
 * up to 3 GiB, the rest at 4 GiB; offsets contiguous in that order. */
int nb_bhyve_restore_layout(uint64_t memsize, struct nb_layout *layout,
                            char *err);

/* Open the restore-only port (bhyve_restore.c): an incoming VM that bhyve
 * will start with `bhyve -r RESTORE`.  Needs restore=, ncpus= and memsize=;
 * RESTORE is created (0600, sparse, memsize bytes) and mapped as guest RAM,
 * load_state checks and keeps the device state, and resume -- the commit --
 * flushes RESTORE and writes RESTORE.kern, then RESTORE.meta last. */
int nb_bhyve_open_restore(struct nb_vmm *vmm, const struct nb_bhyve_opts *opts,
                          char *err);

/* The rctl pcpu limit for throttling `percent` (0..99) of the time of a
 * VM with ncpus vCPUs: ncpus * (100 - percent); 0 means no limit. */
int nb_bhyve_pcpu_limit(int percent, int ncpus, int *limit, char *err);

/* Format an error message into err (NB_ERRLEN bytes); returns -1. */
int nb_errf(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Like nb_errf(), with ": strerror(errno)" appended; errno is preserved. */
int nb_syserrf(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
