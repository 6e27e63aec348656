/*
 * vmm port for a checkpoint file set, the shape bhyve's snapshot support
 * uses (`bhyvectl --suspend=FILE`, `bhyve -r FILE`):
 *
 *   FILE        guest RAM, lowmem then highmem, contiguous
 *   FILE.kern   vCPU and device state (here: the VMM's state blob)
 *   FILE.meta   JSON describing the other two: the schema of CHECKPOINT.md,
 *               parsed and written by ckpt_meta.c (nova_bhyve/machine/
 *               checkpoint.py reads and writes the same sets)
 *
 * As a source it is a stopped VM (no dirty log; pause/resume do nothing).
 * As a destination, load_state writes FILE.kern and resume (the commit)
 * writes FILE.meta last, atomically, so a checkpoint with a .meta is
 * complete.  Checkpoint files are untrusted input: sizes and the state
 * file's CRC-32 are checked against the .meta.  Every file of the set is
 * opened beneath a descriptor of its directory (a symlink as the directory
 * or as any file is refused), and a destination creates its files with
 * O_EXCL after removing what was there, so nothing planted in the
 * directory redirects a write.
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

#include "vmm/ckpt_meta.h"
#include "vmm/vmm.h"

struct ck {
    char base[1024];            /* the set's path, for messages only */
    char name[256];             /* its last component, opened beneath dirfd */
    int dirfd;
    int ramfd;
    int create;
    struct nb_ckpt_meta meta;   /* source: as read; destination: kern_* so far */
};

/* Open NAME+SUFFIX beneath the set's directory, never through a link. */
static int ck_openat(const struct ck *c, const char *suffix, int flags, mode_t mode)
{
    char name[300];
    snprintf(name, sizeof(name), "%s%s", c->name, suffix);
    return openat(c->dirfd, name, flags | O_NOFOLLOW | O_CLOEXEC, mode);
}

/* Remove NAME+SUFFIX if present (a link is removed, not followed). */
static int ck_remove(const struct ck *c, const char *suffix)
{
    char name[300];
    snprintf(name, sizeof(name), "%s%s", c->name, suffix);
    return unlinkat(c->dirfd, name, 0) < 0 && errno != ENOENT ? -1 : 0;
}

/* Create NAME+SUFFIX afresh: whatever was there (a link included) is
 * removed, then the file is created exclusively. */
static int ck_create(const struct ck *c, const char *suffix, int flags)
{
    if (ck_remove(c, suffix) < 0)
        return -1;
    return ck_openat(c, suffix, flags | O_CREAT | O_EXCL, 0600);
}

static int read_file(const struct ck *c, const char *suffix, size_t max,
                     uint8_t **out, size_t *len, char *err)
{
    struct stat st;
    int fd = ck_openat(c, suffix, O_RDONLY, 0);
    size_t got = 0;
    char path[1100];
    snprintf(path, sizeof(path), "%s%s", c->base, suffix);
    if (fd < 0 || fstat(fd, &st) < 0) {
        snprintf(err, NB_ERRLEN, "cannot open %s: %s", path,
                 errno == ELOOP ? "it is a symbolic link" : strerror(errno));
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

/* Write NAME+SUFFIX atomically: temp file, fsync, rename. */
static int write_atomic(const struct ck *c, const char *suffix, const void *data,
                        size_t len, char *err)
{
    char tmpsuffix[32], tmp[300], final[300];
    const uint8_t *p = data;
    int fd;
    snprintf(tmpsuffix, sizeof(tmpsuffix), "%s.tmp", suffix);
    snprintf(tmp, sizeof(tmp), "%s%s", c->name, tmpsuffix);
    snprintf(final, sizeof(final), "%s%s", c->name, suffix);
    fd = ck_create(c, tmpsuffix, O_WRONLY);
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
    if (fsync(fd) < 0 || close(fd) < 0 || renameat(c->dirfd, tmp, c->dirfd, final) < 0)
        goto fail;
    return 0;
fail:
    snprintf(err, NB_ERRLEN, "writing %s%s: %s", c->base, suffix, strerror(errno));
    unlinkat(c->dirfd, tmp, 0);
    return -1;
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

/* Source: the state blob, checked against the .meta's size and CRC-32. */
static int ck_save(struct nb_vmm *v, uint8_t **blob, size_t *len, char *err)
{
    struct ck *c = v->priv;
    if (read_file(c, ".kern", NB_CKPT_KERN_MAX, blob, len, err) < 0)
        return -1;
    if (c->meta.kern_recorded &&
        (*len != c->meta.kern_bytes ||
         nb_crc32_ieee(*blob, *len) != c->meta.kern_crc32)) {
        snprintf(err, NB_ERRLEN, "%s.kern is corrupt (size or CRC-32 differs "
                 "from %s.meta)", c->base, c->base);
        free(*blob);
        *blob = NULL;
        return -1;
    }
    return 0;
}

static int ck_load(struct nb_vmm *v, const uint8_t *blob, size_t len, char *err)
{
    struct ck *c = v->priv;
    if (!c->create) {
        snprintf(err, NB_ERRLEN, "checkpoint %s is a source, not a destination", c->base);
        return -1;
    }
    if (len < 1 || len > NB_CKPT_KERN_MAX) {
        snprintf(err, NB_ERRLEN, "device state of %zu bytes does not fit a "
                 "checkpoint (1 to %d)", len, NB_CKPT_KERN_MAX);
        return -1;
    }
    if (write_atomic(c, ".kern", blob, len, err) < 0)
        return -1;
    c->meta.kern_bytes = len;
    c->meta.kern_crc32 = nb_crc32_ieee(blob, len);
    c->meta.kern_recorded = 1;
    return 0;
}

/* The .meta of the VM received: its spec and layout, the state loaded. */
static void describe(const struct nb_vmm *v, struct nb_ckpt_meta *m)
{
    const struct nb_guest_spec *s = &v->spec;

    m->version = NB_CKPT_META_VERSION;
    m->vmname[0] = 0;           /* the engine is not told the VM's name */
    m->ncpus = s->ncpus;
    m->memsize = v->layout.total;
    m->lowmem = v->layout.seg[0].len;
    m->highmem = v->layout.nsegs > 1 ? v->layout.seg[1].len : 0;
    m->highbase = v->layout.nsegs > 1 ? v->layout.seg[1].gpa : NB_CKPT_HIGHBASE;
    m->page_size = s->page_size;
    snprintf(m->state_format, sizeof(m->state_format), "%s", s->state_format);
    snprintf(m->arch, sizeof(m->arch), "%s", s->arch);
    snprintf(m->cpu_vendor, sizeof(m->cpu_vendor), "%s", s->cpu_vendor);
}

/* Destination commit: flush RAM, then publish the .meta. */
static int ck_commit(struct nb_vmm *v, char *err)
{
    struct ck *c = v->priv;
    char text[NB_CKPT_META_MAX + 1], why[NB_ERRLEN];
    size_t n;

    if (!c->create)
        return 0;
    if ((v->mem && msync(v->mem, v->layout.total, MS_SYNC) < 0) ||
        fsync(c->ramfd) < 0) {
        snprintf(err, NB_ERRLEN, "flushing %s: %s", c->base, strerror(errno));
        return -1;
    }
    describe(v, &c->meta);
    if (nb_ckpt_meta_format(&c->meta, text, sizeof(text), &n, why) < 0) {
        snprintf(err, NB_ERRLEN, "%s.meta: %s", c->base, why);
        return -1;
    }
    return write_atomic(c, ".meta", text, n, err);
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
        if (c->dirfd >= 0)
            close(c->dirfd);
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

/* The size of NAME+SUFFIX (not followed if a link), or -1 with a message. */
static int file_size(const struct ck *c, const char *suffix, uint64_t *size, char *err)
{
    struct stat st;
    char name[300];

    snprintf(name, sizeof(name), "%s%s", c->name, suffix);
    if (fstatat(c->dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, NB_ERRLEN, "%s%s is missing or not a regular file", c->base, suffix);
        return -1;
    }
    *size = (uint64_t)st.st_size;
    return 0;
}

/* Read and check PATH.meta against the RAM and state files beside it. */
static int read_meta(struct ck *c, char *err)
{
    char why[NB_ERRLEN];
    uint8_t *text;
    size_t len;
    uint64_t ram_bytes, kern_bytes;
    int rc;

    if (read_file(c, ".meta", NB_CKPT_META_MAX, &text, &len, err) < 0)
        return -1;
    rc = nb_ckpt_meta_parse((const char *)text, len, &c->meta, why);
    free(text);
    if (rc < 0) {
        snprintf(err, NB_ERRLEN, "%s.meta: %s", c->base, why);
        return -1;
    }
    if (file_size(c, "", &ram_bytes, err) < 0 || file_size(c, ".kern", &kern_bytes, err) < 0)
        return -1;
    if (nb_ckpt_meta_check_sizes(&c->meta, ram_bytes, kern_bytes, why) < 0) {
        snprintf(err, NB_ERRLEN, "checkpoint %s: %s", c->base, why);
        return -1;
    }
    return 0;
}

static int open_existing(struct nb_vmm *v, struct ck *c, char *err)
{
    const struct nb_ckpt_meta *m = &c->meta;
    struct stat st;

    if (read_meta(c, err) < 0)
        return -1;
    c->ramfd = ck_openat(c, "", O_RDONLY, 0);
    if (c->ramfd < 0 || fstat(c->ramfd, &st) < 0 || (uint64_t)st.st_size != m->memsize) {
        snprintf(err, NB_ERRLEN, "RAM file %s is missing or not %llu bytes",
                 c->base, (unsigned long long)m->memsize);
        return -1;
    }
    v->layout.nsegs = m->highmem ? 2 : 1;
    v->layout.seg[0] = (struct nb_seg){ 0, m->lowmem, 0 };
    if (m->highmem)
        v->layout.seg[1] = (struct nb_seg){ m->highbase, m->highmem, m->lowmem };
    v->layout.total = m->memsize;
    v->spec.ncpus = m->ncpus;
    v->spec.page_size = NB_PAGE;
    snprintf(v->spec.state_format, sizeof(v->spec.state_format), "%s",
             m->state_format);
    snprintf(v->spec.arch, sizeof(v->spec.arch), "%s", m->arch);
    return 0;
}

static int create_new(struct nb_vmm *v, struct ck *c, const struct nb_guest_spec *s,
                      char *err)
{
    v->spec = *s;
    v->layout = s->layout;
    /* an old .meta would mark a half-written set complete */
    if (ck_remove(c, ".meta") < 0) {
        snprintf(err, NB_ERRLEN, "cannot remove %s.meta: %s", c->base, strerror(errno));
        return -1;
    }
    c->meta.kern_recorded = 0;
    c->ramfd = ck_create(c, "", O_RDWR);
    if (c->ramfd < 0 || ftruncate(c->ramfd, (off_t)v->layout.total) < 0) {
        snprintf(err, NB_ERRLEN, "cannot create RAM file %s: %s", c->base,
                 strerror(errno));
        return -1;
    }
    return 0;
}

/* Split the set's path into a directory, opened without following a
 * link, and a last component that names the files beneath it. */
static int open_directory(struct ck *c, char *err)
{
    char dir[1024];
    const char *slash = strrchr(c->base, '/');
    const char *name = slash ? slash + 1 : c->base;

    if (!*name || !strcmp(name, ".") || !strcmp(name, "..") ||
        strlen(name) >= sizeof(c->name) - 16) {
        snprintf(err, NB_ERRLEN, "checkpoint path %s does not end in a file name", c->base);
        return -1;
    }
    snprintf(c->name, sizeof(c->name), "%s", name);
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == c->base)
        snprintf(dir, sizeof(dir), "/");
    else
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - c->base), c->base);
    c->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (c->dirfd < 0) {
        snprintf(err, NB_ERRLEN, "checkpoint directory %s: %s", dir,
                 errno == ELOOP || errno == ENOTDIR ?
                 "is a symbolic link or not a directory" : strerror(errno));
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
    c->dirfd = -1;
    c->create = create;
    v->ops = &ckpt_ops;
    v->priv = c;
    rc = open_directory(c, err);
    if (rc == 0)
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
