/*
 * STREAM frames (PROTOCOL.md, "Streams"): a stream disk's bytes, in two
 * parts, on page channel 1.  Layout only; core/stream.c moves the bytes.
 */
#include <stdio.h>

#include "wire/wire.h"

static void put_hdr(uint8_t *frame, uint32_t round, uint16_t stream, uint8_t part,
                    uint8_t flags)
{
    nb_put32(frame, round);
    nb_put16(frame + 4, stream);
    frame[6] = part;
    frame[7] = flags;
}

/* The header of a data frame; its bytes follow at frame + NB_STREAM_HDR. */
void nb_stream_data_put(uint8_t *frame, uint32_t round, uint16_t stream,
                        uint8_t part)
{
    put_hdr(frame, round, stream, part, 0);
}

/* An end frame (the part's length and CRC-32C); returns its payload length. */
size_t nb_stream_end_put(uint8_t *frame, uint32_t round, uint16_t stream,
                         uint8_t part, uint64_t total, uint32_t crc)
{
    put_hdr(frame, round, stream, part, NB_STREAM_END);
    nb_put64(frame + NB_STREAM_HDR, total);
    nb_put32(frame + NB_STREAM_HDR + 8, crc);
    nb_put32(frame + NB_STREAM_HDR + 12, 0);
    return NB_STREAM_HDR + NB_STREAM_END_LEN;
}

/*
 * Parse a STREAM frame: part 0 or 1, flags 0 or END; a data frame carries
 * at least one byte, an end frame exactly its 16-byte trailer (reserved
 * word zero).  Whether the stream exists and the part is the current one
 * is the caller's check.
 */
int nb_stream_parse(const struct nb_frame *f, struct nb_stream_msg *s, char *err)
{
    const uint8_t *p = f->payload;

    if (f->type != NB_MSG_STREAM || f->len < NB_STREAM_HDR) {
        snprintf(err, NB_ERRLEN, "STREAM frame of %u bytes has no header", f->len);
        return -1;
    }
    s->round = nb_get32(p);
    s->stream = nb_get16(p + 4);
    s->part = p[6];
    s->end = p[7] == NB_STREAM_END;
    s->len = f->len - NB_STREAM_HDR;
    s->data = p + NB_STREAM_HDR;
    s->total = 0;
    s->crc = 0;
    if (s->part >= NB_STREAM_PARTS || (p[7] & ~NB_STREAM_END)) {
        snprintf(err, NB_ERRLEN, "STREAM frame with part %u, flags %#x", s->part,
                 p[7]);
        return -1;
    }
    if (!s->end) {
        if (s->len == 0) {
            snprintf(err, NB_ERRLEN, "empty STREAM data frame");
            return -1;
        }
        return 0;
    }
    if (s->len != NB_STREAM_END_LEN || nb_get32(s->data + 12) != 0) {
        snprintf(err, NB_ERRLEN, "STREAM end frame of %u bytes (or reserved "
                 "bits set)", s->len);
        return -1;
    }
    s->total = nb_get64(s->data);
    s->crc = nb_get32(s->data + 8);
    s->len = 0;
    return 0;
}
