/*
 * The disk: legacy ATA PIO on the primary IDE channel (command block
 * 0x1F0-0x1F7, control 0x3F6), one master drive backed by a raw file
 * (--disk), polled (the drive never raises an interrupt).  Specified in
 * ../CONTROL_PROTOCOL.md ("Disk"); the state section in ../STATE_FORMAT.md.
 *
 * Commands: READ SECTORS (0x20, 0x21), WRITE SECTORS (0x30, 0x31),
 * IDENTIFY DEVICE (0xEC), FLUSH CACHE (0xE7); SET FEATURES (0xEF) and
 * INITIALIZE DEVICE PARAMETERS (0x91) are accepted and do nothing.  Only
 * LBA28 addressing.  Every command but FLUSH CACHE completes while the
 * vCPU's port access is handled.  FLUSH CACHE sets BSY and hands the
 * `fdatasync` to the drive's flusher thread, which clears BSY when it
 * returns: the vCPU never waits on the host's storage (bhyve's block
 * backends and QEMU's IDE do their I/O off the vCPU too), and a guest
 * that polls BSY, then DRQ or ERR, works on both.  A flush still in flight
 * when the state is saved travels in it (status BSY, command 0xE7) and
 * the destination's drive runs it again on its own file.
 *
 * Every sector written marks its block (NB_DISK_BLOCK bytes) in the
 * dirty-block log, read with get-and-clear like the memory dirty log.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "testhost.h"

#define ATA_CMD_BASE 0x1f0
#define ATA_CTL_PORT 0x3f6

#define ST_BSY 0x80
#define ST_DRDY 0x40
#define ST_DSC 0x10
#define ST_DRQ 0x08
#define ST_ERR 0x01
#define ERR_ABRT 0x04
#define ERR_UNC 0x40

#define SEL_LBA 0x40
#define SEL_SLAVE 0x10
#define CTL_SRST 0x04

#define LBA28_MAX 0x0fffffffULL

enum xfer { XFER_NONE = 0, XFER_IN = 1, XFER_OUT = 2 };

/* Little-endian field access for the state section. */
static void put32le(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64le(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32le(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get64le(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Registers as after power-on or a software reset (ATA signature). */
static void reset_registers(struct nb_ata *a)
{
    a->feature = 0;
    a->nsector = 1;
    a->lbal = 1;
    a->lbam = a->lbah = 0;
    a->select = 0xa0;
    a->status = ST_DRDY | ST_DSC;
    a->error = 1;           /* diagnostic: device 0 passed */
    a->command = 0;
    a->xfer = XFER_NONE;
    a->lba = 0;
    a->remaining = 0;
    a->pos = 0;
}

/* A VM without a disk: ports float until nb_ata_open(). */
void nb_ata_init(struct nb_ata *a)
{
    memset(a, 0, sizeof(*a));
    pthread_mutex_init(&a->lock, NULL);
    a->fd = -1;
    reset_registers(a);
}

/*
 * The flusher: runs each flush asked for (FLUSH CACHE, or one restored in
 * flight) and, if the drive still waits for it (BSY, no reset or newer
 * flush since), completes the command.  Flushes asked for while one runs
 * are served by the next `fdatasync`, which covers them all.  With
 * --flush-delay-ms it waits that long before each `fdatasync`, as a drive
 * on slow storage (a signal ends the wait early: the process is exiting).
 */
static void *flusher_main(void *arg)
{
    struct nb_ata *a = arg;

    pthread_mutex_lock(&a->lock);
    for (;;) {
        uint64_t asked;
        int rc;

        while (a->flush_done == a->flush_asked)
            pthread_cond_wait(&a->flush_cv, &a->lock);
        asked = a->flush_asked;
        pthread_mutex_unlock(&a->lock);
        if (a->flush_delay_ms) {
            struct timespec ts = {
                .tv_sec = a->flush_delay_ms / 1000,
                .tv_nsec = a->flush_delay_ms % 1000 * 1000000L,
            };
            nanosleep(&ts, NULL);
        }
        rc = fdatasync(a->fd);
        pthread_mutex_lock(&a->lock);
        a->flush_done = asked;
        if (asked != a->flush_asked || !(a->status & ST_BSY))
            continue;
        if (rc < 0) {
            nb_log("disk: flush failed: %s", strerror(errno));
            a->error = ERR_ABRT;
            a->status = ST_DRDY | ST_DSC | ST_ERR;
        } else {
            a->status = ST_DRDY | ST_DSC;
        }
    }
    return NULL;
}

/* FLUSH CACHE: busy until the flusher has run it (under a->lock). */
static void start_flush(struct nb_ata *a)
{
    a->status = ST_BSY | ST_DRDY | ST_DSC;
    a->flush_asked++;
    pthread_cond_signal(&a->flush_cv);
}

/* Attach the raw disk file at path (O_NOFOLLOW); dies with a clear message. */
void nb_ata_open(struct nb_ata *a, const char *path)
{
    struct stat st;
    pthread_t flusher;
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);

    if (fd < 0 && errno == ELOOP)
        nb_die("--disk %s is a symbolic link; give the disk file itself", path);
    if (fd < 0)
        nb_die("--disk %s: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
        nb_die("--disk %s is not a regular file", path);
    if (st.st_size < (off_t)NB_DISK_BLOCK || st.st_size % NB_SECTOR)
        nb_die("--disk %s: size %lld is not a multiple of %d bytes of at "
               "least %" PRIu64, path, (long long)st.st_size, NB_SECTOR,
               NB_DISK_BLOCK);
    if ((uint64_t)st.st_size / NB_SECTOR > LBA28_MAX)
        nb_die("--disk %s: larger than LBA28 addresses (%llu sectors)", path,
               LBA28_MAX);
    a->fd = fd;
    a->sectors = (uint64_t)st.st_size / NB_SECTOR;
    a->nblocks = (a->sectors * NB_SECTOR + NB_DISK_BLOCK - 1) / NB_DISK_BLOCK;
    a->dirty = calloc(1, nb_ata_dirty_bytes(a));
    if (!a->dirty)
        nb_die("out of memory for the dirty-block log");
    /* as the memory log: the first read reports every block */
    for (uint64_t b = 0; b < a->nblocks; b++)
        a->dirty[b / 64] |= 1ULL << (b % 64);
    a->present = 1;
    pthread_cond_init(&a->flush_cv, NULL);
    if ((errno = pthread_create(&flusher, NULL, flusher_main, a)) != 0)
        nb_die("cannot start the disk's flusher thread: %s", strerror(errno));
    pthread_detach(flusher);
}

int nb_ata_claims(uint16_t port)
{
    return (port >= ATA_CMD_BASE && port < ATA_CMD_BASE + 8) ||
           port == ATA_CTL_PORT;
}

static void fail_command(struct nb_ata *a, uint8_t error)
{
    a->xfer = XFER_NONE;
    a->remaining = 0;
    a->pos = 0;
    a->error = error;
    a->status = ST_DRDY | ST_DSC | ST_ERR;
}

static int read_sector(struct nb_ata *a)
{
    if (pread(a->fd, a->buf, NB_SECTOR, (off_t)(a->lba * NB_SECTOR)) != NB_SECTOR) {
        nb_log("disk: reading sector %" PRIu64 " failed: %s", a->lba,
               strerror(errno));
        fail_command(a, ERR_UNC | ERR_ABRT);
        return -1;
    }
    return 0;
}

static int write_sector(struct nb_ata *a)
{
    uint64_t block = a->lba * NB_SECTOR / NB_DISK_BLOCK;

    if (pwrite(a->fd, a->buf, NB_SECTOR, (off_t)(a->lba * NB_SECTOR)) != NB_SECTOR) {
        nb_log("disk: writing sector %" PRIu64 " failed: %s", a->lba,
               strerror(errno));
        fail_command(a, ERR_ABRT);
        return -1;
    }
    a->dirty[block / 64] |= 1ULL << (block % 64);
    return 0;
}

/* Copy an ATA string: two characters per word, the first in the high byte. */
static void put_ata_string(uint8_t *words, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char c = i < strlen(s) ? s[i] : ' ';
        words[i ^ 1] = (uint8_t)c;
    }
}

static void put_word(uint8_t *buf, int index, uint16_t v)
{
    buf[2 * index] = (uint8_t)v;
    buf[2 * index + 1] = (uint8_t)(v >> 8);
}

/* IDENTIFY DEVICE: the 256-word data block. */
static void identify(struct nb_ata *a)
{
    uint64_t cyl = a->sectors / (16 * 63);

    memset(a->buf, 0, sizeof(a->buf));
    put_word(a->buf, 0, 0x0040);                /* fixed disk */
    put_word(a->buf, 1, (uint16_t)(cyl > 16383 ? 16383 : cyl));
    put_word(a->buf, 3, 16);
    put_word(a->buf, 6, 63);
    put_ata_string(a->buf + 20, "NBTESTHOST0001", 20);     /* words 10-19 */
    put_ata_string(a->buf + 46, "1.0", 8);                 /* words 23-26 */
    put_ata_string(a->buf + 54, "nb-testhost ATA disk", 40); /* 27-46 */
    put_word(a->buf, 47, 0x8001);
    put_word(a->buf, 49, 0x0200);               /* LBA supported */
    put_word(a->buf, 60, (uint16_t)a->sectors);
    put_word(a->buf, 61, (uint16_t)(a->sectors >> 16));
    put_word(a->buf, 80, 0x00f0);               /* ATA/ATAPI-4 to -7 */
    put_word(a->buf, 83, 0x4000 | 0x1000);      /* FLUSH CACHE supported */
    put_word(a->buf, 86, 0x1000);               /* ... and enabled */
    a->xfer = XFER_IN;
    a->remaining = 1;
    a->lba = 0;
    a->pos = 0;
    a->status = ST_DRDY | ST_DSC | ST_DRQ;
}

/* READ/WRITE SECTORS: check the LBA28 range, then start the transfer. */
static void start_transfer(struct nb_ata *a, enum xfer dir)
{
    uint32_t count = a->nsector ? a->nsector : 256;
    uint64_t lba = (uint64_t)(a->select & 0x0f) << 24 | (uint64_t)a->lbah << 16 |
                   (uint64_t)a->lbam << 8 | a->lbal;

    if (!(a->select & SEL_LBA) || lba + count > a->sectors) {
        fail_command(a, ERR_ABRT);
        return;
    }
    a->lba = lba;
    a->remaining = count;
    a->pos = 0;
    a->xfer = (uint8_t)dir;
    if (dir == XFER_IN && read_sector(a) < 0)
        return;
    a->status = ST_DRDY | ST_DSC | ST_DRQ;
}

static void execute(struct nb_ata *a, uint8_t cmd)
{
    if (a->select & SEL_SLAVE)
        return;                 /* no slave drive: it ignores commands */
    a->command = cmd;
    a->error = 0;
    a->xfer = XFER_NONE;
    switch (cmd) {
    case 0x20: case 0x21:
        start_transfer(a, XFER_IN);
        break;
    case 0x30: case 0x31:
        start_transfer(a, XFER_OUT);
        break;
    case 0xec:
        identify(a);
        break;
    case 0xe7:
        start_flush(a);
        break;
    case 0xef: case 0x91:
        a->status = ST_DRDY | ST_DSC;
        break;
    default:
        fail_command(a, ERR_ABRT);
    }
}

/* A whole sector has moved through the data port: next one, or done. */
static void sector_done(struct nb_ata *a)
{
    if (a->xfer == XFER_OUT && write_sector(a) < 0)
        return;
    a->pos = 0;
    if (--a->remaining == 0) {
        a->xfer = XFER_NONE;
        a->status = ST_DRDY | ST_DSC;
        return;
    }
    a->lba++;
    if (a->xfer == XFER_IN && read_sector(a) < 0)
        return;
    a->status = ST_DRDY | ST_DSC | ST_DRQ;
}

static void data_in(struct nb_ata *a, uint8_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a->xfer != XFER_IN || (a->select & SEL_SLAVE)) {
            dst[i] = 0xff;
            continue;
        }
        dst[i] = a->buf[a->pos++];
        if (a->pos == NB_SECTOR)
            sector_done(a);
    }
}

static void data_out(struct nb_ata *a, const uint8_t *src, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a->xfer != XFER_OUT || (a->select & SEL_SLAVE))
            return;
        a->buf[a->pos++] = src[i];
        if (a->pos == NB_SECTOR)
            sector_done(a);
    }
}

static uint8_t read_register(struct nb_ata *a, uint16_t port)
{
    int slave = (a->select & SEL_SLAVE) != 0;

    switch (port) {
    case ATA_CMD_BASE + 1: return a->error;
    case ATA_CMD_BASE + 2: return a->nsector;
    case ATA_CMD_BASE + 3: return a->lbal;
    case ATA_CMD_BASE + 4: return a->lbam;
    case ATA_CMD_BASE + 5: return a->lbah;
    case ATA_CMD_BASE + 6: return a->select;
    case ATA_CMD_BASE + 7:
    case ATA_CTL_PORT: return slave ? 0 : a->status;   /* absent slave: 0 */
    }
    return 0xff;
}

static void write_register(struct nb_ata *a, uint16_t port, uint8_t v)
{
    switch (port) {
    case ATA_CMD_BASE + 1: a->feature = v; break;
    case ATA_CMD_BASE + 2: a->nsector = v; break;
    case ATA_CMD_BASE + 3: a->lbal = v; break;
    case ATA_CMD_BASE + 4: a->lbam = v; break;
    case ATA_CMD_BASE + 5: a->lbah = v; break;
    case ATA_CMD_BASE + 6: a->select = v | 0xa0; break;
    case ATA_CMD_BASE + 7: execute(a, v); break;
    case ATA_CTL_PORT:
        if ((v & CTL_SRST) && !(a->control & CTL_SRST))
            reset_registers(a);
        a->control = v;
        break;
    }
}

/* A guest port access (count accesses of size bytes) on a claimed port. */
void nb_ata_io(struct nb_ata *a, uint16_t port, int is_write, uint8_t *data,
               size_t size, size_t count)
{
    pthread_mutex_lock(&a->lock);
    if (port == ATA_CMD_BASE) {
        if (is_write)
            data_out(a, data, size * count);
        else
            data_in(a, data, size * count);
    } else {
        for (size_t i = 0; i < count; i++) {
            /* a wider access reaches the next ports, as on ISA */
            for (size_t b = 0; b < size; b++) {
                uint8_t *d = data + i * size + b;
                uint16_t p = (uint16_t)(port + b);
                if (!nb_ata_claims(p) || p == ATA_CMD_BASE) {
                    if (!is_write)
                        *d = 0xff;
                } else if (is_write) {
                    write_register(a, p, *d);
                } else {
                    *d = read_register(a, p);
                }
            }
        }
    }
    pthread_mutex_unlock(&a->lock);
}

/* Bytes of the dirty-block bitmap (whole 64-bit words). */
size_t nb_ata_dirty_bytes(const struct nb_ata *a)
{
    return (size_t)nb_bitmap_bytes(a->nblocks);
}

/* Copy the dirty-block bitmap to out; clear it unless peek. */
void nb_ata_dirty_log(struct nb_ata *a, uint8_t *out, int peek)
{
    size_t len = nb_ata_dirty_bytes(a);

    pthread_mutex_lock(&a->lock);
    for (size_t w = 0; w < len / 8; w++)
        put64le(out + 8 * w, a->dirty[w]);
    if (!peek)
        memset(a->dirty, 0, len);
    pthread_mutex_unlock(&a->lock);
}

/* Encode the device state (NB_ATA_STATE_LEN bytes, STATE_FORMAT.md). */
void nb_ata_save(struct nb_ata *a, uint8_t *out)
{
    pthread_mutex_lock(&a->lock);
    memset(out, 0, NB_ATA_STATE_LEN);
    out[0] = (uint8_t)a->present;
    out[1] = a->feature;
    out[2] = a->nsector;
    out[3] = a->lbal;
    out[4] = a->lbam;
    out[5] = a->lbah;
    out[6] = a->select;
    out[7] = a->status;
    out[8] = a->error;
    out[9] = a->control;
    out[10] = a->command;
    out[11] = a->xfer;
    put64le(out + 16, a->sectors);
    put64le(out + 24, a->lba);
    put32le(out + 32, a->remaining);
    put32le(out + 36, a->pos);
    memcpy(out + 40, a->buf, NB_SECTOR);
    pthread_mutex_unlock(&a->lock);
}

/* Validate a saved device state against this VM's disk (nothing applied). */
int nb_ata_check(const struct nb_ata *a, const uint8_t *in, char *err,
                 size_t errlen)
{
    uint64_t sectors = get64le(in + 16), lba = get64le(in + 24);
    uint32_t remaining = get32le(in + 32), pos = get32le(in + 36);
    const char *why = NULL;

    if (in[0] > 1 || get32le(in + 12) != 0)
        why = "malformed header";
    else if (in[0] != a->present || sectors != a->sectors)
        why = "the disk differs (a disk of another size, or a disk on only "
              "one side)";
    else if (in[11] > XFER_OUT || pos >= NB_SECTOR)
        why = "bad transfer state";
    else if ((in[7] & ST_BSY) &&
             (!in[0] || in[10] != 0xe7 || in[11] != XFER_NONE))
        why = "busy with no flush in flight";
    else if (in[11] != XFER_NONE &&
             (remaining == 0 || remaining > 256 || lba >= sectors ||
              remaining > sectors - lba))
        why = "transfer outside the disk";
    if (why) {
        snprintf(err, errlen, "ata section: %s (blob: %u disk sectors, "
                 "here: %" PRIu64 ")", why, in[0] ? (unsigned)sectors : 0,
                 a->sectors);
        return -1;
    }
    return 0;
}

/* Apply a device state that nb_ata_check() accepted. */
void nb_ata_restore(struct nb_ata *a, const uint8_t *in)
{
    pthread_mutex_lock(&a->lock);
    a->feature = in[1];
    a->nsector = in[2];
    a->lbal = in[3];
    a->lbam = in[4];
    a->lbah = in[5];
    a->select = in[6];
    a->status = in[7];
    a->error = in[8];
    a->control = in[9];
    a->command = in[10];
    a->xfer = in[11];
    a->lba = get64le(in + 24);
    a->remaining = get32le(in + 32);
    a->pos = get32le(in + 36);
    memcpy(a->buf, in + 40, NB_SECTOR);
    if (a->status & ST_BSY)         /* a flush in flight on the source */
        start_flush(a);
    pthread_mutex_unlock(&a->lock);
}
