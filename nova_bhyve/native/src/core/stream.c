/*
 * Stream disks (PROTOCOL.md, "Streams"): bytes the caller's processes
 * produce on the source (a `zfs send`, say) travel in STREAM frames on
 * page channel 1, inside the session's authentication and encryption,
 * and go to the caller's processes on the destination (a `zfs recv`).
 *
 * Each stream has two parts.  Part 0 flows while the guest runs: the
 * source's sender on channel 1 sends what is readable after each round's
 * pages and disk blocks, and the source does not switch over before
 * every part 0 has ended.  Part 1 is produced only once the guest is
 * paused (the source writes one byte to the stream's notify descriptor
 * then) and is sent whole in the final round.  Each part ends with a
 * frame giving its length and CRC-32C.  Once a stream's parts are done,
 * each side reads its status descriptor: "ok" from the processes that
 * produced (source) or consumed (destination) the bytes, else their
 * error, which fails the migration before the commit; so a guest is
 * never handed over unless every stream was received whole.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/nbmig.h"

/* Between rounds, how long a sender waits for part 0 to have bytes, and
 * how long it sends them before the round goes on. */
#define IDLE_MS 50
#define ROUND_BUDGET_MS 250
/* Poll slices: a cancel or a failure elsewhere is noticed this often. */
#define SLICE_MS 100
/* How long a destination whose receiver stopped reading waits for its
 * status, the reason to report. */
#define REASON_MS 2000
#define MAX_STATUS 200

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* A private duplicate of the caller's descriptor `fd`, or -1. */
static int adopt_fd(int fd, const char *what, int i, char *err)
{
    int mine = fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 3) : -1;
    if (mine < 0)
        snprintf(err, NB_ERRLEN, "stream %d: %s descriptor %d: %s", i, what, fd,
                 fd < 0 ? "not given" : strerror(errno));
    return mine;
}

/*
 * Take duplicates of the caller's stream descriptors (every slot is
 * closed and -1 first, so nb_stream_close is always safe).  Returns 0, or
 * -1 with `err` for a request the engine refuses.
 */
int nb_stream_adopt(struct nb_mig *m, const struct nb_mig_params *p, char *err)
{
    for (int i = 0; i < NB_MAX_STREAMS; i++) {
        struct nb_stream *s = &m->stream[i];
        s->fd[0] = s->fd[1] = s->notify_fd = s->status_fd = -1;
    }
    m->p.stream_fds = m->p.stream_notify_fds = m->p.stream_status_fds = NULL;
    if (p->nstreams < 0 || p->nstreams > NB_MAX_STREAMS || (p->nstreams &&
        (!p->stream_fds || !p->stream_status_fds ||
         (m->is_source && !p->stream_notify_fds)))) {
        snprintf(err, NB_ERRLEN, "nstreams must be 0..%d, with two stream, one "
                 "status (and, sending, one notify) descriptor each",
                 NB_MAX_STREAMS);
        return -1;
    }
    m->nstreams = p->nstreams;
    for (int i = 0; i < m->nstreams; i++) {
        struct nb_stream *s = &m->stream[i];
        if ((s->fd[0] = adopt_fd(p->stream_fds[2 * i], "part 0", i, err)) < 0 ||
            (s->fd[1] = adopt_fd(p->stream_fds[2 * i + 1], "part 1", i, err)) < 0 ||
            (s->status_fd = adopt_fd(p->stream_status_fds[i], "status", i, err)) < 0 ||
            (m->is_source &&
             (s->notify_fd = adopt_fd(p->stream_notify_fds[i], "notify", i, err)) < 0))
            return -1;
    }
    return 0;
}

/* Close every descriptor still open (a notify never written: the guest
 * never paused, part 1's producer must not start). */
void nb_stream_close(struct nb_mig *m)
{
    for (int i = 0; i < m->nstreams; i++) {
        struct nb_stream *s = &m->stream[i];
        close_fd(&s->fd[0]);
        close_fd(&s->fd[1]);
        close_fd(&s->notify_fd);
        close_fd(&s->status_fd);
    }
}

/* 1 once every stream's part 0 has ended (the source may switch over). */
int nb_stream_precopied(struct nb_mig *m)
{
    for (int i = 0; i < m->nstreams; i++)
        if (!atomic_load(&m->stream[i].precopied))
            return 0;
    return 1;
}

/* Source, the guest is paused: let each part 1's producer start. */
void nb_stream_paused(struct nb_mig *m)
{
    for (int i = 0; i < m->nstreams; i++) {
        struct nb_stream *s = &m->stream[i];
        if (s->notify_fd >= 0 && write(s->notify_fd, "1", 1) < 0) {
            /* a producer gone: its part 1 ends early and its status says why */
        }
        close_fd(&s->notify_fd);
    }
}

/*
 * Wait up to `ms` for `fd` to be readable, in slices, failing at once on
 * a cancel or a failure elsewhere in the session.  1: readable (or at
 * its end), 0: not within `ms`, -1: failed, with err and *kind.
 */
static int wait_readable(struct nb_mig *m, int fd, int ms, int *kind, char *err)
{
    for (int waited = 0; waited < ms; waited += SLICE_MS) {
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        int rc = poll(&pfd, 1, ms - waited < SLICE_MS ? ms - waited : SLICE_MS);
        if (rc > 0)
            return 1;
        if (rc < 0 && errno != EINTR) {
            snprintf(err, NB_ERRLEN, "poll: %s", strerror(errno));
            *kind = NB_ERR_RESOURCE;
            return -1;
        }
        if (atomic_load(&m->cancel_req) || nb_fail_kind(m)) {
            snprintf(err, NB_ERRLEN, "%s", atomic_load(&m->cancel_req)
                     ? "cancelled" : "the session failed");
            *kind = atomic_load(&m->cancel_req) ? NB_ERR_CANCELLED
                                                : nb_fail_kind(m);
            return -1;
        }
    }
    return 0;
}

/*
 * Read stream `i`'s status descriptor to its end: 0 if it said "ok"
 * (trailing white space aside), else -1 with `err` naming `who` and what
 * it reported.
 */
static int check_status(struct nb_mig *m, int i, const char *who, int wait_ms,
                        char *err)
{
    struct nb_stream *s = &m->stream[i];
    char text[MAX_STATUS + 1];
    size_t n = 0;
    int kind;

    for (;;) {
        int r = wait_readable(m, s->status_fd, wait_ms, &kind, err);
        ssize_t got;
        if (r <= 0) {
            if (r == 0)
                snprintf(err, NB_ERRLEN, "stream %d: no status from %s within "
                         "%d ms", i, who, wait_ms);
            return -1;
        }
        got = read(s->status_fd, text + n, MAX_STATUS - n);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0 || (n += (size_t)got) == MAX_STATUS)
            break;
    }
    close_fd(&s->status_fd);
    while (n && (text[n - 1] == '\n' || text[n - 1] == ' ' || text[n - 1] == '\r'))
        n--;
    text[n] = 0;
    if (!strcmp(text, "ok"))
        return 0;
    snprintf(err, NB_ERRLEN, "stream %d: %s reports: %s", i, who,
             n ? text : "(nothing: it ended without a status)");
    return -1;
}

/* Source: part `s->part` of stream `i` is at its end: (the last part:
 * check the producers' status, then) send the end frame and move on. */
static int end_part(struct nb_mig *m, struct nb_chan *ch, uint8_t *frame,
                    uint32_t round, int i, char *err)
{
    struct nb_stream *s = &m->stream[i];
    size_t n;

    if (s->part == NB_STREAM_PARTS - 1 &&
        check_status(m, i, "its producer", (int)m->p.timeout_ms, err) < 0)
        return nb_wire_fail(ch, NB_ERR_VMM);
    n = nb_stream_end_put(frame, round, (uint16_t)i, (uint8_t)s->part, s->bytes,
                          s->crc);
    if (nb_send_frame_in_place(ch, NB_MSG_STREAM, frame, (uint32_t)n, err) < 0)
        return -1;
    close_fd(&s->fd[s->part]);
    if (s->part == 0)
        atomic_store(&s->precopied, 1);
    s->part++;
    s->bytes = 0;
    s->crc = 0;
    return 1;
}

/* Source: send one read of the part in flight; 1 at its end, 0 if more
 * may come, -1 on failure. */
static int send_chunk(struct nb_mig *m, struct nb_chan *ch, uint8_t *frame,
                      uint32_t round, int i, char *err)
{
    struct nb_stream *s = &m->stream[i];
    ssize_t n = read(s->fd[s->part], frame + NB_STREAM_HDR,
                     NB_MAX_PAGES_FRAME - NB_STREAM_HDR);

    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return 0;
    if (n < 0) {
        snprintf(err, NB_ERRLEN, "stream %d: reading part %d: %s", i, s->part,
                 strerror(errno));
        return nb_wire_fail(ch, NB_ERR_VMM);
    }
    if (n == 0)
        return end_part(m, ch, frame, round, i, err);
    s->crc = nb_crc32c(s->crc, frame + NB_STREAM_HDR, (size_t)n);
    s->bytes += (uint64_t)n;
    nb_stream_data_put(frame, round, (uint16_t)i, (uint8_t)s->part);
    nb_throttle_bandwidth(m, (size_t)n + NB_STREAM_HDR);
    if (nb_send_frame_in_place(ch, NB_MSG_STREAM, frame,
                               (uint32_t)(n + NB_STREAM_HDR), err) < 0)
        return -1;
    atomic_fetch_add(&m->stream_bytes, (uint64_t)n);
    return 0;
}

/*
 * Source: send the part of stream `i` in flight.  `drain`: to its end,
 * failing if its producer stays silent for the session timeout; else
 * what it offers within ROUND_BUDGET_MS.  1: the part ended, 0: not yet.
 */
static int pump(struct nb_mig *m, struct nb_chan *ch, uint8_t *frame,
                uint32_t round, int i, int drain, char *err)
{
    struct nb_stream *s = &m->stream[i];
    double t0 = nb_now_ms();
    int kind, rc;

    for (;;) {
        int r = wait_readable(m, s->fd[s->part],
                              drain ? (int)m->p.timeout_ms : IDLE_MS, &kind, err);
        if (r < 0)
            return nb_wire_fail(ch, kind);
        if (r == 0 && drain) {
            snprintf(err, NB_ERRLEN, "stream %d: nothing from part %d's producer "
                     "for %u ms", i, s->part, m->p.timeout_ms);
            return nb_wire_fail(ch, NB_ERR_TIMEOUT);
        }
        if (r == 0)
            return 0;
        if ((rc = send_chunk(m, ch, frame, round, i, err)) != 0)
            return rc;
        if (!drain && nb_now_ms() - t0 > ROUND_BUDGET_MS)
            return 0;
    }
}

/*
 * Source, page channel 1 at the end of a round (its pages and blocks
 * sent; `frame` is free, NB_MAX_PAGES_FRAME + NB_TAG bytes): send what
 * part 0 of each stream offers, or, in the `final` round (the guest
 * paused), every part to its end.
 */
int nb_stream_send(struct nb_mig *m, struct nb_chan *ch, uint8_t *frame,
                   uint32_t round, int final, char *err)
{
    for (int i = 0; i < m->nstreams; i++) {
        struct nb_stream *s = &m->stream[i];
        while (s->part < NB_STREAM_PARTS && (final || s->part == 0)) {
            int rc = pump(m, ch, frame, round, i, final, err);
            if (rc < 0)
                return -1;
            if (rc == 0)
                break;
        }
    }
    return 0;
}

/* Write all `len` bytes to `fd` (a pipe whose reader went away: EPIPE,
 * its SIGPIPE kept from the process). */
static int write_all(int fd, const uint8_t *p, size_t len)
{
    sigset_t pipe_sig, old;
    struct timespec now = { 0, 0 };
    int rc = 0, e = 0;

    sigemptyset(&pipe_sig);
    sigaddset(&pipe_sig, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_sig, &old);
    while (len && rc == 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            e = n < 0 ? errno : EIO;
            rc = -1;
            break;
        }
        p += n;
        len -= (size_t)n;
    }
    if (e == EPIPE)
        sigtimedwait(&pipe_sig, NULL, &now);    /* the signal it raised */
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    errno = e;
    return rc;
}

/* Destination: the end of a part: its length and CRC must be what came. */
static int take_end(struct nb_mig *m, const struct nb_stream_msg *msg, char *err)
{
    struct nb_stream *s = &m->stream[msg->stream];

    if (msg->total != s->bytes || msg->crc != s->crc) {
        snprintf(err, NB_ERRLEN, "stream %u part %u: the source sent %llu bytes "
                 "(CRC-32C %08x), %llu arrived (%08x)", msg->stream, msg->part,
                 (unsigned long long)msg->total, msg->crc,
                 (unsigned long long)s->bytes, s->crc);
        return -1;
    }
    close_fd(&s->fd[s->part]);      /* its consumer sees the end */
    if (s->part == 0)
        atomic_store(&s->precopied, 1);
    s->part++;
    s->bytes = 0;
    s->crc = 0;
    return 0;
}

/*
 * Destination, a STREAM frame on page channel `chan` in round `round`:
 * checked (channel 1, its round, an existing stream, the part in flight),
 * then its bytes written to the part's descriptor, or the part ended.
 * -1 with err and *kind: the channel ends.
 */
int nb_stream_apply(struct nb_mig *m, int chan, const struct nb_frame *f,
                    uint32_t round, int *kind, char *err)
{
    struct nb_stream_msg msg;
    struct nb_stream *s;

    *kind = NB_ERR_CORRUPT;
    if (nb_stream_parse(f, &msg, err) < 0)
        return -1;
    if (chan != 1 || msg.round != round || msg.stream >= m->nstreams) {
        snprintf(err, NB_ERRLEN, "STREAM frame for stream %u, round %u on "
                 "channel %d in round %u (%d streams, all on channel 1)",
                 msg.stream, msg.round, chan, round, m->nstreams);
        return -1;
    }
    s = &m->stream[msg.stream];
    if (msg.part != s->part) {
        snprintf(err, NB_ERRLEN, "stream %u: a frame of part %u while part %d "
                 "is in flight", msg.stream, msg.part, s->part);
        return -1;
    }
    if (msg.end)
        return take_end(m, &msg, err);
    if (write_all(s->fd[s->part], msg.data, msg.len) < 0) {
        int e = errno;
        /* a receiver that stopped reading has said why, or will at once */
        if (check_status(m, msg.stream, "its receiver", REASON_MS, err) == 0 ||
            e != EPIPE)
            snprintf(err, NB_ERRLEN, "stream %u: its part %u's receiver does "
                     "not take it: %s", msg.stream, msg.part, strerror(e));
        *kind = NB_ERR_VMM;
        return -1;
    }
    s->crc = nb_crc32c(s->crc, msg.data, msg.len);
    s->bytes += msg.len;
    atomic_fetch_add(&m->stream_bytes, msg.len);
    return 0;
}

/*
 * Destination, before READY (every channel delivered the final round):
 * each stream's parts ended and its receivers report "ok".  Returns 0 or
 * the negated kind with `err`.
 */
int nb_stream_verify(struct nb_mig *m, char *err)
{
    for (int i = 0; i < m->nstreams; i++) {
        if (m->stream[i].part != NB_STREAM_PARTS) {
            snprintf(err, NB_ERRLEN, "stream %d: the final round came without "
                     "the end of part %d", i, m->stream[i].part);
            return -NB_ERR_CORRUPT;
        }
        if (check_status(m, i, "its receiver", (int)m->p.timeout_ms, err) < 0)
            return -NB_ERR_VMM;
    }
    return 0;
}
