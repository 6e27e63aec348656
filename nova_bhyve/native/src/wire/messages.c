/*
 * The typed messages after the handshake: page frames and their records,
 * ROUND_END, DIGEST, and the text and empty control frames.  Sizes are
 * the NB_*_LEN / NB_*_HDR constants of wire.h (PROTOCOL.md).
 */
#include <stdio.h>
#include <string.h>

#include "wire/wire.h"

/* Send REFUSE or ABORT with a reason. */
int nb_send_text(struct nb_chan *c, uint8_t type, const char *text, char *err)
{
    return nb_send_frame(c, type, text, (uint32_t)strlen(text), err);
}

/* Send READY, COMMIT or RUNNING (no payload). */
int nb_send_empty(struct nb_chan *c, uint8_t type, char *err)
{
    return nb_send_frame(c, type, "", 0, err);
}

/* Fill in a PAGES frame's header once its `nrec` records are written. */
void nb_pages_finish(uint8_t *frame, uint32_t round, uint32_t nrec)
{
    nb_put32(frame, round);
    nb_put32(frame + 4, nrec);
}

/* Write a page record's header; its `len` bytes of data follow it. */
void nb_page_rec_put(uint8_t *rec, uint32_t pfn, uint8_t enc, uint16_t len)
{
    nb_put32(rec, pfn);
    rec[4] = enc;
    rec[5] = 0;
    nb_put16(rec + 6, len);
}

/* A PAGES frame's round and record count; -1 if it has no header. */
int nb_pages_parse(const struct nb_frame *f, uint32_t *round, uint32_t *nrec)
{
    if (f->len < NB_PAGES_HDR)
        return -1;
    *round = nb_get32(f->payload);
    *nrec = nb_get32(f->payload + 4);
    return 0;
}

/* Each encoding's record length bounds (PROTOCOL.md, "Page records"). */
static const uint16_t LEN_MIN[] = { [NB_ENC_ZERO] = 0, [NB_ENC_RAW] = NB_PAGE,
                                    [NB_ENC_DELTA] = 1, [NB_ENC_ZSTD] = 1 };
static const uint16_t LEN_MAX[] = { [NB_ENC_ZERO] = 0, [NB_ENC_RAW] = NB_PAGE,
                                    [NB_ENC_DELTA] = NB_PAGE,
                                    [NB_ENC_ZSTD] = NB_PAGE - 1 };

/* Parse one record of `avail` bytes, checking its length before use. */
int nb_page_rec_parse(const uint8_t *rec, size_t avail, struct nb_page_rec *r,
                      char *err)
{
    if (avail < NB_REC_HDR) {
        snprintf(err, NB_ERRLEN, "page record header cut short");
        return -1;
    }
    r->pfn = nb_get32(rec);
    r->enc = rec[4];
    r->len = nb_get16(rec + 6);
    r->data = rec + NB_REC_HDR;
    if (rec[5] != 0 || r->enc > NB_ENC_ZSTD || r->len < LEN_MIN[r->enc] ||
        r->len > LEN_MAX[r->enc] || r->len > avail - NB_REC_HDR) {
        snprintf(err, NB_ERRLEN, "malformed page record (encoding %u, length %u)",
                 r->enc, r->len);
        return -1;
    }
    return 0;
}

/* The pfn of the record after `r` in its frame (`avail`: the bytes from
 * `r`'s header to the frame's end), unchecked: a hint, never applied;
 * 0 when no record follows. */
int nb_page_rec_next_pfn(const struct nb_page_rec *r, size_t avail,
                         uint32_t *pfn)
{
    if (avail - NB_REC_HDR - r->len < NB_REC_HDR)
        return 0;
    *pfn = nb_get32(r->data + r->len);
    return 1;
}

/* Send ROUND_END on a page channel. */
int nb_round_end_send(struct nb_chan *c, const struct nb_round_end *e, char *err)
{
    uint8_t msg[NB_ROUND_END_LEN];
    nb_put32(msg, e->round);
    nb_put32(msg + 4, 0);
    nb_put64(msg + 8, e->pages);
    return nb_send_frame(c, NB_MSG_ROUND_END, msg, sizeof(msg), err);
}

/* Parse a ROUND_END frame; -1 if it is not one. */
int nb_round_end_parse(const struct nb_frame *f, struct nb_round_end *e)
{
    if (f->type != NB_MSG_ROUND_END || f->len != NB_ROUND_END_LEN)
        return -1;
    e->round = nb_get32(f->payload);
    e->pages = nb_get64(f->payload + 8);
    return 0;
}

/* Send DIGEST on the control channel. */
int nb_digest_send(struct nb_chan *c, const struct nb_digest_msg *d, char *err)
{
    uint8_t msg[NB_DIGEST_LEN];
    nb_put32(msg, d->round);
    nb_put32(msg + 4, 0);
    nb_put64(msg + 8, d->digest);
    nb_put64(msg + 16, d->npages);
    nb_put64(msg + 24, d->disk_digest);
    nb_put64(msg + 32, d->nblocks);
    return nb_send_frame(c, NB_MSG_DIGEST, msg, sizeof(msg), err);
}

/* Parse a DIGEST frame; -1 if it is not one. */
int nb_digest_parse(const struct nb_frame *f, struct nb_digest_msg *d)
{
    if (f->type != NB_MSG_DIGEST || f->len != NB_DIGEST_LEN)
        return -1;
    d->round = nb_get32(f->payload);
    d->digest = nb_get64(f->payload + 8);
    d->npages = nb_get64(f->payload + 16);
    d->disk_digest = nb_get64(f->payload + 24);
    d->nblocks = nb_get64(f->payload + 32);
    return 0;
}

/* Send APPLIED on the control channel: round `round` is in guest memory. */
int nb_applied_send(struct nb_chan *c, uint32_t round, char *err)
{
    uint8_t msg[NB_APPLIED_LEN];
    nb_put32(msg, round);
    nb_put32(msg + 4, 0);
    return nb_send_frame(c, NB_MSG_APPLIED, msg, sizeof(msg), err);
}

/* Parse an APPLIED frame; -1 if it is not one. */
int nb_applied_parse(const struct nb_frame *f, uint32_t *round)
{
    if (f->type != NB_MSG_APPLIED || f->len != NB_APPLIED_LEN ||
        nb_get32(f->payload + 4) != 0)
        return -1;
    *round = nb_get32(f->payload);
    return 0;
}

/* Fill in a DISK frame's header once its `nrec` records are written. */
void nb_disk_finish(uint8_t *frame, uint32_t round, uint32_t nrec)
{
    nb_put32(frame, round);
    nb_put32(frame + 4, nrec);
}

/* Write a disk record's header; its `len` bytes of data follow it. */
void nb_disk_rec_put(uint8_t *rec, uint64_t block, uint16_t disk, uint8_t enc,
                     uint16_t len)
{
    nb_put64(rec, block);
    nb_put16(rec + 8, disk);
    rec[10] = enc;
    rec[11] = 0;
    nb_put16(rec + 12, len);
    nb_put16(rec + 14, 0);
}

/* A DISK frame's round and record count; -1 if it has no header. */
int nb_disk_parse(const struct nb_frame *f, uint32_t *round, uint32_t *nrec)
{
    if (f->type != NB_MSG_DISK || f->len < NB_DISK_HDR)
        return -1;
    *round = nb_get32(f->payload);
    *nrec = nb_get32(f->payload + 4);
    return 0;
}

/*
 * Parse one disk record of `avail` bytes: the header's reserved bytes are
 * zero, the encoding is ZERO (no data), RAW (1..4096 bytes: the block, the
 * disk's last one may be short) or ZSTD (1..4095 bytes), and the data fits.
 * Whether the disk and block exist, and RAW's exact length, is the
 * caller's check (it knows the disks).
 */
int nb_disk_rec_parse(const uint8_t *rec, size_t avail, struct nb_disk_rec *r,
                      char *err)
{
    if (avail < NB_DREC_HDR) {
        snprintf(err, NB_ERRLEN, "disk record header cut short");
        return -1;
    }
    r->block = nb_get64(rec);
    r->disk = nb_get16(rec + 8);
    r->enc = rec[10];
    r->len = nb_get16(rec + 12);
    r->data = rec + NB_DREC_HDR;
    if (rec[11] != 0 || nb_get16(rec + 14) != 0 ||
        (r->enc != NB_ENC_ZERO && r->enc != NB_ENC_RAW && r->enc != NB_ENC_ZSTD) ||
        (r->enc == NB_ENC_ZERO) != (r->len == 0) || r->len > NB_DISK_BLOCK ||
        (r->enc == NB_ENC_ZSTD && r->len >= NB_DISK_BLOCK) ||
        r->len > avail - NB_DREC_HDR) {
        snprintf(err, NB_ERRLEN, "malformed disk record (encoding %u, length %u)",
                 r->enc, r->len);
        return -1;
    }
    return 0;
}
