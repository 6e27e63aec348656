/*
 * vmm port for the Linux KVM test host (nova_bhyve/testhost): its control
 * socket (CONTROL_PROTOCOL.md) and the guest-RAM memfd it hands out.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "vmm/vmm.h"

#define REPLY_MAX 1024

struct th {
    pthread_mutex_t lock;   /* one request/reply exchange at a time */
    int sock;
    int memfd;
    char rbuf[REPLY_MAX * 2];
    size_t rlen;
    uint64_t *scratch;      /* a whole dirty bitmap, for ranged requests */
    struct nb_vmm_ops whole_ops;    /* a VM with only the whole log's */
};

static int send_line(struct th *t, const char *line, char *err)
{
    size_t len = strlen(line);
    while (len) {
        ssize_t w = send(t->sock, line, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            snprintf(err, NB_ERRLEN, "test host control socket: %s", strerror(errno));
            return -1;
        }
        line += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Read one reply line; an attached descriptor lands in *fd if fd != NULL. */
static int read_reply(struct th *t, char *line, int *fd, char *err)
{
    for (;;) {
        char *nl = memchr(t->rbuf, '\n', t->rlen);
        if (nl) {
            size_t ll = (size_t)(nl - t->rbuf);
            memcpy(line, t->rbuf, ll);
            line[ll] = 0;
            memmove(t->rbuf, nl + 1, t->rlen - ll - 1);
            t->rlen -= ll + 1;
            if (strncmp(line, "OK", 2) == 0)
                return 0;
            snprintf(err, NB_ERRLEN, "test host: %s", line);
            return -1;
        }
        if (t->rlen >= REPLY_MAX) {
            snprintf(err, NB_ERRLEN, "test host reply too long");
            return -1;
        }
        struct iovec iov = { t->rbuf + t->rlen, sizeof(t->rbuf) - t->rlen };
        union {
            char b[CMSG_SPACE(sizeof(int))];
            struct cmsghdr a;
        } u;
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                              .msg_control = u.b, .msg_controllen = sizeof(u.b) };
        ssize_t r = recvmsg(t->sock, &msg, MSG_CMSG_CLOEXEC);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(err, NB_ERRLEN, "test host closed its control socket");
            return -1;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int got;
                memcpy(&got, CMSG_DATA(c), sizeof(int));
                if (fd && *fd < 0)
                    *fd = got;
                else
                    close(got);
            }
        }
        t->rlen += (size_t)r;
    }
}

static int read_exact(struct th *t, uint8_t *dst, size_t n, char *err)
{
    size_t have = t->rlen < n ? t->rlen : n;
    memcpy(dst, t->rbuf, have);
    memmove(t->rbuf, t->rbuf + have, t->rlen - have);
    t->rlen -= have;
    while (have < n) {
        ssize_t r = recv(t->sock, dst + have, n - have, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(err, NB_ERRLEN, "test host payload cut short");
            return -1;
        }
        have += (size_t)r;
    }
    return 0;
}

static int request(struct th *t, const char *req, char *reply, char *err)
{
    return send_line(t, req, err) < 0 ? -1 : read_reply(t, reply, NULL, err);
}

static uint64_t field(const char *reply, const char *key)
{
    char pat[64];
    const char *p;
    snprintf(pat, sizeof(pat), " %s=", key);
    p = strstr(reply, pat);
    return p ? strtoull(p + strlen(pat), NULL, 10) : 0;
}

static int th_map(struct nb_vmm *v, uint8_t **base, char *err)
{
    struct th *t = v->priv;
    void *p = mmap(NULL, v->layout.total, PROT_READ | PROT_WRITE, MAP_SHARED,
                   t->memfd, 0);
    if (p == MAP_FAILED) {
        snprintf(err, NB_ERRLEN, "mapping guest memory: %s", strerror(errno));
        return -1;
    }
    /* as the test host does: huge pages where the host allows them for
     * shared memory (shmem_enabled "advise"); a hint, so errors don't matter */
    madvise(p, v->layout.total, MADV_HUGEPAGE);
    *base = p;
    return 0;
}

static int th_write_pages(struct nb_vmm *v, uint64_t off,
                          const uint8_t *const *pages, int n, char *err)
{
    struct th *t = v->priv;
    return nb_file_write_pages(t->memfd, off, pages, n, err);
}

static int th_next_data(struct nb_vmm *v, uint64_t off, uint64_t *doff, uint64_t *dend)
{
    struct th *t = v->priv;
    return nb_file_next_data(t->memfd, v->layout.total, off, doff, dend);
}

static int th_has_dirty_log(struct nb_vmm *v)
{
    (void)v;
    return 1;
}

/*
 * Decode a dirty-log reply body into the `words` words of `bitmap`, which
 * is zeroed: runs of words with a bit set, each u32 first word, u32 count,
 * then the words (CONTROL_PROTOCOL.md, "Dirty tracking"); the words
 * between runs are clean.  -1 if a run is cut short or falls outside.
 */
static int decode_runs(const uint8_t *body, size_t len, uint64_t *bitmap,
                       size_t words)
{
    size_t pos = 0;

    while (pos < len) {
        uint32_t hdr[2];
        if (len - pos < sizeof(hdr))
            return -1;
        memcpy(hdr, body + pos, sizeof(hdr));
        pos += sizeof(hdr);
        if (!hdr[1] || hdr[0] >= words || hdr[1] > words - hdr[0] ||
            (len - pos) / 8 < hdr[1])
            return -1;
        memcpy(bitmap + hdr[0], body + pos, (size_t)hdr[1] * 8);
        pos += (size_t)hdr[1] * 8;
    }
    return 0;
}

/* Send a dirty-log request; the whole bitmap comes back in `bitmap`. */
static int th_dirty_request(struct nb_vmm *v, const char *req, uint64_t *bitmap,
                            size_t words, char *err)
{
    struct th *t = v->priv;
    char reply[REPLY_MAX];
    uint64_t bytes, nwords, lowbytes, lowpages, highpages;
    uint8_t *buf;
    int bad;

    pthread_mutex_lock(&t->lock);
    if (request(t, req, reply, err) < 0) {
        pthread_mutex_unlock(&t->lock);
        return -1;
    }
    bytes = field(reply, "bytes");
    nwords = field(reply, "words");
    lowbytes = field(reply, "lowbytes");
    lowpages = field(reply, "lowpages");
    highpages = field(reply, "highpages");
    /* the low bitmap is whole words, so the high one follows it directly:
     * the words are the engine's page order */
    if (lowpages % 64 || lowbytes != lowpages / 8 || highpages > words * 64 ||
        lowpages > words * 64 || nwords != lowpages / 64 + (highpages + 63) / 64 ||
        nwords > words || bytes > nwords * 8 + 8) {
        snprintf(err, NB_ERRLEN, "test host dirty log has an unexpected shape");
        pthread_mutex_unlock(&t->lock);
        return -1;
    }
    buf = malloc(bytes ? bytes : 1);
    if (!buf || read_exact(t, buf, bytes, err) < 0) {
        if (!buf)
            snprintf(err, NB_ERRLEN, "out of memory");
        free(buf);
        pthread_mutex_unlock(&t->lock);
        return -1;
    }
    pthread_mutex_unlock(&t->lock);
    memset(bitmap, 0, words * 8);
    bad = decode_runs(buf, bytes, bitmap, nwords);
    free(buf);
    if (bad)
        snprintf(err, NB_ERRLEN, "test host dirty log has a malformed run");
    return bad ? -1 : 0;
}

static int th_dirty_log(struct nb_vmm *v, uint64_t *bitmap, size_t words, char *err)
{
    return th_dirty_request(v, "dirty-log\n", bitmap, words, err);
}

static int th_dirty_peek(struct nb_vmm *v, uint64_t *bitmap, size_t words, char *err)
{
    return th_dirty_request(v, "dirty-log peek\n", bitmap, words, err);
}

static int th_dirty_log_range(struct nb_vmm *v, size_t first, size_t count,
                              uint64_t *bitmap, size_t words, char *err)
{
    struct th *t = v->priv;
    char req[64];
    if (first >= words || count > words - first) {
        snprintf(err, NB_ERRLEN, "dirty-log range %zu+%zu outside %zu words",
                 first, count, words);
        return -1;
    }
    if (!t->scratch && !(t->scratch = calloc(words, 8))) {
        snprintf(err, NB_ERRLEN, "out of memory");
        return -1;
    }
    snprintf(req, sizeof(req), "dirty-log %zu %zu\n", first, count);
    if (th_dirty_request(v, req, t->scratch, words, err) < 0)
        return -1;
    memcpy(bitmap + first, t->scratch + first, count * 8);
    return 0;
}

/*
 * The disk's dirty-block log (get-and-clear; CONTROL_PROTOCOL.md,
 * `disk-dirty-log`): the test host has one disk, number 0.
 */
static int th_disk_dirty_log(struct nb_vmm *v, int disk, uint64_t *bitmap,
                             size_t words, uint64_t *nblocks, char *err)
{
    struct th *t = v->priv;
    char reply[REPLY_MAX] = "";
    uint64_t bytes, blocks;
    int rc;

    if (disk != 0) {
        snprintf(err, NB_ERRLEN, "the test host has one disk; there is no disk %d",
                 disk);
        return -1;
    }
    pthread_mutex_lock(&t->lock);
    rc = request(t, "disk-dirty-log\n", reply, err);
    bytes = field(reply, "bytes");
    blocks = field(reply, "blocks");
    if (rc == 0 && (field(reply, "block_size") != NB_DISK_BLOCK || bytes % 8 ||
                    bytes > words * 8 || blocks > bytes * 8 ||
                    bytes != (blocks + 63) / 64 * 8)) {
        snprintf(err, NB_ERRLEN, "test host dirty-block log has an unexpected "
                 "shape (%s)", reply);
        rc = -1;
    }
    memset(bitmap, 0, words * 8);
    if (rc == 0)
        rc = read_exact(t, (uint8_t *)bitmap, bytes, err);
    pthread_mutex_unlock(&t->lock);
    *nblocks = blocks;      /* little-endian words, as the memory log's */
    return rc;
}

static int th_simple(struct nb_vmm *v, const char *req, char *err)
{
    struct th *t = v->priv;
    char reply[REPLY_MAX];
    int rc;
    pthread_mutex_lock(&t->lock);
    rc = request(t, req, reply, err);
    pthread_mutex_unlock(&t->lock);
    return rc;
}

static int th_pause(struct nb_vmm *v, char *err) { return th_simple(v, "pause\n", err); }
static int th_resume(struct nb_vmm *v, char *err) { return th_simple(v, "resume\n", err); }

/* After load-state the VM is paused: confirm it is, and leave it so. */
static int th_commit_paused(struct nb_vmm *v, char *err) { return th_simple(v, "pause\n", err); }

static int th_throttle(struct nb_vmm *v, int pct, char *err)
{
    char req[32];
    snprintf(req, sizeof(req), "throttle %d\n", pct);
    return th_simple(v, req, err);
}

static int th_save_locked(struct nb_vmm *v, uint8_t **blob, size_t *len, char *err)
{
    struct th *t = v->priv;
    char reply[REPLY_MAX];
    uint64_t n;
    if (request(t, "save-state\n", reply, err) < 0)
        return -1;
    n = field(reply, "bytes");
    if (n == 0 || n > (16u << 20)) {
        snprintf(err, NB_ERRLEN, "test host state blob has an absurd size");
        return -1;
    }
    *blob = malloc(n);
    if (!*blob) {
        snprintf(err, NB_ERRLEN, "out of memory");
        return -1;
    }
    if (read_exact(t, *blob, n, err) < 0) {
        free(*blob);
        *blob = NULL;
        return -1;
    }
    *len = n;
    return 0;
}

static int th_load_locked(struct nb_vmm *v, const uint8_t *blob, size_t len, char *err)
{
    struct th *t = v->priv;
    char req[64], reply[REPLY_MAX];
    snprintf(req, sizeof(req), "load-state %zu\n", len);
    if (send_line(t, req, err) < 0)
        return -1;
    while (len) {
        ssize_t w = send(t->sock, blob, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            snprintf(err, NB_ERRLEN, "sending state to the test host: %s",
                     strerror(errno));
            return -1;
        }
        blob += w;
        len -= (size_t)w;
    }
    return read_reply(t, reply, NULL, err);
}

static int th_save(struct nb_vmm *v, uint8_t **blob, size_t *len, char *err)
{
    struct th *t = v->priv;
    int rc;
    pthread_mutex_lock(&t->lock);
    rc = th_save_locked(v, blob, len, err);
    pthread_mutex_unlock(&t->lock);
    return rc;
}

static int th_load(struct nb_vmm *v, const uint8_t *blob, size_t len, char *err)
{
    struct th *t = v->priv;
    int rc;
    pthread_mutex_lock(&t->lock);
    rc = th_load_locked(v, blob, len, err);
    pthread_mutex_unlock(&t->lock);
    return rc;
}

static void th_close(struct nb_vmm *v)
{
    struct th *t = v->priv;
    if (v->mem)
        munmap(v->mem, v->layout.total);
    if (t) {
        close(t->sock);
        if (t->memfd >= 0)
            close(t->memfd);
        free(t->scratch);
        free(t);
    }
    v->priv = NULL;
    v->mem = NULL;
}

static const struct nb_vmm_ops testhost_ops = {
    .kind = "testhost",
    .map_memory = th_map,
    .next_data = th_next_data,
    .has_dirty_log = th_has_dirty_log,
    .dirty_log = th_dirty_log,
    .pause = th_pause,
    .resume = th_resume,
    .throttle = th_throttle,
    .brief_throttle = 90,   /* kicked every 1 ms, a vCPU sleeps <= 9 ms (testhost.h) */
    .save_state = th_save,
    .load_state = th_load,
    .close = th_close,
    .write_pages = th_write_pages,
    .commit_paused = th_commit_paused,
    .dirty_log_range = th_dirty_log_range,
    .dirty_peek = th_dirty_peek,
    .disk_dirty_log = th_disk_dirty_log,
};

/* Connect to a test-host VM's control socket and learn its shape. */
int nb_vmm_open_testhost(struct nb_vmm *v, const char *sock_path, char *err)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    struct timeval tv = { 30, 0 };
    char reply[REPLY_MAX];
    struct th *t;
    uint64_t low, high, base, cpus;

    memset(v, 0, sizeof(*v));
    if (strlen(sock_path) >= sizeof(a.sun_path)) {
        snprintf(err, NB_ERRLEN, "socket path too long: %s", sock_path);
        return -1;
    }
    t = calloc(1, sizeof(*t));
    if (!t) {
        snprintf(err, NB_ERRLEN, "out of memory");
        return -1;
    }
    t->memfd = -1;
    pthread_mutex_init(&t->lock, NULL);
    strcpy(a.sun_path, sock_path);
    t->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (t->sock < 0 || connect(t->sock, (struct sockaddr *)&a, sizeof(a)) < 0) {
        snprintf(err, NB_ERRLEN, "cannot reach the test host VM at %s: %s",
                 sock_path, strerror(errno));
        if (t->sock >= 0)
            close(t->sock);
        free(t);
        return -1;
    }
    setsockopt(t->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(t->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    v->ops = &testhost_ops;
    v->priv = t;
    if (request(t, "status\n", reply, err) < 0)
        goto fail;
    cpus = field(reply, "cpus");
    if (field(reply, "dirty_log_whole")) {
        /* as bhyve's port: get-and-clear of the whole log only */
        t->whole_ops = testhost_ops;
        t->whole_ops.dirty_log_range = NULL;
        t->whole_ops.dirty_peek = NULL;
        v->ops = &t->whole_ops;
    }
    if (send_line(t, "memfd\n", err) < 0 || read_reply(t, reply, &t->memfd, err) < 0)
        goto fail;
    if (t->memfd < 0) {
        snprintf(err, NB_ERRLEN, "test host sent no memory descriptor");
        goto fail;
    }
    low = field(reply, "lowmem");
    high = field(reply, "highmem");
    base = field(reply, "highbase");
    v->layout.nsegs = high ? 2 : 1;
    v->layout.seg[0] = (struct nb_seg){ 0, low, 0 };
    if (high)
        v->layout.seg[1] = (struct nb_seg){ base, high, low };
    v->layout.total = low + high;
    strcpy(v->spec.arch, "x86_64");
    v->spec.page_size = NB_PAGE;
    v->spec.ncpus = (uint32_t)cpus;
    strcpy(v->spec.state_format, "nbvmstat/1");
    nb_spec_fill_cpu(&v->spec);
    v->spec.layout = v->layout;
    return 0;
fail:
    th_close(v);
    v->ops = NULL;
    return -1;
}
