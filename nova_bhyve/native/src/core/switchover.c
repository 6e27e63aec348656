/*
 * Source side, the switch-over policy (source.c's ITERATE phase asks it
 * after each count of the dirty pages): the pause the rest would cause,
 * whether to switch over now or run another round, and slowing the guest
 * through the vmm port where rounds alone do not converge (auto-converge)
 * or leave a long pause.  PROTOCOL.md, "Rounds and switch-over",
 * describes the policy.
 */
#include "core/converge.h"
#include "core/source.h"

/* Below this expected downtime, stop iterating even if rounds still shrink. */
#define SMALL_DOWNTIME_MS 5.0
/* Rounds of at least this many pages time the pause estimate's per-page cost. */
#define MIN_TIMED_PAGES 1024
/* A round times the link's bandwidth with what the link delivered during
 * it (the bytes written, less what the page connections held
 * unacknowledged at its end, plus what they held at its start) if that is
 * at least MIN_TIMED_BYTES.  So does the wait after each round for the
 * link to carry it (source.c's drain_round), if the connections held at
 * least MIN_QUEUED_BYTES at its start, with what drained until they held
 * less (the wait may go on below, nb_src_drained: that part is not timed).
 * A smaller round on a fast link goes through at once, and its wall time
 * is its own (waking the channels, the flush, on a busy host the
 * scheduler's: 46 KB took up to 450 ms under busy loops), not the link's;
 * over a few milliseconds what the connections hold moves with the
 * peer's delayed acknowledgements more than with the link.  On a slow
 * link the socket buffers take a round of several hundred KB in a
 * fraction of the time the link needs: its bytes over its wall time would
 * price the link many times too fast (10 Mbit/s read as 8 to 13 MB/s). */
#define MIN_TIMED_BYTES (256u << 10)
#define MIN_QUEUED_BYTES (64u << 10)
/* The device state the pause carries besides the pages, priced before
 * its size is known (the test host's is 9 KB for one vCPU, 16 KB for two
 * and 29 KB for four): on a slow link it is part of the pause. */
#define STATE_BYTES_BASE (8u << 10)
#define STATE_BYTES_PER_VCPU (8u << 10)
/* Auto-converge: the least time between two throttle steps. */
#define CONVERGE_EVERY_MS 500.0
/* A pause that fits the limit but whose pages and blocks would still take
 * this long is worth slowing the guest for (auto-converge on), a step a
 * round, up to the vmm port's brief_throttle: the guest then sleeps at
 * most about 10 ms at a time, a gap shorter than such a pause.  The final
 * sync, the device state and the round trips count for nothing here: no
 * throttle shortens them. */
#define TRIM_PAUSE_MS 20.0

static void count_link(struct source *src, uint64_t delivered, double ms)
{
    src->link_bytes += delivered;
    src->link_ms += ms;
}

/* Count round `r`, which began with `queued0` bytes unacknowledged in the
 * page connections and left `queued1`, towards the link's bandwidth if it
 * can time it. */
void nb_src_time_round(struct source *src, const struct nb_round_stat *r,
                       uint64_t queued0, uint64_t queued1)
{
    uint64_t delivered = r->bytes + queued0 > queued1 ? r->bytes + queued0 - queued1
                                                      : 0;

    if (delivered >= MIN_TIMED_BYTES)
        count_link(src, delivered, r->duration_ms);
}

/* Count the part of a drain of the page connections that times the link:
 * from `queued0` bytes to `queued1`, reached in `ms`, once `queued1` is
 * below MIN_QUEUED_BYTES (counted if `queued0` was at or above it).
 * Returns whether that part is over: 0 while `queued1` is not below it. */
int nb_src_time_drain(struct source *src, uint64_t queued0, uint64_t queued1,
                      double ms)
{
    if (queued1 >= MIN_QUEUED_BYTES)
        return 0;
    if (queued0 >= MIN_QUEUED_BYTES)
        count_link(src, queued0 - queued1, ms);
    return 1;
}

/* Whether `queued` bytes left in the page connections end a drain
 * (nb_drain_threshold, at the link's bandwidth measured so far). */
int nb_src_drained(struct source *src, uint64_t queued)
{
    return queued < nb_drain_threshold(nb_src_link_bandwidth(src), src->nsnd);
}

/* The link's bandwidth the timed rounds and drains measured, at most the
 * cap, in bytes/s; 0 until they took 0.5 ms.  (Each counts only with
 * bytes delivered: link_bytes is never 0 once link_ms is not.) */
double nb_src_link_bandwidth(struct source *src)
{
    uint64_t cap = atomic_load(&src->m->max_bandwidth);
    double bw;

    if (src->link_ms <= 0.5)
        return 0;
    bw = (double)src->link_bytes * 1e3 / src->link_ms;
    return cap && bw > (double)cap ? (double)cap : bw;
}

/*
 * What a page (or block) cost in the last round: its wire bytes (`*bpp`)
 * at the link's bandwidth (`*bw`: what the link delivered in the rounds
 * and drains that timed it over their time, at most the cap; untimed, the
 * cap or 1 GB/s) or,
 * where that was larger, the round's wall time per page (encoding and
 * sealing included), in ms.
 */
static double round_cost(struct source *src, double *bpp, double *bw)
{
    const struct nb_round_stat *last = &src->last_round;
    uint64_t cap = atomic_load(&src->m->max_bandwidth);
    uint64_t sent = last->pages + last->blocks;
    double per_page;

    *bw = nb_src_link_bandwidth(src);
    if (*bw <= 0)
        *bw = cap ? (double)cap : 1e9;
    *bpp = sent ? (double)last->bytes / (double)sent : NB_PAGE + NB_REC_HDR;
    per_page = *bpp * 1e3 / *bw;
    if (sent >= MIN_TIMED_PAGES && last->duration_ms / (double)sent > per_page)
        per_page = last->duration_ms / (double)sent;
    return per_page;
}

/*
 * The pause `dirty` pages and `blocks` disk blocks would cause, in ms:
 * each costs what the last round's cost (round_cost), or, for pages
 * before any was sent twice, what `rc` sampled resending them costs
 * (round 0 sent them raw or against zeros: its cost says nothing of a
 * delta against the cache); plus the last dirty-log sync (the final one,
 * with the guest paused, costs about as much), the device state on the
 * link and two round trips; plus, for each page and block, the time the
 * destination took beyond the source's (src->pace, converge.h).
 * Publishes the estimate; notes what the throttle's decisions leave out
 * of it (fixed_ms, unsteady_ms).
 */
static double estimate_pause(struct source *src, uint64_t dirty, uint64_t blocks,
                             double since_ms, const struct nb_resend_cost *rc)
{
    struct nb_mig *m = src->m;
    uint64_t units = dirty + blocks;
    double bw, bpp, per_page, page_bpp, page_ms, expected;

    page_ms = per_page = round_cost(src, &bpp, &bw);
    page_bpp = bpp;
    if (rc->pages) {
        page_bpp = rc->wire_bytes;
        page_ms = rc->wire_bytes * 1e3 / bw > rc->encode_ms ? rc->wire_bytes * 1e3 / bw
                                                             : rc->encode_ms;
    }
    pthread_mutex_lock(&m->lock);
    src->fixed_ms = src->sync_ms + 2 * m->st.rtt_ms + 1.0 +
                    (STATE_BYTES_BASE + STATE_BYTES_PER_VCPU * (double)m->vmm.spec.ncpus)
                    * 1e3 / bw;
    src->unsteady_ms = (double)units * (src->pace.excess_ms - nb_pace_throttle_ms(&src->pace));
    expected = (double)dirty * page_ms + (double)blocks * per_page + src->fixed_ms +
               (double)units * src->pace.excess_ms;
    src->page_ms = page_ms;
    src->dirty_per_ms = since_ms > 0 ? (double)units / since_ms : 0;
    m->st.dirty_pages = dirty;
    m->st.dirty_blocks = blocks;
    m->st.dirty_rate = since_ms > 0 ? (double)dirty * 1e3 / since_ms : 0;
    m->st.bytes_remaining = (uint64_t)((double)dirty * page_bpp + (double)blocks * bpp);
    m->st.expected_downtime_ms = expected;
    m->st.dest_excess_us = src->pace.excess_ms * 1e3;
    pthread_mutex_unlock(&m->lock);
    return expected;
}

/* drain_round ended for the current round: note it (nb_pace_drained),
 * the round having crossed the link once what the page connections still
 * hold has, at the link's bandwidth; its APPLIED times the destination's
 * pace (nb_src_read_control). */
void nb_src_pace_drained(struct source *src)
{
    double bw = nb_src_link_bandwidth(src);
    double left_ms = bw > 0 ? (double)nb_src_queued(src) * 1e3 / bw : 0;

    nb_pace_drained(&src->pace, src->cur_round, src->applied, nb_now_ms() + left_ms);
}

/* The throttle the guest runs under now, in percent. */
uint32_t nb_src_throttle(struct nb_mig *m)
{
    uint32_t cur;

    pthread_mutex_lock(&m->lock);
    cur = m->st.throttle;
    pthread_mutex_unlock(&m->lock);
    return cur;
}

/*
 * Raise the guest's throttle one step (20 %, then 10 points more), or to
 * `want` percent where that is higher, up to `cap` percent, and count it
 * in `*steps` (a field of m->st, under its lock); 1 if it was raised.
 */
static int throttle_step(struct source *src, uint32_t want, uint32_t cap,
                         uint32_t *steps)
{
    struct nb_mig *m = src->m;
    uint32_t cur, next;
    char e[NB_ERRLEN];

    if (!m->p.auto_converge || !m->vmm.ops->throttle)
        return 0;
    cur = nb_src_throttle(m);
    next = cur ? cur + 10 : 20;
    if (want > next)
        next = want;
    if (next > cap)
        next = cap;
    if (next <= cur || nb_mig_set_param(m, "throttle", next, e, sizeof(e)) < 0)
        return 0;
    src->t_converge = nb_now_ms();
    pthread_mutex_lock(&m->lock);
    (*steps)++;
    pthread_mutex_unlock(&m->lock);
    return 1;
}

/* Of the last estimate, the part a throttle would shorten: neither what
 * no round or throttle shortens nor what a pace only the last round timed
 * showed (one late APPLIED may be the scheduler's, converge.h). */
static double throttled_part(const struct source *src)
{
    return src->expected - src->fixed_ms - src->unsteady_ms;
}

/*
 * The rest fits the limit, rounds no longer shrink it, yet its pages and
 * blocks would make the pause long (the guest dirties pages as fast as
 * they go out): slow the guest a step and run another round, rather than
 * pause it that long; 1 if so.  Only that part of the pause counts (a
 * long round trip is no reason to slow the guest, nor one late APPLIED:
 * throttled_part), and only while each
 * step pays: once that part after a step is not a tenth shorter than
 * before it, slowing the guest more would not help -- unless that part
 * alone is over half the limit.  Then steps go on up to brief_throttle:
 * a guest that still rewrites its whole set a round may stop keeping up
 * only a step or two later (over 10 Mbit/s a two-vCPU tight loop paused
 * either some 25 ms, slowed to 68 % or more, or 235 to 296 ms, left at
 * 52 to 67 % by this rule alone), and such a pause leaves the estimate
 * too little of the limit (up to 50 ms more than predicted was seen).
 * With bhyve (no brief_throttle) no step is taken either way.
 */
static int trim_pause(struct source *src)
{
    double part = throttled_part(src);
    double limit = (double)atomic_load(&src->m->max_downtime_ms);
    int paid = src->trim_from <= 0 || part * 10 <= src->trim_from * 9;

    if (part <= TRIM_PAUSE_MS || (!paid && part * 2 <= limit))
        return 0;
    if (!throttle_step(src, 0, (uint32_t)src->m->vmm.ops->brief_throttle,
                       &src->m->st.trim_steps))
        return 0;
    src->trim_from = part;
    return 1;
}

/*
 * Whether the part of the pause that no round or throttle shortens (the
 * final sync, the device state and the two round trips) alone leaves
 * nothing of the limit: then the rest fits only once the limit is raised
 * (or a switch-over is forced), and rounds need not follow each other at
 * full speed.
 */
int nb_src_limit_out_of_reach(struct source *src)
{
    return src->fixed_ms >= (double)atomic_load(&src->m->max_downtime_ms);
}

/*
 * Decide: 1 = switch over now.  Not before the rest fits the limit, even
 * with nothing dirty (a long round trip alone may exceed it); then
 * keep iterating while another round pays: after round 0 once unless
 * the pause is already tiny (round 0 timed no resend), then while the
 * pages the guest dirties during a round (at the rate seen since the last
 * sync) or the last round's drop promise a dirty set a quarter smaller,
 * until the pause is already tiny or NB_EXTRA_ROUNDS rounds have run since
 * it first fitted (or since a wait for the destination after which the
 * count more than doubled: nb_fit_counted);
 * and while slowing the guest still shortens a long
 * pause that rounds alone no longer do (trim_pause).
 */
int nb_src_should_switch(struct source *src, uint64_t pages, double since_ms)
{
    struct nb_mig *m = src->m;
    struct nb_resend_cost rc = { 0 };
    if (src->cur_round == 0 && pages)       /* no page sent twice yet */
        nb_src_sample_resend(src, src->lazy ? src->scratch : src->bitmap, &rc);
    double expected = estimate_pause(src, pages, src->dirty_blocks, since_ms, &rc);
    uint64_t dirty = pages + src->dirty_blocks;     /* pages and blocks alike */
    uint64_t prev = src->prev_dirty;
    double during_next = since_ms > 0 ? (double)dirty / since_ms * expected : 0;

    src->prev_dirty = dirty;
    src->expected = expected;
    nb_fit_counted(&src->fit, dirty, prev);
    if (atomic_load(&m->force_req))
        return 1;
    if (!nb_stream_precopied(m))    /* a stream disk's first part still flows */
        return 0;
    if (dirty == 0 && m->p.keep_paused)
        return 1;       /* a paused guest has no downtime to keep short */
    if (expected > (double)atomic_load(&m->max_downtime_ms))
        return 0;       /* even with nothing dirty: the round trips alone */
    if (dirty == 0)
        return 1;
    if (expected <= SMALL_DOWNTIME_MS + 2 * m->st.rtt_ms ||
        !nb_fit_round_left(&src->fit))
        return 1;
    /* the estimate after round 0 is a sample's; one more round times
     * what resending the dirtied pages really costs */
    if (src->cur_round == 0)
        return 0;
    if (during_next * 4 <= (double)dirty * 3 || (prev && dirty * 4 <= prev * 3))
        return 0;
    return !trim_pause(src);
}

/*
 * Auto-converge, the last resort: when a round (after round 0) stalled
 * (converge.h; only the part of the pause that rounds shorten counts,
 * throttled_part, against what the final sync and the round trips leave
 * of the limit),
 * slow the guest's vCPUs down through the vmm port, at most
 * 99 %, at most once per CONVERGE_EVERY_MS: by a step (20 %, then 10
 * points more), or at once to where the guest would dirty half what goes
 * out, where the rates measured say that is higher.  A rest that fits
 * needs no throttle to finish: nb_src_should_switch ends those rounds.
 */
void nb_src_converge(struct source *src, uint64_t dirty)
{
    uint64_t prev = src->conv_prev;
    double limit = (double)atomic_load(&src->m->max_downtime_ms);
    uint32_t want;

    src->conv_prev = dirty;
    if (!prev || !nb_stream_precopied(src->m) ||
        !nb_round_stalled(throttled_part(src), limit - src->fixed_ms,
                          dirty, prev) ||
        nb_now_ms() - src->t_converge < CONVERGE_EVERY_MS)
        return;
    want = nb_converge_target(nb_src_throttle(src->m), src->page_ms, src->dirty_per_ms);
    throttle_step(src, want, 99, &src->m->st.converge_steps);
}
