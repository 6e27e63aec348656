/*
 * The control socket: a unix stream socket speaking a line protocol
 * (specified in ../CONTROL_PROTOCOL.md).  One request line, one reply
 * line "OK ..." or "ERR <CODE> <message>", optionally followed by a
 * binary payload whose size the reply line states.  Malformed input gets
 * an ERR reply; it never crashes or hangs the VM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "testhost.h"

#define MAX_CLIENTS 16
#define MAX_LINE 512
#define MAX_ARGS 4
#define IO_TIMEOUT_S 10
#define MAX_STATE_BLOB (16u << 20)

struct client {
    int fd;
    char buf[MAX_LINE + 1];
    size_t len;
};

static const char *state_name(enum nb_vm_state s)
{
    switch (s) {
    case NB_STATE_RUNNING: return "running";
    case NB_STATE_PAUSED: return "paused";
    case NB_STATE_INCOMING: return "incoming";
    case NB_STATE_FAILED: return "failed";
    }
    return "unknown";
}

/* Milliseconds since an arbitrary start, on the monotonic clock. */
static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for `events` or the deadline passes (-1). */
static int wait_ready(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - now_ms();
        struct pollfd p = { .fd = fd, .events = events };
        int r;
        if (left <= 0)
            return -1;
        r = poll(&p, 1, (int)left);
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

/* Send all of buf within IO_TIMEOUT_S in all, however slowly the peer reads. */
static int send_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    int64_t deadline = now_ms() + IO_TIMEOUT_S * 1000;
    while (len) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wait_ready(fd, POLLOUT, deadline) < 0)
                return -1;
            continue;
        }
        if (w <= 0)
            return -1;
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

static int reply(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int reply(int fd, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -1;
    if ((size_t)n > sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    return send_all(fd, line, (size_t)n);
}

/* Read exactly len bytes: first what is buffered, then from the socket,
 * all of it within IO_TIMEOUT_S (a byte now and then does not extend it). */
static int read_exact(struct client *c, uint8_t *dst, size_t len)
{
    size_t have = c->len < len ? c->len : len;
    int64_t deadline = now_ms() + IO_TIMEOUT_S * 1000;
    memcpy(dst, c->buf, have);
    memmove(c->buf, c->buf + have, c->len - have);
    c->len -= have;
    while (have < len) {
        ssize_t r = recv(c->fd, dst + have, len - have, MSG_DONTWAIT);
        if (r < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wait_ready(c->fd, POLLIN, deadline) < 0)
                return -1;
            continue;
        }
        if (r <= 0)
            return -1;
        have += (size_t)r;
    }
    return 0;
}

static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long v;
    if (!s || !*s || *s == '-')
        return -1;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || *end || v > max)
        return -1;
    *out = v;
    return 0;
}

static int cmd_status(struct nb_vm *vm, int fd)
{
    enum nb_vm_state st;
    int thr;
    pthread_mutex_lock(&vm->lock);
    st = vm->state;
    thr = vm->throttle_pct;
    pthread_mutex_unlock(&vm->lock);
    return reply(fd, "OK state=%s name=%s pid=%d cpus=%d mem=%" PRIu64
                 " lowmem=%" PRIu64 " highmem=%" PRIu64 " highbase=%" PRIu64 ""
                 " page_size=%" PRIu64 " dirty_log=1 dirty_log_whole=%d"
                 " throttle=%d exits=%" PRIu64
                 " console_lines=%" PRIu64 " disk_size=%" PRIu64
                 " disk_block=%" PRIu64,
                 state_name(st), vm->name, (int)getpid(), vm->ncpus,
                 vm->mem_size, vm->lowmem, vm->highmem, NB_HIGHMEM_BASE,
                 NB_PAGE_SIZE, vm->dirty_log_whole, thr,
                 __atomic_load_n(&vm->exits, __ATOMIC_RELAXED),
                 vm->console_lines, vm->ata.sectors * NB_SECTOR,
                 NB_DISK_BLOCK);
}

static int cmd_memfd(struct nb_vm *vm, int fd)
{
    char line[256];
    struct msghdr msg;
    struct iovec iov;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct cmsghdr *cm;
    int n = snprintf(line, sizeof(line), "OK size=%" PRIu64 " lowmem=%" PRIu64
                     " highmem=%" PRIu64 " highbase=%" PRIu64 " highoffset=%" PRIu64
                     " page_size=%" PRIu64 "\n", vm->mem_size, vm->lowmem,
                     vm->highmem, NB_HIGHMEM_BASE, vm->lowmem, NB_PAGE_SIZE);

    memset(&msg, 0, sizeof(msg));
    memset(&u, 0, sizeof(u));
    iov.iov_base = line;
    iov.iov_len = (size_t)n;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof(u.buf);
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &vm->mem_fd, sizeof(int));
    return sendmsg(fd, &msg, MSG_NOSIGNAL) == n ? 0 : -1;
}

/*
 * The dirty log's reply body (CONTROL_PROTOCOL.md, "Dirty tracking"): each
 * run of words with a bit set as u32 first word, u32 count and the words,
 * little-endian.  Never more than the bitmap's length plus 8 bytes: each
 * run but the last is followed by a clean word it does not send.
 */
static size_t encode_runs(const uint64_t *w, size_t nw, uint8_t *out)
{
    size_t pos = 0, i = 0;

    while (i < nw) {
        size_t first;
        uint32_t hdr[2];
        if (!w[i]) {
            i++;
            continue;
        }
        for (first = i; i < nw && w[i]; i++) {
        }
        hdr[0] = (uint32_t)first;
        hdr[1] = (uint32_t)(i - first);
        memcpy(out + pos, hdr, sizeof(hdr));
        memcpy(out + pos + sizeof(hdr), &w[first], (i - first) * 8);
        pos += sizeof(hdr) + (i - first) * 8;
    }
    return pos;
}

/* dirty-log [peek | FIRST COUNT]: see CONTROL_PROTOCOL.md */
static int cmd_dirty_log(struct nb_vm *vm, int fd, int argc, char **argv)
{
    size_t len = nb_vm_dirty_log_bytes(vm), body;
    uint64_t first = 0, count = UINT64_MAX;
    int peek = argc == 2 && !strcmp(argv[1], "peek");
    uint8_t *bm, *runs;
    int rc;
    if (argc == 3) {
        if (parse_u64(argv[1], len / 8 - 1, &first) < 0 ||
            parse_u64(argv[2], UINT64_MAX, &count) < 0 || count == 0)
            return reply(fd, "ERR EINVAL dirty-log FIRST COUNT: 64-page words, "
                         "FIRST below %zu, COUNT at least 1", len / 8);
    } else if (argc != 1 && !peek) {
        return reply(fd, "ERR EINVAL usage: dirty-log [peek | FIRST COUNT]");
    }
    if (argc != 1 && vm->dirty_log_whole)
        return reply(fd, "ERR ENOTSUP this VM offers only the whole dirty log "
                     "(--dirty-log-whole)");
    bm = malloc(len);
    runs = malloc(len + 8);
    if (!bm || !runs) {
        free(bm);
        free(runs);
        return reply(fd, "ERR ENOMEM cannot allocate %zu bytes", 2 * len + 8);
    }
    if (nb_vm_dirty_log_range(vm, bm, len, first, count, peek) < 0) {
        rc = reply(fd, "ERR EIO reading the dirty log: %s", strerror(errno));
        free(bm);
        free(runs);
        return rc;
    }
    /* len is a whole number of words (nb_bitmap_bytes) */
    body = encode_runs((const uint64_t *)(void *)bm, len / 8, runs);
    rc = reply(fd, "OK bytes=%zu words=%zu lowpages=%" PRIu64 " highpages=%" PRIu64
               " lowbytes=%" PRIu64, body, len / 8, vm->lowmem / NB_PAGE_SIZE,
               vm->highmem / NB_PAGE_SIZE, nb_bitmap_bytes(vm->lowmem / NB_PAGE_SIZE));
    if (rc == 0)
        rc = send_all(fd, runs, body);
    free(bm);
    free(runs);
    return rc;
}

/* disk-dirty-log [peek]: see CONTROL_PROTOCOL.md */
static int cmd_disk_dirty_log(struct nb_vm *vm, int fd, int argc, char **argv)
{
    int peek = argc == 2 && !strcmp(argv[1], "peek");
    size_t len = nb_ata_dirty_bytes(&vm->ata);
    uint8_t *bm;
    int rc;

    if (argc != 1 && !peek)
        return reply(fd, "ERR EINVAL usage: disk-dirty-log [peek]");
    if (!vm->ata.present)
        return reply(fd, "ERR EINVAL this VM has no disk (start it with --disk)");
    bm = malloc(len);
    if (!bm)
        return reply(fd, "ERR ENOMEM cannot allocate %zu bytes", len);
    nb_ata_dirty_log(&vm->ata, bm, peek);
    rc = reply(fd, "OK bytes=%zu blocks=%" PRIu64 " block_size=%" PRIu64, len,
               vm->ata.nblocks, NB_DISK_BLOCK);
    if (rc == 0)
        rc = send_all(fd, bm, len);
    free(bm);
    return rc;
}

static int cmd_save_state(struct nb_vm *vm, int fd)
{
    char err[256];
    uint8_t *blob;
    size_t len;
    int rc;
    if (vm->state != NB_STATE_PAUSED)
        return reply(fd, "ERR EBUSY VM is %s; pause it before save-state",
                     state_name(vm->state));
    if (nb_state_save(vm, &blob, &len, err, sizeof(err)) < 0)
        return reply(fd, "ERR EIO %s", err);
    rc = reply(fd, "OK bytes=%zu crc32=%08x", len, nb_crc32(blob, len));
    if (rc == 0)
        rc = send_all(fd, blob, len);
    free(blob);
    return rc;
}

static int cmd_load_state(struct nb_vm *vm, struct client *c, const char *arg)
{
    char err[256];
    uint64_t n;
    uint8_t *blob;
    int rc;

    if (parse_u64(arg, MAX_STATE_BLOB, &n) < 0 || n == 0) {
        reply(c->fd, "ERR EINVAL usage: load-state <bytes> (1..%u), then "
              "the blob", MAX_STATE_BLOB);
        return -1; /* the stream position is unknown: drop the client */
    }
    blob = malloc(n);
    if (!blob)
        return reply(c->fd, "ERR ENOMEM cannot allocate %" PRIu64 " bytes", n);
    if (read_exact(c, blob, n) < 0) {
        free(blob);
        reply(c->fd, "ERR EPROTO state blob truncated: connection closed or "
              "timed out before %" PRIu64 " bytes arrived", n);
        return -1;
    }
    if (vm->state != NB_STATE_INCOMING) {
        free(blob);
        return reply(c->fd, "ERR EBUSY VM is %s; load-state needs a VM started "
                     "with --incoming", state_name(vm->state));
    }
    rc = nb_state_load(vm, blob, n, err, sizeof(err));
    free(blob);
    if (rc == -1)
        return reply(c->fd, "ERR EINVAL state refused: %s", err);
    if (rc < 0) {
        vm->state = NB_STATE_FAILED;
        return reply(c->fd, "ERR EIO state load failed half-way, VM will not "
                     "run: %s", err);
    }
    vm->state = NB_STATE_PAUSED;
    return reply(c->fd, "OK state=paused");
}

static int cmd_resume(struct nb_vm *vm, int fd)
{
    if (vm->state == NB_STATE_PAUSED) {
        /* answer before waking the vCPUs: a vCPU woken on this CPU
         * would otherwise hold the answer back for its time slice */
        nb_vcpus_release(vm);
        int rc = reply(fd, "OK state=running");
        nb_vcpus_wake(vm);
        return rc;
    }
    if (vm->state != NB_STATE_RUNNING)
        return reply(fd, "ERR EBUSY VM is %s%s", state_name(vm->state),
                     vm->state == NB_STATE_INCOMING
                         ? "; load a state blob first" : "");
    return reply(fd, "OK state=running");
}

/* Handle one request line.  Returns -1 to drop the client, 1 to exit. */
static int handle_line(struct nb_vm *vm, struct client *c, char *line)
{
    char *argv[MAX_ARGS + 1];
    int argc = 0;
    char *save = NULL;
    uint64_t v;

    for (char *p = line; *p; p++) {
        if ((unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e)
            return reply(c->fd, "ERR EINVAL request contains a non-printable "
                         "byte (0x%02x)", (unsigned char)*p);
    }
    for (char *t = strtok_r(line, " ", &save); t; t = strtok_r(NULL, " ", &save)) {
        if (argc == MAX_ARGS)
            return reply(c->fd, "ERR EINVAL too many arguments");
        argv[argc++] = t;
    }
    argv[argc] = NULL;
    if (argc == 0)
        return reply(c->fd, "ERR EINVAL empty request");

    if (!strcmp(argv[0], "status") && argc == 1)
        return cmd_status(vm, c->fd);
    if (!strcmp(argv[0], "pause") && argc == 1) {
        if (vm->state == NB_STATE_RUNNING)
            nb_vcpus_pause(vm);
        if (vm->state != NB_STATE_PAUSED)
            return reply(c->fd, "ERR EBUSY VM is %s", state_name(vm->state));
        return reply(c->fd, "OK state=paused");
    }
    if (!strcmp(argv[0], "resume") && argc == 1)
        return cmd_resume(vm, c->fd);
    if (!strcmp(argv[0], "throttle") && argc == 2) {
        if (parse_u64(argv[1], 99, &v) < 0)
            return reply(c->fd, "ERR EINVAL throttle takes a percentage 0..99");
        pthread_mutex_lock(&vm->lock);
        vm->throttle_pct = (int)v;
        pthread_cond_broadcast(&vm->cond);
        pthread_mutex_unlock(&vm->lock);
        return reply(c->fd, "OK throttle=%d", (int)v);
    }
    if (!strcmp(argv[0], "save-state") && argc == 1)
        return cmd_save_state(vm, c->fd);
    if (!strcmp(argv[0], "load-state") && argc == 2)
        return cmd_load_state(vm, c, argv[1]);
    if (!strcmp(argv[0], "memfd") && argc == 1)
        return cmd_memfd(vm, c->fd);
    if (!strcmp(argv[0], "dirty-log"))
        return cmd_dirty_log(vm, c->fd, argc, argv);
    if (!strcmp(argv[0], "disk-dirty-log"))
        return cmd_disk_dirty_log(vm, c->fd, argc, argv);
    if (!strcmp(argv[0], "shutdown") && argc == 1) {
        reply(c->fd, "OK state=stopping");
        return 1;
    }
    return reply(c->fd, "ERR EINVAL unknown request '%.40s' with %d argument(s)",
                 argv[0], argc - 1);
}

/* Process buffered input.  Returns -1 to drop the client, 1 to exit. */
static int handle_input(struct nb_vm *vm, struct client *c)
{
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        char line[MAX_LINE + 1];
        size_t ll;
        int rc;
        if (!nl) {
            if (c->len >= MAX_LINE) {
                reply(c->fd, "ERR E2BIG request line longer than %d bytes",
                      MAX_LINE);
                return -1;
            }
            return 0;
        }
        ll = (size_t)(nl - c->buf);
        memcpy(line, c->buf, ll);
        line[ll] = 0;
        if (ll && line[ll - 1] == '\r')
            line[ll - 1] = 0;
        memmove(c->buf, nl + 1, c->len - ll - 1);
        c->len -= ll + 1;
        rc = handle_line(vm, c, line);
        if (rc != 0)
            return rc;
    }
}

static int listen_on(const char *path)
{
    struct sockaddr_un a;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        nb_die("socket: %s", strerror(errno));
    memset(&a, 0, sizeof(a));
    a.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(a.sun_path))
        nb_die("control socket path %s is too long (max %zu bytes); use a "
               "shorter --rundir", path, sizeof(a.sun_path) - 1);
    strcpy(a.sun_path, path);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
        nb_die("a VM is already running with control socket %s", path);
    unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 8) < 0)
        nb_die("cannot listen on %s: %s", path, strerror(errno));
    return fd;
}

/* Serve requests until shutdown or until the VM ends.  Returns the exit status. */
int nb_control_serve(struct nb_vm *vm, const char *sock_path)
{
    struct client clients[MAX_CLIENTS];
    int lfd = listen_on(sock_path);
    int nclients = 0, status = -1;
    struct timeval tv = { .tv_sec = IO_TIMEOUT_S };

    while (status < 0) {
        struct pollfd pfd[MAX_CLIENTS + 2];
        int timeout, thr;

        pfd[0] = (struct pollfd){ .fd = vm->event_fd, .events = POLLIN };
        pfd[1] = (struct pollfd){ .fd = lfd, .events = POLLIN };
        for (int i = 0; i < nclients; i++)
            pfd[i + 2] = (struct pollfd){ .fd = clients[i].fd, .events = POLLIN };
        pthread_mutex_lock(&vm->lock);
        thr = vm->throttle_pct;
        if (vm->quit)
            status = vm->exit_status;
        pthread_mutex_unlock(&vm->lock);
        if (status >= 0)
            break;
        timeout = thr > 0 && vm->state == NB_STATE_RUNNING ? nb_throttle_tick_ms(thr) : -1;
        if (poll(pfd, (nfds_t)nclients + 2, timeout) < 0) {
            if (errno == EINTR)
                continue;
            nb_die("poll: %s", strerror(errno));
        }
        if (thr > 0 && vm->state == NB_STATE_RUNNING)
            nb_vcpus_kick(vm, 1);
        if (pfd[0].revents & POLLIN) {
            uint64_t n;
            if (read(vm->event_fd, &n, sizeof(n)) < 0) {
                /* nothing pending */
            }
        }
        for (int i = nclients - 1; i >= 0; i--) {
            struct client *c = &clients[i];
            ssize_t r;
            int rc = 0;
            if (!(pfd[i + 2].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            r = recv(c->fd, c->buf + c->len, MAX_LINE - c->len, 0);
            if (r <= 0)
                rc = -1;
            else {
                c->len += (size_t)r;
                rc = handle_input(vm, c);
            }
            if (rc == 1)
                status = NB_EXIT_POWEROFF;
            if (rc != 0) {
                close(c->fd);
                clients[i] = clients[--nclients];
            }
        }
        if (pfd[1].revents & POLLIN) {
            int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (cfd >= 0 && nclients == MAX_CLIENTS) {
                reply(cfd, "ERR EBUSY too many control connections");
                close(cfd);
            } else if (cfd >= 0) {
                setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
                setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
                clients[nclients++] = (struct client){ .fd = cfd, .len = 0 };
            }
        }
    }
    for (int i = 0; i < nclients; i++)
        close(clients[i].fd);
    close(lfd);
    unlink(sock_path);
    return status;
}
