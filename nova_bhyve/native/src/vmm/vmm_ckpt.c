/*
 * vmm port for a checkpoint file set, the shape bhyve's snapshot support
 * uses (`bhyvectl --suspend=FILE`, `bhyve -r FILE`):
 *
 *   FILE        guest RAM, lowmem then highmem, contiguous
 *   FILE.kern   vCPU and device state (here: the VMM's state blob)
 *   FILE.meta   JSON describing the VM (ncpus, memsize, lowmem, highmem,
 *               highbase, page_size, state_format, arch, cpu_vendor, vmname)
 *
 * As a source it is a stopped VM (no dirty log; pause/resume do nothing).
 * As a destination, load_state writes FILE.kern and resume (the commit)
 * writes FILE.meta last, atomically, so a checkpoint with a .meta is
 * complete.  Checkpoint files are untrusted input: sizes are validated.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vmm/vmm.h"

#define META_MAX 8192
#define KERN_MAX (16u << 20)

struct ck {
    char base[1024];
    int ramfd;
    int create;
};

static int read_file(const char *path, size_t max, uint8_t **out, size_t *len, char *err)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t got = 0;
    if (fd < 0 || fstat(fd, &st) < 0) {
        snprintf(err, NB_ERRLEN, "cannot open %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode) || st.st_size <= 0 || (size_t)st.st_size > max) {
        snprintf(err, NB_ERRLEN, "%s is not a regular file of 1..%zu bytes", path, max);
        close(fd);
        return -1;
    }
    *out = malloc((size_t)st.st_size + 1);
    if (!*out) {
        close(fd);
        snprintf(err, NB_ERRLEN, "out of memory");
        return -1;
    }
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, *out + got, (size_t)st.st_size - got);
        if (r <= 0) {
            free(*out);
            close(fd);
            snprintf(err, NB_ERRLEN, "reading %s failed", path);
            return -1;
        }
        got += (size_t)r;
    }
    (*out)[got] = 0;
    *len = got;
    close(fd);
    return 0;
}

/* Write a file atomically: temp file, fsync, rename. */
static int write_atomic(const char *path, const void *data, size_t len, char *err)
{
    char tmp[1100];
    const uint8_t *p = data;
    int fd;
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        goto fail;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w <= 0) {
            close(fd);
            goto fail;
        }
        p += w;
        len -= (size_t)w;
    }
    if (fsync(fd) < 0 || close(fd) < 0 || rename(tmp, path) < 0)
        goto fail;
    return 0;
fail:
    snprintf(err, NB_ERRLEN, "writing %s: %s", path, strerror(errno));
    unlink(tmp);
    return -1;
}

/* Minimal JSON field access for our flat .meta object. */
static int json_num(const char *j, const char *key, uint64_t *v)
{
    char pat[64];
    const char *p;
    char *end;
    snprintf(pat, sizeof(pat), "\"%s\"", key);
    p = strstr(j, pat);
    if (!p)
        return -1;
    p += strlen(pat);
    while (*p == ' ' || *p == ':')
        p++;
    if (*p < '0' || *p > '9')
        return -1;
    *v = strtoull(p, &end, 10);
    return 0;
}

static int json_str(const char *j, const char *key, char *out, size_t cap)
{
    char pat[64];
    const char *p, *e;
    snprintf(pat, sizeof(pat), "\"%s\"", key);
    p = strstr(j, pat);
    if (!p)
        return -1;
    p += strlen(pat);
    while (*p == ' ' || *p == ':')
        p++;
    if (*p != '"' || !(e = strchr(p + 1, '"')) || (size_t)(e - p - 1) >= cap)
        return -1;
    memcpy(out, p + 1, (size_t)(e - p - 1));
    out[e - p - 1] = 0;
    return 0;
}

static int ck_map(struct nb_vmm *v, uint8_t **base, char *err)
{
    struct ck *c = v->priv;
    void *p = mmap(NULL, v->layout.total, PROT_READ | (c->create ? PROT_WRITE : 0),
                   MAP_SHARED, c->ramfd, 0);
    if (p == MAP_FAILED) {
        snprintf(err, NB_ERRLEN, "mapping %s: %s", c->base, strerror(errno));
        return -1;
    }
    *base = p;
    return 0;
}

static int ck_next_data(struct nb_vmm *v, uint64_t off, uint64_t *doff, uint64_t *dend)
{
    struct ck *c = v->priv;
    return nb_file_next_data(c->ramfd, v->layout.total, off, doff, dend);
}

static int ck_no_dirty_log(struct nb_vmm *v) { (void)v; return 0; }

static int ck_dirty_log(struct nb_vmm *v, uint64_t *b, size_t w, char *err)
{
    (void)v; (void)b; (void)w;
    snprintf(err, NB_ERRLEN, "a checkpoint has no dirty log");
    return -1;
}

static int ck_nop(struct nb_vmm *v, char *err) { (void)v; (void)err; return 0; }

static int ck_save(struct nb_vmm *v, uint8_t **blob, size_t *len, char *err)
{
    struct ck *c = v->priv;
    char path[1100];
    snprintf(path, sizeof(path), "%s.kern", c->base);
    return read_file(path, KERN_MAX, blob, len, err);
}

static int ck_load(struct nb_vmm *v, const uint8_t *blob, size_t len, char *err)
{
    struct ck *c = v->priv;
    char path[1100];
    if (!c->create) {
        snprintf(err, NB_ERRLEN, "checkpoint %s is a source, not a destination", c->base);
        return -1;
    }
    snprintf(path, sizeof(path), "%s.kern", c->base);
    return write_atomic(path, blob, len, err);
}

/* Destination commit: flush RAM, then publish the .meta. */
static int ck_commit(struct nb_vmm *v, char *err)
{
    struct ck *c = v->priv;
    char path[1100], meta[META_MAX];
    const struct nb_guest_spec *s = &v->spec;
    int n;
    if (!c->create)
        return 0;
    if (v->mem && msync(v->mem, v->layout.total, MS_SYNC) < 0) {
        snprintf(err, NB_ERRLEN, "flushing %s: %s", c->base, strerror(errno));
        return -1;
    }
    if (fsync(c->ramfd) < 0) {
        snprintf(err, NB_ERRLEN, "flushing %s: %s", c->base, strerror(errno));
        return -1;
    }
    n = snprintf(meta, sizeof(meta),
                 "{\n  \"version\": 1,\n  \"ncpus\": %u,\n  \"memsize\": %llu,\n"
                 "  \"lowmem\": %llu,\n  \"highmem\": %llu,\n  \"highbase\": %llu,\n"
                 "  \"page_size\": %u,\n  \"state_format\": \"%s\",\n"
                 "  \"arch\": \"%s\",\n  \"cpu_vendor\": \"%s\"\n}\n",
                 s->ncpus, (unsigned long long)v->layout.total,
                 (unsigned long long)v->layout.seg[0].len,
                 (unsigned long long)(v->layout.nsegs > 1 ? v->layout.seg[1].len : 0),
                 (unsigned long long)(v->layout.nsegs > 1 ? v->layout.seg[1].gpa
                                                          : (4ULL << 30)),
                 s->page_size, s->state_format, s->arch, s->cpu_vendor);
    snprintf(path, sizeof(path), "%s.meta", c->base);
    return write_atomic(path, meta, (size_t)n, err);
}

static int ck_throttle(struct nb_vmm *v, int pct, char *err)
{
    (void)v;
    (void)pct;
    snprintf(err, NB_ERRLEN, "a checkpoint cannot be throttled");
    return -1;
}

static void ck_close(struct nb_vmm *v)
{
    struct ck *c = v->priv;
    if (v->mem)
        munmap(v->mem, v->layout.total);
    if (c) {
        if (c->ramfd >= 0)
            close(c->ramfd);
        free(c);
    }
    v->mem = NULL;
    v->priv = NULL;
}

static int ck_write_pages(struct nb_vmm *v, uint64_t off,
                          const uint8_t *const *pages, int n, char *err)
{
    struct ck *c = v->priv;
    if (!c->create) {
        snprintf(err, NB_ERRLEN, "checkpoint %s is read-only", c->base);
        return -1;
    }
    return nb_file_write_pages(c->ramfd, off, pages, n, err);
}

static const struct nb_vmm_ops ckpt_ops = {
    .kind = "ckpt",
    .map_memory = ck_map,
    .next_data = ck_next_data,
    .has_dirty_log = ck_no_dirty_log,
    .dirty_log = ck_dirty_log,
    .pause = ck_nop,
    .resume = ck_commit,
    .throttle = ck_throttle,
    .save_state = ck_save,
    .load_state = ck_load,
    .close = ck_close,
    .write_pages = ck_write_pages,
};

static int open_existing(struct nb_vmm *v, struct ck *c, char *err)
{
    char path[1100];
    uint8_t *meta;
    size_t mlen;
    uint64_t ncpus, memsize, low, high, base = 4ULL << 30, psize = NB_PAGE;
    struct stat st;

    snprintf(path, sizeof(path), "%s.meta", c->base);
    if (read_file(path, META_MAX, &meta, &mlen, err) < 0)
        return -1;
    if (json_num((char *)meta, "ncpus", &ncpus) < 0 ||
        json_num((char *)meta, "memsize", &memsize) < 0 ||
        json_num((char *)meta, "lowmem", &low) < 0 ||
        json_num((char *)meta, "highmem", &high) < 0) {
        free(meta);
        snprintf(err, NB_ERRLEN, "%s lacks ncpus, memsize, lowmem or highmem", path);
        return -1;
    }
    json_num((char *)meta, "highbase", &base);
    json_num((char *)meta, "page_size", &psize);
    if (json_str((char *)meta, "state_format", v->spec.state_format,
                 sizeof(v->spec.state_format)) < 0)
        strcpy(v->spec.state_format, "nbvmstat/1");
    json_str((char *)meta, "arch", v->spec.arch, sizeof(v->spec.arch));
    free(meta);
    if (ncpus < 1 || ncpus > 1024 || psize != NB_PAGE || low + high != memsize ||
        low % NB_PAGE || high % NB_PAGE || low == 0 || memsize > (1ULL << 40) ||
        (high && base < low)) {
        snprintf(err, NB_ERRLEN, "%s.meta describes an impossible VM", c->base);
        return -1;
    }
    c->ramfd = open(c->base, O_RDONLY | O_CLOEXEC);
    if (c->ramfd < 0 || fstat(c->ramfd, &st) < 0 || (uint64_t)st.st_size != memsize) {
        snprintf(err, NB_ERRLEN, "RAM file %s is missing or not %llu bytes",
                 c->base, (unsigned long long)memsize);
        return -1;
    }
    v->layout.nsegs = high ? 2 : 1;
    v->layout.seg[0] = (struct nb_seg){ 0, low, 0 };
    if (high)
        v->layout.seg[1] = (struct nb_seg){ base, high, low };
    v->layout.total = memsize;
    v->spec.ncpus = (uint32_t)ncpus;
    v->spec.page_size = NB_PAGE;
    return 0;
}

static int create_new(struct nb_vmm *v, struct ck *c, const struct nb_guest_spec *s,
                      char *err)
{
    char path[1100];
    v->spec = *s;
    v->layout = s->layout;
    snprintf(path, sizeof(path), "%s.meta", c->base);
    unlink(path);   /* an old .meta would mark a half-written set complete */
    c->ramfd = open(c->base, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (c->ramfd < 0 || ftruncate(c->ramfd, (off_t)v->layout.total) < 0) {
        snprintf(err, NB_ERRLEN, "cannot create RAM file %s: %s", c->base,
                 strerror(errno));
        return -1;
    }
    return 0;
}

/* Open a checkpoint file set as a source, or create one as a destination. */
int nb_vmm_open_ckpt(struct nb_vmm *v, const char *base, int create,
                     const struct nb_guest_spec *spec, char *err)
{
    struct ck *c;
    int rc;

    memset(v, 0, sizeof(*v));
    if (strlen(base) >= sizeof(c->base) - 16) {
        snprintf(err, NB_ERRLEN, "checkpoint path too long");
        return -1;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(err, NB_ERRLEN, "out of memory");
        return -1;
    }
    strcpy(c->base, base);
    c->ramfd = -1;
    c->create = create;
    v->ops = &ckpt_ops;
    v->priv = c;
    rc = create ? create_new(v, c, spec, err) : open_existing(v, c, err);
    if (rc < 0) {
        ck_close(v);
        v->ops = NULL;
        return -1;
    }
    if (!create) {
        char arch[16];
        snprintf(arch, sizeof(arch), "%s", v->spec.arch);
        nb_spec_fill_cpu(&v->spec);
        if (arch[0])
            snprintf(v->spec.arch, sizeof(v->spec.arch), "%s", arch);
        v->spec.layout = v->layout;
    }
    return 0;
}
