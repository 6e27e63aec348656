/*
 * Disks moved with the guest (PROTOCOL.md, "Disks"): the source reads its
 * disk files and the vmm's dirty-block log, and its senders put the blocks
 * in DISK frames on the page channels after each round's pages; the
 * destination writes them into its own files with pwrite, starts their
 * write-back as it goes, and fsyncs them before each APPLIED and before
 * READY.  Both sides keep the disks' digest as they go.
 *
 * Files are opened beneath a descriptor of their directory, the last
 * component never through a link (as vmm_ckpt.c opens a checkpoint).  A
 * destination creates a missing file (and removes it again if the
 * migration fails) or truncates an existing one, which then stays the
 * caller's: a failed migration leaves it truncated and partly written.
 *
 * Each side holds an advisory lock (flock) on its files for the session:
 * the source a shared one, the destination an exclusive one taken before
 * it truncates anything, so a destination pointed at a disk that a
 * source on the same host is moving refuses instead of destroying it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "core/source.h"

/* Block b's bytes on disk d (the last block of a disk may be short). */
static uint32_t block_len(const struct nb_disk *d, uint64_t b)
{
    uint64_t left = d->size - b * NB_DISK_BLOCK;
    return left < NB_DISK_BLOCK ? (uint32_t)left : NB_DISK_BLOCK;
}

/* Open `path`'s directory (not through a link) and the name beneath it. */
static int open_dir(struct nb_disk *d, char *err)
{
    char dir[1024];
    const char *slash = strrchr(d->path, '/');
    const char *name = slash ? slash + 1 : d->path;

    if (!*name || !strcmp(name, ".") || !strcmp(name, "..") ||
        strlen(name) >= sizeof(d->name) || strlen(d->path) >= sizeof(dir)) {
        snprintf(err, NB_ERRLEN, "disk path %s does not end in a file name "
                 "(or is too long)", d->path);
        return -1;
    }
    snprintf(d->name, sizeof(d->name), "%s", name);
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == d->path)
        snprintf(dir, sizeof(dir), "/");
    else
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - d->path), d->path);
    d->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (d->dirfd < 0) {
        snprintf(err, NB_ERRLEN, "disk directory %s: %s", dir,
                 errno == ELOOP || errno == ENOTDIR
                     ? "is a symbolic link or not a directory" : strerror(errno));
        return -1;
    }
    return 0;
}

/* The file, opened as asked; a regular file or an error naming why not. */
static int open_file(struct nb_disk *d, int flags, char *err)
{
    struct stat st;

    /* O_NONBLOCK: a FIFO or device planted there must not block the open */
    d->fd = openat(d->dirfd, d->name, flags | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK,
                   0600);
    if (d->fd < 0 || fstat(d->fd, &st) < 0) {
        int e = errno;
        snprintf(err, NB_ERRLEN, "cannot open disk %s: %s", d->path,
                 e == ELOOP ? "it is a symbolic link" : strerror(e));
        errno = e;
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, NB_ERRLEN, "disk %s is not a regular file", d->path);
        return -1;
    }
    d->size = (uint64_t)st.st_size;
    return 0;
}

/* Take the session's advisory lock on the file, without waiting. */
static int lock_file(struct nb_disk *d, int how, char *err)
{
    if (flock(d->fd, how | LOCK_NB) == 0)
        return 0;
    snprintf(err, NB_ERRLEN, "disk %s is in use: %s", d->path,
             errno == EWOULDBLOCK ? "another migration holds it (the source's "
             "own disk, on this host?)" : strerror(errno));
    return -1;
}

/* Size the bitmaps and term table of a disk of d->size bytes. */
static int size_tables(struct nb_disk *d, int source, char *err)
{
    d->blocks = (d->size + NB_DISK_BLOCK - 1) / NB_DISK_BLOCK;
    d->words = (size_t)((d->blocks + 63) / 64);
    d->term = calloc(d->blocks ? d->blocks : 1, sizeof(uint64_t));
    if (source) {
        d->pending = calloc(d->words ? d->words : 1, 8);
        d->log = calloc(d->words ? d->words : 1, 8);
    }
    if (!d->term || (source && (!d->pending || !d->log))) {
        snprintf(err, NB_ERRLEN, "out of memory for disk %s's tables", d->path);
        return -1;
    }
    return 0;
}

/* The disks' size in all, in the statistics. */
static void publish_total(struct nb_mig *m)
{
    uint64_t total = 0;
    for (int i = 0; i < m->ndisks; i++)
        total += m->disk[i].size;
    pthread_mutex_lock(&m->lock);
    m->st.disk_total = total;
    pthread_mutex_unlock(&m->lock);
}

/* The disks attached to the VM (a detached one has no dirty-block log). */
static int attached_disks(const struct nb_mig *m)
{
    int n = 0;
    for (int i = 0; i < m->ndisks; i++)
        n += m->disk[i].vmm_index >= 0;
    return n;
}

/*
 * Source: open every disk read-only and describe them for the preamble.
 * The vmm must report the attached disks' writes (a dirty-block log)
 * unless the mode is cold, and agree on each one's size.  Returns 0 or
 * the negated kind.
 */
int nb_disk_open_source(struct nb_mig *m, struct nb_disk_spec *spec, char *err)
{
    memset(spec, 0, sizeof(*spec));
    /* cold: the VM does not run, so its files do not change meanwhile */
    if (attached_disks(m) && !m->vmm.ops->disk_dirty_log &&
        m->p.mode != NB_MODE_COLD) {
        snprintf(err, NB_ERRLEN, "moving disks with the migration is not "
                 "supported on %s yet (its vmm port has no dirty-block log)",
                 m->vmm.ops->kind);
        return -NB_ERR_INVALID;
    }
    for (int i = 0; i < m->ndisks; i++) {
        struct nb_disk *d = &m->disk[i];
        if (open_dir(d, err) < 0 || open_file(d, O_RDONLY, err) < 0 ||
            lock_file(d, LOCK_SH, err) < 0)
            return -NB_ERR_INVALID;
        if (d->size == 0 || d->size % 512 || d->size > NB_MAX_DISK_SIZE) {
            snprintf(err, NB_ERRLEN, "disk %s: %llu bytes is not a whole number "
                     "of 512-byte sectors up to 16 TiB", d->path,
                     (unsigned long long)d->size);
            return -NB_ERR_INVALID;
        }
        if (size_tables(d, 1, err) < 0)
            return -NB_ERR_RESOURCE;
        spec->size[i] = d->size;
    }
    spec->ndisks = (uint32_t)m->ndisks;
    publish_total(m);
    return 0;
}

/* Create `d` afresh, or truncate the file that is there to nothing. */
static int create_or_truncate(struct nb_disk *d, char *err)
{
    if (open_file(d, O_RDWR | O_CREAT | O_EXCL, err) == 0) {
        d->created = 1;
        return lock_file(d, LOCK_EX, err);
    }
    if (d->fd >= 0 || errno != EEXIST)
        return -1;
    if (open_file(d, O_RDWR, err) < 0 || lock_file(d, LOCK_EX, err) < 0)
        return -1;
    if (ftruncate(d->fd, 0) < 0) {
        snprintf(err, NB_ERRLEN, "cannot truncate disk %s: %s", d->path,
                 strerror(errno));
        return -1;
    }
    return 0;
}

/*
 * Destination: create or truncate each target file to the size the
 * source announced (holes: the blocks that never come read as zeros).
 * Returns 0 or the negated kind.
 */
int nb_disk_open_dest(struct nb_mig *m, const struct nb_disk_spec *spec, char *err)
{
    for (int i = 0; i < m->ndisks; i++) {
        struct nb_disk *d = &m->disk[i];
        if (open_dir(d, err) < 0 || create_or_truncate(d, err) < 0)
            return -NB_ERR_VMM;
        d->size = spec->size[i];
        if (ftruncate(d->fd, (off_t)d->size) < 0) {
            snprintf(err, NB_ERRLEN, "cannot size disk %s to %llu bytes: %s",
                     d->path, (unsigned long long)d->size, strerror(errno));
            return -NB_ERR_VMM;
        }
        if (size_tables(d, 0, err) < 0)
            return -NB_ERR_RESOURCE;
    }
    publish_total(m);
    return 0;
}

/* Destination, the migration failed: remove the files this session created. */
void nb_disk_discard(struct nb_mig *m)
{
    for (int i = 0; i < m->ndisks; i++) {
        struct nb_disk *d = &m->disk[i];
        if (d->created && d->dirfd >= 0)
            unlinkat(d->dirfd, d->name, 0);
        d->created = 0;
    }
}

void nb_disk_close(struct nb_mig *m)
{
    for (int i = 0; i < m->ndisks; i++) {
        struct nb_disk *d = &m->disk[i];
        if (d->fd >= 0)
            close(d->fd);
        if (d->dirfd >= 0)
            close(d->dirfd);
        free(d->path);
        free(d->pending);
        free(d->log);
        free(d->term);
        memset(d, 0, sizeof(*d));
        d->fd = d->dirfd = -1;
    }
}

uint64_t nb_disk_total_blocks(const struct nb_mig *m)
{
    uint64_t n = 0;
    for (int i = 0; i < m->ndisks; i++)
        n += m->disk[i].blocks;
    return n;
}

/*
 * Source: read (and clear) every attached disk's dirty-block log and add
 * it to the blocks pending; *pending = how many are pending now.  A
 * detached disk has no log: nothing writes it, so round 0 sent it whole.
 */
int nb_disk_sync(struct nb_mig *m, uint64_t *pending, char *err)
{
    uint64_t n = 0, nblocks;

    for (int i = 0; i < m->ndisks; i++) {
        struct nb_disk *d = &m->disk[i];
        if (d->vmm_index >= 0 &&
            m->vmm.ops->disk_dirty_log(&m->vmm, d->vmm_index, d->log, d->words,
                                       &nblocks, err) < 0)
            return -1;
        if (d->vmm_index >= 0 && nblocks != d->blocks) {
            snprintf(err, NB_ERRLEN, "disk %d: the VM's dirty-block log covers "
                     "%llu blocks, but %s has %llu", i,
                     (unsigned long long)nblocks, d->path,
                     (unsigned long long)d->blocks);
            return -1;
        }
        for (size_t w = 0; w < d->words; w++) {
            d->pending[w] |= d->vmm_index >= 0 ? d->log[w] : 0;
            n += (uint64_t)__builtin_popcountll(d->pending[w]);
        }
    }
    if (pending)
        *pending = n;
    return 0;
}

/* Source, round 0: the blocks holding data (holes stay holes). */
void nb_disk_mark_data(struct nb_mig *m)
{
    for (int i = 0; i < m->ndisks; i++) {
        struct nb_disk *d = &m->disk[i];
        uint64_t off = 0, doff, dend;
        memset(d->pending, 0, d->words * 8);
        while (off < d->size &&
               nb_file_next_data(d->fd, d->size, off, &doff, &dend) == 0 &&
               doff < d->size) {
            if (dend > d->size)
                dend = d->size;
            for (uint64_t b = doff / NB_DISK_BLOCK;
                 b < (dend + NB_DISK_BLOCK - 1) / NB_DISK_BLOCK; b++)
                d->pending[b / 64] |= 1ULL << (b % 64);
            off = dend > doff ? dend : doff + NB_DISK_BLOCK;
        }
    }
}

/* Read `len` bytes at `off`, retrying short reads. */
static int read_at(const struct nb_disk *d, uint8_t *buf, uint32_t len,
                   uint64_t off, char *err)
{
    uint32_t got = 0;
    while (got < len) {
        ssize_t r = pread(d->fd, buf + got, len - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(err, NB_ERRLEN, "reading disk %s at %llu: %s", d->path,
                     (unsigned long long)(off + got),
                     r < 0 ? strerror(errno) : "the file shrank");
            return -1;
        }
        got += (uint32_t)r;
    }
    return 0;
}

/* The keyed hash of a block's content, padded with zeros to a full block. */
static uint64_t block_hash(struct nb_mig *m, const uint8_t *data, uint32_t len)
{
    uint8_t pad[NB_DISK_BLOCK];
    if (len == NB_DISK_BLOCK)
        return nb_page_hash(data, &m->keys.hash);
    memset(pad, 0, sizeof(pad));
    memcpy(pad, data, len);
    return nb_page_hash(pad, &m->keys.hash);
}

/* Record block b of disk i's new digest term in channel `slot`'s part. */
static void set_block_term(struct nb_mig *m, int slot, int i, uint64_t b,
                           uint64_t term)
{
    m->disk_part[slot].sum += term - m->disk[i].term[b];
    m->disk[i].term[b] = term;
}

static uint64_t term_of(struct nb_mig *m, int i, uint64_t b, const uint8_t *data,
                        uint32_t len)
{
    return nb_disk_term((uint32_t)i, b, block_hash(m, data, len), m->disk_hz,
                        &m->keys.hash);
}

/*
 * Encode block b of disk i into the sender's DISK frame, read from the
 * file now (its newest content): ZERO if it is all zeros (round 0 skips
 * it: the destination's file starts as holes), else ZSTD while the
 * channel compresses and it shrinks, else RAW.
 */
static int send_block(struct sender *s, int i, uint64_t b, uint32_t round, char *err)
{
    struct nb_mig *m = s->m;
    struct nb_disk *d = &m->disk[i];
    uint32_t len = block_len(d, b), n = len;
    uint8_t *rec, *data, tmp[NB_DISK_BLOCK];
    int enc = NB_ENC_RAW, zero;

    if (s->flen + NB_DREC_HDR + NB_DISK_BLOCK > NB_MAX_PAGES_FRAME &&
        nb_sender_flush(s, round, err) < 0)
        return -1;
    rec = s->frame + s->flen;
    data = rec + NB_DREC_HDR;
    if (read_at(d, data, len, b * NB_DISK_BLOCK, err) < 0)
        return nb_wire_fail(s->ch, NB_ERR_VMM);
    memset(data + len, 0, NB_DISK_BLOCK - len);
    zero = nb_page_is_zero(data);
    if (m->p.verify == NB_VERIFY_INCREMENTAL)
        set_block_term(m, s->slot, i, b, zero ? 0 : term_of(m, i, b, data, len));
    if (zero && round == 0)
        return 0;
    if (zero) {
        enc = NB_ENC_ZERO;
        n = 0;
    } else if (s->zctx && nb_adapt_try(&s->adapt)) {
        double t0 = nb_now_ms();
        size_t z = ZSTD_compressCCtx(s->zctx, tmp, len - 1, data, len,
                                     m->p.zstd_level);
        nb_adapt_compressed(&s->adapt, len, ZSTD_isError(z) ? len : z,
                            (nb_now_ms() - t0) * 1e6);
        if (!ZSTD_isError(z) && z > 0) {
            memcpy(data, tmp, z);
            n = (uint32_t)z;
            enc = NB_ENC_ZSTD;
        }
    }
    nb_disk_rec_put(rec, b, (uint16_t)i, (uint8_t)enc, (uint16_t)n);
    s->flen += NB_DREC_HDR + n;
    s->nrec++;
    s->round_blocks++;
    atomic_fetch_add(&m->disk_blocks, 1);
    return 0;
}

/*
 * A sender's share of the blocks pending (bitmap words slot, slot + n,
 * ...: block b goes on channel 1 + (b / 64) mod channels, so a newer copy
 * never overtakes an older one), in DISK frames after the round's pages.
 * It clears the words it sent; no other thread touches them meanwhile.
 */
int nb_sender_disks(struct sender *s, struct source *src, uint32_t round, char *err)
{
    struct nb_mig *m = s->m;
    int rc = 0;

    s->ftype = NB_MSG_DISK;
    for (int i = 0; i < m->ndisks && rc == 0; i++) {
        struct nb_disk *d = &m->disk[i];
        for (size_t w = (size_t)s->slot; w < d->words && rc == 0;
             w += (size_t)src->nsnd) {
            uint64_t bits = d->pending[w];
            d->pending[w] = 0;
            while (bits && rc == 0) {
                int b = __builtin_ctzll(bits);
                bits &= bits - 1;
                rc = send_block(s, i, (uint64_t)w * 64 + (uint64_t)b, round, err);
            }
        }
    }
    if (rc == 0)
        rc = nb_sender_flush(s, round, err);
    s->ftype = NB_MSG_PAGES;
    return rc;
}

/* Write `len` zero bytes at `off`: a hole where the system punches one. */
static int write_zeros(struct nb_disk *d, uint64_t off, uint32_t len, char *err)
{
    static const uint8_t zero[NB_DISK_BLOCK];
#ifdef FALLOC_FL_PUNCH_HOLE
    if (fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                  (off_t)len) == 0)
        return 0;
#endif
    if (pwrite(d->fd, zero, len, (off_t)off) == (ssize_t)len)
        return 0;
    snprintf(err, NB_ERRLEN, "writing disk %s at %llu: %s", d->path,
             (unsigned long long)off, strerror(errno));
    return -1;
}

/* Write a decoded block; -1 with err (a file error). */
static int write_block(struct nb_disk *d, uint64_t b, const uint8_t *data,
                       uint32_t len, char *err)
{
    uint32_t done = 0;
    while (done < len) {
        ssize_t w = pwrite(d->fd, data + done, len - done,
                           (off_t)(b * NB_DISK_BLOCK + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            snprintf(err, NB_ERRLEN, "writing disk %s at %llu: %s", d->path,
                     (unsigned long long)(b * NB_DISK_BLOCK + done),
                     w < 0 ? strerror(errno) : "no progress");
            return -1;
        }
        done += (uint32_t)w;
    }
    return 0;
}

/* Bytes a destination writes to a disk before it starts their write-back. */
#define NB_WRITEBACK_KICK (8u << 20)

/*
 * Destination: every NB_WRITEBACK_KICK bytes written to `d`, start their
 * write-back without waiting for it, so the fsync before the next APPLIED
 * finds little left to write while the guest still runs on the source
 * (Linux's sync_file_range; elsewhere that fsync writes it all, and
 * reports any error: this one's are left to it).
 */
static void start_writeback(struct nb_disk *d, uint32_t len)
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

/* Check, decode and write one record; *used = its size on the wire. */
static int apply_block(struct nb_mig *m, int nchan, int chan, void **zctx,
                       const uint8_t *rec, size_t avail, size_t *used, int *kind,
                       char *err)
{
    struct nb_disk_rec r;
    uint8_t block[NB_DISK_BLOCK];
    struct nb_disk *d;
    uint32_t len;

    if (nb_disk_rec_parse(rec, avail, &r, err) < 0)
        return -1;
    if (r.disk >= m->ndisks || r.block >= m->disk[r.disk].blocks) {
        snprintf(err, NB_ERRLEN, "disk record for block %llu of disk %u: no such "
                 "block", (unsigned long long)r.block, r.disk);
        return -1;
    }
    if ((r.block / 64) % (uint64_t)nchan + 1 != (uint64_t)chan) {
        snprintf(err, NB_ERRLEN, "disk record for block %llu of disk %u on "
                 "channel %d; it belongs to channel %llu",
                 (unsigned long long)r.block, r.disk, chan,
                 (unsigned long long)((r.block / 64) % (uint64_t)nchan + 1));
        return -1;
    }
    d = &m->disk[r.disk];
    len = block_len(d, r.block);
    if (decode_block(zctx, &r, len, block)) {
        snprintf(err, NB_ERRLEN, "undecodable disk record (encoding %u, %u bytes) "
                 "for block %llu of disk %u", r.enc, r.len,
                 (unsigned long long)r.block, r.disk);
        return -1;
    }
    *kind = NB_ERR_VMM;
    if ((r.enc == NB_ENC_ZERO ? write_zeros(d, r.block * NB_DISK_BLOCK, len, err)
                              : write_block(d, r.block, block, len, err)) < 0)
        return -1;
    start_writeback(d, len);
    *kind = NB_ERR_CORRUPT;
    if (m->p.verify == NB_VERIFY_INCREMENTAL)
        set_block_term(m, chan - 1, r.disk, r.block, r.enc == NB_ENC_ZERO ? 0
                       : term_of(m, r.disk, r.block, block, len));
    *used = NB_DREC_HDR + r.len;
    return 0;
}

/*
 * Destination: apply a DISK frame of round `round` that arrived on page
 * channel `chan` of `nchan`.  Every index and length is checked before
 * use.  -1 with err and *kind (CORRUPT, or VMM for a file that fails).
 */
int nb_disk_apply(struct nb_mig *m, int nchan, int chan, void **zctx,
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
        if (apply_block(m, nchan, chan, zctx, f->payload + pos, f->len - pos,
                        &used, kind, err) < 0)
            return -1;
        pos += used;
    }
    if (pos != f->len) {
        snprintf(err, NB_ERRLEN, "channel %d: %zu stray bytes after %u disk "
                 "records", chan, (size_t)f->len - pos, n);
        return -1;
    }
    atomic_fetch_add(&m->disk_blocks, n);
    atomic_fetch_add(&m->disk_bytes, NB_FRAME_HDR + f->len + (f->flags & 1 ? NB_TAG : 0));
    return 0;
}


/* The digest of disk i read back from its file (holes add nothing). */
static uint64_t read_digest(struct nb_mig *m, int i)
{
    struct nb_disk *d = &m->disk[i];
    uint8_t buf[NB_DISK_BLOCK];
    uint64_t sum = 0, off = 0, doff, dend;
    char err[NB_ERRLEN];

    while (off < d->size && nb_file_next_data(d->fd, d->size, off, &doff, &dend) == 0 &&
           doff < d->size) {
        uint64_t end = dend < d->size ? dend : d->size;
        for (uint64_t b = doff / NB_DISK_BLOCK; b * NB_DISK_BLOCK < end; b++) {
            uint32_t len = block_len(d, b);
            if (read_at(d, buf, len, b * NB_DISK_BLOCK, err) < 0)
                return ~sum;    /* cannot match the peer's */
            memset(buf + len, 0, NB_DISK_BLOCK - len);
            if (!nb_page_is_zero(buf))
                sum += term_of(m, i, b, buf, len);
        }
        off = (end + NB_DISK_BLOCK - 1) / NB_DISK_BLOCK * NB_DISK_BLOCK;
        if (off <= doff)
            off = doff + NB_DISK_BLOCK;
    }
    return sum;
}

/*
 * The disks' digest: the sum of every block's term.  full=1 reads the
 * files now; full=0 adds up the channels' running sums of the terms
 * recorded as blocks were sent or written.
 */
uint64_t nb_disk_digest(struct nb_mig *m, int full)
{
    uint64_t sum = 0;
    if (!full) {
        for (int c = 0; c < NB_MAX_CHANNELS; c++)
            sum += m->disk_part[c].sum;
        return sum;
    }
    for (int i = 0; i < m->ndisks; i++)
        sum += read_digest(m, i);
    return sum;
}

/*
 * Destination: put every disk on stable storage (fsync).  0, or -1 with
 * err.  Before each APPLIED, so that the bulk of round 0 is written back
 * while the guest still runs on the source, and the fsync of the
 * switch-over only waits for the blocks of the rounds after it.
 */
int nb_disk_flush(struct nb_mig *m, char *err)
{
    for (int i = 0; i < m->ndisks; i++)
        if (fsync(m->disk[i].fd) < 0) {
            snprintf(err, NB_ERRLEN, "flushing disk %s: %s", m->disk[i].path,
                     strerror(errno));
            return -1;
        }
    return 0;
}

/*
 * Destination, every channel's final round applied: put every disk on
 * stable storage and compare the disks' digest with the source's
 * `theirs`.  0, or the negated kind with err (VMM: a file failed;
 * CORRUPT: the digests differ).
 */
int nb_disk_verify(struct nb_mig *m, uint64_t theirs, char *err)
{
    uint64_t mine;

    if (nb_disk_flush(m, err) < 0)
        return -NB_ERR_VMM;
    mine = nb_disk_digest(m, m->p.verify == NB_VERIFY_FULL);
    pthread_mutex_lock(&m->lock);
    m->st.disk_digest = mine;
    pthread_mutex_unlock(&m->lock);
    if (mine != theirs) {
        snprintf(err, NB_ERRLEN, "disk digest mismatch (source %016llx, "
                 "destination %016llx): the disks' copy is not faithful",
                 (unsigned long long)theirs, (unsigned long long)mine);
        return -NB_ERR_CORRUPT;
    }
    return 0;
}
