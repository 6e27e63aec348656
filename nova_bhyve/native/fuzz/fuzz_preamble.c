/*
 * Target "preamble": what the destination does with the source's
 * preamble text (core/dest.c, negotiate): nb_preamble_read_opts,
 * nb_preamble_read_disks, nb_preamble_read_spec, nb_preamble_write of
 * this side's answer and nb_preamble_check of the two.
 *
 * Input: the source's text; if it holds a NUL, the text after it is the
 * destination's own preamble, else the destination's is a fixed one
 * written by nb_preamble_write.  A spec that reads back is written again
 * and must read back the same.
 */
#include "fuzz_util.h"
#include "wire/wire.h"

/* The disks both sides describe: one of 1 MiB and one of a sector. */
static const struct nb_disk_spec DISKS = { 2, { 1u << 20, 512 } };

/* The destination's own guest spec and session parameters. */
static void own_spec(struct nb_guest_spec *s, struct nb_mig_params *p)
{
    memset(s, 0, sizeof(*s));
    memset(p, 0, sizeof(*p));
    strcpy(s->arch, "x86_64");
    strcpy(s->cpu_vendor, "GenuineIntel");
    strcpy(s->state_format, "nbvmstat/1");
    s->page_size = NB_PAGE;
    s->ncpus = 2;
    s->layout.nsegs = 2;
    s->layout.seg[0] = (struct nb_seg){ 0, 1u << 20, 0 };
    s->layout.seg[1] = (struct nb_seg){ 4ull << 30, 1u << 20, 1u << 20 };
    s->layout.total = 2u << 20;
    s->nfeat = 2;
    s->feat[0].leaf = 1, s->feat[0].reg = 2, s->feat[0].bits = 0xfffa3203;
    s->feat[1].leaf = 7, s->feat[1].reg = 1, s->feat[1].bits = 0x029c6fbf;
    p->channels = 4;
    p->compress = 1;
}

/* write(read(text)) must read back as the same guest. */
static void check_round_trip(const struct nb_guest_spec *s)
{
    struct nb_mig_params p;
    struct nb_guest_spec own, again;
    char text[NB_PREAMBLE_CAP], err[NB_ERRLEN];

    own_spec(&own, &p);
    if (nb_preamble_write(s, &p, &DISKS, text, sizeof(text)) < 0)
        return;
    if (nb_preamble_read_spec(text, &again, err) < 0 ||
        memcmp(&again.layout, &s->layout, sizeof(s->layout)) != 0 ||
        again.ncpus != s->ncpus || again.nfeat != s->nfeat ||
        strcmp(again.arch, s->arch) != 0)
        abort();
}

/* Disks read from a preamble are what the destination can create. */
static void check_disks(const struct nb_disk_spec *d)
{
    if (d->ndisks > NB_MAX_DISKS)
        abort();
    for (uint32_t i = 0; i < d->ndisks; i++)
        if (d->size[i] == 0 || d->size[i] % 512 || d->size[i] > NB_MAX_DISK_SIZE)
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz in = { data, size };
    char *src, *dst, mine[NB_PREAMBLE_CAP], err[NB_ERRLEN];
    struct nb_preamble_opts o;
    struct nb_guest_spec spec;
    struct nb_mig_params p;
    struct nb_disk_spec disks;

    if (size >= NB_MAX_PREAMBLE)    /* the frame limit of a PREAMBLE */
        return -1;
    src = fz_cstr(&in);
    own_spec(&spec, &p);
    if (strlen(src) < size) {
        dst = src + strlen(src) + 1;
    } else {
        if (nb_preamble_write(&spec, &p, &DISKS, mine, sizeof(mine)) < 0)
            abort();
        dst = mine;
    }
    memset(err, 'X', sizeof(err));
    if (fz_debug("read_opts", nb_preamble_read_opts(src, &o, err), err) == 0 ?
        o.channels < 1 || o.channels > NB_MAX_CHANNELS : !memchr(err, 0, sizeof(err)))
        abort();
    memset(err, 'X', sizeof(err));
    if (fz_debug("read_disks", nb_preamble_read_disks(src, &disks, err), err) == 0)
        check_disks(&disks);
    memset(err, 'X', sizeof(err));
    if (fz_debug("read_spec", nb_preamble_read_spec(src, &spec, err), err) == 0)
        check_round_trip(&spec);
    memset(err, 'X', sizeof(err));  /* a refusal must say why: no stale text */
    if (fz_debug("check", nb_preamble_check(src, dst, err, sizeof(err)), err) < 0 &&
        strnlen(err, sizeof(err)) == sizeof(err))
        abort();
    free(src);
    return 0;
}

/* Seeds: this side's preamble as the source, alone and with a mismatch. */
static void fuzz_seeds(const char *dir)
{
    struct nb_guest_spec s;
    struct nb_mig_params p;
    char text[2 * NB_PREAMBLE_CAP];
    int n;

    own_spec(&s, &p);
    n = nb_preamble_write(&s, &p, &DISKS, text, NB_PREAMBLE_CAP);
    fz_seed(dir, "same-host", text, (size_t)n);
    s.ncpus = 3;
    s.feat[1].bits |= 0x100;
    p.mode = 1;
    p.verify = NB_VERIFY_INCREMENTAL;
    n = nb_preamble_write(&s, &p, &DISKS, text, NB_PREAMBLE_CAP);
    text[n++] = 0;
    own_spec(&s, &p);
    n += nb_preamble_write(&s, &p, &DISKS, text + n, NB_PREAMBLE_CAP);
    fz_seed(dir, "warm-mismatch", text, (size_t)n);
}
