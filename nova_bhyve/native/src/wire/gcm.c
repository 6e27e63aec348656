/*
 * AES-256-GCM (NIST SP 800-38D) with VAES and VPCLMULQDQ: counter mode
 * sixteen blocks at a time in four 512-bit registers, GHASH over the same
 * sixteen blocks with one reduction (the powers H^16..H^1 precomputed).
 * GHASH works on byte-reversed blocks with H·x as the key, so that one
 * carry-less multiplication and a two-step folding by the polynomial
 * 0xC2..01 give the product (the usual x86 formulation).  AES-NI and
 * carry-less multiplication take constant time; the tag is compared by
 * the caller with CRYPTO_memcmp (seal.c).
 */
#define _GNU_SOURCE
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "wire/gcm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>

#define GCM_TARGET __attribute__((target( \
    "aes,pclmul,ssse3,avx2,avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")))
#define ROUNDS 14

struct nb_gcm {
    __m512i hz[4];          /* lane l of hz[j]: H^(16 - 4j - l), H·x form */
    __m128i rk[ROUNDS + 1]; /* AES-256 round keys */
    __m128i h1;             /* H·x */
    __m128i acc;            /* GHASH state, byte-reversed */
    __m128i ctr;            /* next counter block, byte-reversed */
    __m128i ekj0;           /* E(K, J0), for the tag */
    uint64_t aad_len, len;
    uint8_t ks[16];         /* keystream of the partial block */
    uint8_t part[16];       /* its ciphertext so far */
    unsigned npart;
};

static const uint8_t REV[16] = {15, 14, 13, 12, 11, 10, 9, 8,
                                7, 6, 5, 4, 3, 2, 1, 0};

GCM_TARGET static inline __m128i rev(__m128i x)
{
    return _mm_shuffle_epi8(x, _mm_loadu_si128((const __m128i *)REV));
}

GCM_TARGET static inline __m128i fold(__m128i lo, __m128i hi)
{
    const __m128i poly = _mm_set_epi64x((long long)0xC200000000000000ULL, 1);
    __m128i t = _mm_clmulepi64_si128(lo, poly, 0x10);
    lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4E), t);
    t = _mm_clmulepi64_si128(lo, poly, 0x10);
    lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4E), t);
    return _mm_xor_si128(lo, hi);
}

/* a·b in GF(2^128), both byte-reversed, b in H·x form. */
GCM_TARGET static __m128i gf_mul(__m128i a, __m128i b)
{
    __m128i lo = _mm_clmulepi64_si128(a, b, 0x00);
    __m128i hi = _mm_clmulepi64_si128(a, b, 0x11);
    __m128i mid = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x01),
                                _mm_clmulepi64_si128(a, b, 0x10));
    lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
    hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
    return fold(lo, hi);
}

GCM_TARGET static inline __m128i key_mix(__m128i k, __m128i t)
{
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, t);
}

#define EXPAND_PAIR(i, rcon)                                               \
    rk[i] = key_mix(rk[i - 2], _mm_shuffle_epi32(                          \
        _mm_aeskeygenassist_si128(rk[i - 1], rcon), 0xFF));                \
    if (i + 1 <= ROUNDS)                                                   \
        rk[i + 1] = key_mix(rk[i - 1], _mm_shuffle_epi32(                  \
            _mm_aeskeygenassist_si128(rk[i], 0), 0xAA))

GCM_TARGET static void expand_key(const uint8_t key[32], __m128i *rk)
{
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
    EXPAND_PAIR(2, 0x01);
    EXPAND_PAIR(4, 0x02);
    EXPAND_PAIR(6, 0x04);
    EXPAND_PAIR(8, 0x08);
    EXPAND_PAIR(10, 0x10);
    EXPAND_PAIR(12, 0x20);
    EXPAND_PAIR(14, 0x40);
}

GCM_TARGET static __m128i aes_block(const __m128i *rk, __m128i b)
{
    b = _mm_xor_si128(b, rk[0]);
    for (int r = 1; r < ROUNDS; r++)
        b = _mm_aesenc_si128(b, rk[r]);
    return _mm_aesenclast_si128(b, rk[ROUNDS]);
}

/* H·x: shift left one bit, reduce by the polynomial on a carry out. */
GCM_TARGET static __m128i times_x(__m128i h)
{
    const __m128i poly = _mm_set_epi64x((long long)0xC200000000000000ULL, 1);
    __m128i carry = _mm_srai_epi32(_mm_shuffle_epi32(h, 0xFF), 31);
    __m128i up = _mm_slli_si128(_mm_srli_epi32(h, 31), 4);
    h = _mm_or_si128(_mm_slli_epi32(h, 1), up);
    return _mm_xor_si128(h, _mm_and_si128(carry, poly));
}

GCM_TARGET static void derive_hash_key(struct nb_gcm *g)
{
    __m128i pw[16];

    g->h1 = times_x(rev(aes_block(g->rk, _mm_setzero_si128())));
    pw[0] = g->h1;
    for (int i = 1; i < 16; i++)
        pw[i] = gf_mul(pw[i - 1], g->h1);
    for (int j = 0; j < 4; j++)
        g->hz[j] = _mm512_set_epi64(
            _mm_extract_epi64(pw[12 - 4 * j], 1), _mm_extract_epi64(pw[12 - 4 * j], 0),
            _mm_extract_epi64(pw[13 - 4 * j], 1), _mm_extract_epi64(pw[13 - 4 * j], 0),
            _mm_extract_epi64(pw[14 - 4 * j], 1), _mm_extract_epi64(pw[14 - 4 * j], 0),
            _mm_extract_epi64(pw[15 - 4 * j], 1), _mm_extract_epi64(pw[15 - 4 * j], 0));
    OPENSSL_cleanse(pw, sizeof(pw));
}

GCM_TARGET static void ghash_block(struct nb_gcm *g, const uint8_t *b)
{
    __m128i x = rev(_mm_loadu_si128((const __m128i *)b));
    g->acc = gf_mul(_mm_xor_si128(g->acc, x), g->h1);
}

/* The next counter block in the clear; advances the counter (inc32). */
GCM_TARGET static __m128i next_counter(struct nb_gcm *g)
{
    __m128i c = rev(g->ctr);
    g->ctr = _mm_add_epi32(g->ctr, _mm_set_epi32(0, 0, 0, 1));
    return c;
}

/* The keystream of sixteen blocks: four registers, round by round. */
GCM_TARGET static inline void keystream16(const struct nb_gcm *g, __m512i ks[4])
{
    const __m512i rev4 = _mm512_broadcast_i32x4(
        _mm_loadu_si128((const __m128i *)REV));
    const __m512i four = _mm512_set_epi32(0, 0, 0, 4, 0, 0, 0, 4,
                                          0, 0, 0, 4, 0, 0, 0, 4);
    __m512i c0 = _mm512_add_epi32(_mm512_broadcast_i32x4(g->ctr),
                                  _mm512_set_epi32(0, 0, 0, 3, 0, 0, 0, 2,
                                                   0, 0, 0, 1, 0, 0, 0, 0));
    __m512i c1 = _mm512_add_epi32(c0, four), c2 = _mm512_add_epi32(c1, four);
    __m512i c3 = _mm512_add_epi32(c2, four);
    __m512i k = _mm512_broadcast_i32x4(g->rk[0]);

    c0 = _mm512_xor_si512(_mm512_shuffle_epi8(c0, rev4), k);
    c1 = _mm512_xor_si512(_mm512_shuffle_epi8(c1, rev4), k);
    c2 = _mm512_xor_si512(_mm512_shuffle_epi8(c2, rev4), k);
    c3 = _mm512_xor_si512(_mm512_shuffle_epi8(c3, rev4), k);
#pragma GCC unroll 13
    for (int r = 1; r < ROUNDS; r++) {
        k = _mm512_broadcast_i32x4(g->rk[r]);
        c0 = _mm512_aesenc_epi128(c0, k);
        c1 = _mm512_aesenc_epi128(c1, k);
        c2 = _mm512_aesenc_epi128(c2, k);
        c3 = _mm512_aesenc_epi128(c3, k);
    }
    k = _mm512_broadcast_i32x4(g->rk[ROUNDS]);
    ks[0] = _mm512_aesenclast_epi128(c0, k);
    ks[1] = _mm512_aesenclast_epi128(c1, k);
    ks[2] = _mm512_aesenclast_epi128(c2, k);
    ks[3] = _mm512_aesenclast_epi128(c3, k);
}

/* XOR of the four 128-bit lanes of `v`. */
GCM_TARGET static inline __m128i lanes_xor(__m512i v)
{
    __m256i h = _mm256_xor_si256(_mm512_castsi512_si256(v),
                                 _mm512_extracti64x4_epi64(v, 1));
    return _mm_xor_si128(_mm256_castsi256_si128(h),
                         _mm256_extracti128_si256(h, 1));
}

/* Sixteen blocks: counter mode and GHASH of the ciphertext. */
GCM_TARGET static void crypt16(struct nb_gcm *g, const uint8_t *in,
                               uint8_t *out, int decrypt)
{
    const __m512i rev4 = _mm512_broadcast_i32x4(
        _mm_loadu_si128((const __m128i *)REV));
    __m512i ks[4], lo = _mm512_setzero_si512(), hi = lo, mid = lo;

    keystream16(g, ks);
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        __m512i x = _mm512_loadu_si512(in + 64 * j);
        __m512i y = _mm512_xor_si512(x, ks[j]);
        __m512i c = _mm512_shuffle_epi8(decrypt ? x : y, rev4);
        _mm512_storeu_si512(out + 64 * j, y);
        if (j == 0)
            c = _mm512_xor_si512(c, _mm512_zextsi128_si512(g->acc));
        lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128(c, g->hz[j], 0x00));
        hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128(c, g->hz[j], 0x11));
        mid = _mm512_xor_si512(mid, _mm512_clmulepi64_epi128(c, g->hz[j], 0x01));
        mid = _mm512_xor_si512(mid, _mm512_clmulepi64_epi128(c, g->hz[j], 0x10));
    }
    lo = _mm512_xor_si512(lo, _mm512_bslli_epi128(mid, 8));
    hi = _mm512_xor_si512(hi, _mm512_bsrli_epi128(mid, 8));
    g->acc = fold(lanes_xor(lo), lanes_xor(hi));
    g->ctr = _mm_add_epi32(g->ctr, _mm_set_epi32(0, 0, 0, 16));
}

GCM_TARGET static void crypt1(struct nb_gcm *g, const uint8_t *in,
                              uint8_t *out, int decrypt)
{
    __m128i x = _mm_loadu_si128((const __m128i *)in);
    __m128i y = _mm_xor_si128(x, aes_block(g->rk, next_counter(g)));
    _mm_storeu_si128((__m128i *)out, y);
    g->acc = gf_mul(_mm_xor_si128(g->acc, rev(decrypt ? x : y)), g->h1);
}

/* Bytes into (and out of) the partial block; returns how many it took. */
GCM_TARGET static size_t crypt_partial(struct nb_gcm *g, const uint8_t *in,
                                       uint8_t *out, size_t n, int decrypt)
{
    size_t i = 0;

    if (!g->npart && n) {
        _mm_storeu_si128((__m128i *)g->ks, aes_block(g->rk, next_counter(g)));
        memset(g->part, 0, sizeof(g->part));
    }
    for (; i < n && g->npart < 16; i++, g->npart++) {
        uint8_t c = in[i], p = c ^ g->ks[g->npart];
        g->part[g->npart] = decrypt ? c : p;
        out[i] = p;
    }
    if (g->npart == 16) {
        ghash_block(g, g->part);
        g->npart = 0;
    }
    return i;
}

GCM_TARGET void nb_gcm_start(struct nb_gcm *g, const uint8_t iv[12],
                             const uint8_t *aad, size_t n)
{
    uint8_t j0[16] = {0}, blk[16];

    memcpy(j0, iv, 12);
    j0[15] = 1;
    g->ekj0 = aes_block(g->rk, _mm_loadu_si128((const __m128i *)j0));
    g->ctr = _mm_add_epi32(rev(_mm_loadu_si128((const __m128i *)j0)),
                           _mm_set_epi32(0, 0, 0, 1));
    g->acc = _mm_setzero_si128();
    g->aad_len = n;
    g->len = 0;
    g->npart = 0;
    for (; n >= 16; n -= 16, aad += 16)
        ghash_block(g, aad);
    if (n) {
        memset(blk, 0, sizeof(blk));
        memcpy(blk, aad, n);
        ghash_block(g, blk);
    }
}

GCM_TARGET void nb_gcm_crypt(struct nb_gcm *g, const uint8_t *in, uint8_t *out,
                             size_t n, int decrypt)
{
    size_t k;

    g->len += n;
    if (g->npart) {
        k = crypt_partial(g, in, out, n, decrypt);
        in += k, out += k, n -= k;
    }
    for (; n >= 256; n -= 256, in += 256, out += 256)
        crypt16(g, in, out, decrypt);
    for (; n >= 16; n -= 16, in += 16, out += 16)
        crypt1(g, in, out, decrypt);
    if (n)
        crypt_partial(g, in, out, n, decrypt);
}

GCM_TARGET void nb_gcm_finish(struct nb_gcm *g, uint8_t tag[16])
{
    uint8_t lens[16];
    uint64_t abits = g->aad_len * 8, cbits = g->len * 8;

    if (g->npart)
        ghash_block(g, g->part);    /* zero-padded by crypt_partial */
    g->npart = 0;
    for (int i = 0; i < 8; i++) {
        lens[i] = (uint8_t)(abits >> (56 - 8 * i));
        lens[8 + i] = (uint8_t)(cbits >> (56 - 8 * i));
    }
    ghash_block(g, lens);
    _mm_storeu_si128((__m128i *)tag, _mm_xor_si128(rev(g->acc), g->ekj0));
}

/* VAES, VPCLMULQDQ, AES-NI, PCLMULQDQ and AVX-512 F/BW/VL, with the
 * kernel saving the AVX-512 registers (XCR0 bits 1, 2, 5, 6, 7). */
static int cpu_has_it(void)
{
    unsigned a, b, c, d, lo, hi;

    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_AES) ||
        !(c & bit_PCLMUL) || !(c & bit_OSXSAVE))
        return 0;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xE6) != 0xE6)
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) &&
           (c & (1u << 9)) && (c & (1u << 10));
}

static struct nb_gcm *gcm_alloc(const uint8_t key[32])
{
    struct nb_gcm *g = aligned_alloc(64, sizeof(*g));
    if (!g)
        return NULL;
    memset(g, 0, sizeof(*g));
    expand_key(key, g->rk);
    derive_hash_key(g);
    return g;
}

void nb_gcm_free(struct nb_gcm *g)
{
    if (!g)
        return;
    OPENSSL_cleanse(g, sizeof(*g));
    free(g);
}

/*
 * Once per process: one message through this code and through OpenSSL,
 * fed in uneven pieces; any difference (a miscompilation, an emulator
 * that fakes the CPU flags) leaves the cipher to OpenSSL.
 */
static int matches_openssl(void)
{
    uint8_t key[32], iv[12], aad[12], pt[1200], a[1200], b[1200], ta[16], tb[16];
    static const size_t cuts[] = {5, 11, 300, 16, 256, 600};
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    struct nb_gcm *g;
    int n = 0, ok;

    for (size_t i = 0; i < sizeof(pt); i++)
        pt[i] = (uint8_t)(i * 131 + (i >> 3));
    for (int i = 0; i < 32; i++)
        key[i] = (uint8_t)(7 * i + 1);
    memcpy(iv, key + 3, 12);
    memcpy(aad, key + 17, 12);
    g = gcm_alloc(key);
    ok = g && ctx &&
         EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, iv) &&
         EVP_EncryptUpdate(ctx, NULL, &n, aad, 12) &&
         EVP_EncryptUpdate(ctx, a, &n, pt, (int)sizeof(pt)) &&
         EVP_EncryptFinal_ex(ctx, a + n, &n) &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, ta);
    if (ok) {
        size_t at = 0;
        nb_gcm_start(g, iv, aad, 12);
        for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
            size_t piece = at + cuts[i] > sizeof(pt) ? sizeof(pt) - at : cuts[i];
            nb_gcm_crypt(g, pt + at, b + at, piece, 0);
            at += piece;
        }
        nb_gcm_crypt(g, pt + at, b + at, sizeof(pt) - at, 0);
        nb_gcm_finish(g, tb);
        ok = !memcmp(a, b, sizeof(a)) && !memcmp(ta, tb, 16);
    }
    EVP_CIPHER_CTX_free(ctx);
    nb_gcm_free(g);
    return ok;
}

static int usable;
static pthread_once_t checked = PTHREAD_ONCE_INIT;

static void check_once(void)
{
    usable = cpu_has_it() && matches_openssl();
}

struct nb_gcm *nb_gcm_new(const uint8_t key[32])
{
    pthread_once(&checked, check_once);
    return usable ? gcm_alloc(key) : NULL;
}

#else   /* not x86-64: OpenSSL's path only */

struct nb_gcm *nb_gcm_new(const uint8_t key[32]) { return NULL; }
void nb_gcm_free(struct nb_gcm *g) {}
void nb_gcm_start(struct nb_gcm *g, const uint8_t iv[12], const uint8_t *aad,
                  size_t n) {}
void nb_gcm_crypt(struct nb_gcm *g, const uint8_t *in, uint8_t *out, size_t n,
                  int decrypt) {}
void nb_gcm_finish(struct nb_gcm *g, uint8_t tag[16]) {}

#endif
