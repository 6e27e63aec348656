/*
 * Test-only entry points into the page codecs and the delta cache.  Built
 * only into the unit tests' module (build_engine.selftest_builder), never
 * into the engine.
 */
#include <stdlib.h>
#include <string.h>

#include "core/adapt.h"
#include "core/codec.h"
#include "core/converge.h"
#include "core/transitions.h"
#include "test/selftest.h"
#include "wire/gcm.h"

int nb_selftest_delta(const uint8_t *old, const uint8_t *cur, uint8_t *out,
                      size_t cap, size_t *outlen)
{
    *outlen = nb_delta_encode(old, cur, out, cap);
    return *outlen ? 0 : -1;
}

int nb_selftest_undelta(const uint8_t *delta, size_t len, uint8_t *page)
{
    return nb_delta_decode(delta, len, page);
}

uint32_t nb_selftest_crc32c(const uint8_t *buf, size_t len)
{
    return nb_crc32c(0, buf, len);
}

/* Allow vector code up to `simd` (what the CPU has, at most). */
static int limit_simd(int simd)
{
    int best;
    nb_codec_simd = -1;
    best = nb_simd_level();
    nb_codec_simd = simd < best ? simd : best;
    return nb_codec_simd;
}

uint64_t nb_selftest_page_hash(const uint8_t *page, const uint32_t *nh,
                               uint64_t k0, uint64_t k1, int simd, int *used)
{
    static struct nb_hash_key k;
    uint64_t h;

    memcpy(k.nh, nh, sizeof(k.nh));
    k.page_k0 = k0;
    k.page_k1 = k1;
    *used = limit_simd(simd);
    h = nb_page_hash(page, &k);
    nb_codec_simd = -1;
    return h;
}

uint64_t nb_selftest_digest_term(uint64_t pfn, uint64_t h, uint64_t hz,
                                 uint64_t k0, uint64_t k1)
{
    struct nb_hash_key k = { .term_k0 = k0, .term_k1 = k1 };
    return nb_digest_term(pfn, h, hz, &k);
}

uint64_t nb_selftest_disk_term(uint32_t disk, uint64_t block, uint64_t h,
                               uint64_t hz, uint64_t k0, uint64_t k1)
{
    struct nb_hash_key k = { .term_k0 = k0, .term_k1 = k1 };
    return nb_disk_term(disk, block, h, hz, &k);
}

long nb_selftest_xcache_sweep(uint64_t slots, uint64_t ws, uint32_t rounds)
{
    struct nb_xcache *c = nb_xcache_new(slots * NB_PAGE);
    static uint8_t page[NB_PAGE], buf[NB_PAGE];
    long hits = 0;
    if (!c)
        return -1;
    for (uint32_t r = 0; r < rounds; r++) {
        hits = 0;
        for (uint64_t k = 0; k < ws; k++) {
            page[0] = (uint8_t)r;
            hits += nb_xcache_get(c, k, buf) != NULL;
            nb_xcache_put(c, k, page, r, NULL, 0);
        }
    }
    for (uint64_t k = 0; k < ws; k++)
        nb_xcache_put_zero(c, k, rounds);
    for (uint64_t k = 0; k < ws; k++) {
        const uint8_t *got = nb_xcache_get(c, k, buf);
        if (got && memcmp(got, nb_zero_page, NB_PAGE) != 0)
            hits = -1;
    }
    nb_xcache_free(c);
    return hits;
}

/*
 * A page sent with a byte set (round 1), then as zeros (round 3), then
 * with the byte set again (round 4): the length of its delta against
 * what the cache holds before round 4, or -1 on a miss.  With
 * `rival`, another key of the same slot is stored in round 3 first (the
 * page's entry is two rounds old): the zeros are not kept, nor is the
 * older page (-1).  With `rival` 2, that key is then sent as zeros too,
 * and this page (round 3) takes the slot back from it (-3 if not), then
 * goes as zeros again.
 */
long nb_selftest_xcache_zeroed(int rival)
{
    struct nb_xcache *c = nb_xcache_new(16 * NB_PAGE);
    static uint8_t page[NB_PAGE], buf[NB_PAGE], delta[NB_PAGE];
    const uint8_t *old;
    long n = -1;

    if (!c)
        return -2;
    page[0] = 1;
    nb_xcache_put(c, 3, page, 1, NULL, 0);
    if (rival)
        nb_xcache_put(c, 3 + 16, page, 3, NULL, 0);
    nb_xcache_put_zero(c, 3, 3);
    if (rival > 1) {     /* the zeros keep no slot from a page */
        nb_xcache_put_zero(c, 3 + 16, 3);
        if (!nb_xcache_put(c, 3, page, 3, NULL, 0))
            n = -3;
        nb_xcache_put_zero(c, 3, 3);
    }
    page[0] = 2;
    old = nb_xcache_get(c, 3, buf);
    if (old && nb_xcache_has(c, 3) && n != -3)
        n = (long)nb_delta_encode(old, page, delta, NB_PAGE);
    nb_xcache_free(c);
    return n;
}

long nb_selftest_xcache_roundtrip(uint64_t slots, const uint8_t *pages, uint64_t n)
{
    struct nb_xcache *c = nb_xcache_new(slots * NB_PAGE);
    static uint8_t buf[NB_PAGE];
    long same = 0;
    if (!c)
        return -1;
    for (uint64_t k = 0; k < n; k++)
        nb_xcache_put(c, k, pages + k * NB_PAGE, 1, NULL, 0);
    for (uint64_t k = 0; k < n; k++) {
        const uint8_t *got = nb_xcache_get(c, k, buf);
        same += got && memcmp(got, pages + k * NB_PAGE, NB_PAGE) == 0;
    }
    nb_xcache_free(c);
    return same;
}

int nb_selftest_phase_legal(int is_source, int from, int to)
{
    return nb_phase_legal(is_source, from, to);
}

int nb_selftest_round_stalled(double expected_ms, double limit_ms,
                              uint64_t dirty, uint64_t prev)
{
    return nb_round_stalled(expected_ms, limit_ms, dirty, prev);
}

uint32_t nb_selftest_converge_target(uint32_t cur, double page_ms,
                                     double dirty_per_ms)
{
    return nb_converge_target(cur, page_ms, dirty_per_ms);
}

double nb_selftest_dest_excess_ms(double lag_ms, double rtt_ms, uint64_t backlog)
{
    return nb_dest_excess_ms(lag_ms, rtt_ms, backlog);
}

void *nb_selftest_pace_new(void)
{
    return calloc(1, sizeof(struct nb_dest_pace));
}

void nb_selftest_pace_free(void *p)
{
    free(p);
}

void nb_selftest_pace_sent(void *p, uint32_t round, uint64_t units)
{
    nb_pace_sent(p, round, units);
}

void nb_selftest_pace_drained(void *p, uint32_t round, uint32_t applied,
                              double t_crossed)
{
    nb_pace_drained(p, round, applied, t_crossed);
}

void nb_selftest_pace_quiet(void *p, double now)
{
    ((struct nb_dest_pace *)p)->t_quiet = now;
}

int nb_selftest_pace_applied(void *p, uint32_t applied, int waited,
                             double now, double rtt_ms)
{
    return nb_pace_applied(p, applied, waited, now, rtt_ms);
}

double nb_selftest_pace_excess_ms(void *p)
{
    return ((struct nb_dest_pace *)p)->excess_ms;
}

double nb_selftest_pace_throttle_ms(void *p)
{
    return nb_pace_throttle_ms(p);
}

uint64_t nb_selftest_pace_backlog(void *p)
{
    return ((struct nb_dest_pace *)p)->backlog;
}

void *nb_selftest_fit_new(void)
{
    return calloc(1, sizeof(struct nb_fit));
}

void nb_selftest_fit_free(void *f)
{
    free(f);
}

void nb_selftest_fit_caught_up(void *f)
{
    nb_fit_caught_up(f);
}

void nb_selftest_fit_counted(void *f, uint64_t dirty, uint64_t before)
{
    nb_fit_counted(f, dirty, before);
}

int nb_selftest_fit_round_left(void *f)
{
    return nb_fit_round_left(f);
}

uint64_t nb_selftest_drain_threshold(double bandwidth, int channels)
{
    return nb_drain_threshold(bandwidth, channels);
}

/* How long frame `n` (from 1) of `burst` takes to leave, at `link_Bps` on average. */
static double frame_ms(size_t frame, double link_Bps, int burst, int n)
{
    double mean = (double)frame / link_Bps * 1e3, quick = mean / 50;
    if (burst <= 1)
        return mean;
    return n % burst ? quick : mean * burst - quick * (burst - 1);
}

int nb_selftest_adapt(int mode, double link_Bps, double zstd_Bps, double ratio,
                      int pages, int burst, int *active)
{
    struct nb_adapt a;
    int tried = 0;
    const size_t frame = 256u << 10;

    nb_adapt_init(&a, mode);
    for (int i = 1; i <= pages; i++) {
        if (nb_adapt_try(&a)) {
            tried++;
            nb_adapt_compressed(&a, 4096, (size_t)(4096 * ratio),
                                4096 / zstd_Bps * 1e9);
        }
        if (i % 64 == 0)
            nb_adapt_sent(&a, frame, frame_ms(frame, link_Bps, burst, i / 64));
    }
    *active = a.active;
    return tried;
}

int nb_selftest_gcm(const uint8_t *key, const uint8_t *iv, const uint8_t *aad,
                    size_t aadlen, const uint8_t *in, uint8_t *out, size_t len,
                    const size_t *pieces, size_t npieces, int decrypt,
                    uint8_t *tag)
{
    struct nb_gcm *g = nb_gcm_new(key);
    size_t at = 0;

    if (!g)
        return -1;
    nb_gcm_start(g, iv, aad, aadlen);
    for (size_t i = 0; i < npieces && at < len; i++) {
        size_t n = pieces[i] < len - at ? pieces[i] : len - at;
        nb_gcm_crypt(g, in + at, out + at, n, decrypt);
        at += n;
    }
    nb_gcm_crypt(g, in + at, out + at, len - at, decrypt);
    nb_gcm_finish(g, tag);
    nb_gcm_free(g);
    return 0;
}
