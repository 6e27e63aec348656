/*
 * Target "pages": a PAGES frame's payload applied as the destination's
 * receiver applies it (core/receiver.c, apply_pages, included here so that
 * its static functions are reachable): nb_pages_parse, nb_page_rec_parse,
 * the pfn and channel checks, and each encoding's decoder (ZERO, RAW
 * through write_pages or into the mapping, DELTA, ZSTD into one page),
 * then the incremental digest term.
 *
 * With mode bit 2 the payload is a DISK frame's instead, applied as the
 * receiver applies it (core/disk_apply.c, nb_disk_apply): nb_disk_parse,
 * nb_disk_rec_parse, the disk, block and channel checks, ZERO (a punched
 * hole), RAW (the block's exact length, the last one short) and ZSTD
 * decoding, pwrite into the disk file, or runs of whole blocks gathered
 * and written at once (mode bit 4), and the block's digest term.
 *
 * Guest: 64 pages at pfn 0 and 64 at pfn 0x100 (4 GiB would need a
 * larger pfn; the layout code is the same).  Disks (memory files): disk 0
 * of 64 blocks and a sector, disk 1 of two blocks.
 *
 * Input: u8 mode, u8 channels, u8 round, then the frame payload.
 *   mode bit 0: the vmm has write_pages (RAW pages are batched; so are
 *               DELTAs for pages no record wrote yet, a bit per page
 *               kept across inputs)
 *        bit 1: incremental verification (page and block hashes kept)
 *        bit 2: a DISK frame, not PAGES
 *        bit 3: with bit 0, every page counts as never written again
 *        bit 4: with bit 2, the disks take runs of whole blocks (their
 *               direct descriptor is the memory file itself)
 *   channels: bits 0-1 session channels - 1, bits 2-3 this channel - 1
 */
#include "../src/core/receiver.c"

#include <sys/mman.h>

#include "fuzz_util.h"

#define SEG_PAGES 64
#define HIGH_PFN 0x100

#define DISK0_SIZE (64 * NB_DISK_BLOCK + 512)
#define DISK1_SIZE (2 * NB_DISK_BLOCK)

static struct nb_mig M;
static uint64_t HASHES[2 * SEG_PAGES];
static uint64_t WRITTEN[2 * SEG_PAGES / 64];
static ZSTD_DCtx *ZCTX;
static struct nb_disk_rx DRX;       /* the receiver's for disk blocks */

/* write_pages into the mapping, checking that the run stays inside it. */
static int fake_write_pages(struct nb_vmm *v, uint64_t off,
                            const uint8_t *const *pages, int n, char *err)
{
    if (n < 1 || n > NB_WRITE_BATCH || off % NB_PAGE ||
        off + (uint64_t)n * NB_PAGE > v->layout.total)
        abort();
    for (int i = 0; i < n; i++)
        memcpy(v->mem + off + (uint64_t)i * NB_PAGE, pages[i], NB_PAGE);
    return 0;
}

static const struct nb_vmm_ops WITH_WRITE = { .kind = "fuzz",
                                              .write_pages = fake_write_pages };
static const struct nb_vmm_ops WITHOUT_WRITE = { .kind = "fuzz" };

/* A disk on a memory file, as nb_disk_open_dest leaves one. */
static void disk_init(struct nb_disk *d, const char *name, uint64_t size)
{
    d->path = (char *)name;
    d->dirfd = d->dfd = -1;
    d->size = size;
    d->blocks = (size + NB_DISK_BLOCK - 1) / NB_DISK_BLOCK;
    d->words = (size_t)((d->blocks + 63) / 64);
    if ((d->fd = memfd_create(name, MFD_CLOEXEC)) < 0 ||
        ftruncate(d->fd, (off_t)size) < 0 || !(d->term = calloc(d->blocks, 8)))
        abort();
}

static void guest_init(void)
{
    struct nb_layout *l = &M.vmm.layout;

    l->nsegs = 2;
    l->seg[0] = (struct nb_seg){ 0, SEG_PAGES * NB_PAGE, 0 };
    l->seg[1] = (struct nb_seg){ (uint64_t)HIGH_PFN * NB_PAGE, SEG_PAGES * NB_PAGE,
                                 SEG_PAGES * NB_PAGE };
    l->total = 2 * SEG_PAGES * NB_PAGE;
    M.npages = 2 * SEG_PAGES;
    M.page_hash = HASHES;
    if (!(M.vmm.mem = calloc(1, l->total)) || !(ZCTX = ZSTD_createDCtx()))
        abort();
    for (size_t i = 0; i < NB_NH_WORDS; i++)
        M.keys.hash.nh[i] = (uint32_t)(i * 2654435761u);
    M.keys.hash.page_k0 = 1, M.keys.hash.page_k1 = 2;
    M.keys.hash.term_k0 = 3, M.keys.hash.term_k1 = 4;
    M.disk_hz = nb_zero_page_hash(&M.keys.hash);
    disk_init(&M.disk[0], "fuzz-disk-0", DISK0_SIZE);
    disk_init(&M.disk[1], "fuzz-disk-1", DISK1_SIZE);
    M.ndisks = 2;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz in = { data, size };
    uint8_t mode = fz_u8(&in), chans = fz_u8(&in), round = fz_u8(&in);
    struct dest d = { .m = &M, .nrcv = 1 + (chans & 3) };
    struct nb_chan ch = { .index = 1 + ((chans >> 2) & 3) };
    struct receiver r = { .m = &M, .dst = &d, .ch = &ch };
    struct nb_frame f = { .type = NB_MSG_PAGES, .channel = ch.index };
    char err[NB_ERRLEN];

    if (size > NB_MAX_PAGES_FRAME)
        return -1;
    if (!M.vmm.mem)
        guest_init();
    r.zctx = ZCTX;                  /* one per receiver, kept across frames */
    if (mode & 1) {
        d.written = WRITTEN;
        if (mode & 8)
            memset(WRITTEN, 0, sizeof(WRITTEN));
    }
    M.vmm.ops = mode & 1 ? &WITH_WRITE : &WITHOUT_WRITE;
    M.p.verify = mode & 2 ? NB_VERIFY_INCREMENTAL : NB_VERIFY_FULL;
    f.len = (uint32_t)in.n;
    f.payload = malloc(in.n + 1);   /* exactly the frame, as ASan sees it */
    memcpy(f.payload, in.p, in.n);
    memset(err, 'X', sizeof(err));
    if (mode & 4) {
        int kind = 0;
        f.type = NB_MSG_DISK;
        for (int i = 0; i < M.ndisks; i++)
            M.disk[i].dfd = mode & 16 ? M.disk[i].fd : -1;
        fz_debug("nb_disk_apply", nb_disk_apply(&M, d.nrcv, ch.index, &DRX, &f,
                                                round, &kind, err), err);
        /* the channel's ROUND_END writes the run */
        fz_debug("nb_disk_rx_flush", nb_disk_rx_flush(&M, &DRX, err), err);
        if (DRX.count)
            abort();    /* a run left unwritten past its round */
        free(f.payload);
        return 0;
    }
    fz_debug("apply_pages", apply_pages(&r, &f, round, err), err);
    if (r.nrun)
        abort();    /* a run left pointing into a frame about to be reused */
    free(r.fresh);
    free(f.payload);
    return 0;
}

static void disk_seed(const char *dir);

/* Seeds: one frame of each encoding, as the source encodes them. */
static void fuzz_seeds(const char *dir)
{
    static uint8_t old[NB_PAGE], cur[NB_PAGE], enc[NB_PAGE];
    struct fz_buf b = { 0 };
    uint8_t rec[NB_REC_HDR], hdr[NB_PAGES_HDR];
    size_t n;

    for (size_t i = 0; i < NB_PAGE; i++)
        cur[i] = (uint8_t)(i % 7 == 0 ? i : 0);
    fz_put8(&b, 3);
    fz_put8(&b, 0);                 /* one channel */
    fz_put8(&b, 0);
    nb_pages_finish(hdr, 0, 5);
    fz_put(&b, hdr, sizeof(hdr));
    nb_page_rec_put(rec, 1, NB_ENC_ZERO, 0);
    fz_put(&b, rec, sizeof(rec));
    nb_page_rec_put(rec, 2, NB_ENC_RAW, NB_PAGE);
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, cur, NB_PAGE);
    nb_page_rec_put(rec, 3, NB_ENC_RAW, NB_PAGE);
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, cur, NB_PAGE);
    memcpy(old, cur, NB_PAGE);
    memcpy(cur + 100, "changed bytes", 13);
    n = nb_delta_encode(old, cur, enc, sizeof(enc));
    nb_page_rec_put(rec, HIGH_PFN + 4, NB_ENC_DELTA, (uint16_t)n);
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, enc, n);
    n = ZSTD_compress(enc, NB_PAGE - 256, cur, NB_PAGE, 1);
    if (ZSTD_isError(n))
        abort();
    nb_page_rec_put(rec, HIGH_PFN + 5, NB_ENC_ZSTD, (uint16_t)n);
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, enc, n);
    fz_seed(dir, "one-of-each", b.p, b.len);
    b.len = 0;
    fz_put8(&b, 0);
    fz_put8(&b, 1 | 1 << 2);        /* two channels, this one is 2 */
    fz_put8(&b, 1);
    nb_pages_finish(hdr, 1, 1);
    fz_put(&b, hdr, sizeof(hdr));
    nb_page_rec_put(rec, HIGH_PFN + 1, NB_ENC_ZERO, 0);
    fz_put(&b, rec, sizeof(rec));
    fz_seed(dir, "second-channel", b.p, b.len);
    free(b.p);
    disk_seed(dir);
}

/* Seed: a DISK frame with one record of each encoding, the short last
 * block of disk 0 among them. */
static void disk_seed(const char *dir)
{
    static uint8_t block[NB_DISK_BLOCK], enc[NB_DISK_BLOCK];
    struct fz_buf b = { 0 };
    uint8_t rec[NB_DREC_HDR], hdr[NB_DISK_HDR];
    size_t n;

    for (size_t i = 0; i < NB_DISK_BLOCK; i++)
        block[i] = (uint8_t)(i % 5 == 0 ? i : 0);
    fz_put8(&b, 4 | 2);             /* DISK, incremental */
    fz_put8(&b, 0);                 /* one channel */
    fz_put8(&b, 2);
    nb_disk_finish(hdr, 2, 4);
    fz_put(&b, hdr, sizeof(hdr));
    nb_disk_rec_put(rec, 1, 0, NB_ENC_ZERO, 0);
    fz_put(&b, rec, sizeof(rec));
    nb_disk_rec_put(rec, 2, 0, NB_ENC_RAW, NB_DISK_BLOCK);
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, block, NB_DISK_BLOCK);
    nb_disk_rec_put(rec, 64, 0, NB_ENC_RAW, 512);     /* the last, short */
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, block, 512);
    n = ZSTD_compress(enc, NB_DISK_BLOCK - 1, block, NB_DISK_BLOCK, 1);
    if (ZSTD_isError(n))
        abort();
    nb_disk_rec_put(rec, 1, 1, NB_ENC_ZSTD, (uint16_t)n);
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, enc, n);
    fz_seed(dir, "disk-one-of-each", b.p, b.len);
    b.len = 0;
    fz_put8(&b, 16 | 4 | 2);        /* DISK in runs, incremental */
    fz_put8(&b, 0);
    fz_put8(&b, 3);
    nb_disk_finish(hdr, 3, 5);
    fz_put(&b, hdr, sizeof(hdr));
    for (uint64_t blk = 5; blk < 8; blk++) {     /* one run of three */
        nb_disk_rec_put(rec, blk, 0, NB_ENC_RAW, NB_DISK_BLOCK);
        fz_put(&b, rec, sizeof(rec));
        fz_put(&b, block, NB_DISK_BLOCK);
    }
    nb_disk_rec_put(rec, 8, 0, NB_ENC_ZSTD, (uint16_t)n);   /* extends it */
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, enc, n);
    nb_disk_rec_put(rec, 0, 1, NB_ENC_RAW, NB_DISK_BLOCK);  /* another disk */
    fz_put(&b, rec, sizeof(rec));
    fz_put(&b, block, NB_DISK_BLOCK);
    fz_seed(dir, "disk-runs", b.p, b.len);
    free(b.p);
}
