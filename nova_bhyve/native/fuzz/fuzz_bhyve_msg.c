/*
 * Target "bhyve_msg": the bhyve port's other input handling (bhyve_msg.c,
 * bhyve_restore.c): the target-string parser, the nvlist packer and the
 * checkpoint request (names and values from the input, into buffers of
 * any size), the guest layout from VM_MMAP_GETNEXT results, the dirty-log
 * capability decision and the UPB dirty-page list -> bitmap conversion.
 *
 * Input: u8 mode, then
 *   mode 0: the target string "NAME[,key=value...]"
 *   mode 1: u16 capacity, then pairs { u8 type, u8 name length, name,
 *           u8 value length, value } packed into an nvlist
 *   mode 2: u8 suspend, u16 capacity, the checkpoint file name
 *   mode 3: u8 count, then maps { u64 gpa, u64 len, u8 flags }, u64
 *           restore memsize, u8 percent, u16 ncpus
 *   mode 4: u8 flags, u8 low pages, u8 high pages, u16 offset fudge,
 *           u8 bitmap words, then the dirty-page list
 */
#include <errno.h>

#include "fuzz_util.h"
#include "vmm/bhyve/bhyve.h"

static void target_string(struct fz *in)
{
    struct nb_bhyve_opts o;
    char *s = fz_cstr(in), err[NB_ERRLEN], dir[600];

    memset(err, 'X', sizeof(err));

    if (fz_debug("parse_target", nb_bhyve_parse_target(s, &o, err), err) == 0) {
        if (!o.name[0] || strchr(o.name, '/') || strchr(o.name, ',') ||
            strlen(o.rundir) + 1 + strlen(o.name) >= 104)
            abort();    /* a name or socket path the parser should refuse */
        nb_bhyve_keep_dir(&o, dir, sizeof(dir));
    }
    free(s);
}

static void nvlist(struct fz *in)
{
    size_t cap = fz_u16(in) % 4096, len = 0;
    uint8_t *buf = malloc(cap + 1);
    struct nb_nvbuf nv;
    char err[NB_ERRLEN];

    nb_nv_init(&nv, buf, cap);
    while (in->n) {
        uint8_t type = fz_u8(in);
        size_t nl, vl;
        const uint8_t *np = fz_take(in, fz_u8(in), &nl);
        char name[256], value[256];
        memcpy(name, np, nl);
        name[nl] = 0;
        memcpy(value, fz_take(in, fz_u8(in), &vl), vl);
        value[vl] = 0;
        switch (type & 3) {
        case 0: nb_nv_add_string(&nv, name, value); break;
        case 1: nb_nv_add_bool(&nv, name, vl); break;
        case 2: nb_nv_add_number(&nv, name, vl * 0x0101010101010101ull); break;
        case 3: nb_nv_add_descriptor(&nv, name); break;
        }
    }
    if (nb_nv_finish(&nv, &len, err) == 0 && (len > cap || len < NB_NV_LIST_HEADER_SIZE))
        abort();
    free(buf);
}

static void checkpoint_msg(struct fz *in)
{
    int suspend = fz_u8(in) & 1;
    size_t cap = fz_u16(in) % 2048, len = 0;
    uint8_t *buf = malloc(cap + 1);
    char *name = fz_cstr(in), err[NB_ERRLEN];

    if (nb_bhyve_checkpoint_msg(buf, cap, &len, name, suspend, err) == 0 && len > cap)
        abort();
    free(name);
    free(buf);
}

static void layout(struct fz *in)
{
    struct nb_bhyve_map maps[8];
    struct nb_layout l, r;
    char err[NB_ERRLEN];
    int n = fz_u8(in) % 9, wired = 0, limit;

    for (int i = 0; i < n; i++) {
        uint8_t flags;
        maps[i].gpa = fz_u64(in);
        maps[i].len = fz_u64(in);
        flags = fz_u8(in);
        maps[i].sysmem = flags & 1;
        maps[i].wired = (flags >> 1) & 1;
        if (flags & 4)  /* the two addresses libvmmapi uses */
            maps[i].gpa = flags & 8 ? NB_BHYVE_HIGHMEM_BASE : 0;
    }
    if (nb_bhyve_layout(maps, n, &l, &wired, err) == 0) {
        char reason[NB_ERRLEN];
        if (l.nsegs < 1 || l.nsegs > 2 || l.seg[0].len > NB_BHYVE_LOWMEM_LIMIT)
            abort();
        nb_bhyve_probe_decide(0, 0, wired, 0, &l, reason);
        nb_bhyve_probe_decide(-1, ENOTTY, wired, 1, &l, reason);
    }
    if (nb_bhyve_restore_layout(fz_u64(in), &r, err) == 0 &&
        r.total != r.seg[0].len + (r.nsegs == 2 ? r.seg[1].len : 0))
        abort();
    {
        int percent = (int8_t)fz_u8(in), ncpus = (int16_t)fz_u16(in);
        nb_bhyve_pcpu_limit(percent, ncpus, &limit, err);
    }
}

static void dirty_list(struct fz *in)
{
    uint8_t flags = fz_u8(in);
    uint64_t low = fz_u8(in), high = fz_u8(in), fudge = fz_u16(in), ndirty;
    size_t words = fz_u8(in);
    uint64_t *bitmap = calloc(words + 1, sizeof(uint64_t));
    struct nb_layout l = { .nsegs = 1 + (flags & 1) };
    char err[NB_ERRLEN];

    memset(err, 'X', sizeof(err));
    l.seg[0].len = low * NB_PAGE;
    l.seg[1].gpa = NB_BHYVE_HIGHMEM_BASE;
    l.seg[1].len = high * NB_PAGE;
    l.seg[1].offset = l.seg[0].len + (flags & 2 ? fudge : 0);
    l.seg[0].offset = flags & 4 ? fudge : 0;
    l.total = l.seg[0].len + (l.nsegs == 2 ? l.seg[1].len : 0) + (flags & 8 ? fudge : 0);
    if (flags & 16)
        l.nsegs = flags >> 5;
    if (fz_debug("dirty_to_bitmap", nb_bhyve_dirty_to_bitmap(&l, in->p, in->n,
                 bitmap, words, &ndirty, err), err) == 0 && ndirty > in->n)
        abort();
    free(bitmap);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz in = { data, size };

    if (size > 65536)
        return -1;
    switch (fz_u8(&in) % 5) {
    case 0: target_string(&in); break;
    case 1: nvlist(&in); break;
    case 2: checkpoint_msg(&in); break;
    case 3: layout(&in); break;
    case 4: dirty_list(&in); break;
    }
    return 0;
}

/* Seeds: one valid input per mode. */
static void fuzz_seeds(const char *dir)
{
    static const char target[] = "\x00vm1,rundir=/var/run/bhyve,scratch=/var/tmp,"
        "restore=/var/tmp/r,pidfile=/var/run/vm1.pid,pid=42,timeout=60,"
        "exit_on_save=1,ncpus=2,memsize=1073741824";
    struct fz_buf b = { 0 };

    fz_seed(dir, "target", target, sizeof(target) - 1);
    fz_put8(&b, 1);
    fz_put16(&b, 512);
    fz_put8(&b, 0), fz_put8(&b, 3), fz_put(&b, "cmd", 3), fz_put8(&b, 10);
    fz_put(&b, "checkpoint", 10);
    fz_put8(&b, 1), fz_put8(&b, 7), fz_put(&b, "suspend", 7), fz_put8(&b, 0);
    fz_put8(&b, 3), fz_put8(&b, 5), fz_put(&b, "fddir", 5), fz_put8(&b, 0);
    fz_seed(dir, "nvlist", b.p, b.len);
    b.len = 0;
    fz_put8(&b, 2), fz_put8(&b, 1), fz_put16(&b, 256), fz_put(&b, "ckpt", 4);
    fz_seed(dir, "checkpoint", b.p, b.len);
    b.len = 0;
    fz_put8(&b, 3), fz_put8(&b, 3);
    fz_put32(&b, 0), fz_put32(&b, 0), fz_put32(&b, 3u << 30), fz_put32(&b, 0);
    fz_put8(&b, 1 | 2);
    fz_put32(&b, 0), fz_put32(&b, 1), fz_put32(&b, 1u << 30), fz_put32(&b, 0);
    fz_put8(&b, 1 | 2);
    fz_put32(&b, 0xfffc0000u), fz_put32(&b, 0), fz_put32(&b, 1u << 18), fz_put32(&b, 0);
    fz_put8(&b, 0);
    fz_put32(&b, 1u << 30), fz_put32(&b, 1);    /* 5 GiB */
    fz_put8(&b, 50), fz_put16(&b, 4);
    fz_seed(dir, "layout", b.p, b.len);
    b.len = 0;
    fz_put8(&b, 4), fz_put8(&b, 1), fz_put8(&b, 70), fz_put8(&b, 10);
    fz_put16(&b, 0), fz_put8(&b, 2);
    for (int i = 0; i < 80; i++)
        fz_put8(&b, (uint8_t)(i % 3 == 0));
    fz_seed(dir, "dirty", b.p, b.len);
    free(b.p);
}
