/* Auto-converge's decisions: see converge.h. */
#include "core/converge.h"

int nb_round_stalled(double expected_ms, double limit_ms, uint64_t dirty,
                     uint64_t prev)
{
    double pace, left = expected_ms;

    if (limit_ms <= 0 || expected_ms <= limit_ms)
        return 0;       /* nothing to shorten, or nothing would make it fit */
    if (!prev || dirty * 10 >= prev * 9)
        return 1;
    pace = (double)dirty / (double)prev;
    for (int i = 0; i < NB_CONVERGE_ROUNDS && left > limit_ms; i++)
        left *= pace;
    return left > limit_ms;
}

/*
 * A guest that rewrote its whole working set within the interval dirtied
 * faster than its count says: the next stall raises the throttle again,
 * each time at least halving the guest's share.
 */
uint32_t nb_converge_target(uint32_t cur, double page_ms, double dirty_per_ms)
{
    double out = page_ms > 0 ? 1.0 / page_ms : 0;
    double run;

    if (out <= 0 || dirty_per_ms <= 0)
        return 0;
    run = (100.0 - cur) / 100.0 * out / (2 * dirty_per_ms);
    return run >= 1 ? 0 : (uint32_t)(100.0 - 100.0 * run + 0.999);
}

double nb_dest_excess_ms(double lag_ms, double rtt_ms, uint64_t backlog)
{
    double beyond = lag_ms - rtt_ms;

    return backlog && beyond > 0 ? beyond / (double)backlog : 0;
}

/* Pages and blocks sent in the rounds before `round` (its ring slot
 * before it must still be kept). */
static uint64_t sent_before(const struct nb_dest_pace *p, uint32_t round)
{
    return round ? p->sent[(round - 1) % NB_PACE_ROUNDS] : 0;
}

/* Round `round` (+1) was timed at `ms` a page beyond the source's. */
static void pace_timed(struct nb_dest_pace *p, uint32_t round, double ms)
{
    p->steady_ms = ms < p->excess_ms ? ms : p->excess_ms;
    p->excess_ms = ms;
    p->excess_round = round;
}

double nb_pace_throttle_ms(const struct nb_dest_pace *p)
{
    return p->drained_round - p->excess_round < NB_PACE_LONE_ROUNDS ? p->steady_ms
                                                                     : p->excess_ms;
}

void nb_pace_sent(struct nb_dest_pace *p, uint32_t round, uint64_t units)
{
    p->sent[round % NB_PACE_ROUNDS] = sent_before(p, round) + units;
    if (round == 0)
        return;
    if (p->excess_round == 1) {     /* round 0 corroborates nothing */
        p->excess_ms = p->steady_ms = 0;
        p->excess_round = 0;
    }
    if (p->pending_round == 1)
        p->pending_round = 0;   /* round 0's APPLIED, come later, times nothing */
}

void nb_pace_drained(struct nb_dest_pace *p, uint32_t round, uint32_t applied,
                     double t_crossed)
{
    uint64_t units = p->sent[round % NB_PACE_ROUNDS] - sent_before(p, round);

    p->pending_round = 0;
    p->drained_round = round + 1;
    if (applied > round) {          /* applied before its drain ended */
        if (units >= NB_PACE_MIN_UNITS)
            pace_timed(p, round + 1, 0);
        return;
    }
    /* sent[applied - 1] must still be in the ring (sent[round] is) */
    if (applied && round - applied + 1 >= NB_PACE_ROUNDS)
        return;
    p->backlog = p->sent[round % NB_PACE_ROUNDS] - sent_before(p, applied);
    if (p->backlog < NB_PACE_MIN_UNITS)
        return;
    p->pending_round = round + 1;
    p->t_crossed = t_crossed;
}

int nb_pace_applied(struct nb_dest_pace *p, uint32_t applied, int waited,
                    double now, double rtt_ms)
{
    double came = waited ? now : p->t_quiet;
    uint32_t round = p->pending_round;

    if (waited)
        p->t_quiet = now;       /* frames come in order: what it reads
                                 * next came no earlier */
    if (!round || applied < round)
        return 0;
    p->pending_round = 0;
    if (!waited && came - p->t_crossed <= rtt_ms)
        return 0;               /* no telling whether it lagged */
    pace_timed(p, round, nb_dest_excess_ms(came - p->t_crossed, rtt_ms, p->backlog));
    return 1;
}

void nb_fit_caught_up(struct nb_fit *f)
{
    f->waited = 1;
}

void nb_fit_counted(struct nb_fit *f, uint64_t dirty, uint64_t before)
{
    int waited = f->waited;

    f->waited = 0;
    if (!waited || !f->rounds || f->restarts >= NB_CATCHUP_RESTARTS ||
        dirty <= 2 * before)
        return;
    f->restarts++;
    f->rounds = 0;
}

int nb_fit_round_left(struct nb_fit *f)
{
    return ++f->rounds <= NB_EXTRA_ROUNDS;
}

uint64_t nb_drain_threshold(double bandwidth, int channels)
{
    double below = bandwidth * NB_DRAIN_POLL_MS / 1e3;
    double least = (double)NB_DRAIN_FLOOR_PER_CHANNEL * (channels > 1 ? channels : 1);

    if (least < (double)NB_DRAIN_FLOOR)
        least = (double)NB_DRAIN_FLOOR;
    if (!(bandwidth > 0) || below > (double)NB_DRAIN_CEILING ||
        least > (double)NB_DRAIN_CEILING)
        return NB_DRAIN_CEILING;
    return below < least ? (uint64_t)least : (uint64_t)below;
}
