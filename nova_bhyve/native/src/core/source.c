/*
 * Source side: connect, authenticate, agree on compatibility, then copy
 * memory in rounds (pre-copy) over several page channels, switch over,
 * send the device state, prove the copy with the memory digest, and hand
 * the guest to the destination with an explicit commit.
 *
 * Ownership rule: the source resumes its guest only if it never sent
 * COMMIT (the destination runs only after receiving COMMIT).  After
 * COMMIT the source never resumes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#include "core/nbmig.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

struct source;

struct sender {
    struct nb_mig *m;
    struct source *src;
    struct nb_chan *ch;
    int slot;                   /* 0-based channel slot */
    struct nb_xcache *cache;
    ZSTD_CCtx *zctx;
    uint8_t *frame;
    size_t flen;
    uint32_t nrec;
    uint64_t round_pages;
    pthread_t thread;
};

struct source {
    struct nb_mig *m;
    struct sender snd[NB_MAX_CHANNELS];
    int nsnd;
    uint64_t *bitmap;           /* pages to send this round, layout order */
    size_t words;
    uint64_t hz;                /* hash of the zero page */
    /* round hand-off between the migration thread and the senders */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint32_t round;             /* round to run */
    int generation;             /* bumped to start a round */
    int finished;               /* senders done with this generation */
    int stop;
    int failed;
    int paused;                 /* we paused the guest */
    double t_pause;             /* when it stopped (downtime starts) */
    uint64_t prev_dirty;        /* dirty pages at the previous sync */
    /* the words [w0, w1) of the bitmap the senders work on now; the
     * round ends (ROUND_END) with the part that reaches the last word */
    size_t w0, w1;
    /* lazy clearing (vmm dirty_log_range + dirty_peek): a round clears
     * and sends the log one chunk of `chunk` words at a time */
    int lazy;
    size_t chunk;
    uint64_t *scratch;          /* a bitmap for peeks and round 0's clears */
};

/* Lazy clearing works on chunks of at least this many 64-page words (64 MiB). */
#define LAZY_MIN_WORDS ((64u << 20) / NB_PAGE / 64)

/* Below this expected downtime, stop iterating even if rounds still shrink. */
#define SMALL_DOWNTIME_MS 5.0

#define FRAME_CAP (NB_MAX_PAGES_FRAME)

static int flush_frame(struct sender *s, uint32_t round, char *err)
{
    if (!s->nrec)
        return 0;
    nb_pages_finish(s->frame, round, s->nrec);
    nb_throttle_bandwidth(s->m, s->flen);
    if (nb_send_frame(s->ch, NB_MSG_PAGES, s->frame, (uint32_t)s->flen, err) < 0)
        return -1;
    s->flen = NB_PAGES_HDR;
    s->nrec = 0;
    return 0;
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
    uint8_t *rec, *snap, tmp[NB_PAGE];
    uint64_t pfn, off, key;
    size_t n = NB_PAGE;
    int enc = NB_ENC_RAW;
    int incremental = m->p.verify == NB_VERIFY_INCREMENTAL;

    if (nb_page_addr(m, index, &pfn, &off) < 0)
        return 0;
    if (s->flen + NB_REC_HDR + NB_PAGE > FRAME_CAP && flush_frame(s, round, err) < 0)
        return -1;
    rec = s->frame + s->flen;
    snap = rec + NB_REC_HDR;
    /* cache key: the page's index among this channel's pages, so a cache
     * as large as the channel's share never collides */
    key = (index / 64 / (uint64_t)src->nsnd) * 64 + index % 64;
    memcpy(snap, m->vmm.mem + off, NB_PAGE);
    if (nb_page_is_zero(snap)) {
        if (s->cache)   /* the destination's copy is zeros, not the cached one */
            nb_xcache_drop(s->cache, key);
        if (incremental)
            m->page_hash[index] = nb_digest_term(pfn, src->hz, &m->keys.hash);
        if (round == 0)
            return 0;       /* the destination starts out zeroed */
        enc = NB_ENC_ZERO;
        n = 0;
        atomic_fetch_add(&m->pages_zero, 1);
    } else {
        uint8_t *old = s->cache && round > 0 ? nb_xcache_get(s->cache, key) : NULL;
        if (incremental)
            m->page_hash[index] = nb_digest_term(
                pfn, nb_page_hash(snap, &m->keys.hash), &m->keys.hash);
        if (s->cache) {
            size_t d = old ? nb_delta_encode(old, snap, tmp, NB_PAGE / 2) : 0;
            nb_xcache_put(s->cache, key, snap, round);
            if (d) {
                memcpy(snap, tmp, d);
                enc = NB_ENC_DELTA;
                n = d;
            }
        }
        if (enc == NB_ENC_RAW && s->zctx) {
            size_t z = ZSTD_compressCCtx(s->zctx, tmp, NB_PAGE - 256, snap, NB_PAGE,
                                         m->p.zstd_level);
            if (!ZSTD_isError(z) && z > 0) {
                memcpy(snap, tmp, z);
                enc = NB_ENC_ZSTD;
                n = z;
            }
        }
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
        s->round_pages = 0;
    for (; w < src->w1; w += n) {
        uint64_t bits = src->bitmap[w];
        while (bits) {
            int b = __builtin_ctzll(bits);
            bits &= bits - 1;
            if (send_page(s, src, (uint64_t)w * 64 + (uint64_t)b, round, err) < 0)
                return -1;
        }
        if (atomic_load(&s->m->cancel_req)) {
            snprintf(err, NB_ERRLEN, "cancelled");
            return -1;
        }
    }
    if (src->w1 < src->words)
        return 0;               /* more of this round to come */
    if (flush_frame(s, round, err) < 0)
        return -1;
    end = (struct nb_round_end){ round, s->round_pages };
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
            nb_fail(s->m, atomic_load(&s->m->cancel_req) ? NB_RESULT_CANCELLED
                                                          : NB_RESULT_FAILED,
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

/*
 * The destination says nothing on the control channel while rounds run:
 * anything readable there (a REFUSE, an ABORT, or the connection closing)
 * means it has given up.  Fail at once and break the page links, so that
 * no sender stays blocked on a socket nobody reads.  Called unlocked.
 */
static void check_peer(struct source *src)
{
    struct nb_mig *m = src->m;
    struct pollfd p = { .fd = m->ctl.fd, .events = POLLIN };
    char err[NB_ERRLEN];

    /* a cancel shuts our own sockets down: that is not the peer talking */
    if (m->ctl.fd < 0 || atomic_load(&m->cancel_req) || poll(&p, 1, 0) <= 0)
        return;
    nb_peer_gave_up(&m->ctl, "destination", "during the copy", err);
    pthread_mutex_lock(&src->lock);
    src->failed = 1;
    pthread_mutex_unlock(&src->lock);
    nb_fail(m, NB_RESULT_FAILED, "%s", err);
    nb_shutdown_data(m);
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
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 100 * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        if (pthread_cond_timedwait(&src->cond, &src->lock, &until) != ETIMEDOUT ||
            src->failed)
            continue;
        pthread_mutex_unlock(&src->lock);
        check_peer(src);
        pthread_mutex_lock(&src->lock);
    }
    pthread_mutex_unlock(&src->lock);
}

/*
 * Run one round on all senders.  `lazy`: clear the dirty log chunk by
 * chunk just before sending it, so a page the guest writes before its
 * chunk comes up goes once, with its newest content.  Later rounds send
 * what the clear reports; round 0 sends the pages that held data when it
 * began plus what the clear reports (a page first written during round
 * 0, before its chunk was cleared, is in no later round's log).
 */
static int do_round(struct source *src, uint32_t round, uint64_t dirty, int lazy)
{
    struct nb_mig *m = src->m;
    uint64_t bytes0 = atomic_load(&m->wire_bytes), pages = 0;
    double t0 = nb_now_ms();
    char err[NB_ERRLEN];
    int failed = 0, log_failed = 0;

    if (!lazy) {
        dispatch(src, round, 0, src->words);
    } else {
        for (size_t w0 = 0; w0 < src->words && !failed; w0 += src->chunk) {
            size_t n = src->words - w0 < src->chunk ? src->words - w0 : src->chunk;
            if (m->vmm.ops->dirty_log_range(&m->vmm, w0, n,
                                            round ? src->bitmap : src->scratch,
                                            src->words, err) < 0) {
                nb_fail(m, NB_RESULT_FAILED, "%s", err);
                log_failed = 1;
                break;
            }
            if (round == 0)
                for (size_t w = w0; w < w0 + n; w++)
                    src->bitmap[w] |= src->scratch[w];
            dispatch(src, round, w0, w0 + n);
            pthread_mutex_lock(&src->lock);
            failed = src->failed;
            pthread_mutex_unlock(&src->lock);
        }
    }
    pthread_mutex_lock(&src->lock);
    failed = src->failed || log_failed;
    pthread_mutex_unlock(&src->lock);

    for (int i = 0; i < src->nsnd; i++)
        pages += src->snd[i].round_pages;
    pthread_mutex_lock(&m->lock);
    m->st.round = round;
    m->st.nrounds = round + 1;
    if (round < NB_MAX_ROUND_STATS) {
        struct nb_round_stat *r = &m->st.rounds[round];
        r->start_ms = t0 - m->t0;
        r->duration_ms = nb_now_ms() - t0;
        r->pages = pages;
        r->bytes = atomic_load(&m->wire_bytes) - bytes0;
        r->dirty = dirty;
    }
    pthread_mutex_unlock(&m->lock);
    return failed ? -1 : 0;
}

static uint64_t popcount_bitmap(const uint64_t *b, size_t words)
{
    uint64_t n = 0;
    for (size_t i = 0; i < words; i++)
        n += (uint64_t)__builtin_popcountll(b[i]);
    return n;
}

/* Round 0 sends every page that holds data: mark the memory file's extents
 * (layouts are contiguous in the file: page index = offset / page size). */
static void mark_data_pages(struct source *src)
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
        /* map the extent in one go rather than a page fault per page */
        madvise(m->vmm.mem + doff, dend - doff, MADV_POPULATE_READ);
        off = dend > doff ? dend : doff + NB_PAGE;
    }
}

static int connect_to(struct nb_mig *m, char *err)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_NUMERICSERV };
    struct addrinfo *res = NULL;
    char port[16];
    int fd = -1, rc;

    snprintf(port, sizeof(port), "%d", m->p.port);
    rc = getaddrinfo(m->p.host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, NB_ERRLEN, "cannot resolve %s: %s", m->p.host, gai_strerror(rc));
        return -1;
    }
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        struct timeval tv = { m->p.timeout_ms / 1000, (m->p.timeout_ms % 1000) * 1000 };
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        if (connect(fd, a->ai_addr, a->ai_addrlen) < 0) {
            snprintf(err, NB_ERRLEN, "cannot connect to %s port %d: %s", m->p.host,
                     m->p.port, strerror(errno));
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd >= 0)
        nb_set_nodelay(fd);
    return fd;
}


static int start_senders(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    for (int i = 0; i < src->nsnd; i++) {
        struct sender *s = &src->snd[i];
        s->m = m;
        s->src = src;
        s->slot = i;
        s->ch = &m->data[i];
        s->frame = malloc(FRAME_CAP);
        s->flen = NB_PAGES_HDR;
        if (!s->frame) {
            snprintf(err, NB_ERRLEN, "out of memory");
            return -1;
        }
        if (m->p.delta_cache && m->p.mode == NB_MODE_LIVE)
            s->cache = nb_xcache_new(m->p.delta_cache / (uint64_t)src->nsnd);
        if (m->p.compress)
            s->zctx = ZSTD_createCCtx();
        if (pthread_create(&s->thread, NULL, sender_main, s) != 0) {
            snprintf(err, NB_ERRLEN, "cannot start a sender thread");
            return -1;
        }
    }
    return 0;
}

static void stop_senders(struct source *src)
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

static int sync_dirty(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    memset(src->bitmap, 0, src->words * 8);
    return m->vmm.ops->dirty_log(&m->vmm, src->bitmap, src->words, err);
}

/* Connect, authenticate, exchange preambles, join the page channels. */
static int source_connect(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    char pre[NB_PREAMBLE_CAP], peer_err[NB_ERRLEN];
    struct nb_frame f;
    double t;
    int n;

    m->ctl.fd = connect_to(m, err);
    if (m->ctl.fd < 0)
        return -1;
    m->ctl.index = 0;
    m->ctl.wire = &m->wire_bytes;
    nb_set_phase(m, NB_PHASE_HANDSHAKE);
    t = nb_now_ms();
    if (nb_handshake_source(&m->ctl, m->p.secret, m->p.secret_len, &m->keys, err) < 0)
        return -1;
    pthread_mutex_lock(&m->lock);
    m->st.rtt_ms = (nb_now_ms() - t) / 1.5;   /* 1.5 round trips */
    pthread_mutex_unlock(&m->lock);
    n = nb_preamble_write(&m->vmm.spec, &m->p, pre, sizeof(pre));
    if (n < 0 || nb_send_frame(&m->ctl, NB_MSG_PREAMBLE, pre, (uint32_t)n, err) < 0 ||
        nb_expect(&m->ctl, &f, NB_MSG_ACCEPT, NB_MAX_PREAMBLE, err) < 0)
        return -1;
    /* the destination checked; check its answer too (defence in depth) */
    if ((size_t)f.len >= sizeof(pre)) {
        snprintf(err, NB_ERRLEN, "destination preamble too long");
        return -1;
    }
    {
        char dst[NB_MAX_PREAMBLE];
        memcpy(dst, f.payload, f.len);
        dst[f.len] = 0;
        if (nb_preamble_check(pre, dst, peer_err, sizeof(peer_err)) < 0) {
            snprintf(err, NB_ERRLEN, "%s", peer_err);
            return -1;
        }
    }
    for (int i = 0; i < src->nsnd; i++) {
        struct nb_chan *c = &m->data[i];
        c->fd = connect_to(m, err);
        if (c->fd < 0)
            return -1;
        c->index = (uint16_t)(i + 1);
        c->wire = &m->wire_bytes;
        if (nb_join_send(c, &m->keys, err) < 0)
            return -1;
    }
    return 0;
}

/* Estimate and decide: 1 = switch over now. */
static int should_switch(struct source *src, uint64_t dirty, double since_ms)
{
    struct nb_mig *m = src->m;
    double bw, bpp = NB_PAGE + NB_REC_HDR, send_ms = 0, expected;
    uint64_t bytes = 0, pages = 0;
    uint32_t nr, limit = atomic_load(&m->max_downtime_ms);
    int force = atomic_load(&m->force_req);

    pthread_mutex_lock(&m->lock);
    nr = m->st.nrounds < NB_MAX_ROUND_STATS ? m->st.nrounds : NB_MAX_ROUND_STATS;
    for (uint32_t i = 0; i < nr; i++) {
        bytes += m->st.rounds[i].bytes;
        send_ms += m->st.rounds[i].duration_ms;
    }
    if (nr && m->st.rounds[nr - 1].pages) {
        pages = m->st.rounds[nr - 1].pages;
        bpp = (double)m->st.rounds[nr - 1].bytes / (double)pages;
    }
    bw = send_ms > 0.5 ? (double)bytes * 1e3 / send_ms : 1e9;
    {
        uint64_t cap = atomic_load(&m->max_bandwidth);
        if (cap && bw > (double)cap)
            bw = (double)cap;
    }
    expected = (double)dirty * bpp * 1e3 / bw + 2 * m->st.rtt_ms + 1.0;
    m->st.dirty_pages = dirty;
    m->st.dirty_rate = since_ms > 0 ? (double)dirty * 1e3 / since_ms : 0;
    m->st.bandwidth = bw;
    m->st.bytes_remaining = (uint64_t)((double)dirty * bpp);
    m->st.expected_downtime_ms = expected;
    pthread_mutex_unlock(&m->lock);
    if (dirty == 0 || force)
        return 1;
    if (expected > (double)limit) {
        src->prev_dirty = dirty;
        return 0;
    }
    /*
     * It would fit.  While each round still shrinks the dirty set by a
     * quarter or more, one more (short) round is cheaper than the extra
     * downtime; stop once it no longer converges or is already tiny.
     */
    {
        uint64_t prev = src->prev_dirty;
        src->prev_dirty = dirty;
        if (prev && dirty * 4 <= prev * 3 &&
            expected > SMALL_DOWNTIME_MS + 2 * m->st.rtt_ms)
            return 0;
    }
    return 1;
}

/* Undo what we did to the guest: it keeps running here. */
static void source_recover(struct source *src)
{
    struct nb_mig *m = src->m;
    char e[NB_ERRLEN];
    if (m->st.throttle && m->vmm.ops->throttle)
        m->vmm.ops->throttle(&m->vmm, 0, e);
    if (src->paused && !m->p.keep_paused && m->vmm.ops->resume(&m->vmm, e) == 0)
        src->paused = 0;
    pthread_mutex_lock(&m->lock);
    m->st.guest_runs_here = !src->paused || m->p.keep_paused;   /* it lives here */
    m->st.throttle = 0;
    pthread_mutex_unlock(&m->lock);
    if (m->ctl.fd >= 0 && m->ctl.key) {
        const char *why = atomic_load(&m->cancel_req) ? "cancelled by the source"
                                                      : "source failed";
        nb_send_text(&m->ctl, NB_MSG_ABORT, why, e);
    }
}

/* Pause, send the last pages, the state and the digest; commit. */
static int switch_over(struct source *src, uint32_t round, char *err)
{
    struct nb_mig *m = src->m;
    uint8_t *blob = NULL;
    struct nb_digest_msg dm;
    size_t blen = 0;
    struct nb_frame f;
    double t_pause, t_run;
    uint64_t digest;
    int rc;

    nb_set_phase(m, NB_PHASE_SWITCHOVER);
    t_pause = src->t_pause;
    if (m->p.mode == NB_MODE_LIVE) {
        /* the final round: everything dirty when the guest stopped */
        if (do_round(src, round, popcount_bitmap(src->bitmap, src->words), 0) < 0) {
            snprintf(err, NB_ERRLEN, "%s", m->st.error);
            return -1;
        }
    }
    if (m->vmm.ops->save_state(&m->vmm, &blob, &blen, err) < 0)
        return -1;
    rc = nb_send_frame(&m->ctl, NB_MSG_STATE, blob, (uint32_t)blen, err);
    free(blob);
    if (rc < 0)
        return -1;
    nb_set_phase(m, NB_PHASE_VERIFY);
    digest = nb_memory_digest(m, m->p.verify == NB_VERIFY_FULL);
    dm = (struct nb_digest_msg){ round, digest, m->npages };
    if (nb_digest_send(&m->ctl, &dm, err) < 0 ||
        nb_expect(&m->ctl, &f, NB_MSG_READY, 64, err) < 0)
        return -1;
    pthread_mutex_lock(&m->lock);
    m->st.digest = digest;
    if (atomic_load(&m->cancel_req)) {
        pthread_mutex_unlock(&m->lock);
        snprintf(err, NB_ERRLEN, "cancelled");
        return -1;
    }
    m->st.committed = 1;    /* from here on the guest belongs to the destination */
    m->st.phase = NB_PHASE_COMMIT;
    pthread_mutex_unlock(&m->lock);
    if (nb_send_empty(&m->ctl, NB_MSG_COMMIT, err) < 0 ||
        nb_expect(&m->ctl, &f, NB_MSG_RUNNING, 64, err) < 0) {
        snprintf(err + strlen(err), NB_ERRLEN - strlen(err),
                 " (after COMMIT: the source stays stopped; check the destination)");
        return -2;
    }
    t_run = nb_now_ms();
    pthread_mutex_lock(&m->lock);
    /* from the pause until the destination says it runs: an upper bound
     * (by one network latency) on what the guest sees */
    m->st.downtime_ms = t_run - t_pause;
    pthread_mutex_unlock(&m->lock);
    return 0;
}

void *nb_source_main(void *arg)
{
    struct nb_mig *m = arg;
    struct source src;
    char err[NB_ERRLEN] = "";
    uint32_t round = 0;
    int rc = -1;

    memset(&src, 0, sizeof(src));
    src.m = m;
    pthread_mutex_init(&src.lock, NULL);
    pthread_cond_init(&src.cond, NULL);
    src.nsnd = m->p.channels;
    pthread_mutex_lock(&m->lock);
    m->st.guest_runs_here = 1;
    pthread_mutex_unlock(&m->lock);

    if (nb_setup_memory(m, err) < 0)
        goto out;
    src.words = (m->npages + 63) / 64;
    src.bitmap = calloc(src.words, 8);
    src.lazy = m->vmm.ops->dirty_log_range && m->vmm.ops->dirty_peek;
    /* 16 chunks, none under 64 MiB: fine enough to keep re-sends down,
     * coarse enough that the extra dirty-log calls cost little */
    src.chunk = (src.words + 15) / 16 < LAZY_MIN_WORDS ? LAZY_MIN_WORDS
                                                       : (src.words + 15) / 16;
    src.scratch = src.lazy ? calloc(src.words, 8) : NULL;
    if (!src.bitmap || (src.lazy && !src.scratch)) {
        snprintf(err, NB_ERRLEN, "out of memory");
        goto out;
    }
    if (m->p.mode == NB_MODE_LIVE && !m->vmm.ops->has_dirty_log(&m->vmm)) {
        snprintf(err, NB_ERRLEN, "live migration needs a dirty-page log, which "
                 "this VM's host does not provide; use warm mode");
        goto out;
    }
    if (source_connect(&src, err) < 0)
        goto out;
    nb_init_page_hashes(m);
    {
        static const uint8_t zero[NB_PAGE];
        src.hz = nb_page_hash(zero, &m->keys.hash);
    }
    if (start_senders(&src, err) < 0)
        goto out;

    if (m->p.mode != NB_MODE_LIVE) {
        /* warm and cold: stop first, then one full copy */
        if (m->vmm.ops->pause(&m->vmm, err) < 0)
            goto out;
        src.paused = 1;
        src.t_pause = nb_now_ms();
        pthread_mutex_lock(&m->lock);
        m->st.guest_runs_here = 0;
        pthread_mutex_unlock(&m->lock);
    } else if (sync_dirty(&src, err) < 0) {
        /* track from here: every bit set later is a page written since,
         * so round 0 may add what its lazy clears report (and no more:
         * a VM's log starts with every page set, holes included) */
        goto out;
    }
    nb_set_phase(m, NB_PHASE_PRECOPY);
    mark_data_pages(&src);
    if (do_round(&src, 0, 0, src.lazy && m->p.mode == NB_MODE_LIVE) < 0) {
        snprintf(err, NB_ERRLEN, "%s", m->st.error);
        goto out;
    }
    if (m->p.mode == NB_MODE_LIVE) {
        double last_sync = nb_now_ms();
        nb_set_phase(m, NB_PHASE_ITERATE);
        for (;;) {
            uint64_t dirty;
            double now;
            if (atomic_load(&m->cancel_req)) {
                snprintf(err, NB_ERRLEN, "cancelled");
                goto out;
            }
            if (src.lazy) {
                /* count without clearing: each chunk clears as it goes */
                if (m->vmm.ops->dirty_peek(&m->vmm, src.scratch, src.words, err) < 0)
                    goto out;
                dirty = popcount_bitmap(src.scratch, src.words);
            } else {
                if (sync_dirty(&src, err) < 0)
                    goto out;
                dirty = popcount_bitmap(src.bitmap, src.words);
            }
            now = nb_now_ms();
            if (should_switch(&src, dirty, now - last_sync))
                break;
            last_sync = now;
            if (do_round(&src, ++round, dirty, src.lazy) < 0) {
                snprintf(err, NB_ERRLEN, "%s", m->st.error);
                goto out;
            }
        }
        /* the pages found dirty by that last sync go in the final round */
        round++;
        {
            /* keep them: the final sync after pausing adds to this set */
            uint64_t *keep = malloc(src.words * 8);
            if (!keep) {
                snprintf(err, NB_ERRLEN, "out of memory");
                goto out;
            }
            if (src.lazy)   /* nothing was cleared since the peek */
                memset(keep, 0, src.words * 8);
            else
                memcpy(keep, src.bitmap, src.words * 8);
            nb_set_phase(m, NB_PHASE_SWITCHOVER);
            if (m->vmm.ops->pause(&m->vmm, err) < 0) {
                free(keep);
                goto out;
            }
            src.paused = 1;
            src.t_pause = nb_now_ms();
            if (sync_dirty(&src, err) < 0) {
                free(keep);
                goto out;
            }
            for (size_t w = 0; w < src.words; w++)
                src.bitmap[w] |= keep[w];
            free(keep);
        }
        pthread_mutex_lock(&m->lock);
        m->st.guest_runs_here = 0;
        pthread_mutex_unlock(&m->lock);
    }
    rc = switch_over(&src, round, err);
out:
    if (rc == 0) {
        pthread_mutex_lock(&m->lock);
        m->st.result = NB_RESULT_COMPLETED;
        m->st.phase = NB_PHASE_DONE;
        m->st.total_ms = nb_now_ms() - m->t0;
        m->st.guest_runs_here = 0;
        pthread_mutex_unlock(&m->lock);
    } else {
        int cancelled = atomic_load(&m->cancel_req);
        if (rc != -2)
            source_recover(&src);
        nb_fail(m, cancelled && rc != -2 ? NB_RESULT_CANCELLED : NB_RESULT_FAILED,
                "%s", err[0] ? err : m->st.error);
        pthread_mutex_lock(&m->lock);
        m->st.total_ms = nb_now_ms() - m->t0;
        pthread_mutex_unlock(&m->lock);
    }
    if (rc != 0)
        nb_shutdown_data(m);
    stop_senders(&src);
    free(src.bitmap);
    free(src.scratch);
    pthread_mutex_lock(&m->lock);
    m->done = 1;
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
    return NULL;
}
