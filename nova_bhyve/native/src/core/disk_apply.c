/*
 * Destination: a page channel's DISK frames written to the disk files
 * (PROTOCOL.md, "Disks").  Every record is checked, decoded and written
 * in the order it came.
 *
 * Whole blocks at consecutive offsets of one disk gather in the
 * receiver's run buffer and go out in one direct write (O_DIRECT, past
 * the page cache: the copy is written once and fsynced at the next
 * APPLIED, so caching it only costs the copy and the memory).  Zeros, a
 * disk's short last block, and blocks of a file system that has no
 * direct I/O or refuses it go through the page cache, whose write-back
 * starts as they come.  A run may span frames; it is written at its
 * channel's ROUND_END at the latest (nb_disk_rx_flush), so a round is in
 * its files once every channel has ended it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#include "core/nbmig.h"

/* Bytes a destination writes to a disk before it starts their write-back. */
#define NB_WRITEBACK_KICK (8u << 20)

/* pwrite all `len` bytes of `data` at `off`; -1 with errno. */
static int write_all(int fd, const uint8_t *data, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t w = pwrite(fd, data + done, len - done, (off_t)(off + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            if (w == 0)
                errno = EIO;    /* no progress */
            return -1;
        }
        done += (size_t)w;
    }
    return 0;
}

static int write_failed(const struct nb_disk *d, uint64_t off, char *err)
{
    snprintf(err, NB_ERRLEN, "writing disk %s at %llu: %s", d->path,
             (unsigned long long)off, strerror(errno));
    return -1;
}

/*
 * Every NB_WRITEBACK_KICK bytes written to `d` through the page cache,
 * start their write-back without waiting for it, so the fsync before the
 * next APPLIED finds little left to write while the guest still runs on
 * the source (Linux's sync_file_range; elsewhere that fsync writes it
 * all, and reports any error: this one's are left to it).
 */
static void start_writeback(struct nb_disk *d, size_t len)
{
#ifdef __linux__
    if (atomic_fetch_add(&d->unsynced, len) + len >= NB_WRITEBACK_KICK) {
        atomic_store(&d->unsynced, 0);
        (void)sync_file_range(d->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    }
#else
    (void)d;
    (void)len;
#endif
}

/* Write `len` bytes through the page cache: zeros as a hole where the
 * system punches one.  -1 with err (a file error). */
static int write_cached(struct nb_disk *d, const uint8_t *data, size_t len,
                        uint64_t off, int zero, char *err)
{
#ifdef FALLOC_FL_PUNCH_HOLE
    if (zero && fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          (off_t)off, (off_t)len) == 0)
        return 0;
#endif
    if (write_all(d->fd, data, len, off) < 0)
        return write_failed(d, off, err);
    start_writeback(d, len);
    return 0;
}

/*
 * Write the receiver's run, if any: directly, or through the page cache
 * where the file system refuses direct I/O for it (EINVAL).  Called when
 * a block does not extend the run, and at the channel's ROUND_END, so
 * that a round is in its files once every channel has ended it.  -1 with
 * err.
 */
int nb_disk_rx_flush(struct nb_mig *m, struct nb_disk_rx *rx, char *err)
{
    struct nb_disk *d = &m->disk[rx->disk];
    size_t len = (size_t)rx->count * NB_DISK_BLOCK;
    uint64_t off = rx->first * NB_DISK_BLOCK;

    if (!rx->count)
        return 0;
    rx->count = 0;
    if (write_all(d->dfd, rx->run, len, off) == 0)
        return 0;
    if (errno != EINVAL)
        return write_failed(d, off, err);
    return write_cached(d, rx->run, len, off, 0, err);
}

/*
 * Make block b of disk i the run's next, writing the run first unless b
 * extends it.  Returns the slot to decode b into, or NULL: with err set
 * if that write failed, with err empty if no run buffer could be had
 * (the block then goes through the page cache).
 */
static uint8_t *run_next(struct nb_mig *m, struct nb_disk_rx *rx, int i,
                         uint64_t b, char *err)
{
    err[0] = 0;
    if (rx->count && (rx->disk != i || rx->first + rx->count != b ||
                      rx->count == NB_DISK_RUN_BLOCKS) &&
        nb_disk_rx_flush(m, rx, err) < 0)
        return NULL;
    if (!rx->run && posix_memalign((void **)&rx->run, NB_DISK_BLOCK,
                                   NB_DISK_RUN_BLOCKS * NB_DISK_BLOCK) != 0) {
        rx->run = NULL;
        return NULL;
    }
    if (!rx->count) {
        rx->disk = i;
        rx->first = b;
    }
    return rx->run + (size_t)rx->count * NB_DISK_BLOCK;
}

/*
 * Decode a checked record into `out` (a block's bytes, zero-padded to a
 * full block): 1 if undecodable (RAW of the wrong length, ZSTD that does
 * not give exactly the block).
 */
static int decode_block(void **zctx, const struct nb_disk_rec *r, uint32_t len,
                        uint8_t *out)
{
    size_t n;
    memset(out, 0, NB_DISK_BLOCK);
    switch (r->enc) {
    case NB_ENC_ZERO:
        return 0;
    case NB_ENC_RAW:
        if (r->len != len)
            return 1;
        memcpy(out, r->data, len);
        return 0;
    case NB_ENC_ZSTD:
        if (!*zctx && !(*zctx = ZSTD_createDCtx()))
            return 1;
        n = ZSTD_decompressDCtx(*zctx, out, NB_DISK_BLOCK, r->data, r->len);
        return ZSTD_isError(n) || n != len;
    }
    return 1;
}

/* A parsed record names a block of a disk, on the channel it belongs to. */
static int check_record(struct nb_mig *m, int nchan, int chan,
                        const struct nb_disk_rec *r, char *err)
{
    if (r->disk >= m->ndisks || r->block >= m->disk[r->disk].blocks) {
        snprintf(err, NB_ERRLEN, "disk record for block %llu of disk %u: no such "
                 "block", (unsigned long long)r->block, r->disk);
        return -1;
    }
    if ((r->block / 64) % (uint64_t)nchan + 1 != (uint64_t)chan) {
        snprintf(err, NB_ERRLEN, "disk record for block %llu of disk %u on "
                 "channel %d; it belongs to channel %llu",
                 (unsigned long long)r->block, r->disk, chan,
                 (unsigned long long)((r->block / 64) % (uint64_t)nchan + 1));
        return -1;
    }
    return 0;
}

/* Check, decode and write (or gather) one record; *used = its size on
 * the wire.  -1 with err and *kind. */
static int apply_block(struct nb_mig *m, int nchan, int chan, struct nb_disk_rx *rx,
                       const uint8_t *rec, size_t avail, size_t *used, int *kind,
                       char *err)
{
    struct nb_disk_rec r;
    uint8_t block[NB_DISK_BLOCK], *out = NULL;
    struct nb_disk *d;
    uint32_t len;

    if (nb_disk_rec_parse(rec, avail, &r, err) < 0 ||
        check_record(m, nchan, chan, &r, err) < 0)
        return -1;
    d = &m->disk[r.disk];
    len = nb_disk_block_len(d, r.block);
    if (d->dfd >= 0 && r.enc != NB_ENC_ZERO && len == NB_DISK_BLOCK) {
        out = run_next(m, rx, r.disk, r.block, err);
        if (!out && err[0]) {
            *kind = NB_ERR_VMM;
            return -1;
        }
    }
    if (decode_block(&rx->zctx, &r, len, out ? out : block)) {
        snprintf(err, NB_ERRLEN, "undecodable disk record (encoding %u, %u bytes) "
                 "for block %llu of disk %u", r.enc, r.len,
                 (unsigned long long)r.block, r.disk);
        return -1;
    }
    if (out)
        rx->count++;
    else if (write_cached(d, block, len, r.block * NB_DISK_BLOCK,
                          r.enc == NB_ENC_ZERO, err) < 0) {
        *kind = NB_ERR_VMM;
        return -1;
    }
    if (m->p.verify == NB_VERIFY_INCREMENTAL)
        nb_disk_set_term(m, chan - 1, r.disk, r.block, r.enc == NB_ENC_ZERO ? 0
                         : nb_disk_block_term(m, r.disk, r.block,
                                              out ? out : block, len));
    *used = NB_DREC_HDR + r.len;
    return 0;
}

/*
 * Destination: apply a DISK frame of round `round` that arrived on page
 * channel `chan` of `nchan`.  Every index and length is checked before
 * use.  -1 with err and *kind (CORRUPT, or VMM for a file that fails).
 */
int nb_disk_apply(struct nb_mig *m, int nchan, int chan, struct nb_disk_rx *rx,
                  const struct nb_frame *f, uint32_t round, int *kind, char *err)
{
    size_t pos = NB_DISK_HDR;
    uint32_t got = 0, n = 0;

    *kind = NB_ERR_CORRUPT;
    if (nb_disk_parse(f, &got, &n) < 0 || got != round) {
        snprintf(err, NB_ERRLEN, "channel %d: disk blocks for round %u while in "
                 "round %u", chan, got, round);
        return -1;
    }
    for (uint32_t i = 0; i < n; i++) {
        size_t used;
        if (apply_block(m, nchan, chan, rx, f->payload + pos, f->len - pos,
                        &used, kind, err) < 0) {
            rx->count = 0;      /* the session fails: its run is dropped */
            return -1;
        }
        pos += used;
    }
    if (pos != f->len) {
        snprintf(err, NB_ERRLEN, "channel %d: %zu stray bytes after %u disk "
                 "records", chan, (size_t)f->len - pos, n);
        rx->count = 0;
        return -1;
    }
    atomic_fetch_add(&m->disk_blocks, n);
    atomic_fetch_add(&m->disk_bytes, NB_FRAME_HDR + f->len + (f->flags & 1 ? NB_TAG : 0));
    return 0;
}

/* Free a receiver's DISK state (at the session's end). */
void nb_disk_rx_free(struct nb_disk_rx *rx)
{
    ZSTD_freeDCtx(rx->zctx);
    free(rx->run);
    memset(rx, 0, sizeof(*rx));
}
