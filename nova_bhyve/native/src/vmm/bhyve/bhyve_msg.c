/*
 * Portable pieces of the bhyve vmm port; see bhyve.h.
 *
 * Wire format of a packed nvlist (sys/contrib/libnv, nvlist.c/nvpair.c),
 * every integer in the sender's byte order (NB_NV_FLAG_BIG_ENDIAN set in
 * the header flags on big-endian hosts), both headers __packed:
 *
 *   nvlist_header  u8 magic 0x6c, u8 version 0, u8 flags,
 *                  u64 descriptors, u64 size (bytes after this header)
 *   nvpair_header  u8 type, u16 namesize (name + NUL), u64 datasize,
 *                  u64 nitems (0 for non-array types)
 *   name           namesize bytes, NUL-terminated
 *   data           string: the string and its NUL; bool: one byte 0/1;
 *                  number: u64; descriptor: i64 index into the
 *                  descriptors that nvlist_send() passes after the data:
 *                  a one-byte (0) message with one SCM_RIGHTS cmsghdr per
 *                  descriptor (msgio.c fd_package_send).
 *
 * Pairs are packed in insertion order (nvpair_insert uses TAILQ tail).
 */
#include "vmm/bhyve/bhyve.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int nb_errf(char *err, const char *fmt, ...)
{
    va_list ap;

    if (err != NULL) {
        va_start(ap, fmt);
        vsnprintf(err, NB_ERRLEN, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int nb_syserrf(char *err, const char *fmt, ...)
{
    int e = errno;
    size_t n;
    va_list ap;

    if (err == NULL)
        return -1;
    va_start(ap, fmt);
    vsnprintf(err, NB_ERRLEN, fmt, ap);
    va_end(ap);
    n = strlen(err);
    snprintf(err + n, NB_ERRLEN - n, ": %s", strerror(e));
    errno = e;
    return -1;
}

#define fail nb_errf

static int host_big_endian(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 0;
}

/* ------------------------------------------------------------- nvlist */

void nb_nv_init(struct nb_nvbuf *nv, uint8_t *buf, size_t cap)
{
    memset(nv, 0, sizeof(*nv));
    nv->buf = buf;
    nv->cap = cap;
    nv->len = NB_NV_LIST_HEADER_SIZE;
    if (cap < NB_NV_LIST_HEADER_SIZE)
        nv->overflow = 1;
}

static int nv_pair(struct nb_nvbuf *nv, uint8_t type, const char *name,
                   const void *data, uint64_t datasize)
{
    size_t namesize = name != NULL ? strlen(name) + 1 : 0;
    uint16_t ns16;
    uint64_t nitems = 0;
    uint8_t *p;

    if (namesize < 2 || namesize > NB_NV_NAME_MAX) {
        nv->bad_name = 1;
        return -1;
    }
    if (nv->overflow || nv->len + NB_NV_PAIR_HEADER_SIZE + namesize +
        datasize > nv->cap) {
        nv->overflow = 1;
        return -1;
    }
    ns16 = (uint16_t)namesize;
    p = nv->buf + nv->len;
    p[0] = type;
    memcpy(p + 1, &ns16, 2);
    memcpy(p + 3, &datasize, 8);
    memcpy(p + 11, &nitems, 8);
    memcpy(p + NB_NV_PAIR_HEADER_SIZE, name, namesize);
    memcpy(p + NB_NV_PAIR_HEADER_SIZE + namesize, data, (size_t)datasize);
    nv->len += NB_NV_PAIR_HEADER_SIZE + namesize + (size_t)datasize;
    return 0;
}

int nb_nv_add_string(struct nb_nvbuf *nv, const char *name, const char *value)
{
    return nv_pair(nv, NB_NV_TYPE_STRING, name, value, strlen(value) + 1);
}

int nb_nv_add_bool(struct nb_nvbuf *nv, const char *name, int value)
{
    uint8_t b = value ? 1 : 0;
    return nv_pair(nv, NB_NV_TYPE_BOOL, name, &b, 1);
}

int nb_nv_add_number(struct nb_nvbuf *nv, const char *name, uint64_t value)
{
    return nv_pair(nv, NB_NV_TYPE_NUMBER, name, &value, 8);
}

int nb_nv_add_descriptor(struct nb_nvbuf *nv, const char *name)
{
    int64_t idx = (int64_t)nv->ndesc;

    if (nv_pair(nv, NB_NV_TYPE_DESCRIPTOR, name, &idx, 8) != 0)
        return -1;
    nv->ndesc++;
    return 0;
}

int nb_nv_finish(struct nb_nvbuf *nv, size_t *len, char *err)
{
    uint64_t size;
    uint8_t *p = nv->buf;

    if (nv->bad_name)
        return fail(err, "nvlist pair name is empty or longer than %d bytes",
                    NB_NV_NAME_MAX - 1);
    if (nv->overflow)
        return fail(err, "nvlist does not fit in %zu bytes", nv->cap);
    size = nv->len - NB_NV_LIST_HEADER_SIZE;
    p[0] = NB_NV_HEADER_MAGIC;
    p[1] = NB_NV_HEADER_VERSION;
    p[2] = host_big_endian() ? NB_NV_FLAG_BIG_ENDIAN : 0;
    memcpy(p + 3, &nv->ndesc, 8);
    memcpy(p + 11, &size, 8);
    *len = nv->len;
    return 0;
}

int nb_bhyve_checkpoint_msg(uint8_t *out, size_t cap, size_t *len,
                            const char *filename, int suspend, char *err)
{
    struct nb_nvbuf nv;
    size_t n = filename != NULL ? strlen(filename) : 0;

    /* bhyve opens FILE, FILE.kern and FILE.meta with openat(fddir, ...)
     * and refuses names longer than NAME_MAX (255) with the extension. */
    if (n == 0 || strchr(filename, '/') != NULL || strcmp(filename, ".") == 0
        || strcmp(filename, "..") == 0)
        return fail(err, "checkpoint file name '%s' must be a plain file name "
                    "inside the checkpoint directory",
                    filename != NULL ? filename : "");
    if (n + 5 > 255)
        return fail(err, "checkpoint file name is %zu bytes; bhyve allows "
                    "250 so that FILE.kern and FILE.meta fit NAME_MAX", n);
    nb_nv_init(&nv, out, cap);
    nb_nv_add_string(&nv, "cmd", "checkpoint");
    nb_nv_add_string(&nv, "filename", filename);
    nb_nv_add_bool(&nv, "suspend", suspend);
    nb_nv_add_descriptor(&nv, "fddir");
    return nb_nv_finish(&nv, len, err);
}

/* ---------------------------------------------------- dirty log, layout */

static int layout_pages(const struct nb_layout *l, uint64_t *npages, char *err)
{
    if (l == NULL || l->nsegs < 1 || l->nsegs > 2)
        return fail(err, "layout must have one or two segments");
    if (l->seg[0].offset != 0 ||
        (l->nsegs == 2 && l->seg[1].offset != l->seg[0].len))
        return fail(err, "layout offsets are not lowmem then highmem "
                    "contiguous, which the UPB dirty-page index assumes");
    if (l->total % NB_PAGE != 0 ||
        l->total != l->seg[0].len + (l->nsegs == 2 ? l->seg[1].len : 0))
        return fail(err, "layout total is not the page-aligned sum of its "
                    "segments");
    *npages = l->total / NB_PAGE;
    return 0;
}

int nb_bhyve_dirty_to_bitmap(const struct nb_layout *layout,
                             const uint8_t *list, size_t npages,
                             uint64_t *bitmap, size_t words,
                             uint64_t *ndirty, char *err)
{
    uint64_t want = 0, count = 0;
    size_t i;

    if (layout_pages(layout, &want, err) != 0)
        return -1;
    if (npages != want)
        return fail(err, "dirty-page list has %zu pages, the layout %llu",
                    npages, (unsigned long long)want);
    if (words < (npages + 63) / 64)
        return fail(err, "bitmap of %zu words is too small for %zu pages",
                    words, npages);
    memset(bitmap, 0, words * sizeof(*bitmap));
    for (i = 0; i < npages; i++) {
        if (list[i] != 0) {
            bitmap[i / 64] |= 1ull << (i % 64);
            count++;
        }
    }
    if (ndirty != NULL)
        *ndirty = count;
    return 0;
}

int nb_bhyve_probe_decide(int ioctl_rc, int err_no, int mem_wired,
                          int cpu_smap, const struct nb_layout *layout,
                          char *reason)
{
    uint64_t npages = 0;

    if (ioctl_rc != 0) {
        if (err_no == ENOTTY)
            fail(reason, "kernel has no VM_GET_DIRTY_PAGE_LIST (stock "
                 "vmm(4); it exists only in the UPB migration branch built "
                 "with BHYVE_SNAPSHOT): memory is copied with the VM paused");
        else if (err_no == EINVAL)
            fail(reason, "kernel rejected VM_GET_DIRTY_PAGE_LIST (EINVAL): "
                 "its vmm(4) ABI differs from the UPB migration branch");
        else if (err_no == EPERM || err_no == EACCES)
            fail(reason, "not permitted to read the dirty-page list: run as "
                 "root, and in a jail set allow.vmm");
        else
            fail(reason, "VM_GET_DIRTY_PAGE_LIST probe failed: %s",
                 strerror(err_no));
        return 0;
    }
    if (layout_pages(layout, &npages, reason) != 0)
        return 0;
    if (layout->nsegs == 2 && layout->seg[0].len != NB_BHYVE_LOWMEM_LIMIT) {
        fail(reason, "highmem with lowmem of %llu bytes: the UPB kernel's "
             "page index assumes lowmem is exactly 3 GiB",
             (unsigned long long)layout->seg[0].len);
        return 0;
    }
    /* Clearing dirty bits needs VM_COPY_VMM_PAGES, whose handler memcpy()s
     * into the caller's buffer instead of using copyout(9): with SMAP on,
     * that supervisor write to user memory is a fatal page fault. */
    if (cpu_smap) {
        fail(reason, "kernel has VM_GET_DIRTY_PAGE_LIST, but clearing dirty "
             "pages (VM_COPY_VMM_PAGES) writes user memory without "
             "copyout(9) and would panic this SMAP-capable host");
        return 0;
    }
    if (!mem_wired) {
        fail(reason, "kernel has VM_GET_DIRTY_PAGE_LIST but guest memory is "
             "not wired, so pages paged out between passes would be missed: "
             "start bhyve with -S");
        return 0;
    }
    fail(reason, "VM_GET_DIRTY_PAGE_LIST available (UPB migration kernel), "
         "guest memory wired");
    return 1;
}

int nb_bhyve_layout(const struct nb_bhyve_map *maps, int nmaps,
                    struct nb_layout *layout, int *wired, char *err)
{
    const struct nb_bhyve_map *low = NULL, *high = NULL;
    int i, nsys = 0, all_wired = 1;

    for (i = 0; i < nmaps; i++)
        nsys += maps[i].sysmem != 0;
    if (nsys == 0)
        return fail(err, "the VM has no guest RAM mapped yet: is bhyve still "
                    "starting?");
    if (nsys > 2)
        return fail(err, "the VM has %d guest RAM mappings: the migration "
                    "engine supports lowmem at 0 plus highmem at 4 GiB (no "
                    "NUMA domains)", nsys);
    for (i = 0; i < nmaps; i++) {
        const struct nb_bhyve_map *m = &maps[i];

        if (!m->sysmem)
            continue;           /* bootrom, framebuffer: device memory */
        if (m->len == 0 || m->len % NB_PAGE != 0 || m->gpa % NB_PAGE != 0 ||
            m->gpa + m->len < m->gpa)
            return fail(err, "guest RAM mapping at 0x%llx (+0x%llx) is not "
                        "page aligned", (unsigned long long)m->gpa,
                        (unsigned long long)m->len);
        if (m->gpa == 0 && low == NULL)
            low = m;
        else if (m->gpa == NB_BHYVE_HIGHMEM_BASE && high == NULL)
            high = m;
        else
            return fail(err, "guest RAM mapped at 0x%llx: only lowmem at 0 "
                        "and highmem at 4 GiB (libvmmapi's layout) are "
                        "supported", (unsigned long long)m->gpa);
        all_wired &= m->wired != 0;
    }
    if (low == NULL)
        return fail(err, "the VM has no guest RAM at GPA 0: the migration "
                    "engine supports lowmem at 0 plus highmem at 4 GiB");
    if (low->len > NB_BHYVE_LOWMEM_LIMIT)
        return fail(err, "lowmem of %llu bytes reaches past 3 GiB",
                    (unsigned long long)low->len);
    memset(layout, 0, sizeof(*layout));
    layout->nsegs = high != NULL ? 2 : 1;
    layout->seg[0].gpa = 0;
    layout->seg[0].len = low->len;
    layout->seg[0].offset = 0;
    if (high != NULL) {
        layout->seg[1].gpa = high->gpa;
        layout->seg[1].len = high->len;
        layout->seg[1].offset = low->len;
    }
    layout->total = low->len + (high != NULL ? high->len : 0);
    if (wired != NULL)
        *wired = all_wired;
    return 0;
}

/* ------------------------------------------------------------ options */

static int opt_int(const char *key, const char *val, long min, long max,
                   int *out, char *err)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(val, &end, 10);
    if (errno != 0 || end == val || *end != '\0' || v < min || v > max)
        return fail(err, "option %s=%s: expected an integer in %ld..%ld",
                    key, val, min, max);
    *out = (int)v;
    return 0;
}

static int opt_memsize(const char *key, const char *val, uint64_t *out,
                       char *err)
{
    unsigned long long v;
    char *end;

    errno = 0;
    v = strtoull(val, &end, 10);
    if (errno != 0 || end == val || *end != '\0' || val[0] == '-' ||
        v == 0 || v % NB_PAGE != 0 || v > NB_BHYVE_MAX_MEMSIZE)
        return fail(err, "option %s=%s: expected bytes of guest RAM, a "
                    "multiple of %u up to %llu", key, val, NB_PAGE,
                    (unsigned long long)NB_BHYVE_MAX_MEMSIZE);
    *out = v;
    return 0;
}

static int opt_path(const char *key, const char *val, char *out, size_t cap,
                    char *err)
{
    if (val[0] != '/' || strlen(val) >= cap)
        return fail(err, "option %s=%s: expected an absolute path shorter "
                    "than %zu bytes", key, val, cap);
    memcpy(out, val, strlen(val) + 1);
    return 0;
}

int nb_bhyve_parse_target(const char *target, struct nb_bhyve_opts *o,
                          char *err)
{
    char buf[2048], *tok, *end, *eq;
    size_t i, n;

    memset(o, 0, sizeof(*o));
    strcpy(o->rundir, "/var/run/bhyve");
    strcpy(o->scratch, "/var/tmp");
    o->timeout = 600;
    if (target == NULL || strlen(target) >= sizeof(buf))
        return fail(err, "bhyve target must be 'NAME[,key=value...]' of "
                    "fewer than %zu bytes", sizeof(buf));
    strcpy(buf, target);
    n = strcspn(buf, ",");
    if (n == 0 || n >= sizeof(o->name))
        return fail(err, "VM name must be 1..%zu bytes (target '%s')",
                    sizeof(o->name) - 1, target);
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)buf[i];
        if (c <= ' ' || c == '/' || c == '=' || c == 0x7f)
            return fail(err, "VM name '%.*s' contains '%c' (0x%02x): bhyve "
                        "names are /dev/vmm/NAME", (int)n, buf,
                        c > ' ' && c < 0x7f ? c : '?', c);
    }
    memcpy(o->name, buf, n);
    o->name[n] = '\0';
    if (strcmp(o->name, ".") == 0 || strcmp(o->name, "..") == 0)
        return fail(err, "'%s' is not a VM name", o->name);
    for (tok = buf + n; *tok != '\0'; tok = end) {
        char sep;
        int r;

        tok++;                              /* the ',' */
        end = tok + strcspn(tok, ",");
        sep = *end;
        *end = '\0';
        if ((eq = strchr(tok, '=')) == NULL)
            return fail(err, "option '%s' is not key=value", tok);
        *eq++ = '\0';
        if (strcmp(tok, "rundir") == 0)
            r = opt_path(tok, eq, o->rundir, sizeof(o->rundir), err);
        else if (strcmp(tok, "scratch") == 0)
            r = opt_path(tok, eq, o->scratch, sizeof(o->scratch), err);
        else if (strcmp(tok, "restore") == 0)
            r = opt_path(tok, eq, o->restore, sizeof(o->restore), err);
        else if (strcmp(tok, "pidfile") == 0)
            r = opt_path(tok, eq, o->pidfile, sizeof(o->pidfile), err);
        else if (strcmp(tok, "pid") == 0)
            r = opt_int(tok, eq, 1, 2147483647L, &o->pid, err);
        else if (strcmp(tok, "timeout") == 0)
            r = opt_int(tok, eq, 1, 86400, &o->timeout, err);
        else if (strcmp(tok, "exit_on_save") == 0)
            r = opt_int(tok, eq, 0, 1, &o->exit_on_save, err);
        else if (strcmp(tok, "ncpus") == 0)
            r = opt_int(tok, eq, 1, NB_BHYVE_MAX_CPUS, &o->ncpus, err);
        else if (strcmp(tok, "memsize") == 0)
            r = opt_memsize(tok, eq, &o->memsize, err);
        else
            return fail(err, "unknown option '%s' (known: rundir, scratch, "
                        "restore, pidfile, pid, timeout, exit_on_save, ncpus, "
                        "memsize)", tok);
        if (r != 0)
            return -1;
        *end = sep;
    }
    /* FreeBSD's sockaddr_un has 104 bytes for the path and its NUL. */
    if (strlen(o->rundir) + 1 + strlen(o->name) >= 104)
        return fail(err, "checkpoint socket path %s/%s is longer than "
                    "AF_UNIX allows (103 bytes): use a shorter rundir",
                    o->rundir, o->name);
    return 0;
}

int nb_bhyve_pcpu_limit(int percent, int ncpus, int *limit, char *err)
{
    if (percent < 0 || percent > 99)
        return fail(err, "throttle of %d%%: expected 0..99", percent);
    if (ncpus < 1 || ncpus > NB_BHYVE_MAX_CPUS)
        return fail(err, "throttle needs the vCPU count, got %d", ncpus);
    *limit = percent == 0 ? 0 : ncpus * (100 - percent);
    return 0;
}
