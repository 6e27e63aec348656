/* Adaptive encoding: see adapt.h. */
#include "core/adapt.h"
#include "engine.h"

#define EWMA 0.25               /* weight of the newest sample */
#define MIN_FRAME (64u << 10)   /* smaller frames say little about the link */
/* The link is sampled over a window of raw frames, not frame by frame:
 * a send that fits in the socket buffer returns at memory speed and the
 * next one waits for the buffer to drain, so single frames swing between
 * GB/s and the link; their bytes over their time is the link. */
#define WINDOW_BYTES (2u << 20)
#define WINDOW_MS 20.0
#define ON_BELOW 0.8            /* hysteresis: turn on below 0.8 x the gain, */
#define OFF_ABOVE 1.0           /* off above 1.0 x */

static double ewma(double old, double sample, int have)
{
    return have ? old + EWMA * (sample - old) : sample;
}

void nb_adapt_init(struct nb_adapt *a, int mode)
{
    *a = (struct nb_adapt){ .mode = mode, .active = mode == NB_COMPRESS_ON };
}

int nb_adapt_try(struct nb_adapt *a)
{
    if (a->mode != NB_COMPRESS_AUTO)
        return a->mode == NB_COMPRESS_ON;
    if (a->active)
        return 1;
    if (++a->since_probe < NB_ADAPT_PROBE)
        return 0;
    a->since_probe = 0;
    return 1;
}

void nb_adapt_compressed(struct nb_adapt *a, size_t in, size_t out, double ns)
{
    double ratio = out >= in ? 1.0 : (double)out / (double)in;
    if (!in || ns <= 0)
        return;
    a->zstd_Bps = ewma(a->zstd_Bps, (double)in * 1e9 / ns, a->have_zstd);
    a->ratio = ewma(a->ratio, ratio, a->have_zstd);
    a->have_zstd = 1;
}

void nb_adapt_sent(struct nb_adapt *a, size_t bytes, double ms)
{
    double gain;
    if (a->mode != NB_COMPRESS_AUTO)
        return;
    /* the link is measured on raw frames only: while compressing, the
     * socket drains during the compression and sends look faster than
     * the link is */
    if (!a->active && bytes >= MIN_FRAME && ms > 0) {
        a->win_bytes += bytes;
        a->win_ms += ms;
    }
    if (a->win_bytes >= WINDOW_BYTES || a->win_ms >= WINDOW_MS) {
        a->link_Bps = ewma(a->link_Bps, a->win_bytes * 1e3 / a->win_ms, a->have_link);
        a->have_link = 1;
        a->win_bytes = 0;
        a->win_ms = 0;
    }
    if (!a->have_zstd || !a->have_link)
        return;
    gain = a->zstd_Bps * (1.0 - a->ratio);     /* bytes/s zstd keeps off the wire */
    if (a->active && a->link_Bps > OFF_ABOVE * gain)
        a->active = 0;
    else if (!a->active && a->link_Bps < ON_BELOW * gain)
        a->active = 1;
}
