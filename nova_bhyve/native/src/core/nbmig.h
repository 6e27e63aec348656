/*
 * Migration engine internals shared by the core's files (engine.c, the
 * source's source.c and sender.c, the destination's dest.c and receiver.c).
 */
#ifndef NB_MIG_INTERNAL_H
#define NB_MIG_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "core/codec.h"
#include "core/transitions.h"
#include "engine.h"
#include "vmm/vmm.h"
#include "wire/wire.h"


/* ---- disk.c: one disk moved with the guest ------------------------------ */
struct nb_disk {
    char *path;                 /* private copy of the caller's, for messages */
    int dirfd, fd;              /* its directory, the file (-1: not open) */
    int dfd;                    /* destination: the file again, O_DIRECT, for
                                 * runs of whole blocks (-1: none) */
    char name[256];             /* the last component, beneath dirfd */
    int created;                /* destination: this session created the file */
    int vmm_index;              /* source: the vmm's number of the disk, whose
                                 * dirty-block log it reads; -1: detached
                                 * (not the VM's: nothing writes it) */
    uint64_t size, blocks;      /* bytes, NB_DISK_BLOCK blocks (last may be short) */
    size_t words;               /* 64-bit words of a block bitmap */
    uint64_t *pending;          /* source: blocks the next round sends */
    uint64_t *log;              /* source: the vmm's log, read into here */
    uint64_t *term;             /* incremental digest term per block */
    _Atomic uint64_t unsynced;  /* destination: bytes written since their
                                 * write-back was last started */
};

/* ---- stream.c: one stream disk (PROTOCOL.md, "Streams") ---------------- */
struct nb_stream {
    int fd[NB_STREAM_PARTS];    /* each part's descriptor (-1: closed) */
    int notify_fd;              /* source: written once the guest pauses */
    int status_fd;              /* the producers' or consumers' verdict */
    int part;                   /* the part in flight (2: both ended) */
    _Atomic int precopied;      /* part 0 has ended */
    uint64_t bytes;             /* of the part in flight */
    uint32_t crc;               /* CRC-32C of the part in flight */
};

/* ---- engine.c: the session -------------------------------------------- */
struct nb_mig {
    struct nb_mig_params p;     /* strings below are private copies */
    char *host, *target;
    uint8_t *secret;
    int is_source;

    struct nb_vmm vmm;
    int vmm_open;
    uint64_t npages;            /* pages in layout order */
    uint64_t *page_hash;        /* incremental digest terms, per page
                                 * (0: a zero page, as every page starts) */
    /* the sum of the terms of each page channel's pages (a page is on
     * one channel only, so each part has one writer) */
    struct { uint64_t sum; char pad[56]; } digest_part[NB_MAX_CHANNELS];

    int ndisks;                 /* disks moved with the memory */
    uint64_t disk_hz;           /* H(0) under the session's keys (a zero
                                 * block's hash), set once they exist */
    struct nb_disk disk[NB_MAX_DISKS];
    int nstreams;               /* stream disks (stream.c) */
    struct nb_stream stream[NB_MAX_STREAMS];
    _Atomic uint64_t stream_bytes;
    /* the disks' digest, kept per page channel as the memory's */
    struct { uint64_t sum; char pad[56]; } disk_part[NB_MAX_CHANNELS];

    int listen_fd;
    struct nb_chan ctl;
    struct nb_chan data[NB_MAX_CHANNELS];
    int nchan;
    struct nb_session_keys keys;

    pthread_t thread;           /* migration thread */
    int thread_started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
    int fail_kind;              /* first failure's nb_error_kind (lock), 0: none */
    _Atomic int guest_paused;   /* the source paused its guest */

    /* requests from the caller */
    _Atomic int cancel_req;
    _Atomic int force_req;
    _Atomic uint32_t max_downtime_ms;
    _Atomic uint64_t max_bandwidth;

    /* progress, written by engine threads, read by nb_mig_stats */
    _Atomic uint64_t wire_bytes;
    _Atomic uint64_t pages_sent, pages_zero, pages_delta, pages_compressed, pages_raw;
    _Atomic uint32_t compressing;   /* page channels compressing now */
    _Atomic uint64_t disk_bytes, disk_blocks;   /* DISK frames, their records */
    struct nb_mig_stats st;     /* protected by lock */
    double t0;                  /* start, monotonic ms */
    double bw_tokens_t;         /* bandwidth cap bookkeeping (lock) */
    double bw_tokens;
};

double nb_now_ms(void);
void nb_fail(struct nb_mig *m, int kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void nb_throttle_bandwidth(struct nb_mig *m, size_t bytes);
void nb_shutdown_data(struct nb_mig *m);
int nb_page_addr(const struct nb_mig *m, uint64_t index, uint64_t *pfn, uint64_t *off);
int nb_pfn_to_offset(const struct nb_mig *m, uint64_t pfn, uint64_t *off, uint64_t *index);
uint64_t nb_memory_digest(struct nb_mig *m, int full);
int nb_setup_memory(struct nb_mig *m, char *err);
int nb_fail_kind(struct nb_mig *m);
void nb_fail_because(struct nb_mig *m, int kind, const char *why);

/* Record page `index`'s new digest term, keeping channel `slot`'s part of
 * the sum (the page's channel's: one writer per part). */
static inline void nb_set_page_term(struct nb_mig *m, int slot, uint64_t index,
                                    uint64_t term)
{
    m->digest_part[slot].sum += term - m->page_hash[index];
    m->page_hash[index] = term;
}
int nb_set_nodelay(int fd);
void nb_set_timeouts(int fd, uint32_t ms);
uint64_t nb_socket_queued(int fd);
void nb_deadline(struct timespec *until, long ms);

/* disk.c: the disks moved with the guest (PROTOCOL.md, "Disks") */
int nb_disk_open_source(struct nb_mig *m, struct nb_disk_spec *spec, char *err);
int nb_disk_open_dest(struct nb_mig *m, const struct nb_disk_spec *spec, char *err);
void nb_disk_discard(struct nb_mig *m);
void nb_disk_close(struct nb_mig *m);
int nb_disk_sync(struct nb_mig *m, uint64_t *pending, char *err);
void nb_disk_mark_data(struct nb_mig *m);
uint64_t nb_disk_total_blocks(const struct nb_mig *m);
uint64_t nb_disk_digest(struct nb_mig *m, int full);
int nb_disk_flush(struct nb_mig *m, char *err);
int nb_disk_verify(struct nb_mig *m, uint64_t theirs, char *err);
uint32_t nb_disk_block_len(const struct nb_disk *d, uint64_t b);
uint64_t nb_disk_block_term(struct nb_mig *m, int i, uint64_t b,
                            const uint8_t *data, uint32_t len);
void nb_disk_set_term(struct nb_mig *m, int slot, int i, uint64_t b, uint64_t term);

/* disk_apply.c: a destination's DISK frames written to the files */

/* Blocks a receiver gathers before one direct write (1 MiB). */
#define NB_DISK_RUN_BLOCKS 256

/* A receiver's state for DISK frames: its decompressor, and the run of
 * whole blocks at consecutive offsets of one disk not yet written. */
struct nb_disk_rx {
    void *zctx;                 /* ZSTD_DCtx, made on first use */
    uint8_t *run;               /* NB_DISK_RUN_BLOCKS blocks, page-aligned */
    int disk;                   /* the run's disk */
    uint64_t first;             /* its first block */
    uint32_t count;             /* blocks in it (0: no run) */
};

int nb_disk_apply(struct nb_mig *m, int nchan, int chan, struct nb_disk_rx *rx,
                  const struct nb_frame *f, uint32_t round, int *kind, char *err);
int nb_disk_rx_flush(struct nb_mig *m, struct nb_disk_rx *rx, char *err);
void nb_disk_rx_free(struct nb_disk_rx *rx);

/* stream.c: stream disks (PROTOCOL.md, "Streams") */
int nb_stream_adopt(struct nb_mig *m, const struct nb_mig_params *p, char *err);
void nb_stream_close(struct nb_mig *m);
int nb_stream_precopied(struct nb_mig *m);
void nb_stream_paused(struct nb_mig *m);
int nb_stream_send(struct nb_mig *m, struct nb_chan *ch, uint8_t *frame,
                   uint32_t round, int final, char *err);
int nb_stream_apply(struct nb_mig *m, int chan, const struct nb_frame *f,
                    uint32_t round, int *kind, char *err);
int nb_stream_verify(struct nb_mig *m, char *err);

/* phase.c: the state machine of each side (tables: transitions.c) */
int nb_enter_phase(struct nb_mig *m, int next, char *err);
void nb_end(struct nb_mig *m, int kind, int guest_here);

/* source.c / dest.c: the migration threads */
void *nb_source_main(void *arg);
void *nb_dest_main(void *arg);

#endif
