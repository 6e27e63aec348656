/*
 * Target "frame": the destination's frame receive path, nb_recv_frame and
 * nb_expect (header checks, length limits, sequence, CRC, and with a
 * fixed key the AES-256-GCM open), then the typed message parsers on what
 * it accepts (the source's APPLIED parser included, and a DISK frame's
 * records).
 *
 * Input: u8 mode, u8 select, corruptions, then the stream.
 *   mode   bit 0: the stream is the rest of the input as raw bytes;
 *                 else frames built from records (fuzz_wire.h)
 *          bit 1: built frames are sealed (both ends keyed)
 *          bit 2: receive with nb_expect instead of nb_recv_frame
 *          bits 3-4: number of corruptions (u16 offset, u8 xor each)
 *   select bits 0-2: the length limit; bits 3-4: the receiving channel
 *          (0, 1, 2 or 0xffff, "any"); bits 5-7: nb_expect's type
 */
#include "fuzz_wire.h"

static const uint32_t LIMITS[8] = {
    NB_MAX_PAGES_FRAME, NB_MAX_CTRL_FRAME, NB_MAX_REASON, NB_MAX_ACK,
    NB_MAX_JOIN_FRAME, NB_MAX_PREAMBLE, 0, NB_HELLO_LEN,
};
static const uint16_t CHANNELS[4] = { 0, 1, 2, 0xffff };
static const uint8_t EXPECT[8] = {
    NB_MSG_PAGES, NB_MSG_ROUND_END, NB_MSG_DIGEST, NB_MSG_STATE,
    NB_MSG_READY, NB_MSG_PREAMBLE, NB_MSG_COMMIT, NB_MSG_HELLO,
};

/* What the destination does with a frame it accepted. */
static void use_frame(const struct nb_frame *f)
{
    char text[NB_PEER_TEXT], err[NB_ERRLEN];
    struct nb_round_end e;
    struct nb_digest_msg d;
    struct nb_page_rec r;
    uint32_t round, nrec;
    size_t pos = NB_PAGES_HDR;

    nb_peer_text(f, text);
    nb_round_end_parse(f, &e);
    nb_digest_parse(f, &d);
    nb_applied_parse(f, &round);
    if (f->type == NB_MSG_DISK && nb_disk_parse(f, &round, &nrec) == 0) {
        struct nb_disk_rec dr;
        for (uint32_t i = 0; i < nrec && pos <= f->len; i++) {
            if (nb_disk_rec_parse(f->payload + pos, f->len - pos, &dr, err) < 0)
                break;
            pos += NB_DREC_HDR + dr.len;
        }
        return;
    }
    if (f->type != NB_MSG_PAGES || nb_pages_parse(f, &round, &nrec) < 0)
        return;
    for (uint32_t i = 0; i < nrec && pos <= f->len; i++) {
        if (nb_page_rec_parse(f->payload + pos, f->len - pos, &r, err) < 0)
            break;
        pos += NB_REC_HDR + r.len;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz in = { data, size };
    uint8_t mode = fz_u8(&in), sel = fz_u8(&in);
    struct fz cz = fz_split(&in, 3u * ((mode >> 3) & 3));
    uint16_t index = CHANNELS[(sel >> 3) & 3];
    int sealed = !(mode & 1) && (mode & 2), peer, rc;
    struct nb_chan c = { .index = index };
    char err[NB_ERRLEN];
    uint8_t *stream;
    size_t len;

    if (size > 200000)
        return -1;
    if (mode & 1) {
        len = in.n;
        stream = malloc(len + 1);
        memcpy(stream, in.p, len);
    } else {
        struct nb_chan w;
        fz_writer_open(&w, index, sealed);
        fz_send_frames(&in, &w, FZ_MAX_FRAMES);
        stream = fz_writer_take(&w, &len);
    }
    fz_corrupt(cz, stream, len);
    c.fd = fz_stream(stream, len, &peer);
    free(stream);
    if (sealed && nb_seal_start(&c, FZ_KEY, 0, err) < 0)
        abort();
    memset(err, 'X', sizeof(err));
    for (int i = 0; i < FZ_MAX_FRAMES; i++) {
        struct nb_frame f;
        rc = mode & 4 ? nb_expect(&c, &f, EXPECT[sel >> 5], LIMITS[sel & 7], err)
                      : nb_recv_frame(&c, &f, LIMITS[sel & 7], err);
        if (fz_debug("frame", rc, err) < 0)
            break;
        use_frame(&f);
    }
    nb_seal_free(&c);
    free(c.rbuf);
    close(c.fd);
    close(peer);
    return 0;
}

/* Seeds: control and page frames (PAGES, DISK, ROUND_END), plain and
 * sealed, as the source sends them. */
static void fuzz_seeds(const char *dir)
{
    static const char *names[] = { "plain", "sealed" };
    uint8_t pages[NB_PAGES_HDR + 2 * NB_REC_HDR + NB_PAGE];
    uint8_t rend[NB_ROUND_END_LEN] = { 0 }, dig[NB_DIGEST_LEN] = { 0 };
    uint8_t applied[NB_APPLIED_LEN] = { 3 };    /* round 3 */
    uint8_t disk[NB_DISK_HDR + 2 * NB_DREC_HDR + 512];

    memset(disk, 0xcd, sizeof(disk));
    nb_disk_finish(disk, 0, 2);
    nb_disk_rec_put(disk + NB_DISK_HDR, 7, 0, NB_ENC_ZERO, 0);
    nb_disk_rec_put(disk + NB_DISK_HDR + NB_DREC_HDR, 8, 1, NB_ENC_RAW, 512);
    memset(pages, 0xab, sizeof(pages));
    nb_pages_finish(pages, 0, 2);
    nb_page_rec_put(pages + NB_PAGES_HDR, 5, NB_ENC_ZERO, 0);
    nb_page_rec_put(pages + NB_PAGES_HDR + NB_REC_HDR, 6, NB_ENC_RAW, NB_PAGE);
    nb_put64(rend + 8, 2);
    nb_put64(dig + 16, 2);
    for (int s = 0; s < 2; s++) {
        struct fz_buf b = { 0 };
        char name[64];

        fz_put8(&b, (uint8_t)(s << 1));
        fz_put8(&b, 1 << 3);            /* page-frame limit, channel 1 */
        fz_put_frame(&b, NB_MSG_PAGES, pages, sizeof(pages));
        fz_put_frame(&b, NB_MSG_DISK, disk, sizeof(disk));
        fz_put_frame(&b, NB_MSG_ROUND_END, rend, sizeof(rend));
        snprintf(name, sizeof(name), "pages-%s", names[s]);
        fz_seed(dir, name, b.p, b.len);
        b.len = 0;
        fz_put8(&b, (uint8_t)(s << 1 | 4));
        fz_put8(&b, 1 | 2 << 5);        /* control limit, channel 0, DIGEST */
        fz_put_frame(&b, NB_MSG_DIGEST, dig, sizeof(dig));
        fz_put_frame(&b, NB_MSG_APPLIED, applied, sizeof(applied));
        fz_put_frame(&b, NB_MSG_ABORT, "source gave up\n\x01", 16);
        snprintf(name, sizeof(name), "control-%s", names[s]);
        fz_seed(dir, name, b.p, b.len);
        free(b.p);
    }
    {   /* a raw stream: one plaintext READY frame on channel 0 */
        uint8_t raw[2 + NB_FRAME_HDR] = { 1, 3 };
        uint8_t *h = raw + 2;
        h[0] = NB_MSG_READY;
        nb_put32(h + NB_FRAME_CRC_AT, nb_crc32c(0, h, NB_FRAME_CRC_AT));
        fz_seed(dir, "raw-ready", raw, sizeof(raw));
    }
}
