/*
 * Source side, as a state machine (PROTOCOL.md, "Phases"): SETUP connects,
 * HANDSHAKE authenticates and agrees on compatibility, PRECOPY sends
 * round 0, ITERATE (live only) sends what the guest dirtied since, until
 * the rest fits the downtime; SWITCHOVER stops the guest and sends the
 * last pages and the device state, VERIFY proves the copy with the
 * memory digest, COMMIT hands the guest over.  One function per phase,
 * run in that order by nb_source_main(); source_finish() alone decides
 * the result and who runs the guest.
 *
 * Ownership rule: the source resumes its guest only if it never entered
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
#include <sys/socket.h>
#include <unistd.h>
#if defined(__FreeBSD__)
#include <sys/param.h>
#include <sys/cpuset.h>
#elif defined(__linux__)
#include <sched.h>
#endif

#include "core/converge.h"
#include "core/source.h"

/* How long a failing source listens for the destination's reason. */
#define PEER_REASON_MS 500
/* Most page channels `channels` 0 (auto) chooses. */
#define AUTO_CHANNELS_MAX 2
/* While the limit is out of reach, the longest wait between two rounds. */
#define HOLD_MS 100

/* Note why the current phase failed; returns -1. */
static int fail(struct source *src, int kind)
{
    src->kind = kind;
    return -1;
}

/* A connection to the destination, or -1 with `err` and `*kind` set. */
static int connect_to(struct nb_mig *m, int *kind, char *err)
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
        *kind = NB_ERR_INVALID;
        return -1;
    }
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        nb_set_timeouts(fd, m->p.timeout_ms);
        if (connect(fd, a->ai_addr, a->ai_addrlen) < 0) {
            snprintf(err, NB_ERRLEN, "cannot connect to %s port %d: %s", m->p.host,
                     m->p.port, strerror(errno));
            *kind = errno == ETIMEDOUT || errno == EINPROGRESS || errno == EAGAIN
                        ? NB_ERR_TIMEOUT : NB_ERR_PEER_GONE;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd >= 0)
        nb_set_nodelay(fd);
    return fd;
}

/* CPUs this process may run on. */
static int host_cpus(void)
{
#if defined(__FreeBSD__)
    cpuset_t set;

    if (cpuset_getaffinity(CPU_LEVEL_WHICH, CPU_WHICH_PID, -1, sizeof(set),
                           &set) == 0)
        return CPU_COUNT(&set);
#elif defined(__linux__)
    cpu_set_t set;

    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        return CPU_COUNT(&set);
#endif
    return (int)sysconf(_SC_NPROCESSORS_ONLN);
}

/*
 * The page channels: as asked, or (0, auto) one per CPU of this host that
 * the guest's vCPUs leave free while they run (live mode; warm and cold
 * pause them first), 1 to AUTO_CHANNELS_MAX.  Each channel is a thread
 * here and one on the destination: where CPUs are scarce, a second one
 * takes the guest's time and not the link's.
 */
static int choose_channels(struct nb_mig *m)
{
    int spare = host_cpus();

    if (m->p.channels > 0)
        return m->p.channels;
    if (m->p.mode == NB_MODE_LIVE)
        spare -= (int)m->vmm.spec.ncpus;
    return spare < 1 ? 1 : spare > AUTO_CHANNELS_MAX ? AUTO_CHANNELS_MAX : spare;
}

/* SETUP: map guest memory, choose the page channels, size the dirty
 * bitmaps, connect the control channel. */
static int phase_setup(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    int rc = nb_setup_memory(m, err);

    if (rc < 0 || (rc = nb_disk_open_source(m, &src->disks, err)) < 0)
        return fail(src, -rc);
    src->nsnd = m->p.channels = choose_channels(m);
    pthread_mutex_lock(&m->lock);
    m->st.channels = (uint32_t)m->p.channels;
    pthread_mutex_unlock(&m->lock);
    src->disks.nstreams = (uint32_t)m->nstreams;
    src->words = (m->npages + 63) / 64;
    src->bitmap = calloc(src->words ? src->words : 1, 8);   /* none: 0 pages */
    src->lazy = m->vmm.ops->dirty_log_range && m->vmm.ops->dirty_peek;
    /* at most 16 chunks, none under 64 MiB: fine enough to keep re-sends
     * down, coarse enough that the extra dirty-log calls cost little */
    src->chunk = (src->words + 15) / 16 < LAZY_MIN_WORDS ? LAZY_MIN_WORDS
                                                         : (src->words + 15) / 16;
    src->scratch = src->lazy ? calloc(src->words, 8) : NULL;
    if (!src->bitmap || (src->lazy && !src->scratch)) {
        snprintf(err, NB_ERRLEN, "out of memory");
        return fail(src, NB_ERR_RESOURCE);
    }
    if (m->p.mode == NB_MODE_LIVE && !m->vmm.ops->has_dirty_log(&m->vmm)) {
        snprintf(err, NB_ERRLEN, "live migration needs a dirty-page log, which "
                 "this VM's host does not provide; use warm mode");
        return fail(src, NB_ERR_INVALID);
    }
    m->ctl.fd = connect_to(m, &src->kind, err);
    if (m->ctl.fd < 0)
        return -1;
    m->ctl.index = 0;
    m->ctl.wire = &m->wire_bytes;
    return 0;
}

/*
 * The control channel's round trip: the least time one of its exchanges
 * took from our frame out to the answer in, `t0` its start.  The first
 * exchange also pays for the destination's first cryptography; the least
 * is what the pause's two exchanges (VERIFY, COMMIT) will cost.
 */
static void note_rtt(struct nb_mig *m, double t0)
{
    double rtt = nb_now_ms() - t0;

    pthread_mutex_lock(&m->lock);
    if (m->st.rtt_ms <= 0 || rtt < m->st.rtt_ms)
        m->st.rtt_ms = rtt;
    pthread_mutex_unlock(&m->lock);
}

/* Send our preamble; check the destination's answer too (defence in depth). */
static int exchange_preambles(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    char pre[NB_PREAMBLE_CAP], dst[NB_MAX_PREAMBLE], peer_err[NB_ERRLEN];
    struct nb_frame f;
    double t0;
    int n;

    n = nb_preamble_write(&m->vmm.spec, &m->p, &src->disks, pre, sizeof(pre));
    if (n < 0) {
        snprintf(err, NB_ERRLEN, "preamble too long");
        return fail(src, NB_ERR_INTERNAL);
    }
    t0 = nb_now_ms();
    if (nb_send_frame(&m->ctl, NB_MSG_PREAMBLE, pre, (uint32_t)n, err) < 0 ||
        nb_expect(&m->ctl, &f, NB_MSG_ACCEPT, NB_MAX_PREAMBLE, err) < 0)
        return fail(src, m->ctl.err_kind);
    note_rtt(m, t0);
    if ((size_t)f.len >= sizeof(pre)) {
        snprintf(err, NB_ERRLEN, "destination preamble too long");
        return fail(src, NB_ERR_CORRUPT);
    }
    memcpy(dst, f.payload, f.len);
    dst[f.len] = 0;
    if (nb_preamble_check(pre, dst, peer_err, sizeof(peer_err)) < 0) {
        snprintf(err, NB_ERRLEN, "%s", peer_err);
        return fail(src, NB_ERR_INCOMPATIBLE);
    }
    return 0;
}

/* HANDSHAKE: authenticate, agree on compatibility, join the page channels. */
static int phase_handshake(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    double t = nb_now_ms();

    if (nb_handshake_source(&m->ctl, m->p.secret, m->p.secret_len, &m->keys, err) < 0)
        return fail(src, m->ctl.err_kind);
    note_rtt(m, t);     /* one round trip (HELLO, CHALLENGE) and the proofs */
    if (exchange_preambles(src, err) < 0)
        return -1;
    for (int i = 0; i < src->nsnd; i++) {
        struct nb_chan *c = &m->data[i];
        c->fd = connect_to(m, &src->kind, err);
        if (c->fd < 0)
            return -1;
        c->index = (uint16_t)(i + 1);
        c->wire = &m->wire_bytes;
        if (nb_join_send(c, &m->keys, err) < 0 ||
            (!m->p.plaintext_pages && nb_seal_start(c, m->keys.key, 1, err) < 0))
            return fail(src, c->err_kind);
    }
    src->hz = m->disk_hz = nb_zero_page_hash(&m->keys.hash);
    if (nb_src_start_senders(src, err) < 0)
        return fail(src, NB_ERR_RESOURCE);
    return 0;
}

static int pause_guest(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    if (m->vmm.ops->pause(&m->vmm, err) < 0)
        return fail(src, NB_ERR_VMM);
    atomic_store(&m->guest_paused, 1);
    src->t_pause = src->t_collected = nb_now_ms();
    nb_stream_paused(m);        /* the stream disks' last parts may start */
    return 0;
}

static int drain_round(struct source *src, char *err);

/* PRECOPY: round 0, every page and disk block that holds data (warm and
 * cold stop the guest first). */
static int phase_precopy(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    int live = m->p.mode == NB_MODE_LIVE;

    /* warm and cold: stream disks' first parts flow while the guest still
     * runs, in rounds without pages; the pause carries the rest */
    while (!live && !nb_stream_precopied(m) && !atomic_load(&m->force_req))
        if (nb_src_round(src, src->cur_round++, 0, 0) < 0) {
            snprintf(err, NB_ERRLEN, "%s", m->st.error);
            return fail(src, nb_fail_kind(m));
        }
    if (!live && pause_guest(src, err) < 0)
        return -1;
    /* live: track from here: every bit set later is a page (a block)
     * written since, so round 0 may add what its lazy clears report (and
     * no more: a VM's log may start with every page set, holes included) */
    if (live && (nb_src_sync_dirty(src, err) < 0 || nb_disk_sync(m, NULL, err) < 0))
        return fail(src, NB_ERR_VMM);
    nb_src_mark_data_pages(src);
    nb_disk_mark_data(m);
    if (nb_src_round(src, src->cur_round, 0, src->lazy && live) < 0) {
        snprintf(err, NB_ERRLEN, "%s", m->st.error);
        return fail(src, nb_fail_kind(m));
    }
    if (!live)
        return 0;
    if (drain_round(src, err) < 0)
        return -1;
    nb_src_pace_drained(src);
    return 0;
}

/*
 * Get-and-clear the dirty log into the bitmap.  Where the bitmap holds
 * pages an earlier count cleared from the log and no round has sent
 * (`unsent`: a count followed by a wait, or the last count before the
 * pause), the log's pages are added to them, not put in their place.
 */
static int take_dirty_log(struct source *src, char *err)
{
    uint64_t *keep = NULL;

    if (src->unsent && !(keep = malloc(src->words * 8))) {
        snprintf(err, NB_ERRLEN, "out of memory");
        return fail(src, NB_ERR_RESOURCE);
    }
    if (keep)
        memcpy(keep, src->bitmap, src->words * 8);
    if (!src->unsent)
        src->t_pile = src->t_sync;      /* the log's pages, since then */
    if (nb_src_sync_dirty(src, err) < 0) {
        free(keep);
        return fail(src, NB_ERR_VMM);
    }
    for (size_t w = 0; keep && w < src->words; w++)
        src->bitmap[w] |= keep[w];
    free(keep);
    src->unsent = 1;
    return 0;
}

/* Count the dirty pages: a peek (lazy: each chunk clears as it goes) or a
 * get-and-clear into the bitmap (adding to pages an earlier count left
 * unsent); and, at the same moment, take the disks' dirty-block logs into
 * the blocks pending. */
static int count_dirty(struct source *src, uint64_t *dirty, char *err)
{
    struct nb_mig *m = src->m;
    if (nb_disk_sync(m, &src->dirty_blocks, err) < 0)
        return fail(src, NB_ERR_VMM);
    if (src->lazy) {
        if (m->vmm.ops->dirty_peek(&m->vmm, src->scratch, src->words, err) < 0)
            return fail(src, NB_ERR_VMM);
        *dirty = nb_popcount_bitmap(src->scratch, src->words);
        return 0;
    }
    if (take_dirty_log(src, err) < 0)
        return -1;
    *dirty = nb_popcount_bitmap(src->bitmap, src->words);
    return 0;
}

/*
 * Since when the pages the next count finds have been piling up: the last
 * get-and-clear sync, or the one before the count that left pages unsent
 * (they are in this count too); or, clearing lazily (chunk by chunk as
 * the last round sent them), the middle of the last round.  (A chunk
 * that round left alone, clean at the count before it, has piled up
 * since that count, half a round longer: its pages are dated a little
 * late, so the rate comes out a little high, never low.)
 */
static double dirtied_from(struct source *src)
{
    const struct nb_round_stat *last = &src->last_round;

    if (!src->lazy)
        return src->unsent ? src->t_pile : src->t_sync;
    if (last->duration_ms <= 0)
        return src->t_sync;         /* no round yet */
    return src->m->t0 + last->start_ms + last->duration_ms / 2;
}

/* Fail on a cancel or a destination that gave up; take its APPLIED
 * frames, waiting up to `wait_ms` for one. */
static int read_control(struct source *src, int wait_ms, char *err)
{
    struct nb_mig *m = src->m;

    if (atomic_load(&m->cancel_req)) {
        snprintf(err, NB_ERRLEN, "cancelled");
        return fail(src, NB_ERR_CANCELLED);
    }
    if (nb_src_read_control(src, wait_ms) < 0) {
        snprintf(err, NB_ERRLEN, "%s", m->st.error);
        return fail(src, nb_fail_kind(m));
    }
    return 0;
}

/* Read the control channel for up to 50 ms, for APPLIED; fail as
 * read_control() does, or on silence past `until`. */
static int await_applied(struct source *src, double until, char *err)
{
    struct nb_mig *m = src->m;

    if (read_control(src, 50, err) < 0)
        return -1;
    if (src->applied <= src->cur_round && nb_now_ms() > until) {
        snprintf(err, NB_ERRLEN, "the destination reported no round applied "
                 "for %u ms", m->p.timeout_ms);
        return fail(src, NB_ERR_TIMEOUT);
    }
    return 0;
}

/* Count `ms` the source waited, the guest running, for the link to carry
 * its rounds or the destination to apply them, and publish the link's
 * bandwidth, which a drain may have timed. */
static void count_catchup(struct source *src, double ms)
{
    struct nb_mig *m = src->m;

    pthread_mutex_lock(&m->lock);
    m->st.catchup_ms += ms;
    m->st.bandwidth = nb_src_link_bandwidth(src);
    pthread_mutex_unlock(&m->lock);
}

/*
 * Wait until the destination holds every round sent so far (APPLIED):
 * rounds being decoded there would otherwise land in the pause.  (The
 * link has carried them but for the drain's threshold, nb_src_drained,
 * which crosses it during this wait.)  A destination that stays silent
 * for timeout_ms fails it.
 */
static int wait_applied(struct source *src, char *err)
{
    double t0 = nb_now_ms(), until = t0 + src->m->p.timeout_ms;
    int rc = 0;

    while (src->applied <= src->cur_round && rc == 0)
        rc = await_applied(src, until, err);
    count_catchup(src, nb_now_ms() - t0);
    return rc;
}

/*
 * Pace the rounds by the link: while the page connections hold what the
 * link has not carried (nb_src_drained), wait, the guest running.  On a
 * link slower than the source the socket buffers take a round at once:
 * counted at once, the next round would find only what the guest dirtied
 * in the moments the buffers took, rounds would seem to shrink while the
 * guest dirties as fast as the link carries (no auto-converge), and the
 * wait before the pause would let it dirty a whole round.  The part of
 * the wait down to nb_src_time_drain's threshold times the link; below
 * it, what the connections hold moves with acknowledgements and, on a
 * busy host, with the scheduler.  A link that delivers nothing for
 * timeout_ms fails it.
 */
static int drain_round(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    double t0 = nb_now_ms(), until = t0 + m->p.timeout_ms;
    uint64_t queued0 = nb_src_queued(src), queued = queued0, least = queued0;
    int timed = nb_src_time_drain(src, queued0, queued0, 0);

    while (!nb_src_drained(src, queued)) {
        if (read_control(src, NB_DRAIN_POLL_MS, err) < 0)
            return -1;
        queued = nb_src_queued(src);
        if (!timed)
            timed = nb_src_time_drain(src, queued0, queued, nb_now_ms() - t0);
        if (queued < least) {
            least = queued;
            until = nb_now_ms() + m->p.timeout_ms;
        } else if (nb_now_ms() > until) {
            snprintf(err, NB_ERRLEN, "the page connections delivered nothing "
                     "for %u ms", m->p.timeout_ms);
            return fail(src, NB_ERR_TIMEOUT);
        }
    }
    count_catchup(src, nb_now_ms() - t0);
    return 0;
}

/*
 * While the round trips alone leave nothing of the downtime limit
 * (nb_src_limit_out_of_reach), rounds cannot make the rest fit: rather
 * than resend at full speed, wait for the destination to apply the round
 * just sent, at most HOLD_MS, before the next count.
 */
static int hold_round(struct source *src, char *err)
{
    double until = nb_now_ms() + HOLD_MS;

    while (src->applied <= src->cur_round && nb_now_ms() < until)
        if (read_control(src, (int)(until - nb_now_ms()) + 1, err) < 0)
            return -1;
    return 0;
}

/*
 * ITERATE: send what the guest dirtied since the last round until the rest
 * fits, and pause only once the destination holds everything sent.  The
 * count after waiting for round 0 to be applied (the destination's first
 * writes, its slowest) holds what the guest dirtied for as long as that
 * took: auto-converge takes it as a new start, not as a round that failed
 * to shrink the one before.  Once only: for auto-converge, a destination
 * that falls behind again is counted against the rounds, and may get the
 * guest slowed.  What the guest dirtied during a later wait may get more
 * rounds (nb_fit_counted).
 */
static int phase_iterate(struct source *src, char *err)
{
    struct nb_mig *m = src->m;

    for (;;) {
        uint64_t dirty;
        double from = dirtied_from(src);
        if (read_control(src, 0, err) < 0)
            return -1;
        double t0 = nb_now_ms();
        if (count_dirty(src, &dirty, err) < 0)
            return -1;
        src->sync_ms = nb_now_ms() - t0;    /* the final sync costs about as much */
        if (read_control(src, 0, err) < 0)  /* an APPLIED the count let pass */
            return -1;
        if (nb_src_should_switch(src, dirty, nb_now_ms() - from)) {
            if (src->applied > src->cur_round)
                return 0;
            if (src->applied == 0)
                src->conv_prev = 0;     /* the next count is no round's */
            if (wait_applied(src, err) < 0)
                return -1;
            nb_fit_caught_up(&src->fit);
            continue;       /* the guest ran meanwhile: count again */
        }
        nb_src_converge(src, dirty + src->dirty_blocks);
        if (nb_src_round(src, ++src->cur_round, dirty, src->lazy) < 0) {
            snprintf(err, NB_ERRLEN, "%s", m->st.error);
            return fail(src, nb_fail_kind(m));
        }
        src->unsent = 0;
        if (drain_round(src, err) < 0)
            return -1;
        nb_src_pace_drained(src);
        if (nb_src_limit_out_of_reach(src) && hold_round(src, err) < 0)
            return -1;
    }
}

/* Stop the guest; the final round sends what the sync after the pause
 * reports, plus (not lazy) what the last count found dirty and cleared.
 * A lazy count only peeked: its pages are still in the log. */
static int stop_and_collect(struct source *src, char *err)
{
    if (pause_guest(src, err) < 0)
        return fail(src, NB_ERR_VMM);
    if (take_dirty_log(src, err) < 0)
        return -1;
    if (nb_disk_sync(src->m, &src->dirty_blocks, err) < 0)
        return fail(src, NB_ERR_VMM);
    return 0;
}

/* SWITCHOVER: the guest stopped, send the final round and the device state. */
static int phase_switchover(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    uint8_t *blob = NULL;
    size_t blen = 0;
    int rc;

    if (m->p.mode == NB_MODE_LIVE) {
        src->cur_round++;
        if (stop_and_collect(src, err) < 0)
            return -1;
        src->t_collected = nb_now_ms();
        if (nb_src_round(src, src->cur_round,
                         nb_popcount_bitmap(src->bitmap, src->words), 0) < 0) {
            snprintf(err, NB_ERRLEN, "%s", m->st.error);
            return fail(src, nb_fail_kind(m));
        }
    }
    if (m->vmm.ops->save_state(&m->vmm, &blob, &blen, err) < 0)
        return fail(src, NB_ERR_VMM);
    rc = nb_send_frame(&m->ctl, NB_MSG_STATE, blob, (uint32_t)blen, err);
    free(blob);
    src->t_state = nb_now_ms();
    return rc < 0 ? fail(src, m->ctl.err_kind) : 0;
}

/* Receive the next control frame that is not a late APPLIED (one for a
 * round already sent, which the destination may still be reporting). */
static int recv_past_applied(struct source *src, struct nb_frame *f, char *err)
{
    uint32_t round;

    do {
        if (nb_recv_frame(&src->m->ctl, f, NB_MAX_REASON, err) < 0)
            return -1;
    } while (nb_applied_parse(f, &round) == 0 && round <= src->cur_round);
    return 0;
}

/* Receive the control frame `type`, passing over late APPLIED frames. */
static int expect_control(struct source *src, struct nb_frame *f, uint8_t type,
                          char *err)
{
    if (recv_past_applied(src, f, err) < 0)
        return -1;
    return nb_frame_expect(&src->m->ctl, f, type, NB_MAX_ACK, err);
}

/* VERIFY: send the memory digest; the destination answers READY if its own matches. */
static int phase_verify(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    struct nb_digest_msg dm = { src->cur_round, 0, m->npages, 0,
                                nb_disk_total_blocks(m) };
    struct nb_frame f;
    double t0;

    dm.digest = nb_memory_digest(m, m->p.verify == NB_VERIFY_FULL);
    dm.disk_digest = nb_disk_digest(m, m->p.verify == NB_VERIFY_FULL);
    t0 = nb_now_ms();
    if (nb_digest_send(&m->ctl, &dm, err) < 0 ||
        expect_control(src, &f, NB_MSG_READY, err) < 0)
        return fail(src, m->ctl.err_kind);
    src->t_ready = nb_now_ms();
    note_rtt(m, t0);
    pthread_mutex_lock(&m->lock);
    m->st.digest = dm.digest;
    m->st.disk_digest = dm.disk_digest;
    pthread_mutex_unlock(&m->lock);
    return 0;
}

/*
 * The destination answered COMMIT with REFUSE or ABORT: it sends those only
 * from its failure epilogue, never once its guest runs, and only it can seal
 * them, so the guest is provably not running there and comes back here.
 */
static int declined(struct source *src, char *err)
{
    struct nb_mig *m = src->m;

    pthread_mutex_lock(&m->lock);
    m->st.committed = 0;
    pthread_mutex_unlock(&m->lock);
    snprintf(err + strlen(err), NB_ERRLEN - strlen(err),
             " (after COMMIT: the destination does not run the guest; it "
             "resumes here)");
    return fail(src, m->ctl.err_kind);
}

/* The pause, from the guest's stop until the destination said RUNNING at
 * `now`, and its parts (engine.h). */
static void note_pause(struct source *src, double now)
{
    struct nb_mig *m = src->m;

    pthread_mutex_lock(&m->lock);
    /* an upper bound (by one network latency) on what the guest sees */
    m->st.downtime_ms = now - src->t_pause;
    m->st.pause_stop_ms = src->t_collected - src->t_pause;
    m->st.pause_final_ms = src->t_state - src->t_collected;
    m->st.pause_verify_ms = src->t_ready - src->t_state;
    m->st.pause_commit_ms = now - src->t_ready;
    pthread_mutex_unlock(&m->lock);
}

/* COMMIT: the guest is the destination's from here; its RUNNING ends the downtime. */
static int phase_commit(struct source *src, char *err)
{
    struct nb_mig *m = src->m;
    struct nb_frame f = { 0 };
    double t0 = nb_now_ms();

    if (nb_send_empty(&m->ctl, NB_MSG_COMMIT, err) < 0 ||
        expect_control(src, &f, NB_MSG_RUNNING, err) < 0) {
        if (f.type == NB_MSG_REFUSE || f.type == NB_MSG_ABORT)
            return declined(src, err);
        snprintf(err + strlen(err), NB_ERRLEN - strlen(err),
                 " (after COMMIT: the source stays stopped; check the destination)");
        return fail(src, m->ctl.err_kind);
    }
    note_pause(src, nb_now_ms());
    note_rtt(m, t0);
    return 0;
}

/*
 * A session that broke on a page channel: the destination has usually said
 * why on the control channel (REFUSE or ABORT) by then.  Read it, briefly,
 * so that its reason and not the broken pipe is the error.
 */
static void take_peer_reason(struct source *src)
{
    struct nb_mig *m = src->m;
    struct pollfd p = { .fd = m->ctl.fd, .events = POLLIN };
    struct nb_frame f;
    char why[NB_ERRLEN], text[NB_PEER_TEXT];
    int kind = nb_fail_kind(m);

    if (m->ctl.fd < 0 || !m->ctl.seal || atomic_load(&m->cancel_req) ||
        kind == NB_ERR_REFUSED || poll(&p, 1, PEER_REASON_MS) <= 0)
        return;
    nb_set_timeouts(m->ctl.fd, PEER_REASON_MS);
    if (recv_past_applied(src, &f, why) < 0)
        return;
    if (f.type != NB_MSG_REFUSE && f.type != NB_MSG_ABORT)
        return;
    snprintf(why, sizeof(why), "destination %s: %s",
             f.type == NB_MSG_REFUSE ? "refused" : "aborted", nb_peer_text(&f, text));
    nb_fail_because(m, f.type == NB_MSG_REFUSE ? NB_ERR_REFUSED : NB_ERR_PEER_GONE, why);
}

/* Undo what we did to the guest; returns 1 if it lives here (running, or
 * paused as it came). */
static int source_recover(struct source *src)
{
    struct nb_mig *m = src->m;
    char e[NB_ERRLEN];
    int paused = atomic_load(&m->guest_paused);

    /* the guest runs at full speed again (the stats keep a throttle that
     * could not be lifted) */
    if (nb_src_throttle(m))
        nb_mig_set_param(m, "throttle", 0, e, sizeof(e));
    if (paused && !m->p.keep_paused && m->vmm.ops->resume(&m->vmm, e) == 0)
        atomic_store(&m->guest_paused, paused = 0);
    if (m->ctl.fd >= 0 && m->ctl.seal) {
        const char *why = atomic_load(&m->cancel_req) ? "cancelled by the source"
                                                      : "source failed";
        nb_send_text(&m->ctl, NB_MSG_ABORT, why, e);
    }
    return !paused || m->p.keep_paused;
}

/*
 * The epilogue, the only place that decides the result and who runs the
 * guest: completed, it runs on the destination; failed before COMMIT, it
 * stays here (resumed); failed after COMMIT, it is the destination's.
 */
static void source_finish(struct source *src, int rc, const char *err)
{
    struct nb_mig *m = src->m;
    int here = 0, committed;

    if (rc == 0) {
        nb_end(m, 0, here);
        return;
    }
    pthread_mutex_lock(&m->lock);
    committed = m->st.committed;
    pthread_mutex_unlock(&m->lock);
    if (!committed)
        take_peer_reason(src);
    if (!committed)
        here = source_recover(src);
    /* a cancel before COMMIT is what ended it, whatever broke as it did */
    nb_fail(m, atomic_load(&m->cancel_req) && !committed ? NB_ERR_CANCELLED
                                                         : src->kind,
            "%s", err[0] ? err : m->st.error);
    nb_end(m, nb_fail_kind(m), here);
    if (m->ctl.fd >= 0)
        shutdown(m->ctl.fd, SHUT_RDWR);     /* the destination hears of it now */
    nb_shutdown_data(m);
}

typedef int (*source_phase_fn)(struct source *, char *);

static int run_phase(struct source *src, int phase, source_phase_fn fn, char *err)
{
    int rc = nb_enter_phase(src->m, phase, err);
    return rc < 0 ? fail(src, -rc) : fn(src, err);
}

/* The source's migration thread: its phases in order, then the epilogue. */
void *nb_source_main(void *arg)
{
    struct nb_mig *m = arg;
    struct source src;
    char err[NB_ERRLEN] = "";
    int live = m->p.mode == NB_MODE_LIVE, rc;

    memset(&src, 0, sizeof(src));
    src.m = m;
    pthread_mutex_init(&src.lock, NULL);
    pthread_cond_init(&src.cond, NULL);

    rc = phase_setup(&src, err);
    if (rc == 0)
        rc = run_phase(&src, NB_PHASE_HANDSHAKE, phase_handshake, err);
    if (rc == 0)
        rc = run_phase(&src, NB_PHASE_PRECOPY, phase_precopy, err);
    if (rc == 0 && live)
        rc = run_phase(&src, NB_PHASE_ITERATE, phase_iterate, err);
    if (rc == 0)
        rc = run_phase(&src, NB_PHASE_SWITCHOVER, phase_switchover, err);
    if (rc == 0)
        rc = run_phase(&src, NB_PHASE_VERIFY, phase_verify, err);
    if (rc == 0)
        rc = run_phase(&src, NB_PHASE_COMMIT, phase_commit, err);
    source_finish(&src, rc, err);

    nb_src_stop_senders(&src);
    nb_stream_close(m);
    free(src.bitmap);
    free(src.scratch);
    pthread_mutex_lock(&m->lock);
    m->done = 1;
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
    return NULL;
}
