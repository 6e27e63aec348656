/*
 * Engine-side helpers for the wire targets: frames built from the input
 * with the engine's own sender (nb_send_frame into a memory file, sealed
 * with a fixed key when asked), optionally corrupted, then handed to the
 * destination's receive path through a stream socket (fuzz_util.h).
 *
 * Input layout of a "built" stream (after the target's own header):
 *   repeated { u8 type, u16 length, length bytes of payload }
 * A corruption is { u16 offset, u8 xor } applied to the built stream.
 */
#ifndef NB_FUZZ_WIRE_H
#define NB_FUZZ_WIRE_H

#define _GNU_SOURCE
#include <sys/mman.h>

#include "fuzz_util.h"
#include "wire/wire.h"

#define FZ_MAX_FRAMES 16
#define FZ_MAX_CORRUPT 3

/* The fixed session key and id of every sealed or joined test stream. */
static const uint8_t FZ_KEY[NB_KEY] = {
    0x6e, 0x62, 0x2d, 0x66, 0x75, 0x7a, 0x7a, 0x2d, 0x6b, 0x65, 0x79, 0x01,
    0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d,
    0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15,
};
static const uint8_t FZ_SID[NB_SID] = "fuzz-session-id";

/* A sending channel that writes into a memory file. */
static inline void fz_writer_open(struct nb_chan *w, uint16_t index, int sealed)
{
    char err[NB_ERRLEN];

    memset(w, 0, sizeof(*w));
    w->index = index;
    if ((w->fd = memfd_create("nb-fuzz", MFD_CLOEXEC)) < 0)
        abort();
    if (sealed && nb_seal_start(w, FZ_KEY, 1, err) < 0)
        abort();
}

/* Frames from the input records, sent on `w` (at most `max`). */
static inline void fz_send_frames(struct fz *in, struct nb_chan *w, int max)
{
    char err[NB_ERRLEN];

    for (int i = 0; i < max && in->n; i++) {
        uint8_t type = fz_u8(in);
        size_t len;
        const uint8_t *p = fz_take(in, fz_u16(in), &len);
        if (nb_send_frame(w, type, p, (uint32_t)len, err) < 0)
            abort();
    }
}

/* The writer's bytes (malloc()ed, *len of them); closes the writer. */
static inline uint8_t *fz_writer_take(struct nb_chan *w, size_t *len)
{
    off_t end = lseek(w->fd, 0, SEEK_END);
    uint8_t *buf = malloc(end > 0 ? (size_t)end : 1);

    if (end < 0 || !buf || pread(w->fd, buf, (size_t)end, 0) != end)
        abort();
    close(w->fd);
    nb_seal_free(w);
    *len = (size_t)end;
    return buf;
}

/* Apply the corruptions in `cz` (u16 offset, u8 xor each) to buf. */
static inline void fz_corrupt(struct fz cz, uint8_t *buf, size_t len)
{
    while (cz.n >= 3) {
        uint16_t at = fz_u16(&cz);
        uint8_t x = fz_u8(&cz);
        if (len)
            buf[at % len] ^= x;
    }
}

/* Seed helper: append a { type, length, payload } record. */
static inline void fz_put_frame(struct fz_buf *b, uint8_t type, const void *p,
                                uint16_t len)
{
    fz_put8(b, type);
    fz_put16(b, len);
    fz_put(b, p, len);
}

#endif
