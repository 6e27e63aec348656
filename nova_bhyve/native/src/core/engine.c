/*
 * Migration sessions: the public API, parameters, statistics, the memory
 * digest and the helpers both directions share.  The migration itself
 * runs in source.c / dest.c on threads started here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#if defined(__linux__)
#include <linux/sockios.h>     /* SIOCOUTQ */
#elif defined(__FreeBSD__)
#include <sys/filio.h>        /* FIONWRITE */
#endif
#include <time.h>
#include <unistd.h>
#include <openssl/rand.h>

#include "core/nbmig.h"

double nb_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/*
 * Record the first failure: its message and its kind (enum
 * nb_error_kind).  Later ones keep the first; the side's epilogue ends
 * the session with that kind.
 */
void nb_fail(struct nb_mig *m, int kind, const char *fmt, ...)
{
    va_list ap;
    pthread_mutex_lock(&m->lock);
    if (!m->fail_kind && m->st.result == NB_RESULT_RUNNING) {
        va_start(ap, fmt);
        vsnprintf(m->st.error, sizeof(m->st.error), fmt, ap);
        va_end(ap);
        m->fail_kind = kind ? kind : NB_ERR_INTERNAL;
    }
    pthread_mutex_unlock(&m->lock);
}

/* Replace the recorded failure with the peer's own reason for it (a REFUSE
 * or ABORT read after a broken pipe had been recorded first). */
void nb_fail_because(struct nb_mig *m, int kind, const char *why)
{
    pthread_mutex_lock(&m->lock);
    if (m->st.result == NB_RESULT_RUNNING) {
        snprintf(m->st.error, sizeof(m->st.error), "%s", why);
        m->fail_kind = kind ? kind : NB_ERR_INTERNAL;
    }
    pthread_mutex_unlock(&m->lock);
}

/* The kind of the first recorded failure, 0 if none. */
int nb_fail_kind(struct nb_mig *m)
{
    int kind;
    pthread_mutex_lock(&m->lock);
    kind = m->fail_kind;
    pthread_mutex_unlock(&m->lock);
    return kind;
}

/* `ms` milliseconds from now on CLOCK_REALTIME, for pthread_cond_timedwait. */
void nb_deadline(struct timespec *until, long ms)
{
    clock_gettime(CLOCK_REALTIME, until);
    until->tv_sec += ms / 1000;
    until->tv_nsec += (ms % 1000) * 1000000L;
    if (until->tv_nsec >= 1000000000L) {
        until->tv_sec++;
        until->tv_nsec -= 1000000000L;
    }
}

int nb_set_nodelay(int fd)
{
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Bytes written to a connected socket that the peer has not acknowledged
 * yet (unsent or in flight): Linux's SIOCOUTQ, FreeBSD's FIONWRITE; 0 if
 * the socket or the system cannot say. */
uint64_t nb_socket_queued(int fd)
{
    int n = 0;
#if defined(__linux__)
    if (fd < 0 || ioctl(fd, SIOCOUTQ, &n) < 0 || n < 0)
        return 0;
#elif defined(__FreeBSD__)
    if (fd < 0 || ioctl(fd, FIONWRITE, &n) < 0 || n < 0)
        return 0;
#else
    (void)fd;
#endif
    return (uint64_t)n;
}

/* Receive and send timeouts of `ms` on a socket (0: none). */
void nb_set_timeouts(int fd, uint32_t ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

/* Sleep as needed to keep page traffic under the bandwidth cap. */
void nb_throttle_bandwidth(struct nb_mig *m, size_t bytes)
{
    uint64_t cap = atomic_load(&m->max_bandwidth);
    double wait_ms = 0;
    if (!cap)
        return;
    pthread_mutex_lock(&m->lock);
    {
        double now = nb_now_ms();
        double burst = (double)cap / 20.0;      /* 50 ms worth */
        m->bw_tokens += (now - m->bw_tokens_t) * (double)cap / 1e3;
        if (m->bw_tokens > burst)
            m->bw_tokens = burst;
        m->bw_tokens_t = now;
        m->bw_tokens -= (double)bytes;
        if (m->bw_tokens < 0)
            wait_ms = -m->bw_tokens * 1e3 / (double)cap;
    }
    pthread_mutex_unlock(&m->lock);
    if (wait_ms > 0) {
        struct timespec ts = { (time_t)(wait_ms / 1e3),
                               (long)((wait_ms - (double)(time_t)(wait_ms / 1e3) * 1e3) * 1e6) };
        nanosleep(&ts, NULL);
    }
}

/* Page `index` in layout order -> guest pfn and offset in the memory file. */
int nb_page_addr(const struct nb_mig *m, uint64_t index, uint64_t *pfn, uint64_t *off)
{
    const struct nb_layout *l = &m->vmm.layout;
    for (int s = 0; s < l->nsegs; s++) {
        uint64_t n = l->seg[s].len / NB_PAGE;
        if (index < n) {
            *pfn = l->seg[s].gpa / NB_PAGE + index;
            *off = l->seg[s].offset + index * NB_PAGE;
            return 0;
        }
        index -= n;
    }
    return -1;
}

/* Guest pfn -> offset in the memory file and page index; -1 if not RAM. */
int nb_pfn_to_offset(const struct nb_mig *m, uint64_t pfn, uint64_t *off, uint64_t *index)
{
    const struct nb_layout *l = &m->vmm.layout;
    uint64_t base = 0;
    for (int s = 0; s < l->nsegs; s++) {
        uint64_t first = l->seg[s].gpa / NB_PAGE, n = l->seg[s].len / NB_PAGE;
        if (pfn >= first && pfn - first < n) {
            *off = l->seg[s].offset + (pfn - first) * NB_PAGE;
            *index = base + (pfn - first);
            return 0;
        }
        base += n;
    }
    return -1;
}

struct digest_job {
    struct nb_mig *m;
    uint64_t first, last;   /* page indices [first, last) */
    uint64_t sum;
};

static void *digest_worker(void *arg)
{
    struct digest_job *j = arg;
    struct nb_mig *m = j->m;
    uint64_t hz = nb_zero_page_hash(&m->keys.hash);
    uint64_t data_off = 0, data_end = 0, sum = 0;

    for (uint64_t i = j->first; i < j->last; i++) {
        uint64_t pfn, off, h;
        nb_page_addr(m, i, &pfn, &off);
        /* never-written ranges hash as zero pages without being touched */
        if (m->vmm.ops->next_data && off >= data_end) {
            if (m->vmm.ops->next_data(&m->vmm, off, &data_off, &data_end) != 0)
                data_off = data_end = UINT64_MAX;
        }
        if (m->vmm.ops->next_data && off < data_off)
            continue;
        h = nb_page_hash(m->vmm.mem + off, &m->keys.hash);
        sum += nb_digest_term(pfn, h, hz, &m->keys.hash);
    }
    j->sum = sum;
    return NULL;
}

/*
 * The memory digest: the sum over all pages of a keyed hash of (pfn,
 * content), less what zero pages would give.  full=1 reads all guest
 * memory now (two threads); full=0 adds up the channels' running sums of
 * the terms recorded as pages were sent or applied.
 */
uint64_t nb_memory_digest(struct nb_mig *m, int full)
{
    uint64_t sum = 0;
    if (!full) {
        /* the running sum: O(channels), not O(pages), in the pause */
        for (int c = 0; c < NB_MAX_CHANNELS; c++)
            sum += m->digest_part[c].sum;
        return sum;
    }
    enum { NT = 2 };
    struct digest_job jobs[NT];
    pthread_t t[NT];
    for (int k = 0; k < NT; k++) {
        jobs[k] = (struct digest_job){ m, m->npages * (uint64_t)k / NT,
                                       m->npages * (uint64_t)(k + 1) / NT, 0 };
        if (k > 0 && pthread_create(&t[k], NULL, digest_worker, &jobs[k]) != 0)
            digest_worker(&jobs[k]), t[k] = 0;
    }
    digest_worker(&jobs[0]);
    sum = jobs[0].sum;
    for (int k = 1; k < NT; k++) {
        if (t[k])
            pthread_join(t[k], NULL);
        sum += jobs[k].sum;
    }
    return sum;
}

static int open_vmm(struct nb_mig *m, char *err)
{
    switch (m->p.vmm_kind) {
    case NB_VMM_TESTHOST:
        return nb_vmm_open_testhost(&m->vmm, m->target, err);
    case NB_VMM_BHYVE:
        return nb_vmm_open_bhyve(&m->vmm, m->target, err);
    case NB_VMM_CKPT:
        /* a destination checkpoint is created once the source's spec is known */
        return m->is_source ? nb_vmm_open_ckpt(&m->vmm, m->target, 0, NULL, err) : 0;
    case NB_VMM_NONE:
        return nb_vmm_open_none(&m->vmm, m->target, err);
    }
    snprintf(err, NB_ERRLEN, "unknown vmm kind %d", m->p.vmm_kind);
    return -1;
}

static int valid_disk_paths(const struct nb_mig_params *p, char *err)
{
    for (int i = 0; i < p->ndisks; i++)
        if (!p->disk_paths[i] || !*p->disk_paths[i] ||
            strlen(p->disk_paths[i]) >= 1024) {
            snprintf(err, NB_ERRLEN, "disk path %d is empty or too long", i);
            return -1;
        }
    return 0;
}

static int validate_params(const struct nb_mig_params *p, int is_source, char *err)
{
    if (p->mode < NB_MODE_LIVE || p->mode > NB_MODE_COLD)
        snprintf(err, NB_ERRLEN, "mode must be live, warm or cold");
    else if (!p->secret || p->secret_len < 16 || p->secret_len > 1024)
        snprintf(err, NB_ERRLEN, "the migration secret must be 16..1024 bytes");
    else if (!p->vmm_target || !*p->vmm_target)
        snprintf(err, NB_ERRLEN, "no VM (vmm_target) given");
    else if (is_source && p->vmm_kind == NB_VMM_NONE && p->mode != NB_MODE_COLD)
        snprintf(err, NB_ERRLEN, "a stopped guest (vmm none) moves in cold mode only");
    else if (is_source && (!p->host || !*p->host))
        snprintf(err, NB_ERRLEN, "no destination host given");
    else if (p->port < 0 || p->port > 65535 || (is_source && p->port == 0))
        snprintf(err, NB_ERRLEN, "port %d out of range", p->port);
    else if (is_source && (p->channels < 0 || p->channels > NB_MAX_CHANNELS))
        snprintf(err, NB_ERRLEN, "channels must be 1..%d, or 0 (auto)",
                 NB_MAX_CHANNELS);
    else if (p->compress < NB_COMPRESS_OFF || p->compress > NB_COMPRESS_AUTO)
        snprintf(err, NB_ERRLEN, "compress must be 0 (off), 1 (zstd) or 2 (auto)");
    else if (p->verify < 0 || p->verify > 1)
        snprintf(err, NB_ERRLEN, "verify must be 0 (incremental) or 1 (full)");
    else if (p->ndisks < 0 || p->ndisks > NB_MAX_DISKS ||
             (p->ndisks && !p->disk_paths))
        snprintf(err, NB_ERRLEN, "ndisks must be 0..%d, with as many disk paths",
                 NB_MAX_DISKS);
    else if (p->disks_detached >> p->ndisks)
        snprintf(err, NB_ERRLEN, "disks_detached names a disk beyond the %d given",
                 p->ndisks);
    else
        return valid_disk_paths(p, err);
    return -1;
}

static int bind_listener(struct nb_mig *m, char *err)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
    struct addrinfo *res = NULL;
    char port[16];
    int fd = -1, one = 1, rc;

    snprintf(port, sizeof(port), "%d", m->p.port);
    rc = getaddrinfo(m->host && *m->host ? m->host : NULL, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, NB_ERRLEN, "cannot resolve listen address %s: %s",
                 m->host ? m->host : "*", gai_strerror(rc));
        return -1;
    }
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 32) == 0)
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        snprintf(err, NB_ERRLEN, "cannot listen on %s port %d: %s",
                 m->host ? m->host : "*", m->p.port, strerror(errno));
        return -1;
    }
    {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        getsockname(fd, (struct sockaddr *)&ss, &sl);
        m->st.port = ntohs(ss.ss_family == AF_INET6
                               ? ((struct sockaddr_in6 *)&ss)->sin6_port
                               : ((struct sockaddr_in *)&ss)->sin_port);
    }
    m->listen_fd = fd;
    return 0;
}

/* The session's own copies of the disks' paths, and each one's vmm number
 * (the attached disks in order; -1 for a detached one). */
static int take_disks(struct nb_mig *m, const struct nb_mig_params *p)
{
    for (int i = 0; i < NB_MAX_DISKS; i++)
        m->disk[i].fd = m->disk[i].dirfd = m->disk[i].dfd = -1;
    m->ndisks = p->ndisks;
    m->p.disk_paths = NULL;     /* the private copies are m->disk[i].path */
    for (int i = 0, vmm = 0; i < p->ndisks; i++) {
        m->disk[i].vmm_index = p->disks_detached >> i & 1 ? -1 : vmm++;
        if (!(m->disk[i].path = strdup(p->disk_paths[i])))
            return -1;
    }
    return 0;
}

static struct nb_mig *session_new(const struct nb_mig_params *p, int is_source,
                                  char *err)
{
    struct nb_mig *m = calloc(1, sizeof(*m));
    if (!m) {
        snprintf(err, NB_ERRLEN, "out of memory");
        return NULL;
    }
    m->p = *p;
    m->host = p->host ? strdup(p->host) : NULL;
    m->target = strdup(p->vmm_target);
    m->secret = malloc(p->secret_len);
    if (!m->target || !m->secret || (p->host && !m->host) ||
        take_disks(m, p) < 0) {
        nb_disk_close(m);
        free(m->host);
        free(m->target);
        free(m->secret);
        free(m);
        snprintf(err, NB_ERRLEN, "out of memory");
        return NULL;
    }
    memcpy(m->secret, p->secret, p->secret_len);
    m->p.host = m->host;
    m->p.vmm_target = m->target;
    m->p.secret = m->secret;
    if (!m->p.timeout_ms)
        m->p.timeout_ms = 30000;
    if (!m->p.zstd_level)
        m->p.zstd_level = 1;
    if (!m->p.max_downtime_ms)
        m->p.max_downtime_ms = 300;
    m->is_source = is_source;
    m->listen_fd = -1;
    m->ctl.fd = -1;
    for (int i = 0; i < NB_MAX_CHANNELS; i++)
        m->data[i].fd = -1;
    pthread_mutex_init(&m->lock, NULL);
    pthread_cond_init(&m->cond, NULL);
    atomic_store(&m->max_downtime_ms, m->p.max_downtime_ms);
    atomic_store(&m->max_bandwidth, m->p.max_bandwidth);
    m->st.is_source = is_source;
    m->st.mode = p->mode;
    m->st.max_downtime_ms = m->p.max_downtime_ms;
    m->t0 = nb_now_ms();
    m->bw_tokens_t = m->t0;
    return m;
}

static int start(const struct nb_mig_params *p, int is_source, nb_mig **out,
                 char *err, size_t errlen)
{
    char e[NB_ERRLEN] = "";
    struct nb_mig *m;
    int kind = 0;

    *out = NULL;
    if (validate_params(p, is_source, e) < 0) {
        snprintf(err, errlen, "%s", e);
        return -NB_ERR_INVALID;
    }
    m = session_new(p, is_source, e);
    if (!m) {
        snprintf(err, errlen, "%s", e);
        return -NB_ERR_RESOURCE;
    }
    if (nb_stream_adopt(m, p, e) < 0)
        kind = NB_ERR_INVALID;
    else if (open_vmm(m, e) < 0)
        kind = p->vmm_kind > NB_VMM_NONE || p->vmm_kind < 0 ? NB_ERR_INVALID
                                                            : NB_ERR_VMM;
    else if (!is_source && bind_listener(m, e) < 0)
        kind = NB_ERR_RESOURCE;
    else {
        m->vmm_open = m->vmm.ops != NULL;
        if (pthread_create(&m->thread, NULL,
                           is_source ? nb_source_main : nb_dest_main, m) != 0) {
            snprintf(e, sizeof(e), "cannot start the migration thread");
            kind = NB_ERR_RESOURCE;
        }
    }
    if (kind) {
        snprintf(err, errlen, "%s", e);
        nb_mig_free(m);
        return -kind;
    }
    m->thread_started = 1;
    *out = m;
    return 0;
}

/* Start migrating a VM out; returns at once, the work runs on new threads.
 * Every call below that can be refused returns 0 or a negated
 * enum nb_error_kind, with the message in `err`. */
int nb_mig_send(const struct nb_mig_params *p, nb_mig **out, char *err, size_t errlen)
{
    return start(p, 1, out, err, errlen);
}

/* Listen for an incoming migration into a VM (or checkpoint); returns at once. */
int nb_mig_receive(const struct nb_mig_params *p, nb_mig **out, char *err, size_t errlen)
{
    return start(p, 0, out, err, errlen);
}

void nb_mig_stats(nb_mig *m, struct nb_mig_stats *out)
{
    pthread_mutex_lock(&m->lock);
    *out = m->st;
    pthread_mutex_unlock(&m->lock);
    out->bytes_transferred = atomic_load(&m->wire_bytes);
    out->pages_zero = atomic_load(&m->pages_zero);
    out->pages_delta = atomic_load(&m->pages_delta);
    out->pages_compressed = atomic_load(&m->pages_compressed);
    out->pages_raw = atomic_load(&m->pages_raw);
    out->disk_bytes = atomic_load(&m->disk_bytes);
    out->disk_blocks = atomic_load(&m->disk_blocks);
    out->stream_bytes = atomic_load(&m->stream_bytes);
    out->compressing = atomic_load(&m->compressing);
    out->pages_sent = out->pages_zero + out->pages_delta + out->pages_compressed +
                      out->pages_raw;
    out->max_downtime_ms = atomic_load(&m->max_downtime_ms);
    if (out->result == NB_RESULT_RUNNING) {
        out->total_ms = nb_now_ms() - m->t0;
        /* until the epilogue decides: the source's guest runs until paused */
        out->guest_runs_here = m->is_source && !atomic_load(&m->guest_paused);
    }
}

/* Change a parameter while the migration runs. */
int nb_mig_set_param(nb_mig *m, const char *name, uint64_t value, char *err, size_t errlen)
{
    if (!strcmp(name, "max_downtime_ms")) {
        if (value < 1 || value > 3600000) {
            snprintf(err, errlen, "max_downtime_ms must be 1..3600000");
            return -NB_ERR_INVALID;
        }
        atomic_store(&m->max_downtime_ms, (uint32_t)value);
        return 0;
    }
    if (!strcmp(name, "max_bandwidth")) {
        atomic_store(&m->max_bandwidth, value);
        return 0;
    }
    if (!strcmp(name, "throttle")) {
        char e[NB_ERRLEN];
        if (!m->is_source || value > 99) {
            snprintf(err, errlen, "throttle is 0..99 and applies to the source");
            return -NB_ERR_INVALID;
        }
        if (!m->vmm.ops || !m->vmm.ops->throttle ||
            m->vmm.ops->throttle(&m->vmm, (int)value, e) < 0) {
            snprintf(err, errlen, "cannot throttle the guest: %s",
                     m->vmm.ops && m->vmm.ops->throttle ? e : "not supported");
            return m->vmm.ops && m->vmm.ops->throttle ? -NB_ERR_VMM : -NB_ERR_INVALID;
        }
        pthread_mutex_lock(&m->lock);
        m->st.throttle = (uint32_t)value;
        pthread_mutex_unlock(&m->lock);
        return 0;
    }
    snprintf(err, errlen, "unknown parameter '%s' (max_downtime_ms, max_bandwidth, "
             "throttle)", name);
    return -NB_ERR_INVALID;
}

/* Switch over at the next opportunity, whatever the downtime estimate. */
int nb_mig_force_complete(nb_mig *m)
{
    atomic_store(&m->force_req, 1);
    return 0;
}

/* Break every page connection, so no thread stays blocked on one. */
void nb_shutdown_data(struct nb_mig *m)
{
    for (int i = 0; i < NB_MAX_CHANNELS; i++)
        if (m->data[i].fd >= 0)
            shutdown(m->data[i].fd, SHUT_RDWR);
}

/* Wake every thread blocked on a socket.  The control channel is shut for
 * reading only, so the failure epilogue can still tell the peer (ABORT). */
static void shutdown_channels(struct nb_mig *m)
{
    if (m->ctl.fd >= 0)
        shutdown(m->ctl.fd, SHUT_RD);
    nb_shutdown_data(m);
    if (m->listen_fd >= 0)
        shutdown(m->listen_fd, SHUT_RDWR);
}

/*
 * Cancel.  Refused once ownership has passed to the destination (the
 * source sent COMMIT, or the destination received it): from then on the
 * guest lives on the destination.
 */
int nb_mig_cancel(nb_mig *m, char *err, size_t errlen)
{
    pthread_mutex_lock(&m->lock);
    if (m->st.committed) {
        pthread_mutex_unlock(&m->lock);
        snprintf(err, errlen, "too late to cancel: the guest has been handed "
                 "to the destination");
        return -NB_ERR_TOO_LATE;
    }
    if (m->st.result != NB_RESULT_RUNNING || m->fail_kind) {
        pthread_mutex_unlock(&m->lock);
        snprintf(err, errlen, "the migration has already ended");
        return -NB_ERR_INVALID;
    }
    atomic_store(&m->cancel_req, 1);
    shutdown_channels(m);
    pthread_mutex_unlock(&m->lock);
    return 0;
}

/* Wait up to timeout_ms (-1: forever); returns 1 when finished, 0 if not. */
int nb_mig_wait(nb_mig *m, int timeout_ms)
{
    struct timespec until;
    int done;

    nb_deadline(&until, timeout_ms >= 0 ? timeout_ms : 0);
    pthread_mutex_lock(&m->lock);
    while (!m->done) {
        if (timeout_ms < 0)
            pthread_cond_wait(&m->cond, &m->lock);
        else if (pthread_cond_timedwait(&m->cond, &m->lock, &until) != 0)
            break;
    }
    done = m->done;
    pthread_mutex_unlock(&m->lock);
    return done;
}

/* Free a finished session (cancels and joins a running one first). */
void nb_mig_free(nb_mig *m)
{
    char e[NB_ERRLEN];
    if (!m)
        return;
    if (m->thread_started) {
        if (!nb_mig_wait(m, 0))
            nb_mig_cancel(m, e, sizeof(e));
        pthread_join(m->thread, NULL);
    }
    if (m->ctl.fd >= 0)
        close(m->ctl.fd);
    free(m->ctl.rbuf);
    nb_seal_free(&m->ctl);
    for (int i = 0; i < NB_MAX_CHANNELS; i++) {
        if (m->data[i].fd >= 0)
            close(m->data[i].fd);
        free(m->data[i].rbuf);
        nb_seal_free(&m->data[i]);
    }
    if (m->listen_fd >= 0)
        close(m->listen_fd);
    if (m->vmm.ops && m->vmm.ops->close)
        m->vmm.ops->close(&m->vmm);
    free(m->page_hash);
    nb_disk_close(m);
    nb_stream_close(m);
    if (m->secret)
        memset(m->secret, 0, m->p.secret_len);
    memset(&m->keys, 0, sizeof(m->keys));
    free(m->secret);
    free(m->host);
    free(m->target);
    pthread_mutex_destroy(&m->lock);
    pthread_cond_destroy(&m->cond);
    free(m);
}

int nb_engine_init(void)
{
    unsigned char b;
    return RAND_bytes(&b, 1) == 1 ? 0 : -1;
}

int nb_spec_check(const char *src_preamble, const char *dst_preamble,
                  char *err, size_t errlen)
{
    return nb_preamble_check(src_preamble, dst_preamble, err, errlen) < 0
               ? -NB_ERR_INCOMPATIBLE : 0;
}

/* Map guest memory and size the per-page tables (after the vmm is open);
 * returns 0 or the negated nb_error_kind. */
int nb_setup_memory(struct nb_mig *m, char *err)
{
    const struct nb_layout *l = &m->vmm.layout;
    uint64_t expect = 0;

    if (m->vmm.ops->map_memory(&m->vmm, &m->vmm.mem, err) < 0)
        return -NB_ERR_VMM;
    for (int s = 0; s < l->nsegs; s++) {
        if (l->seg[s].offset != expect || l->seg[s].len % NB_PAGE ||
            l->seg[s].gpa % NB_PAGE) {
            snprintf(err, NB_ERRLEN, "guest memory segment %d is not laid out "
                     "contiguously in page units", s);
            return -NB_ERR_VMM;
        }
        expect += l->seg[s].len;
    }
    m->npages = expect / NB_PAGE;
    m->page_hash = calloc(m->npages ? m->npages : 1, sizeof(uint64_t));
    if (!m->page_hash) {
        snprintf(err, NB_ERRLEN, "out of memory for %llu page hashes",
                 (unsigned long long)m->npages);
        return -NB_ERR_RESOURCE;
    }
    pthread_mutex_lock(&m->lock);
    m->st.mem_total = expect;
    pthread_mutex_unlock(&m->lock);
    return 0;
}
