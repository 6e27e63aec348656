/*
 * FILE.meta of a checkpoint file set: the one schema shared by the
 * engine's checkpoint port (vmm_ckpt.c) and nova_bhyve/machine/
 * checkpoint.py.  CHECKPOINT.md beside this file is the specification.
 *
 * build_engine.py also hands this header to cffi (the unit tests call the
 * parser and the writer directly), so it holds plain declarations only.
 */
#ifndef NB_CKPT_META_H
#define NB_CKPT_META_H

#include <stddef.h>
#include <stdint.h>

#define NB_CKPT_META_VERSION 2
#define NB_CKPT_META_MAX 8192           /* bytes of FILE.meta, at most */
#define NB_CKPT_KERN_MAX 16777216       /* bytes of FILE.kern, at most */
#define NB_CKPT_MAX_CPUS 1024
#define NB_CKPT_MAX_MEMSIZE 1099511627776   /* 1 TiB */
#define NB_CKPT_HIGHBASE 4294967296     /* highbase of an older set without one */
#define NB_CKPT_MAX_HIGHBASE 281474976710656    /* 2^48 */

struct nb_ckpt_meta {
    uint32_t version;       /* 2; 1 or 0 (absent) for older sets */
    char vmname[256];       /* the VM the set was taken from; may be empty */
    uint32_t ncpus;
    uint64_t memsize;       /* bytes of FILE: lowmem + highmem */
    uint64_t lowmem;        /* RAM at guest-physical 0, first in FILE */
    uint64_t highmem;       /* RAM at highbase, after lowmem in FILE */
    uint64_t highbase;
    uint32_t page_size;     /* 4096 */
    char state_format[32];  /* FILE.kern's format: "nbvmstat/1", "bhyve-ckpt/1" */
    uint64_t kern_bytes;    /* size of FILE.kern */
    uint32_t kern_crc32;    /* CRC-32 (IEEE, as zlib's) of FILE.kern */
    int kern_recorded;      /* 0: an older set has no kern_bytes, kern_crc32 */
    char arch[16];          /* "x86_64"; empty if an older set did not say */
    char cpu_vendor[16];    /* CPU vendor of the writing host; may be empty */
};

/* Parse and check FILE.meta's text (`len` bytes).  Returns 0, or -1 with
 * the reason in err (NB_ERRLEN bytes). */
int nb_ckpt_meta_parse(const char *text, size_t len, struct nb_ckpt_meta *meta,
                       char *err);

/* Write `meta` as JSON (version 2) into out (cap bytes, NUL-terminated);
 * *len gets the length.  `meta` must pass the parser's checks, with
 * kern_recorded set.  Returns 0, or -1 with the reason in err. */
int nb_ckpt_meta_format(const struct nb_ckpt_meta *meta, char *out, size_t cap,
                        size_t *len, char *err);

/* Check the sizes of FILE and FILE.kern against `meta` (FILE.kern only
 * against NB_CKPT_KERN_MAX if the set recorded no kern_bytes). */
int nb_ckpt_meta_check_sizes(const struct nb_ckpt_meta *meta, uint64_t ram_bytes,
                             uint64_t kern_bytes, char *err);

/* CRC-32 (IEEE 802.3, reflected, as zlib's crc32()) of `len` bytes. */
uint32_t nb_crc32_ieee(const uint8_t *data, size_t len);

#endif
