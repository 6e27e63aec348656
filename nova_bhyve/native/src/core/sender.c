/*
 * Source side, page copying: sender threads, one per page channel, each
 * sending its share of a round's pages (page index i goes on channel
 * 1 + (i / 64) mod channels), and the round driver that hands them work.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <poll.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "core/source.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

#define FRAME_CAP (NB_MAX_PAGES_FRAME)
/* Records a PAGES frame holds at most while the guest is paused.  The
 * destination applies a frame only once it is whole (its tag covers all
 * of it): 256 KiB of deltas of a few bytes each are ten thousand pages,
 * whose applying would wait for the frame's last byte and then hold up
 * the end of the pause by ~10 ms.  While the guest runs, frames stay as
 * large as they fit, as before: the cap was measured to help the pause
 * only (benchmarks/README.md, "the pause's last frames"). */
#define PAUSED_FRAME_RECORDS 512
_Static_assert(NB_PAGES_HDR == NB_DISK_HDR, "PAGES and DISK frames share a buffer");

/* Send the frame being filled (PAGES or DISK), if it holds a record. */
int nb_sender_flush(struct sender *s, uint32_t round, char *err)
{
    if (!s->nrec)
        return 0;
    int was = s->adapt.active;
    double t0 = nb_now_ms();

    if (s->ftype == NB_MSG_DISK)
        nb_disk_finish(s->frame, round, s->nrec);
    else
        nb_pages_finish(s->frame, round, s->nrec);
    nb_throttle_bandwidth(s->m, s->flen);
    /* sealed in place: the frame is rebuilt from the next record on */
    if (nb_send_frame_in_place(s->ch, s->ftype, s->frame, (uint32_t)s->flen,
                               err) < 0)
        return -1;
    if (s->ftype == NB_MSG_DISK)
        atomic_fetch_add(&s->m->disk_bytes, NB_FRAME_HDR + s->flen +
                         (s->ch->seal ? NB_TAG : 0));
    nb_adapt_sent(&s->adapt, s->flen, nb_now_ms() - t0);
    if (s->adapt.active != was) {
        if (s->adapt.active)
            atomic_fetch_add(&s->m->compressing, 1);
        else
            atomic_fetch_sub(&s->m->compressing, 1);
    }
    s->flen = NB_PAGES_HDR;     /* = NB_DISK_HDR */
    s->nrec = 0;
    return 0;
}

/* A delta longer than this goes as zstd or raw instead. */
#define DELTA_CAP (NB_PAGE / 2)

/* `page` compressed by zstd into `out` (NB_PAGE bytes) at the session's
 * level: its length, or 0 where it would not save 256 bytes or failed. */
static size_t zstd_page(struct sender *s, const uint8_t *page, uint8_t *out)
{
    size_t z = ZSTD_compressCCtx(s->zctx, out, NB_PAGE - 256, page, NB_PAGE,
                                 s->m->p.zstd_level);
    return ZSTD_isError(z) ? 0 : z;
}

/*
 * Encode, in place, the snapshot of a page that holds data: as a DELTA
 * against what the destination holds (in round 0 zeros, unless compress
 * is off; later, what the cache kept), else zstd-compressed if enabled
 * and it shrinks, else RAW.  Returns the encoding; *n is its length.  A
 * sparse page thus costs a scan of the page and a few bytes on the wire,
 * however fast or slow the link.
 */
static int encode_data_page(struct sender *s, uint64_t key, uint8_t *snap,
                            uint32_t round, size_t *n)
{
    uint8_t tmp[NB_PAGE], buf[NB_PAGE];
    int vs_zero = round == 0 && s->adapt.mode != NB_COMPRESS_OFF;
    const uint8_t *old = vs_zero ? nb_zero_page
                         : round > 0 && s->cache ? nb_xcache_get(s->cache, key, buf)
                                                 : NULL;
    size_t d = old ? nb_delta_encode(old, snap, tmp, DELTA_CAP) : 0;

    *n = NB_PAGE;
    if (s->cache)   /* a delta against zeros is what the cache keeps of a sparse page */
        nb_xcache_put(s->cache, key, snap, round, vs_zero ? tmp : NULL, d);
    if (d) {
        memcpy(snap, tmp, d);
        *n = d;
        return NB_ENC_DELTA;
    }
    if (s->zctx && nb_adapt_try(&s->adapt)) {
        double t0 = nb_now_ms();
        size_t z = zstd_page(s, snap, tmp);
        nb_adapt_compressed(&s->adapt, NB_PAGE, z ? z : NB_PAGE,
                            (nb_now_ms() - t0) * 1e6);
        if (z) {
            memcpy(snap, tmp, z);
            *n = z;
            return NB_ENC_ZSTD;
        }
    }
    return NB_ENC_RAW;
}

/* The cache key of page `index`: its index among its channel's pages, so
 * a cache as large as the channel's share never collides. */
static uint64_t cache_key(const struct source *src, uint64_t index)
{
    return (index / 64 / (uint64_t)src->nsnd) * 64 + index % 64;
}

/*
 * The wire bytes resending page `index` would take now on its channel
 * `s`, record header included, encoded as send_page would: a ZERO
 * record, a delta against the cache's copy, zstd where the channel
 * compresses now and it shrinks, else raw; 0 for a page outside guest
 * RAM.  Sends nothing and leaves the cache as it is.
 */
static size_t resend_bytes(struct sender *s, uint64_t index)
{
    struct nb_mig *m = s->m;
    uint8_t snap[NB_PAGE], tmp[NB_PAGE], buf[NB_PAGE];
    const uint8_t *old;
    uint64_t pfn, off;
    size_t n;

    if (nb_page_addr(m, index, &pfn, &off) < 0)
        return 0;
    memcpy(snap, m->vmm.mem + off, NB_PAGE);
    if (nb_page_is_zero(snap))
        return NB_REC_HDR;
    old = s->cache ? nb_xcache_get(s->cache, cache_key(s->src, index), buf) : NULL;
    if (old && (n = nb_delta_encode(old, snap, tmp, DELTA_CAP)) > 0)
        return NB_REC_HDR + n;
    if (s->zctx && s->adapt.active && (n = zstd_page(s, snap, tmp)) > 0)
        return NB_REC_HDR + n;
    return NB_REC_HDR + NB_PAGE;
}

/* The sender (page channel) that sends page `index`. */
static struct sender *channel_of(struct source *src, uint64_t index)
{
    return &src->snd[index / 64 % (uint64_t)src->nsnd];
}

/* Whether page `index` would be resent against its channel's cache. */
static int resend_hits(struct source *src, uint64_t index)
{
    struct sender *s = channel_of(src, index);
    return s->cache && nb_xcache_has(s->cache, cache_key(src, index));
}

/* Dirty pages of one kind (cache hit or miss) and what a sample of
 * them, every `step`-th, cost. */
struct stratum {
    uint64_t count, step, seen;
    uint32_t pages;
    double bytes, ms;
};

static void sample_page(struct source *src, uint64_t index, struct stratum *st)
{
    if (st->seen++ % st->step || st->pages >= NB_RESEND_SAMPLE / 2)
        return;
    double t0 = nb_now_ms();
    size_t n = resend_bytes(channel_of(src, index), index);
    st->ms += nb_now_ms() - t0;
    st->bytes += (double)n;
    st->pages += n > 0;
}

/* Visit the pages set in `bits`: count them by cache hit or miss, or
 * (`sample`) sample each kind. */
static void visit_dirty(struct source *src, const uint64_t *bits,
                        struct stratum st[2], int sample)
{
    for (size_t w = 0; w < src->words; w++)
        for (uint64_t b = bits[w]; b; b &= b - 1) {
            uint64_t index = (uint64_t)w * 64 + (uint64_t)__builtin_ctzll(b);
            struct stratum *k = &st[resend_hits(src, index)];
            if (sample)
                sample_page(src, index, k);
            else
                k->count++;
        }
}

/*
 * What resending the pages set in `bits` would cost now.  Every page is
 * looked up in its channel's cache; up to NB_RESEND_SAMPLE / 2 of the
 * hits (deltas, mostly tiny) and as many of the misses (zstd or raw),
 * each spread evenly, are encoded as their channels would
 * (resend_bytes), and each kind is weighed by its count: a few misses
 * among many hits can carry most of the bytes, and a sample of all
 * pages alike missed them.  Between rounds only: the senders idle,
 * their caches and zstd contexts are free.
 */
void nb_src_sample_resend(struct source *src, const uint64_t *bits,
                          struct nb_resend_cost *out)
{
    struct stratum st[2] = { { 0 }, { 0 } };
    double pages = 0, bytes = 0, ms = 0;

    memset(out, 0, sizeof(*out));
    visit_dirty(src, bits, st, 0);
    for (int k = 0; k < 2; k++)
        st[k].step = st[k].count / (NB_RESEND_SAMPLE / 2) + 1;
    visit_dirty(src, bits, st, 1);
    for (int k = 0; k < 2; k++) {
        if (!st[k].pages)
            continue;
        out->pages += st[k].pages;
        pages += (double)st[k].count;
        bytes += (double)st[k].count * st[k].bytes / st[k].pages;
        ms += (double)st[k].count * st[k].ms / st[k].pages;
    }
    if (pages > 0) {
        out->wire_bytes = bytes / pages;
        out->encode_ms = ms / pages;
    }
}

/*
 * Encode one page into the current frame.  The page is first copied into
 * the frame: that copy is the snapshot everything else works on, since
 * the guest may be writing the page right now.
 */
static int send_page(struct sender *s, struct source *src, uint64_t index,
                     uint32_t round, char *err)
{
    struct nb_mig *m = s->m;
    uint8_t *rec, *snap;
    uint64_t pfn, off, key;
    size_t n = NB_PAGE;
    int enc = NB_ENC_RAW;
    int incremental = m->p.verify == NB_VERIFY_INCREMENTAL;

    if (nb_page_addr(m, index, &pfn, &off) < 0)
        return 0;
    if ((s->flen + NB_REC_HDR + NB_PAGE > FRAME_CAP || s->nrec >= s->max_rec) &&
        nb_sender_flush(s, round, err) < 0)
        return -1;
    rec = s->frame + s->flen;
    snap = rec + NB_REC_HDR;
    key = cache_key(src, index);
    memcpy(snap, m->vmm.mem + off, NB_PAGE);
    if (nb_page_is_zero(snap)) {
        /* the destination's copy is zeros, not the cached one: the cache
         * says so (or, where another page keeps the slot, holds nothing of
         * this one), and a page the guest zeroed goes as a delta against
         * zeros when written again, where its changes fit one */
        if (s->cache)
            nb_xcache_put_zero(s->cache, key, round);
        if (incremental)
            nb_set_page_term(m, s->slot, index, 0);
        if (round == 0)
            return 0;       /* the destination starts out zeroed */
        enc = NB_ENC_ZERO;
        n = 0;
        atomic_fetch_add(&m->pages_zero, 1);
    } else {
        if (incremental)
            nb_set_page_term(m, s->slot, index,
                             nb_digest_term(pfn, nb_page_hash(snap, &m->keys.hash),
                                            src->hz, &m->keys.hash));
        enc = encode_data_page(s, key, snap, round, &n);
        atomic_fetch_add(enc == NB_ENC_DELTA ? &m->pages_delta
                         : enc == NB_ENC_ZSTD ? &m->pages_compressed
                                              : &m->pages_raw, 1);
    }
    nb_page_rec_put(rec, (uint32_t)pfn, (uint8_t)enc, (uint16_t)n);
    s->flen += NB_REC_HDR + n;
    s->nrec++;
    s->round_pages++;
    return 0;
}

/* Send this channel's share of the round: words slot, slot+n, slot+2n... */
static int run_round(struct sender *s, struct source *src, uint32_t round, char *err)
{
    struct nb_round_end end;
    size_t n = (size_t)src->nsnd;
    /* the first word of [w0, w1) that is this sender's (word w: w % n) */
    size_t w = src->w0 + ((size_t)s->slot + n - src->w0 % n) % n;
    if (src->w0 == 0)
        s->round_pages = s->round_blocks = 0;
    s->max_rec = atomic_load(&s->m->guest_paused) ? PAUSED_FRAME_RECORDS
                                                  : UINT32_MAX;
    for (; w < src->w1; w += n) {
        uint64_t bits = src->bitmap[w];
        if (!bits)
            continue;   /* a clean word: nothing sent, no cancel to heed */
        while (bits) {
            int b = __builtin_ctzll(bits);
            bits &= bits - 1;
            if (send_page(s, src, (uint64_t)w * 64 + (uint64_t)b, round, err) < 0)
                return -1;
        }
        if (atomic_load(&s->m->cancel_req)) {
            snprintf(err, NB_ERRLEN, "cancelled");
            return nb_wire_fail(s->ch, NB_ERR_CANCELLED);
        }
    }
    if (src->w1 < src->words)
        return 0;               /* more of this round to come */
    if (nb_sender_flush(s, round, err) < 0 ||
        (s->m->ndisks && nb_sender_disks(s, src, round, err) < 0) ||
        (s->slot == 0 && s->m->nstreams &&
         nb_stream_send(s->m, s->ch, s->frame, round,
                        atomic_load(&s->m->guest_paused), err) < 0))
        return -1;
    end = (struct nb_round_end){ round, s->round_pages + s->round_blocks };
    return nb_round_end_send(s->ch, &end, err);
}

static void *sender_main(void *arg)
{
    struct sender *s = arg;
    struct source *src = s->src;
    char err[NB_ERRLEN];
    int seen = 0;

    for (;;) {
        uint32_t round;
        pthread_mutex_lock(&src->lock);
        while (src->generation == seen && !src->stop)
            pthread_cond_wait(&src->cond, &src->lock);
        if (src->stop) {
            pthread_mutex_unlock(&src->lock);
            break;
        }
        seen = src->generation;
        round = src->round;
        pthread_mutex_unlock(&src->lock);

        int rc = run_round(s, src, round, err);

        pthread_mutex_lock(&src->lock);
        if (rc < 0 && !src->failed) {
            src->failed = 1;
            pthread_mutex_unlock(&src->lock);
            nb_fail(s->m, atomic_load(&s->m->cancel_req) ? NB_ERR_CANCELLED
                                                          : s->ch->err_kind,
                    "%s", err);
            /* the other senders must not wait on a half-dead link */
            nb_shutdown_data(s->m);
            pthread_mutex_lock(&src->lock);
        }
        src->finished++;
        pthread_cond_broadcast(&src->cond);
        pthread_mutex_unlock(&src->lock);
    }
    return NULL;
}

/* A poll that returned after this long waited for what it read (one that
 * found it already there returns in microseconds). */
#define POLL_WOKE_MS 0.02

/*
 * While rounds run the destination says only APPLIED on the control
 * channel; anything else readable there (a REFUSE, an ABORT, or the
 * connection closing) means it has given up: fail at once and break the
 * page links, so that no sender stays blocked on a socket nobody reads.
 * Reads what arrives within `wait_ms`, noting when each APPLIED came for
 * the destination's pace (converge.h); -1 once the session failed.
 * Called unlocked, from the migration thread only.
 */
int nb_src_read_control(struct source *src, int wait_ms)
{
    struct nb_mig *m = src->m;
    struct pollfd p = { .fd = m->ctl.fd, .events = POLLIN };
    struct nb_frame f;
    char err[NB_ERRLEN] = "";
    uint32_t round;
    int ok;

    /* a cancel shuts our own sockets down: that is not the peer talking */
    while (m->ctl.fd >= 0 && !atomic_load(&m->cancel_req)) {
        double t_poll = nb_now_ms(), now;
        int ready = poll(&p, 1, wait_ms);

        now = nb_now_ms();
        if (ready == 0)
            src->pace.t_quiet = now;
        if (ready <= 0)
            break;
        ok = nb_recv_frame(&m->ctl, &f, NB_MAX_REASON, err) == 0;
        if (ok && nb_applied_parse(&f, &round) == 0 && round <= src->cur_round) {
            if (round + 1 > src->applied) {
                int waited = wait_ms > 0 && now - t_poll > POLL_WOKE_MS;
                double rtt;

                src->applied = round + 1;
                pthread_mutex_lock(&m->lock);
                rtt = m->st.rtt_ms;
                pthread_mutex_unlock(&m->lock);
                nb_pace_applied(&src->pace, src->applied, waited, now, rtt);
            }
            wait_ms = 0;
            continue;
        }
        nb_peer_said(&m->ctl, ok ? &f : NULL, "destination", "during the copy", err);
        pthread_mutex_lock(&src->lock);
        src->failed = 1;
        pthread_mutex_unlock(&src->lock);
        nb_fail(m, m->ctl.err_kind, "%s", err);
        nb_shutdown_data(m);
        return -1;
    }
    return 0;
}

/* Have every sender send its pages of words [w0, w1); wait for them. */
static void dispatch(struct source *src, uint32_t round, size_t w0, size_t w1)
{
    pthread_mutex_lock(&src->lock);
    src->w0 = w0;
    src->w1 = w1;
    src->round = round;
    src->finished = 0;
    src->generation++;
    pthread_cond_broadcast(&src->cond);
    while (src->finished < src->nsnd) {
        struct timespec until;
        nb_deadline(&until, 100);
        if (pthread_cond_timedwait(&src->cond, &src->lock, &until) != ETIMEDOUT ||
            src->failed)
            continue;
        pthread_mutex_unlock(&src->lock);
        nb_src_read_control(src, 0);
        pthread_mutex_lock(&src->lock);
    }
    pthread_mutex_unlock(&src->lock);
}

/* What the page connections hold that the destination has not
 * acknowledged yet, in bytes. */
uint64_t nb_src_queued(struct source *src)
{
    uint64_t n = 0;

    for (int i = 0; i < src->nsnd; i++)
        if (src->snd[i].ch)
            n += nb_socket_queued(src->snd[i].ch->fd);
    return n;
}

/* Record round `round`, begun at `t0` with the wire at `bytes0` bytes
 * (`queued0` of them not yet acknowledged) and `dirty` pages counted: the
 * source's last round (src->last_round), the link's timing and bandwidth,
 * and the stats (the first NB_MAX_ROUND_STATS rounds). */
static void record_round(struct source *src, uint32_t round, double t0,
                         uint64_t bytes0, uint64_t queued0, uint64_t dirty)
{
    struct nb_mig *m = src->m;
    struct nb_round_stat *r = &src->last_round;

    *r = (struct nb_round_stat){ .start_ms = t0 - m->t0, .dirty = dirty,
                                 .dirty_blocks = src->dirty_blocks,
                                 .expected_ms = round ? src->expected : 0,
                                 .log_reads = src->log_reads };
    for (int i = 0; i < src->nsnd; i++) {
        r->pages += src->snd[i].round_pages;
        r->blocks += src->snd[i].round_blocks;
    }
    r->duration_ms = nb_now_ms() - t0;
    r->bytes = atomic_load(&m->wire_bytes) - bytes0;
    nb_pace_sent(&src->pace, round, r->pages + r->blocks);
    nb_src_time_round(src, r, queued0, nb_src_queued(src));
    pthread_mutex_lock(&m->lock);
    m->st.bandwidth = nb_src_link_bandwidth(src);
    r->throttle = m->st.throttle;
    m->st.round = round;
    m->st.nrounds = round + 1;
    if (round < NB_MAX_ROUND_STATS)
        m->st.rounds[round] = *r;
    pthread_mutex_unlock(&m->lock);
}

/* No bit set in words [w0, w0 + n) of `b`. */
static int words_clean(const uint64_t *b, size_t w0, size_t n)
{
    for (size_t w = w0; w < w0 + n; w++)
        if (b[w])
            return 0;
    return 1;
}

/*
 * A lazy round, chunk by chunk: clear the chunk's part of the dirty log,
 * then send it.  A chunk with nothing to send is left alone, its log
 * uncleared (a page written there since goes in a later round): in round
 * 0 one without data, later one the count's peek (src->scratch) found
 * clean.  Each clear is a request to the vmm (on the test host its
 * control thread runs it, beside the guest's vCPUs) and each dispatch
 * wakes the senders: the clean chunks go with the next dispatch, their
 * words zero, and the last dispatch ends at the last word (the senders
 * end the round there).  0, or -1 (the failure recorded) if the log
 * could not be read.
 */
static int round_lazy(struct source *src, uint32_t round)
{
    struct nb_mig *m = src->m;
    char err[NB_ERRLEN];
    size_t from = 0;        /* the first word not dispatched yet */
    int failed = 0;

    for (size_t w0 = 0; w0 < src->words && !failed; w0 += src->chunk) {
        size_t n = src->words - w0 < src->chunk ? src->words - w0 : src->chunk;
        if (words_clean(round ? src->scratch : src->bitmap, w0, n)) {
            memset(src->bitmap + w0, 0, n * 8);
            continue;
        }
        if (m->vmm.ops->dirty_log_range(&m->vmm, w0, n,
                                        round ? src->bitmap : src->scratch,
                                        src->words, err) < 0) {
            nb_fail(m, NB_ERR_VMM, "%s", err);
            return -1;
        }
        src->log_reads++;
        if (round == 0)
            for (size_t w = w0; w < w0 + n; w++)
                src->bitmap[w] |= src->scratch[w];
        dispatch(src, round, from, w0 + n);
        from = w0 + n;
        pthread_mutex_lock(&src->lock);
        failed = src->failed;
        pthread_mutex_unlock(&src->lock);
    }
    if (!failed && (from < src->words || from == 0))    /* 0 words: once */
        dispatch(src, round, from, src->words);
    return 0;
}

/*
 * Run one round on all senders.  `lazy`: clear the dirty log chunk by
 * chunk just before sending it (round_lazy), so a page the guest writes
 * before its chunk comes up goes once, with its newest content.  Later
 * rounds send what the clear reports; round 0 sends the pages that held
 * data when it began plus what the clear reports (a page first written
 * during round 0, before its chunk was cleared, is in no later round's
 * log).
 */
int nb_src_round(struct source *src, uint32_t round, uint64_t dirty, int lazy)
{
    struct nb_mig *m = src->m;
    uint64_t bytes0 = atomic_load(&m->wire_bytes), queued0 = nb_src_queued(src);
    double t0 = nb_now_ms();
    int failed, log_failed = 0;

    src->log_reads = 0;
    if (!lazy)
        dispatch(src, round, 0, src->words);
    else
        log_failed = round_lazy(src, round) < 0;
    pthread_mutex_lock(&src->lock);
    failed = src->failed || log_failed;
    pthread_mutex_unlock(&src->lock);

    record_round(src, round, t0, bytes0, queued0, dirty);
    return failed ? -1 : 0;
}

uint64_t nb_popcount_bitmap(const uint64_t *b, size_t words)
{
    uint64_t n = 0;
    for (size_t i = 0; i < words; i++)
        if (b[i])       /* mostly clean in the pause: skip the count */
            n += (uint64_t)__builtin_popcountll(b[i]);
    return n;
}

/* Round 0 sends every page that holds data: mark the memory file's extents
 * (layouts are contiguous in the file: page index = offset / page size). */
void nb_src_mark_data_pages(struct source *src)
{
    struct nb_mig *m = src->m;
    uint64_t off = 0, total = m->npages * NB_PAGE;

    memset(src->bitmap, 0, src->words * 8);
    if (!m->vmm.ops->next_data) {
        for (uint64_t i = 0; i < m->npages; i++)
            src->bitmap[i / 64] |= 1ULL << (i % 64);
        return;
    }
    while (off < total) {
        uint64_t doff, dend;
        if (m->vmm.ops->next_data(&m->vmm, off, &doff, &dend) != 0 || doff >= total)
            break;
        if (dend > total)
            dend = total;
        for (uint64_t i = doff / NB_PAGE; i < (dend + NB_PAGE - 1) / NB_PAGE; i++)
            src->bitmap[i / 64] |= 1ULL << (i % 64);
        /* map the extent in one go rather than a page fault per page
         * (tried instead: the senders mapping each 64-page word as they
         * reach it; no faster end to end, benchmarks/README.md) */
        madvise(m->vmm.mem + doff, dend - doff, MADV_POPULATE_READ);
        off = dend > doff ? dend : doff + NB_PAGE;
    }
}

/*
 * The delta cache's size: as given, or (auto) as large as the guest's
 * memory, at most a quarter of what is free on this host now and at most
 * the cap given.  Its pages are only touched as pages are cached.
 */
static uint64_t delta_cache_size(const struct nb_mig *m)
{
    long free_pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    uint64_t quarter = free_pages > 0 && page > 0
                       ? (uint64_t)free_pages * (uint64_t)page / 4 : 0;
    uint64_t size = m->vmm.layout.total;

    if (m->p.mode != NB_MODE_LIVE)
        return 0;
    if (!m->p.delta_cache_auto)
        return m->p.delta_cache;
    if (quarter && size > quarter)
        size = quarter;
    if (m->p.delta_cache && size > m->p.delta_cache)
        size = m->p.delta_cache;
    return size;
}

int nb_src_start_senders(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    uint64_t cache = delta_cache_size(m);

    pthread_mutex_lock(&m->lock);
    m->st.delta_cache_bytes = cache;
    pthread_mutex_unlock(&m->lock);
    for (int i = 0; i < src->nsnd; i++) {
        struct sender *s = &src->snd[i];
        s->m = m;
        s->src = src;
        s->slot = i;
        s->ch = &m->data[i];
        s->frame = malloc(FRAME_CAP + NB_TAG);  /* room for the tag */
        s->flen = NB_PAGES_HDR;
        s->ftype = NB_MSG_PAGES;
        if (!s->frame) {
            snprintf(err, NB_ERRLEN, "out of memory");
            return -1;
        }
        if (cache)
            s->cache = nb_xcache_new(cache / (uint64_t)src->nsnd);
        nb_adapt_init(&s->adapt, m->p.compress);
        if (m->p.compress)
            s->zctx = ZSTD_createCCtx();
        if (s->adapt.active)
            atomic_fetch_add(&m->compressing, 1);
        if (pthread_create(&s->thread, NULL, sender_main, s) != 0) {
            snprintf(err, NB_ERRLEN, "cannot start a sender thread");
            return -1;
        }
    }
    return 0;
}

void nb_src_stop_senders(struct source *src)
{
    pthread_mutex_lock(&src->lock);
    src->stop = 1;
    pthread_cond_broadcast(&src->cond);
    pthread_mutex_unlock(&src->lock);
    for (int i = 0; i < src->nsnd; i++) {
        struct sender *s = &src->snd[i];
        if (s->thread)
            pthread_join(s->thread, NULL);
        nb_xcache_free(s->cache);
        ZSTD_freeCCtx(s->zctx);
        free(s->frame);
    }
}

int nb_src_sync_dirty(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    memset(src->bitmap, 0, src->words * 8);
    src->t_sync = nb_now_ms();
    return m->vmm.ops->dirty_log(&m->vmm, src->bitmap, src->words, err);
}
