/*
 * Adaptive encoding: whether a sender compresses the pages it cannot
 * send as zeros or deltas.  One per sender (page channel), so no locking.
 *
 * compress=auto compresses while this channel's link moves fewer bytes
 * per second than zstd keeps off it: link < zstd_rate * (1 - ratio), the
 * point where compressing a byte costs less time than sending the bytes
 * it saves.  The link rate is measured on the raw frames sent (bandwidth
 * cap and a full socket included; their bytes over their time, in windows
 * of 2 MiB or 20 ms), zstd's rate and ratio on the pages it
 * compressed; while off, one data page in NB_ADAPT_PROBE is compressed
 * anyway (and sent so if it shrinks) to keep those two estimates current.
 */
#ifndef NB_ADAPT_H
#define NB_ADAPT_H

#include <stddef.h>
#include <stdint.h>

#define NB_ADAPT_PROBE 32

struct nb_adapt {
    int mode;                   /* NB_COMPRESS_OFF / _ON / _AUTO */
    int active;                 /* compressing now */
    uint32_t since_probe;       /* data pages since the last trial (auto, off) */
    double link_Bps;            /* wire bytes per second of this channel */
    double win_bytes, win_ms;   /* raw frames sent since the last link sample */
    double zstd_Bps;            /* page bytes per second zstd takes in */
    double ratio;               /* compressed / raw bytes, 0..1 */
    int have_link, have_zstd;
};

void nb_adapt_init(struct nb_adapt *a, int mode);
/* Compress this data page?  (Counts a page toward the next probe.) */
int nb_adapt_try(struct nb_adapt *a);
/* zstd took `ns` nanoseconds to turn `in` bytes into `out` (out >= in: no gain). */
void nb_adapt_compressed(struct nb_adapt *a, size_t in, size_t out, double ns);
/* A frame of `bytes` took `ms` to leave; decides for the next pages. */
void nb_adapt_sent(struct nb_adapt *a, size_t bytes, double ms);

#endif
