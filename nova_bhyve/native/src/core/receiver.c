/*
 * Destination side, the page channels' receivers (one thread each): a
 * channel's PAGES frames are decoded into guest memory (RAW pages at
 * consecutive offsets in one vmm write_pages call), its DISK frames into
 * the disk files (core/disk.c), and its ROUND_END moves the channel to
 * the next round, which the migration thread (core/dest.c) waits on.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zstd.h>

#include "core/dest.h"

/* Write the pending run of RAW pages, if any. */
static int flush_run(struct receiver *r, char *err)
{
    int n = r->nrun;
    r->nrun = 0;
    if (!n)
        return 0;
    if (r->m->vmm.ops->write_pages(&r->m->vmm, r->run_off, r->run, n, err) < 0) {
        r->kind = NB_ERR_VMM;
        return -1;
    }
    return 0;
}

/* Make room for a page at `off` in the run: write the run first if it
 * is full or the page does not follow it. */
static int run_room(struct receiver *r, uint64_t off, char *err)
{
    if (r->nrun && (r->nrun == NB_WRITE_BATCH ||
                    off != r->run_off + (uint64_t)r->nrun * NB_PAGE) &&
        flush_run(r, err) < 0)
        return -1;
    if (!r->nrun)
        r->run_off = off;
    return 0;
}

/*
 * Queue a RAW page at `off` for one write_pages call with its neighbours
 * (the record stays in the frame until the run is flushed).
 */
static int queue_raw(struct receiver *r, uint64_t off, const uint8_t *data,
                     char *err)
{
    if (run_room(r, off, err) < 0)
        return -1;
    r->run[r->nrun++] = data;
    return 0;
}

/*
 * A DELTA for a page nothing has written yet applies to zeros: decode it
 * into a page of the run and write it with its neighbours, which costs
 * the destination less than faulting the page in.  Returns 1 if the
 * delta is malformed.
 */
static int queue_fresh_delta(struct receiver *r, uint64_t off,
                             const struct nb_page_rec *pr, const uint8_t **hashed,
                             char *err)
{
    uint8_t *page;
    if (!r->fresh && !(r->fresh = malloc((size_t)NB_WRITE_BATCH * NB_PAGE))) {
        snprintf(err, NB_ERRLEN, "out of memory");
        r->kind = NB_ERR_RESOURCE;
        return -1;
    }
    if (run_room(r, off, err) < 0)
        return -1;
    page = r->fresh + (size_t)r->nrun * NB_PAGE;
    memset(page, 0, NB_PAGE);
    if (nb_delta_decode(pr->data, pr->len, page) < 0)
        return 1;
    r->run[r->nrun++] = page;
    *hashed = page;
    return 0;
}

/* Note that page `index` is written; 1 if it was not before. */
static int first_write(struct receiver *r, uint64_t index)
{
    uint64_t *w = r->dst->written, bit = 1ULL << (index % 64);
    int first;
    if (!w)
        return 0;
    first = !(w[index / 64] & bit);
    w[index / 64] |= bit;
    return first;
}

/* Pages the kernel maps around a read fault (fault_around_bytes, 64 KiB
 * by default), aligned. */
#define FAULT_AROUND_PAGES 16

/*
 * Read one byte of `page` (guest memory) before writing into it, when
 * the frame's next record is for a page of the same 64 KiB: a page that
 * only write_pages has written is not mapped here yet, and a read fault
 * maps its written neighbours with it (the kernel's fault-around), where
 * a write fault maps one page.  Measured on the Linux test host: pages
 * written in a run then cost 0.35 us each to map instead of 1.7 us (in a
 * final round of sixty thousand deltas that was most of the
 * destination's time in the pause); but a lone page 6.5 us against 2.2,
 * hence the neighbour test.
 */
static inline void map_by_reading(const uint8_t *page,
                                  const struct nb_page_rec *pr, size_t avail)
{
    uint32_t next;
    if (nb_page_rec_next_pfn(pr, avail, &next) &&
        next / FAULT_AROUND_PAGES == pr->pfn / FAULT_AROUND_PAGES)
        (void)*(const volatile uint8_t *)page;
}

/*
 * Decode a record for page `index` into `page` (guest memory).  A RAW
 * page, or a DELTA for a page nothing has written yet, may instead be
 * queued for write_pages: *hashed then points at its bytes.  A ZERO for
 * such a page writes nothing (it is zeros already).  `avail`: the bytes
 * from the record to the frame's end.  Returns 1 if the record is
 * undecodable.
 */
static int decode_record(struct receiver *r, const struct nb_page_rec *pr,
                         uint64_t off, uint64_t index, uint8_t *page,
                         size_t avail, const uint8_t **hashed, char *err)
{
    uint8_t tmp[NB_PAGE];
    size_t n;

    *hashed = page;
    if (first_write(r, index)) {
        if (pr->enc == NB_ENC_DELTA)
            return queue_fresh_delta(r, off, pr, hashed, err);
        if (pr->enc == NB_ENC_ZERO) {
            *hashed = nb_zero_page;
            return pr->len != 0;
        }
    }
    if (pr->enc != NB_ENC_RAW) {
        if (flush_run(r, err) < 0)
            return -1;
        map_by_reading(page, pr, avail);
    }
    switch (pr->enc) {
    case NB_ENC_ZERO:
        if (pr->len != 0)
            return 1;
        memset(page, 0, NB_PAGE);
        return 0;
    case NB_ENC_RAW:
        if (pr->len != NB_PAGE)
            return 1;
        if (!r->m->vmm.ops->write_pages) {
            memcpy(page, pr->data, NB_PAGE);
            return 0;
        }
        *hashed = pr->data;
        return queue_raw(r, off, pr->data, err);
    case NB_ENC_DELTA:
        return nb_delta_decode(pr->data, pr->len, page) < 0;
    case NB_ENC_ZSTD:
        if (!r->zctx && !(r->zctx = ZSTD_createDCtx()))
            return 1;
        n = ZSTD_decompressDCtx(r->zctx, tmp, NB_PAGE, pr->data, pr->len);
        if (ZSTD_isError(n) || n != NB_PAGE)
            return 1;
        memcpy(page, tmp, NB_PAGE);
        return 0;
    }
    return 1;
}

/* Apply one page record; every length and index is checked before use. */
static int apply_record(struct receiver *r, const uint8_t *rec, size_t avail,
                        size_t *used, char *err)
{
    struct nb_mig *m = r->m;
    struct nb_page_rec pr;
    const uint8_t *hashed;
    uint64_t off, index;
    int rc;

    if (nb_page_rec_parse(rec, avail, &pr, err) < 0)
        return -1;
    if (nb_pfn_to_offset(m, pr.pfn, &off, &index) < 0) {
        snprintf(err, NB_ERRLEN, "page record for pfn 0x%llx outside guest RAM",
                 (unsigned long long)pr.pfn);
        return -1;
    }
    if ((index / 64) % (uint64_t)r->dst->nrcv + 1 != r->ch->index) {
        snprintf(err, NB_ERRLEN, "page record for pfn 0x%llx on channel %u; it "
                 "belongs to channel %llu", (unsigned long long)pr.pfn,
                 r->ch->index,
                 (unsigned long long)((index / 64) % (uint64_t)r->dst->nrcv + 1));
        return -1;
    }
    rc = decode_record(r, &pr, off, index, m->vmm.mem + off, avail, &hashed,
                       err);
    if (rc < 0)
        return -1;
    if (rc > 0) {
        snprintf(err, NB_ERRLEN, "undecodable page record (encoding %u, %u bytes) "
                 "for pfn 0x%llx", pr.enc, pr.len, (unsigned long long)pr.pfn);
        return -1;
    }
    if (m->p.verify == NB_VERIFY_INCREMENTAL)
        nb_set_page_term(m, r->ch->index - 1, index,
                         nb_digest_term(pr.pfn, nb_page_hash(hashed, &m->keys.hash),
                                        r->dst->hz, &m->keys.hash));
    *used = NB_REC_HDR + pr.len;
    return 0;
}

static int apply_pages(struct receiver *r, const struct nb_frame *f,
                       uint32_t expect_round, char *err)
{
    size_t pos = NB_PAGES_HDR;
    uint32_t round = 0, n = 0;
    if (nb_pages_parse(f, &round, &n) < 0 || round != expect_round) {
        snprintf(err, NB_ERRLEN, "channel %u: pages for round %u while in round %u",
                 f->channel, round, expect_round);
        return -1;
    }
    for (uint32_t i = 0; i < n; i++) {
        size_t used;
        if (apply_record(r, f->payload + pos, f->len - pos, &used, err) < 0) {
            r->nrun = 0;
            return -1;
        }
        pos += used;
    }
    if (pos != f->len) {
        snprintf(err, NB_ERRLEN, "channel %u: %zu stray bytes after %u page records",
                 f->channel, (size_t)f->len - pos, n);
        r->nrun = 0;
        return -1;
    }
    if (flush_run(r, err) < 0)   /* the frame's buffer is reused next */
        return -1;
    atomic_fetch_add(&r->m->pages_raw, n);
    return 0;
}

/*
 * Take one frame of a page channel that is in round *round: PAGES and
 * DISK frames apply (none after the final round), ROUND_END moves the
 * channel to the next round.  -1 with err and *kind: the channel ends.
 */
static int take_frame(struct receiver *r, const struct nb_frame *f,
                      uint32_t *round, int *kind, char *err)
{
    struct dest *d = r->dst;
    struct nb_round_end end;
    int slot = r->ch->index - 1;

    *kind = NB_ERR_CORRUPT;
    if ((f->type == NB_MSG_PAGES || f->type == NB_MSG_DISK ||
         f->type == NB_MSG_STREAM) &&
        *round > atomic_load(&d->final_round)) {
        snprintf(err, NB_ERRLEN, "channel %d: %s frame after the final "
                 "round %u (never applied)", slot + 1, nb_msg_name(f->type),
                 atomic_load(&d->final_round));
        return -1;
    }
    if (f->type == NB_MSG_PAGES) {
        if (apply_pages(r, f, *round, err) == 0)
            return 0;
        *kind = r->kind ? r->kind : NB_ERR_CORRUPT;
        return -1;
    }
    if (f->type == NB_MSG_STREAM)
        return nb_stream_apply(r->m, slot + 1, f, *round, kind, err);
    if (f->type == NB_MSG_DISK)
        return nb_disk_apply(r->m, d->nrcv, slot + 1, &r->disk, f, *round, kind,
                             err);
    if (nb_round_end_parse(f, &end) < 0 || end.round != *round) {
        snprintf(err, NB_ERRLEN, "channel %d: unexpected %s frame in round %u",
                 slot + 1, nb_msg_name(f->type), *round);
        return -1;
    }
    if (nb_disk_rx_flush(r->m, &r->disk, err) < 0) {
        *kind = NB_ERR_VMM;
        return -1;
    }
    pthread_mutex_lock(&d->lock);
    d->done_round[slot] = ++*round;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    if (write(d->wake[1], "x", 1) < 0) {
        /* the pipe is full: the control thread is awake anyway */
    }
    return 0;
}

/*
 * A page channel's receiver thread: applies its frames until the channel
 * ends; one ending before the session is over fails the session.
 */
void *nb_receiver_main(void *arg)
{
    struct receiver *r = arg;
    struct dest *d = r->dst;
    struct nb_mig *m = r->m;
    char err[NB_ERRLEN];
    uint32_t round = 0;
    int kind;

    for (;;) {
        struct nb_frame f;
        if (nb_recv_frame(r->ch, &f, NB_MAX_PAGES_FRAME, err) < 0) {
            kind = r->ch->err_kind;
            break;
        }
        if (take_frame(r, &f, &round, &kind, err) < 0)
            break;
    }
    /* a channel ending is normal once the session is over */
    pthread_mutex_lock(&m->lock);
    int over = m->st.committed || m->st.result != NB_RESULT_RUNNING ||
               m->fail_kind;
    pthread_mutex_unlock(&m->lock);
    pthread_mutex_lock(&d->lock);
    if (!over) {
        d->failed = 1;
        pthread_cond_broadcast(&d->cond);
    }
    pthread_mutex_unlock(&d->lock);
    if (!over) {
        nb_fail(m, kind, "%s", err);
        /* wake the control thread; it can still tell the source why */
        if (m->ctl.fd >= 0)
            shutdown(m->ctl.fd, SHUT_RD);
    }
    return NULL;
}
