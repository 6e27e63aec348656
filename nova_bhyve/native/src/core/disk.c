/*
 * Disks moved with the guest (PROTOCOL.md, "Disks"): the source reads its
 * disk files and the vmm's dirty-block log, and its senders put the blocks
 * in DISK frames on the page channels after each round's pages; the
 * destination writes them into its own files (core/disk_apply.c) and
 * fsyncs them before each APPLIED and before READY.  Both sides keep the
 * disks' digest as they go.
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
uint32_t nb_disk_block_len(const struct nb_disk *d, uint64_t b)
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
 * Destination: the file once more, for writing runs of whole blocks past
 * the page cache (each is written once, and fsynced at the next APPLIED
 * anyway); opened beneath the same directory descriptor, not through a
 * link, and kept only if it is the very file the session locked.  None
 * (-1) where the system or the file system has no direct I/O.
 */
static void open_direct(struct nb_disk *d)
{
    d->dfd = -1;
#ifdef O_DIRECT
    struct stat a, b;
    int fd = openat(d->dirfd, d->name,
                    O_WRONLY | O_DIRECT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return;
    /* O_NONBLOCK only kept the open from waiting on a FIFO put there */
    if (fstat(fd, &a) == 0 && fstat(d->fd, &b) == 0 && a.st_dev == b.st_dev &&
        a.st_ino == b.st_ino && fcntl(fd, F_SETFL, O_DIRECT) == 0)
        d->dfd = fd;
    else
        close(fd);
#endif
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
        open_direct(d);
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
        if (d->dfd >= 0)
            close(d->dfd);
        if (d->dirfd >= 0)
            close(d->dirfd);
        free(d->path);
        free(d->pending);
        free(d->log);
        free(d->term);
        memset(d, 0, sizeof(*d));
        d->fd = d->dirfd = d->dfd = -1;
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
void nb_disk_set_term(struct nb_mig *m, int slot, int i, uint64_t b, uint64_t term)
{
    m->disk_part[slot].sum += term - m->disk[i].term[b];
    m->disk[i].term[b] = term;
}

/* Block b of disk i's digest term, for its `len` bytes at `data`. */
uint64_t nb_disk_block_term(struct nb_mig *m, int i, uint64_t b,
                            const uint8_t *data, uint32_t len)
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
    uint32_t len = nb_disk_block_len(d, b), n = len;
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
        nb_disk_set_term(m, s->slot, i, b, zero ? 0 : nb_disk_block_term(m, i, b, data, len));
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
            uint32_t len = nb_disk_block_len(d, b);
            if (read_at(d, buf, len, b * NB_DISK_BLOCK, err) < 0)
                return ~sum;    /* cannot match the peer's */
            memset(buf + len, 0, NB_DISK_BLOCK - len);
            if (!nb_page_is_zero(buf))
                sum += nb_disk_block_term(m, i, b, buf, len);
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
