/*
 * Target "delta": the page decoders on their own.  nb_delta_decode of an
 * arbitrary record into a page; zstd decompression into one page with
 * the destination's exact call (core/receiver.c, decode_record); and the
 * delta encoder's round trip: decode(encode(old, cur)) applied to old
 * must give cur.
 *
 * Input: u8 mode, then the record (modes 0, 1) or a page edit script
 * (mode 2: repeated u16 offset, u8 length, bytes to write into cur).
 */
#include <zstd.h>

#include "core/codec.h"
#include "fuzz_util.h"

static uint8_t *page_with(uint8_t fill)
{
    uint8_t *p = malloc(NB_PAGE);
    if (!p)
        abort();
    memset(p, fill, NB_PAGE);
    return p;
}

static void round_trip(struct fz *in)
{
    uint8_t *old = page_with(0x11), *cur = page_with(0x11), *out = page_with(0);
    uint8_t enc[NB_PAGE];
    size_t n;

    for (size_t i = 0; i < NB_PAGE; i++)
        old[i] = cur[i] = (uint8_t)(i * 31);
    while (in->n) {
        uint16_t at = fz_u16(in) % NB_PAGE;
        size_t len;
        const uint8_t *p = fz_take(in, fz_u8(in), &len);
        if (len > NB_PAGE - at)
            len = NB_PAGE - at;
        memcpy(cur + at, p, len);
    }
    n = nb_delta_encode(old, cur, enc, sizeof(enc));
    if (n) {
        memcpy(out, old, NB_PAGE);
        if (n > sizeof(enc) || nb_delta_decode(enc, n, out) < 0 ||
            memcmp(out, cur, NB_PAGE) != 0)
            abort();    /* the encoder wrote a delta its decoder refuses */
    }
    free(old);
    free(cur);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static ZSTD_DCtx *zctx;
    struct fz in = { data, size };
    uint8_t mode = fz_u8(&in) % 3, tmp[NB_PAGE], *page;
    size_t n;

    if (size > 2 * NB_PAGE)
        return -1;
    if (!zctx && !(zctx = ZSTD_createDCtx()))
        abort();
    if (mode == 2) {
        round_trip(&in);
        return 0;
    }
    page = page_with(0xcc);
    if (mode == 0) {
        nb_delta_decode(in.p, in.n, page);
    } else if (in.n >= 1 && in.n <= NB_PAGE - 1) {   /* ZSTD record bounds */
        n = ZSTD_decompressDCtx(zctx, tmp, NB_PAGE, in.p, in.n);
        if (!ZSTD_isError(n) && n == NB_PAGE)
            memcpy(page, tmp, NB_PAGE);
    }
    free(page);
    return 0;
}

/* Seeds: a delta, a zstd page and an edit script. */
static void fuzz_seeds(const char *dir)
{
    static uint8_t old[NB_PAGE], cur[NB_PAGE];
    uint8_t out[1 + NB_PAGE];
    size_t n;

    for (size_t i = 0; i < NB_PAGE; i += 97)
        cur[i] = (uint8_t)i;
    out[0] = 0;
    n = nb_delta_encode(old, cur, out + 1, NB_PAGE);
    fz_seed(dir, "delta", out, n + 1);
    out[0] = 1;
    n = ZSTD_compress(out + 1, NB_PAGE - 1, cur, NB_PAGE, 3);
    if (ZSTD_isError(n))
        abort();
    fz_seed(dir, "zstd", out, n + 1);
    memcpy(out, "\x02\x10\x00\x05" "hello" "\xf0\x0f\x03" "abc", 13);
    fz_seed(dir, "edits", out, 13);
}
