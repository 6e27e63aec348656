/*
 * Page codecs: zero detection, delta encoding against a cache of what was
 * sent before (XBZRLE-like), optional zstd, and a keyed 64-bit page hash for
 * the memory digest.
 *
 * Delta format (see PROTOCOL.md, "delta"): a sequence of
 *   uleb128 skip, uleb128 n, n literal bytes
 * meaning "keep `skip` bytes of the current page, then overwrite the next
 * `n` bytes".  The runs must stay inside the page.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "core/codec.h"

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);       /* pages sit at any offset inside a frame */
    return v;
}

const uint8_t nb_zero_page[NB_PAGE];

int nb_page_is_zero(const uint8_t *page)
{
    for (size_t i = 0; i < NB_PAGE; i += 64) {
        uint64_t any = 0;
        for (size_t k = 0; k < 64; k += 8)
            any |= load64(page + i + k);
        if (any)
            return 0;
    }
    return 1;
}

static size_t put_uleb(uint8_t *out, size_t v)
{
    size_t n = 0;
    do {
        uint8_t b = (uint8_t)(v & 0x7f);
        v >>= 7;
        out[n++] = (uint8_t)(b | (v ? 0x80 : 0));
    } while (v);
    return n;
}

static int get_uleb(const uint8_t *in, size_t len, size_t *pos, size_t *v)
{
    size_t out = 0;
    for (int shift = 0; shift < 21; shift += 7) {
        uint8_t b;
        if (*pos >= len)
            return -1;
        b = in[(*pos)++];
        out |= (size_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = out;
            return 0;
        }
    }
    return -1; /* more than 3 bytes: no value of a 4 KiB page needs that */
}

/*
 * Encode `cur` as a delta against `old`.  Returns the encoded size, or 0
 * when the delta would exceed `cap` (send the page another way).
 */
size_t nb_delta_encode(const uint8_t *old, const uint8_t *cur, uint8_t *out,
                       size_t cap)
{
    size_t i = 0, n = 0;
    while (i < NB_PAGE) {
        size_t start = i, skip, run;
        /* unchanged bytes, a word at a time where aligned */
        while (i < NB_PAGE && (i & 7) && old[i] == cur[i])
            i++;
        while (i + 8 <= NB_PAGE && memcmp(old + i, cur + i, 8) == 0)
            i += 8;         /* memcmp: pages sit at any offset in a frame */
        while (i < NB_PAGE && old[i] == cur[i])
            i++;
        if (i == NB_PAGE)
            break;
        skip = i - start;
        start = i;
        /* changed bytes; absorb short equal stretches (< 4 bytes); give
         * up as soon as the run alone would not fit */
        while (i < NB_PAGE) {
            if (old[i] != cur[i]) {
                if (n + 6 + (++i - start) > cap)
                    return 0;
                continue;
            }
            size_t j = i;
            while (j < NB_PAGE && j - i < 4 && old[j] == cur[j])
                j++;
            if (j - i >= 4 || j == NB_PAGE)
                break;
            i = j;
        }
        run = i - start;
        if (n + 6 + run > cap)
            return 0;
        n += put_uleb(out + n, skip);
        n += put_uleb(out + n, run);
        memcpy(out + n, cur + start, run);
        n += run;
    }
    if (n == 0) {
        /* identical page: an empty delta is valid but say so explicitly */
        if (cap < 2)
            return 0;
        out[0] = 0;
        out[1] = 0;
        n = 2;
    }
    return n;
}

/* Apply a delta to `page` in place.  Returns -1 if the delta is malformed. */
int nb_delta_decode(const uint8_t *in, size_t len, uint8_t *page)
{
    size_t pos = 0, at = 0;
    while (pos < len) {
        size_t skip, run;
        if (get_uleb(in, len, &pos, &skip) < 0 ||
            get_uleb(in, len, &pos, &run) < 0)
            return -1;
        if (skip > NB_PAGE - at || run > NB_PAGE - at - skip || run > len - pos)
            return -1;
        at += skip;
        memcpy(page + at, in + pos, run);
        at += run;
        pos += run;
    }
    return 0;
}

/* ---- the memory digest's keyed hashes (PROTOCOL.md, "Memory digest") -- */

static inline uint64_t rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint32_t load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);       /* frames put pages at any offset */
    return v;
}

#define SIPROUND(v0, v1, v2, v3) do {                                   \
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32);      \
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2;                          \
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0;                          \
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32);      \
    } while (0)

/* SipHash-2-4 of `n` 64-bit words under (k0, k1). */
static uint64_t siphash24(uint64_t k0, uint64_t k1, const uint64_t *m, size_t n)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    uint64_t last = (uint64_t)(n * 8) << 56;

    for (size_t i = 0; i < n; i++) {
        v3 ^= m[i];
        SIPROUND(v0, v1, v2, v3);
        SIPROUND(v0, v1, v2, v3);
        v0 ^= m[i];
    }
    v3 ^= last;
    SIPROUND(v0, v1, v2, v3);
    SIPROUND(v0, v1, v2, v3);
    v0 ^= last;
    v2 ^= 0xff;
    for (int r = 0; r < 4; r++)
        SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/*
 * NH over one page twice, with the key words starting at k and at k + 4
 * (each a 2^-32-universal hash), in one pass over the page:
 *   out[j] = sum_i ((w[2i] + k[2i + 4j]) mod 2^32) * ((w[2i+1] + k[2i+1 + 4j]) mod 2^32)
 * mod 2^64.  The sums are order-free, so the vector version below adds
 * the same products in another order and gets the same result.
 */
static void nh_pair_scalar(const uint8_t *page, const uint32_t *k, uint64_t out[2])
{
    uint64_t a = 0, b = 0;
    for (size_t i = 0; i < NB_PAGE / 4; i += 2) {
        uint32_t w0 = load32(page + 4 * i), w1 = load32(page + 4 * i + 4);
        a += (uint64_t)(uint32_t)(w0 + k[i]) * (uint32_t)(w1 + k[i + 1]);
        b += (uint64_t)(uint32_t)(w0 + k[i + 4]) * (uint32_t)(w1 + k[i + 5]);
    }
    out[0] = a;
    out[1] = b;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* The same with AVX2: eight words at a time, four products per pass. */
__attribute__((target("avx2")))
static void nh_pair_avx2(const uint8_t *page, const uint32_t *k, uint64_t out[2])
{
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    uint64_t la[4], lb[4];

    for (size_t i = 0; i < NB_PAGE / 4; i += 8) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(page + 4 * i));
        __m256i sa = _mm256_add_epi32(w, _mm256_loadu_si256((const __m256i *)(k + i)));
        __m256i sb = _mm256_add_epi32(w, _mm256_loadu_si256((const __m256i *)(k + i + 4)));
        /* each 64-bit lane: (low word) * (high word) */
        a = _mm256_add_epi64(a, _mm256_mul_epu32(sa, _mm256_srli_epi64(sa, 32)));
        b = _mm256_add_epi64(b, _mm256_mul_epu32(sb, _mm256_srli_epi64(sb, 32)));
    }
    _mm256_storeu_si256((__m256i *)la, a);
    _mm256_storeu_si256((__m256i *)lb, b);
    out[0] = la[0] + la[1] + la[2] + la[3];
    out[1] = lb[0] + lb[1] + lb[2] + lb[3];
}
#endif

/*
 * The vector code to use: 0 none, 1 AVX2; -1 (the default): the best the
 * CPU has, decided on first use.
 */
int nb_codec_simd = -1;

int nb_simd_level(void)
{
#if defined(__x86_64__)
    if (nb_codec_simd < 0) {
        __builtin_cpu_init();
        nb_codec_simd = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return nb_codec_simd;
#else
    return 0;
#endif
}

static void nh_pair(const uint8_t *page, const uint32_t *k, uint64_t out[2])
{
#if defined(__x86_64__)
    if (nb_simd_level() >= 1) {
        nh_pair_avx2(page, k, out);
        return;
    }
#endif
    nh_pair_scalar(page, k, out);
}

/*
 * 64-bit keyed hash of one page: SipHash-2-4 of two NH passes (the second
 * with the key shifted by four words), a pseudorandom function of the
 * content whatever the difference between two pages.
 */
uint64_t nb_page_hash(const uint8_t *page, const struct nb_hash_key *k)
{
    uint64_t nh[2];
    nh_pair(page, k->nh, nh);
    return siphash24(k->page_k0, k->page_k1, nh, 2);
}

/* The keyed hash of an all-zero page (never-written memory). */
uint64_t nb_zero_page_hash(const struct nb_hash_key *k)
{
    return nb_page_hash(nb_zero_page, k);
}

/*
 * Page `pfn`'s term of the memory digest (PROTOCOL.md) given its content
 * hash `h`: T(pfn, h) - T(pfn, hz), so that a zero page adds nothing.
 */
uint64_t nb_digest_term(uint64_t pfn, uint64_t h, uint64_t hz,
                        const struct nb_hash_key *k)
{
    uint64_t mh[2] = { pfn, h }, mz[2] = { pfn, hz };
    if (h == hz)
        return 0;
    return siphash24(k->term_k0, k->term_k1, mh, 2) -
           siphash24(k->term_k0, k->term_k1, mz, 2);
}

/*
 * Block `block` of disk `disk`'s term of the disk digest (PROTOCOL.md,
 * "Digest"): T_disk(d, b, h) - T_disk(d, b, hz), with T_disk a SipHash-2-4
 * of four words (a tag, the disk, the block, the content hash) under the
 * same key as the pages' terms.  A page's term hashes two words: messages
 * of another length, so no block's term can equal a page's.
 */
#define DISK_TERM_TAG 0x00006b736964626eULL     /* "nbdisk\0\0" */

uint64_t nb_disk_term(uint32_t disk, uint64_t block, uint64_t h, uint64_t hz,
                      const struct nb_hash_key *k)
{
    uint64_t mh[4] = { DISK_TERM_TAG, disk, block, h };
    uint64_t mz[4] = { DISK_TERM_TAG, disk, block, hz };
    if (h == hz)
        return 0;
    return siphash24(k->term_k0, k->term_k1, mh, 4) -
           siphash24(k->term_k0, k->term_k1, mz, 4);
}

/* ---- delta cache (source side) --------------------------------------- */

/*
 * A page whose delta against zeros fits in XCACHE_SMALL bytes is kept as
 * that delta, not as 4 KiB: a working set of sparse pages (a byte or a
 * few words written per page) then costs the cache a few megabytes, not
 * a copy of itself that must first be faulted in and zeroed.
 */
#define XCACHE_SMALL 64
/* lens[] of an entry that stands for a page of zeros (sent as ZERO): the
 * destination's copy is zeros, and the next write to the page goes as a
 * delta against them where its changes fit one, not whole. */
#define XCACHE_ZERO 0xff

struct nb_xcache {
    size_t nslots;
    uint64_t *tags;     /* pfn + 1; 0 = empty */
    uint32_t *ages;     /* round the entry was stored in */
    uint8_t *lens;      /* 0: the page is in pages; else its delta's length in small */
    uint8_t *small;     /* XCACHE_SMALL bytes per slot */
    uint8_t *pages;
};

/* Room for the cached pages, in huge pages where the system has them:
 * caching a page then faults (and zeroes) 2 MiB at a time, not 4 KiB. */
static uint8_t *cache_pages(size_t bytes)
{
#ifdef MADV_HUGEPAGE
    void *p = NULL;
    if (bytes < (2u << 20) || posix_memalign(&p, 2u << 20, bytes) != 0)
        return malloc(bytes);
    madvise(p, bytes, MADV_HUGEPAGE);
    return p;
#else
    return malloc(bytes);
#endif
}

struct nb_xcache *nb_xcache_new(uint64_t bytes)
{
    struct nb_xcache *c;
    size_t n = (size_t)(bytes / NB_PAGE);
    if (n < 16)
        return NULL;
    c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->nslots = n;
    c->tags = calloc(n, sizeof(uint64_t));
    c->ages = calloc(n, sizeof(uint32_t));
    c->lens = calloc(n, 1);
    c->small = calloc(n, XCACHE_SMALL);
    c->pages = cache_pages(n * NB_PAGE);
    if (!c->tags || !c->ages || !c->lens || !c->small || !c->pages) {
        nb_xcache_free(c);
        return NULL;
    }
    return c;
}

void nb_xcache_free(struct nb_xcache *c)
{
    if (!c)
        return;
    free(c->tags);
    free(c->ages);
    free(c->lens);
    free(c->small);
    free(c->pages);
    free(c);
}

static size_t slot_of(const struct nb_xcache *c, uint64_t key)
{
    return (size_t)(key % c->nslots);
}

/* Whether the cache holds an entry for `key` (nb_xcache_get would find it,
 * barring a sparse entry that no longer decodes). */
int nb_xcache_has(const struct nb_xcache *c, uint64_t key)
{
    return c->tags[slot_of(c, key)] == key + 1;
}

/*
 * The page content last sent under `key`, or NULL: the cache's own copy,
 * or `buf` (a page) rebuilt from a sparse page's delta.
 */
const uint8_t *nb_xcache_get(struct nb_xcache *c, uint64_t key, uint8_t *buf)
{
    size_t s = slot_of(c, key);
    if (c->tags[s] != key + 1)
        return NULL;
    if (c->lens[s] == XCACHE_ZERO)
        return nb_zero_page;
    if (!c->lens[s])
        return c->pages + s * NB_PAGE;
    memset(buf, 0, NB_PAGE);
    return nb_delta_decode(c->small + s * XCACHE_SMALL, c->lens[s], buf) < 0
           ? NULL : buf;
}

/* Take slot `s` for `key` in round `round`, unless it holds a page for
 * another key stored in this round or the one before: evicting it would
 * make a sweep over more pages than the cache holds miss on every page,
 * round after round, while keeping it lets the pages that stay hit
 * (QEMU's XBZRLE cache keeps fresh entries the same way).  An entry of
 * zeros keeps no slot: it saves a page written again after it was
 * zeroed, not one rewritten round after round. */
static int claim_slot(struct nb_xcache *c, size_t s, uint64_t key, uint32_t round)
{
    if (c->tags[s] && c->tags[s] != key + 1 && c->lens[s] != XCACHE_ZERO &&
        c->ages[s] + 1 >= round)
        return 0;
    c->tags[s] = key + 1;
    c->ages[s] = round;
    return 1;
}

/*
 * Remember `page` as the content last sent under `key` in round `round`;
 * `zdelta` (`zlen` bytes) is its delta against zeros if the caller has
 * it (`zlen` 0: larger than the cache keeps small), else NULL.  Returns
 * 1 if the page was stored (a later get returns it), else 0 (claim_slot).
 */
int nb_xcache_put(struct nb_xcache *c, uint64_t key, const uint8_t *page,
                  uint32_t round, const uint8_t *zdelta, size_t zlen)
{
    size_t s = slot_of(c, key);
    uint8_t *small = c->small + s * XCACHE_SMALL;

    if (!claim_slot(c, s, key, round))
        return 0;
    if (!zdelta)
        zlen = nb_delta_encode(nb_zero_page, page, small, XCACHE_SMALL);
    else if (zlen && zlen <= XCACHE_SMALL)
        memcpy(small, zdelta, zlen);
    else
        zlen = 0;
    c->lens[s] = (uint8_t)zlen;     /* at most XCACHE_SMALL here */
    if (!c->lens[s])
        memcpy(c->pages + s * NB_PAGE, page, NB_PAGE);
    return 1;
}

/* Remember that what was sent under `key` in round `round` is a page of
 * zeros (a ZERO record).  Returns 1 if stored, else 0 (claim_slot: the
 * slot holds another page, so nothing of `key` is left either). */
int nb_xcache_put_zero(struct nb_xcache *c, uint64_t key, uint32_t round)
{
    size_t s = slot_of(c, key);

    if (!claim_slot(c, s, key, round))
        return 0;
    c->lens[s] = XCACHE_ZERO;
    return 1;
}
