/*
 * The source side's shared state: the migration thread (source.c) and
 * the sender threads that copy pages on the page channels (sender.c).
 */
#ifndef NB_SOURCE_H
#define NB_SOURCE_H

#include <zstd.h>

#include "core/adapt.h"
#include "core/converge.h"
#include "core/nbmig.h"

struct source;

struct sender {
    struct nb_mig *m;
    struct source *src;
    struct nb_chan *ch;
    int slot;                   /* 0-based channel slot */
    struct nb_xcache *cache;
    ZSTD_CCtx *zctx;
    struct nb_adapt adapt;      /* whether to compress, compress=auto */
    uint8_t *frame;
    size_t flen;
    uint8_t ftype;              /* the frame being filled: PAGES or DISK */
    uint32_t nrec;
    uint32_t max_rec;           /* records a PAGES frame holds at most */
    uint64_t round_pages;
    uint64_t round_blocks;      /* disk blocks sent in this round */
    pthread_t thread;
};

struct source {
    struct nb_mig *m;
    struct sender snd[NB_MAX_CHANNELS];
    int nsnd;
    uint64_t *bitmap;           /* pages to send this round, layout order */
    size_t words;
    uint64_t hz;                /* hash of the zero page */
    struct nb_disk_spec disks;  /* the disks, as the preamble announces them */
    /* round hand-off between the migration thread and the senders */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint32_t round;             /* round the senders run */
    int generation;             /* bumped to start a round */
    int finished;               /* senders done with this generation */
    int stop;
    int failed;
    uint32_t cur_round;         /* the migration thread's round counter */
    uint32_t applied;           /* rounds the destination holds in guest
                                 * memory (its last APPLIED round + 1) */
    int kind;                   /* nb_error_kind of the phase that failed */
    double t_pause;             /* when the guest stopped (downtime starts) */
    double t_collected;         /* the pause's last syncs done */
    double t_state;             /* the final round and STATE sent */
    double t_ready;             /* READY heard */
    uint64_t prev_dirty;        /* dirty pages and blocks at the previous sync */
    uint64_t dirty_blocks;      /* disk blocks pending at the last sync */
    double t_sync;              /* when the dirty log was last synced */
    double sync_ms;             /* how long the last count of dirty pages took */
    struct nb_fit fit;          /* extra rounds once the rest fits (converge.h) */
    double expected;            /* the last pause estimate, ms */
    double fixed_ms;            /* of it, what no round or throttle shortens:
                                 * the final sync, the device state on the
                                 * link and two round trips */
    double unsteady_ms;         /* of it, what a pace only the last round
                                 * timed showed adds (converge.h:
                                 * nb_pace_throttle_ms); no throttle is
                                 * raised for it */
    uint64_t conv_prev;         /* auto-converge: dirty pages last round */
    double t_converge;          /* auto-converge: last throttle step */
    double page_ms;             /* what one page cost to send, last estimate */
    double dirty_per_ms;        /* pages (and blocks) dirtied per ms, last count */
    double trim_from;           /* the pause's shortenable part when the
                                 * last step to shorten it was taken (0:
                                 * none yet) */
    struct nb_round_stat last_round;    /* the last round run (zeros: none) */
    uint64_t link_bytes;        /* bytes the link delivered in the rounds */
    double link_ms;             /* and drains that time it (switchover.c),
                                 * their time */
    /* the words [w0, w1) of the bitmap the senders work on now; the
     * round ends (ROUND_END) with the part that reaches the last word */
    size_t w0, w1;
    /* lazy clearing (vmm dirty_log_range + dirty_peek): a round clears
     * and sends the log one chunk of `chunk` words at a time */
    int lazy;
    /* not lazy: the bitmap holds pages a count cleared from the log that
     * no round has sent yet; the next count adds to them */
    int unsent;
    double t_pile;              /* not lazy: since when they piled up (the
                                 * sync before the count that took them) */
    size_t chunk;
    uint32_t log_reads;         /* chunks the round being run read and
                                 * cleared (lazy) */
    uint64_t *scratch;          /* a bitmap for peeks and round 0's clears */
    struct nb_dest_pace pace;   /* the destination's pace (converge.h) */
};

/* What resending dirty pages would cost now, sampled (nb_src_sample_resend). */
struct nb_resend_cost {
    uint32_t pages;             /* pages sampled (0: none) */
    double wire_bytes;          /* wire bytes per page, record header included */
    double encode_ms;           /* encoding time per page, on one thread */
};

/* Pages nb_src_sample_resend encodes at most: half of them cache hits,
 * half misses. */
#define NB_RESEND_SAMPLE 512

/* Lazy clearing works on chunks of at least this many 64-page words (64 MiB). */
#define LAZY_MIN_WORDS ((64u << 20) / NB_PAGE / 64)

int nb_src_start_senders(struct source *src, char *err);
void nb_src_stop_senders(struct source *src);
int nb_src_read_control(struct source *src, int wait_ms);
int nb_src_round(struct source *src, uint32_t round, uint64_t dirty, int lazy);
void nb_src_mark_data_pages(struct source *src);
int nb_src_sync_dirty(struct source *src, char *err);
uint64_t nb_popcount_bitmap(const uint64_t *b, size_t words);
uint64_t nb_src_queued(struct source *src);
int nb_sender_flush(struct sender *s, uint32_t round, char *err);
void nb_src_sample_resend(struct source *src, const uint64_t *bits,
                          struct nb_resend_cost *out);
/* switchover.c: the switch-over policy */
int nb_src_should_switch(struct source *src, uint64_t pages, double since_ms);
int nb_src_limit_out_of_reach(struct source *src);
void nb_src_time_round(struct source *src, const struct nb_round_stat *r,
                       uint64_t queued0, uint64_t queued1);
int nb_src_time_drain(struct source *src, uint64_t queued0, uint64_t queued1,
                      double ms);
int nb_src_drained(struct source *src, uint64_t queued);
double nb_src_link_bandwidth(struct source *src);
void nb_src_converge(struct source *src, uint64_t dirty);
void nb_src_pace_drained(struct source *src);
uint32_t nb_src_throttle(struct nb_mig *m);
int nb_sender_disks(struct sender *s, struct source *src, uint32_t round, char *err);

#endif
