/*
 * The disk writer (disk=1): versioned, self-describing 4 KiB blocks
 * written over a region of the ATA master disk on the primary IDE ports,
 * read back, and re-read later against the version the guest remembers.
 *
 * ATA PIO, polled: the guest waits for BSY to clear, then checks DRQ or
 * ERR, as both QEMU's IDE and the test host's ata.c need.  While the drive
 * is busy after a command or a sector, disk_step() polls it once and
 * returns, so a slow drive (a flush the host's storage holds up) never
 * stops the heartbeat.  A sector moves
 * with one `rep insw` / `rep outsw` from a 512-byte aligned buffer: one VM
 * exit per sector where a word at a time costs 256 (README.md, "Disk
 * writer", on why this stays consistent across a pause).
 *
 * disk_step() moves one sector and returns, so the caller can keep
 * its heartbeat and its memory writer going in between (README.md,
 * "Disk writer").
 */
#include "guest.h"

#define ATA_DATA        0x1F0
#define ATA_ERROR       0x1F1
#define ATA_NSECTOR     0x1F2
#define ATA_LBA_LOW     0x1F3
#define ATA_LBA_MID     0x1F4
#define ATA_LBA_HIGH    0x1F5
#define ATA_SELECT      0x1F6
#define ATA_STATUS      0x1F7
#define ATA_COMMAND     0x1F7
#define ATA_CONTROL     0x3F6

#define ST_BSY          0x80
#define ST_DRQ          0x08
#define ST_ERR          0x01

#define CMD_READ        0x20
#define CMD_WRITE       0x30
#define CMD_FLUSH       0xE7
#define CMD_IDENTIFY    0xEC

#define SECTOR          512
#define BLOCK           4096ULL
#define SECTORS_PER_BLOCK 8
#define WORDS_PER_SECTOR (SECTOR / 8)
#define DISK_MAGIC      0x31304B5349444E42ULL   /* "NBDISK01" */
#define WAIT_SECONDS    5

enum phase { PH_WRITE, PH_READBACK, PH_OLD };
/* A wait for the drive, in TSC ticks: the last poll, and when it fails. */
struct wait { uint64_t last, until; };
/* A command whose end the next step checks, once the drive is not busy. */
enum finish { FIN_NONE, FIN_WRITE, FIN_FLUSH };

static struct {
    uint64_t sectors;           /* disk size from IDENTIFY */
    uint64_t nblocks;           /* blocks in the region */
    uint64_t wait_ticks;        /* TSC ticks before a wait fails */
    uint64_t pass;              /* version being written, from 1 */
    uint64_t done;              /* passes completed */
    uint64_t block;             /* block being written */
    uint64_t old;               /* re-read cursor */
    enum phase phase;
    unsigned sector;            /* sector of the block in this phase */
    bool issued;                /* this phase's command is issued */
    bool bad;                   /* this block already reported a mismatch */
    enum finish finish;         /* a command to see completed */
    uint64_t finish_lba;
    bool busy;                  /* the drive may be busy: poll first */
    struct wait busy_wait;
} d;

/* Expected version of every block of the region (0: never written). */
static uint32_t expect[DISK_MAX_BLOCKS];

static inline uint16_t inw(uint16_t port)
{
    uint16_t val;
    __asm__ volatile("inw %1, %0" : "=a"(val) : "Nd"(port));
    return val;
}

static inline uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Word w (0..511) of block b at version v: magic, b, v, then a stream. */
static uint64_t block_word(uint64_t b, uint64_t v, unsigned w)
{
    if (w == 0)
        return DISK_MAGIC;
    if (w == 1)
        return b;
    if (w == 2)
        return v;
    return mix64(mix64((v << 32) ^ b) + w);
}

/* Start a wait of WAIT_SECONDS. */
static void wait_start(struct wait *w)
{
    w->last = rdtsc();
    w->until = w->last + d.wait_ticks;
}

/*
 * A poll found the drive still busy: true once the wait has run out.
 * Time the host held the VM paused (the TSC runs on) is not the drive's:
 * a gap of over a fiftieth of the wait between two polls extends it.
 */
static bool wait_over(struct wait *w)
{
    uint64_t now = rdtsc();

    if (now - w->last > d.wait_ticks / 50)
        w->until += now - w->last;
    w->last = now;
    return now > w->until;
}

/* Poll until BSY clears; returns the status, or -1 after WAIT_SECONDS. */
static int wait_not_busy(void)
{
    struct wait w;
    uint8_t st;

    wait_start(&w);
    while ((st = inb(ATA_STATUS)) & ST_BSY) {
        if (wait_over(&w))
            return -1;
        cpu_relax();
    }
    return st;
}

/* After a command or a sector: the drive may be busy until it is done. */
static void arm_busy(void)
{
    d.busy = true;
    wait_start(&d.busy_wait);
}

/*
 * Poll a drive that may be busy, once: true while BSY is set (the step
 * returns; the heartbeat and the memory writer go on).  At the end of the
 * wait this gives up and the blocking wait that follows reports the
 * failure.
 */
static bool drive_busy(void)
{
    if (!d.busy)
        return false;
    d.busy = (inb(ATA_STATUS) & ST_BSY) && !wait_over(&d.busy_wait);
    return d.busy;
}

static void io_fail(uint64_t lba, int want, int got)
{
    report_fail("diskio", lba * SECTOR, (uint64_t)want, (uint64_t)(got & 0xffff));
}

/* Issue an LBA28 command on the master drive. */
static bool issue(uint8_t cmd, uint64_t lba, unsigned count)
{
    int st = wait_not_busy();

    if (st < 0) {
        io_fail(lba, 0, st);
        return false;
    }
    outb(ATA_SELECT, (uint8_t)(0xE0 | ((lba >> 24) & 0x0F)));
    outb(ATA_NSECTOR, (uint8_t)count);
    outb(ATA_LBA_LOW, (uint8_t)lba);
    outb(ATA_LBA_MID, (uint8_t)(lba >> 8));
    outb(ATA_LBA_HIGH, (uint8_t)(lba >> 16));
    outb(ATA_COMMAND, cmd);
    return true;
}

/* Wait until the drive wants data (DRQ) for the sector at lba. */
static bool wait_drq(uint64_t lba)
{
    int st = wait_not_busy();

    if (st < 0 || (st & ST_ERR) || !(st & ST_DRQ)) {
        io_fail(lba, ST_DRQ, st);
        return false;
    }
    return true;
}

/* Wait for the end of a command; false (and a FAIL) on ERR or a timeout. */
static bool wait_done(uint64_t lba)
{
    int st = wait_not_busy();

    if (st < 0 || (st & (ST_ERR | ST_DRQ))) {
        io_fail(lba, 0, st < 0 ? st : (st | inb(ATA_ERROR) << 8));
        return false;
    }
    return true;
}

/*
 * IDENTIFY the master drive.  Returns its sector count, 0 if there is no
 * ATA disk (floating bus, no answer, or an error).
 */
static uint64_t identify(void)
{
    uint16_t id[256];
    int st;

    outb(ATA_CONTROL, 0x02);            /* nIEN: no interrupts */
    outb(ATA_SELECT, 0xE0);
    if (inb(ATA_STATUS) == 0xFF || wait_not_busy() < 0)
        return 0;
    outb(ATA_COMMAND, CMD_IDENTIFY);
    st = wait_not_busy();
    if (st <= 0 || (st & ST_ERR) || !(st & ST_DRQ))
        return 0;
    for (int i = 0; i < 256; i++)
        id[i] = inw(ATA_DATA);
    return (uint64_t)id[60] | (uint64_t)id[61] << 16;
}

/*
 * Find the disk and lay out the region: its first `region` bytes (0: the
 * whole disk), rounded down to whole blocks, at most DISK_MAX_BLOCKS.
 * Returns the number of blocks, 0 without a usable disk.
 */
uint64_t disk_init(uint64_t region, uint64_t tsc_khz)
{
    d.wait_ticks = tsc_khz * 1000 * WAIT_SECONDS;
    d.sectors = identify();
    if (!region || region > d.sectors * SECTOR)
        region = d.sectors * SECTOR;
    d.nblocks = region / BLOCK;
    if (d.nblocks > DISK_MAX_BLOCKS)
        d.nblocks = DISK_MAX_BLOCKS;
    d.pass = 1;
    return d.nblocks;
}

uint64_t disk_sectors(void)
{
    return d.sectors;
}

uint64_t disk_passes(void)
{
    return d.done;
}

/* Sector buffer: 512-byte aligned, so a string transfer never crosses a page. */
static uint64_t sector_buf[WORDS_PER_SECTOR] __attribute__((aligned(SECTOR)));

/* One sector through the data port: a single `rep outsw` / `rep insw`. */
static void pio_write_sector(void)
{
    const void *src = sector_buf;
    uint64_t n = SECTOR / 2;

    __asm__ volatile("rep outsw" : "+S"(src), "+c"(n)
                     : "d"((uint16_t)ATA_DATA) : "memory");
}

static void pio_read_sector(void)
{
    void *dst = sector_buf;
    uint64_t n = SECTOR / 2;

    __asm__ volatile("rep insw" : "+D"(dst), "+c"(n)
                     : "d"((uint16_t)ATA_DATA) : "memory");
}

/* Compare sector_buf with sector s of block b at version v. */
static void check_sector(const char *what, uint64_t b, uint64_t v, unsigned s)
{
    for (unsigned j = 0; j < WORDS_PER_SECTOR; j++) {
        unsigned w = s * WORDS_PER_SECTOR + j;
        uint64_t want = block_word(b, v, w), got = sector_buf[j];

        if (got != want && !d.bad) {
            d.bad = true;       /* one FAIL per block read */
            report_fail(what, b * BLOCK + w * 8ULL, want, got);
        }
    }
}

/*
 * Move the block transfer on by a step: issue the command, or move the
 * next sector (after waiting for DRQ); true once the whole block is done
 * (or failed, with a FAIL printed).  The end of a write is checked at the
 * next step (d.finish).
 */
static bool block_sector(uint8_t cmd, const char *what, uint64_t b, uint64_t v)
{
    uint64_t lba = b * SECTORS_PER_BLOCK + d.sector;

    if (!d.issued) {
        d.bad = false;
        if (!issue(cmd, lba, SECTORS_PER_BLOCK))
            return true;
        d.issued = true;
        arm_busy();
        return false;
    }
    if (!wait_drq(lba)) {
        d.sector = 0;
        d.issued = false;
        return true;
    }
    if (cmd == CMD_WRITE) {
        for (unsigned j = 0; j < WORDS_PER_SECTOR; j++)
            sector_buf[j] = block_word(b, v, d.sector * WORDS_PER_SECTOR + j);
        pio_write_sector();
    } else {
        pio_read_sector();
        check_sector(what, b, v, d.sector);
    }
    arm_busy();
    if (++d.sector < SECTORS_PER_BLOCK)
        return false;
    d.sector = 0;
    d.issued = false;
    if (cmd == CMD_WRITE) {
        d.finish = FIN_WRITE;
        d.finish_lba = lba;
    }
    return true;
}

/* The next block written: at the end of the region, flush; the pass
 * counts once the flush is done (finish_command). */
static void next_block(void)
{
    d.phase = PH_WRITE;
    if (++d.block < d.nblocks)
        return;
    d.block = 0;
    if (issue(CMD_FLUSH, 0, 0)) {
        d.finish = FIN_FLUSH;
        d.finish_lba = 0;
        arm_busy();
        return;
    }
    d.done = d.pass++;
}

/* The drive is no longer busy: check the end of a write or a flush. */
static void finish_command(void)
{
    enum finish f = d.finish;

    d.finish = FIN_NONE;
    wait_done(d.finish_lba);
    if (f == FIN_FLUSH)
        d.done = d.pass++;
}

/* Advance the writer by a step: a poll of a busy drive, the end of a
 * command, a command or a sector (README.md, "Disk writer"). */
void disk_step(void)
{
    if (!d.nblocks || drive_busy())
        return;
    if (d.finish != FIN_NONE) {
        finish_command();
        return;
    }
    switch (d.phase) {
    case PH_WRITE:
        if (block_sector(CMD_WRITE, "disk", d.block, d.pass))
            d.phase = PH_READBACK;
        break;
    case PH_READBACK:
        if (block_sector(CMD_READ, "disk", d.block, d.pass)) {
            expect[d.block] = (uint32_t)d.pass;
            d.phase = PH_OLD;
        }
        break;
    case PH_OLD:
        /* the re-read cursor runs half a region behind the writer */
        d.old = (d.block + d.nblocks / 2 + 1) % d.nblocks;
        if (!expect[d.old] ||
            block_sector(CMD_READ, "diskold", d.old, expect[d.old]))
            next_block();
        break;
    }
}
