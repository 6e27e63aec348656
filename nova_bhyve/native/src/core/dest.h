/*
 * The destination side's shared state: the migration thread (dest.c)
 * and the receiver threads that apply the page channels' frames
 * (receiver.c).
 */
#ifndef NB_DEST_H
#define NB_DEST_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <zstd.h>

#include "core/nbmig.h"

struct dest;

struct receiver {
    struct nb_mig *m;
    struct dest *dst;
    struct nb_chan *ch;
    ZSTD_DCtx *zctx;
    struct nb_disk_rx disk;     /* the DISK frames' decoding and writing */
    pthread_t thread;
    /* a run of RAW pages at consecutive offsets, written in one call
     * (vmm write_pages); they point into the frame being applied */
    const uint8_t *run[NB_WRITE_BATCH];
    int nrun;
    uint64_t run_off;
    /* the run's pages decoded from DELTA records against zeros (a page
     * nothing has written yet): run[i] may point at fresh[i] */
    uint8_t *fresh;
    int kind;                   /* nb_error_kind of a failure applying pages */
};

struct dest {
    struct nb_mig *m;
    struct receiver rcv[NB_MAX_CHANNELS];
    int nrcv;
    uint64_t hz;
    /* a bit per page, set once a record wrote it (a 64-page word is one
     * channel's: only its receiver touches it); NULL without write_pages */
    uint64_t *written;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint32_t done_round[NB_MAX_CHANNELS]; /* last ROUND_END + 1 per channel */
    int wake[2];                /* a receiver finished a round (pipe) */
    int acking;                 /* PRECOPY: tell the source with APPLIED */
    uint32_t acked;             /* rounds told so far */
    _Atomic uint32_t final_round; /* from DIGEST; UINT32_MAX until then */
    int failed;
    int kind;                   /* nb_error_kind of the phase that failed */
    struct nb_frame f;          /* the control frame the last phase waited for */
    int early;                  /* f holds a control frame read while joining */
    int told;                   /* a REFUSE went to the source already */
    double deadline;            /* connections must come by then (monotonic ms) */
    int rejected;               /* connections dropped for failing to prove
                                 * themselves */
    struct nb_digest_msg dm;    /* the source's DIGEST */
};

void *nb_receiver_main(void *arg);

#endif
