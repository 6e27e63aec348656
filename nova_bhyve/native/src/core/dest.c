/*
 * Destination side, the source's mirror as a state machine (PROTOCOL.md,
 * "Phases"): SETUP waits for a source that passes the handshake (core/
 * gate.c vets connections concurrently), HANDSHAKE checks compatibility,
 * PRECOPY receives pages on several channels into guest memory (the
 * receiver threads, core/receiver.c; APPLIED tells the source each round
 * that is in) until STATE arrives,
 * SWITCHOVER loads the device state,
 * VERIFY compares memory digests, and COMMIT runs the guest, on the
 * source's COMMIT only.  dest_finish() alone decides the result and who
 * runs the guest: anything but a completed COMMIT leaves it not running
 * here (the caller then discards the incoming VM).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <zstd.h>

#include "core/dest.h"
#include "core/gate.h"

/* Note why the current phase failed; returns -1. */
static int fail(struct dest *d, int kind)
{
    d->kind = kind;
    return -1;
}

/* Vet a control connection: the handshake (HELLO, CHALLENGE, AUTH). */
static int vet_control(void *ctx, struct nb_chan *c, struct nb_session_keys *keys,
                       char *err)
{
    struct nb_mig *m = ctx;
    return nb_handshake_dest(c, m->p.secret, m->p.secret_len, keys, err);
}

/* Vet a page channel: its JOIN, then its sealing keys. */
static int vet_join(void *ctx, struct nb_chan *c, struct nb_session_keys *keys,
                    char *err)
{
    struct dest *d = ctx;
    struct nb_mig *m = d->m;
    (void)keys;
    if (nb_join_check(c, &m->keys, d->nrcv, err) < 0)
        return -1;
    return m->p.plaintext_pages ? 0 : nb_seal_start(c, m->keys.key, 0, err);
}

/*
 * Take the first connection that passes the handshake as the control
 * channel.  Connections are vetted concurrently (core/gate.c): one that
 * fails or stays silent is dropped after NB_GATE_MS, and the next awaited
 * until the session timeout, so a stray or hostile client can neither end
 * the session nor hold the listener.
 */
static int open_control(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    struct nb_gate g;
    int kind = 0, rc;

    if (nb_gate_open(&g, m->listen_fd, vet_control, m, "authenticated source",
                     m->p.timeout_ms, &m->wire_bytes, err) < 0)
        return fail(d, NB_ERR_RESOURCE);
    rc = nb_gate_next(&g, d->deadline, -1, &m->cancel_req, &m->ctl, &m->keys,
                      &kind, err);
    d->rejected += g.rejected;
    nb_gate_close(&g);
    if (rc < 0)
        return fail(d, kind);
    nb_set_timeouts(m->ctl.fd, m->p.timeout_ms);
    d->deadline = nb_now_ms() + m->p.timeout_ms;  /* for the joins */
    return 0;
}

/*
 * While the page channels join, the source may already have sent its
 * next control frame: a quiet guest's pages go out before this side has
 * accepted every channel.  Read that frame ahead (an ABORT or REFUSE ends
 * the session) and keep it for the next phase.
 */
static int read_ahead(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;

    if (nb_recv_frame(&m->ctl, &d->f, NB_MAX_CTRL_FRAME, err) < 0)
        return fail(d, m->ctl.err_kind);
    if (d->f.type == NB_MSG_ABORT || d->f.type == NB_MSG_REFUSE) {
        atomic_store(&m->cancel_req, d->f.type == NB_MSG_ABORT);
        char text[NB_PEER_TEXT];
        snprintf(err, NB_ERRLEN, "source %s before its page channels joined: %s",
                 d->f.type == NB_MSG_ABORT ? "aborted" : "refused",
                 nb_peer_text(&d->f, text));
        return fail(d, d->f.type == NB_MSG_ABORT ? NB_ERR_CANCELLED : NB_ERR_REFUSED);
    }
    d->early = 1;
    return 0;
}

/* Where the vmm writes pages in runs, a bit per page for what records
 * wrote (receiver.c): the rest is zeros.  0, or NB_ERR_RESOURCE. */
static int track_written(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    if (!m->vmm.ops->write_pages || !m->npages)
        return 0;
    d->written = calloc((m->npages + 63) / 64, 8);
    if (d->written)
        return 0;
    snprintf(err, NB_ERRLEN, "out of memory");
    return NB_ERR_RESOURCE;
}

/*
 * Answer REFUSE with the reason in `err`; returns -1.  The reason is
 * recorded first, so that it, not the page channels breaking as the
 * source gives up, is the session's error.
 */
static int refuse(struct dest *d, int kind, const char *err)
{
    char e2[NB_ERRLEN];
    nb_fail(d->m, kind, "%s", err);
    nb_send_text(&d->m->ctl, NB_MSG_REFUSE, err, e2);
    d->told = 1;
    return fail(d, kind);
}

static int negotiate(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    char src[NB_MAX_PREAMBLE], mine[NB_PREAMBLE_CAP];
    struct nb_preamble_opts o;
    struct nb_disk_spec disks;
    struct nb_frame f;
    int n, kind = NB_ERR_INCOMPATIBLE;

    if (nb_expect(&m->ctl, &f, NB_MSG_PREAMBLE, sizeof(src) - 1, err) < 0)
        return fail(d, m->ctl.err_kind);
    memcpy(src, f.payload, f.len);
    src[f.len] = 0;
    if (nb_preamble_read_opts(src, &o, err) < 0 ||
        nb_preamble_read_disks(src, &disks, err) < 0)
        goto refused;
    disks.ndisks = (uint32_t)m->ndisks;     /* ours: a differing count is refused */
    disks.nstreams = (uint32_t)m->nstreams;
    if (m->p.vmm_kind == NB_VMM_CKPT) {
        struct nb_guest_spec spec;
        if (nb_preamble_read_spec(src, &spec, err) < 0)
            goto refused;
        kind = NB_ERR_VMM;
        if (nb_vmm_open_ckpt(&m->vmm, m->p.vmm_target, 1, &spec, err) < 0)
            goto refused;
        kind = NB_ERR_INCOMPATIBLE;
        m->vmm_open = 1;
    }
    {
        struct nb_mig_params mp;
        m->p.mode = o.mode;
        m->p.verify = o.verify;
        if (o.keep_paused)      /* a guest paused on the source arrives paused */
            m->p.keep_paused = 1;
        mp = m->p;
        mp.channels = o.channels;
        n = nb_preamble_write(&m->vmm.spec, &mp, &disks, mine, sizeof(mine));
    }
    if (n < 0) {
        snprintf(err, NB_ERRLEN, "preamble too long");
        kind = NB_ERR_INTERNAL;
        goto refused;
    }
    if (nb_preamble_check(src, mine, err, NB_ERRLEN) < 0)
        goto refused;
    if ((kind = -nb_setup_memory(m, err)) > 0 ||
        (kind = -nb_disk_open_dest(m, &disks, err)) > 0 ||
        (kind = track_written(d, err)) > 0)
        goto refused;
    d->hz = m->disk_hz = nb_zero_page_hash(&m->keys.hash);
    d->nrcv = o.channels;
    pthread_mutex_lock(&m->lock);
    m->st.mode = m->p.mode;
    pthread_mutex_unlock(&m->lock);
    if (nb_send_frame(&m->ctl, NB_MSG_ACCEPT, mine, (uint32_t)n, err) < 0)
        return fail(d, m->ctl.err_kind);
    return 0;
refused:
    return refuse(d, kind, err);
}

/* Accept the page channels (vetted by the gate), reading ahead a control
 * frame that arrives meanwhile. */
static int accept_channels(struct dest *d, struct nb_gate *g, char *err)
{
    struct nb_mig *m = d->m;
    int joined = 0, kind = 0;

    while (joined < d->nrcv) {
        struct nb_chan c;
        int rc = nb_gate_next(g, d->deadline, d->early ? -1 : m->ctl.fd,
                              &m->cancel_req, &c, NULL, &kind, err);
        if (rc < 0)
            return fail(d, kind);
        if (rc == 1) {
            if (read_ahead(d, err) < 0)
                return -1;
            continue;
        }
        if (m->data[c.index - 1].fd >= 0) {
            close(c.fd);        /* a second JOIN of a joined channel */
            free(c.rbuf);
            nb_seal_free(&c);
            d->rejected++;
            continue;
        }
        {
            /* page channels may idle for long; the control thread watches
             * liveness and shuts them down when the session ends */
            struct timeval none = { 0, 0 };
            setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
        }
        m->data[c.index - 1] = c;
        joined++;
    }
    return 0;
}

static int join_channels(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    struct nb_gate g;
    int rc;

    if (nb_gate_open(&g, m->listen_fd, vet_join, d, "page channel",
                     m->p.timeout_ms, &m->wire_bytes, err) < 0)
        return fail(d, NB_ERR_RESOURCE);
    rc = accept_channels(d, &g, err);
    d->rejected += g.rejected;
    nb_gate_close(&g);
    if (rc < 0)
        return -1;
    for (int i = 0; i < d->nrcv; i++) {
        struct receiver *r = &d->rcv[i];
        r->m = m;
        r->dst = d;
        r->ch = &m->data[i];
        if (pthread_create(&r->thread, NULL, nb_receiver_main, r) != 0) {
            snprintf(err, NB_ERRLEN, "cannot start a receiver thread");
            return fail(d, NB_ERR_RESOURCE);
        }
    }
    return 0;
}

/* Bytes seen on the wire so far, and since when none arrived. */
struct quiet {
    uint64_t seen;
    double since;
};

/* 1 once nothing at all has arrived for the session timeout. */
static int source_silent(struct nb_mig *m, struct quiet *q)
{
    uint64_t now_bytes = atomic_load(&m->wire_bytes);
    if (now_bytes != q->seen) {
        q->seen = now_bytes;
        q->since = nb_now_ms();
        return 0;
    }
    return nb_now_ms() - q->since > m->p.timeout_ms;
}

/* Wait until every channel has delivered round `last`, or the source
 * goes silent (a stalled path would otherwise hold this forever: the page
 * channels have no receive timeout). */
static int wait_rounds(struct dest *d, uint32_t last, char *err)
{
    struct nb_mig *m = d->m;
    struct quiet q = { atomic_load(&m->wire_bytes), nb_now_ms() };
    int ok = 1, silent = 0;
    pthread_mutex_lock(&d->lock);
    for (;;) {
        int all = 1;
        struct timespec until;
        for (int i = 0; i < d->nrcv; i++)
            if (d->done_round[i] < last + 1)
                all = 0;
        if (all || d->failed || (silent = source_silent(m, &q)))
            break;
        nb_deadline(&until, 250);
        pthread_cond_timedwait(&d->cond, &d->lock, &until);
    }
    ok = !d->failed && !silent;
    pthread_mutex_unlock(&d->lock);
    if (silent) {
        snprintf(err, NB_ERRLEN, "the source went silent for %u ms before its "
                 "final round arrived", m->p.timeout_ms);
        return fail(d, NB_ERR_TIMEOUT);
    }
    if (!ok)
        snprintf(err, NB_ERRLEN, "%s", m->st.error);
    return ok ? 0 : -1;
}

/* Tell the source the rounds every channel has delivered since last told. */
static int report_applied(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    char drain[64];
    uint32_t all = UINT32_MAX;

    while (read(d->wake[0], drain, sizeof(drain)) > 0)
        ;
    pthread_mutex_lock(&d->lock);
    for (int i = 0; i < d->nrcv; i++)
        if (d->done_round[i] < all)
            all = d->done_round[i];
    pthread_mutex_unlock(&d->lock);
    if (all == UINT32_MAX || all <= d->acked)
        return 0;
    if (nb_disk_flush(m, err) < 0)      /* the rounds' blocks on disk too */
        return fail(d, NB_ERR_VMM);
    d->acked = all;
    if (nb_applied_send(&m->ctl, all - 1, err) < 0)
        return fail(d, m->ctl.err_kind);
    return 0;
}

/*
 * The control channel is quiet while pages flow: wait for it as long as
 * page data keeps arriving, and give up only after `timeout_ms` without
 * any traffic at all.  Meanwhile, in PRECOPY, answer each round every
 * channel has delivered with APPLIED.
 */
static int wait_control(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    struct quiet q = { atomic_load(&m->wire_bytes), nb_now_ms() };
    for (;;) {
        struct pollfd p[2] = { { .fd = m->ctl.fd, .events = POLLIN },
                               { .fd = d->wake[0], .events = POLLIN } };
        int rc = poll(p, d->acking ? 2 : 1, 250);
        if (rc > 0 && p[0].revents)
            return 0;
        if (rc > 0 && report_applied(d, err) < 0)
            return -1;
        if (rc < 0 && errno != EINTR) {
            snprintf(err, NB_ERRLEN, "control channel: %s", strerror(errno));
            return fail(d, NB_ERR_PEER_GONE);
        }
        if (source_silent(m, &q)) {
            snprintf(err, NB_ERRLEN, "the source went silent for %u ms",
                     m->p.timeout_ms);
            return fail(d, NB_ERR_TIMEOUT);
        }
    }
}

/*
 * Wait for the source's next control frame (into d->f), which must be of
 * type `want`: an ABORT ends the session as cancelled, anything else is
 * refused.
 */
static int next_control(struct dest *d, uint8_t want, char *err)
{
    struct nb_mig *m = d->m;
    struct nb_frame *f = &d->f;

    if (d->early)
        d->early = 0;           /* read ahead while the channels joined */
    else if (wait_control(d, err) < 0)
        return -1;
    else if (nb_recv_frame(&m->ctl, f, NB_MAX_CTRL_FRAME, err) < 0)
        return fail(d, m->ctl.err_kind);
    if (f->type == want)
        return 0;
    if (f->type == NB_MSG_ABORT) {
        atomic_store(&m->cancel_req, 1);
        char text[NB_PEER_TEXT];
        snprintf(err, NB_ERRLEN, "source aborted: %s", nb_peer_text(f, text));
        return fail(d, NB_ERR_CANCELLED);
    }
    snprintf(err, NB_ERRLEN, "unexpected %s on the control channel",
             nb_msg_name(f->type));
    return refuse(d, NB_ERR_CORRUPT, err);
}

/* SETUP: wait for a control connection that passes the handshake. */
static int phase_setup(struct dest *d, char *err)
{
    return open_control(d, err);
}

/* HANDSHAKE: agree on compatibility with the authenticated source. */
static int phase_handshake(struct dest *d, char *err)
{
    return negotiate(d, err);
}

/* PRECOPY: the page channels join and deliver rounds (each one APPLIED)
 * until STATE arrives. */
static int phase_precopy(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    int rc;

    pthread_mutex_lock(&m->lock);
    m->st.channels = (uint32_t)d->nrcv;
    pthread_mutex_unlock(&m->lock);
    if (join_channels(d, err) < 0)
        return -1;
    d->acking = 1;
    rc = next_control(d, NB_MSG_STATE, err);
    d->acking = 0;
    return rc;
}

/* SWITCHOVER: load the device state (the VM stays paused); wait for DIGEST. */
static int phase_switchover(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;

    if (m->vmm.ops->load_state(&m->vmm, d->f.payload, d->f.len, err) < 0)
        return refuse(d, NB_ERR_VMM, err);
    if (next_control(d, NB_MSG_DIGEST, err) < 0)
        return -1;
    if (nb_digest_parse(&d->f, &d->dm) < 0) {
        snprintf(err, NB_ERRLEN, "unexpected %s on the control channel",
                 nb_msg_name(d->f.type));
        return refuse(d, NB_ERR_CORRUPT, err);
    }
    atomic_store(&d->final_round, d->dm.round);   /* no page applies after it */
    if (d->dm.npages != m->npages || d->dm.nblocks != nb_disk_total_blocks(m)) {
        snprintf(err, NB_ERRLEN, "digest covers %llu pages and %llu disk blocks, "
                 "guest has %llu and %llu", (unsigned long long)d->dm.npages,
                 (unsigned long long)d->dm.nblocks, (unsigned long long)m->npages,
                 (unsigned long long)nb_disk_total_blocks(m));
        return refuse(d, NB_ERR_CORRUPT, err);
    }
    return 0;
}

/* VERIFY: once every channel delivered the final round, compare digests;
 * READY, then wait for COMMIT. */
static int phase_verify(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    uint32_t last = d->dm.round;
    uint64_t mine;
    int rc;

    if (wait_rounds(d, last, err) < 0)
        return fail(d, nb_fail_kind(m));
    if ((rc = nb_disk_verify(m, d->dm.disk_digest, err)) < 0 ||
        (rc = nb_stream_verify(m, err)) < 0)
        return refuse(d, -rc, err);
    mine = nb_memory_digest(m, m->p.verify == NB_VERIFY_FULL);
    pthread_mutex_lock(&m->lock);
    m->st.digest = mine;
    m->st.round = last;
    m->st.nrounds = last + 1;
    pthread_mutex_unlock(&m->lock);
    if (mine != d->dm.digest) {
        snprintf(err, NB_ERRLEN, "memory digest mismatch (source %016llx, "
                 "destination %016llx): the copy is not faithful",
                 (unsigned long long)d->dm.digest, (unsigned long long)mine);
        return refuse(d, NB_ERR_CORRUPT, err);
    }
    if (nb_send_empty(&m->ctl, NB_MSG_READY, err) < 0)
        return fail(d, m->ctl.err_kind);
    return next_control(d, NB_MSG_COMMIT, err);
}

/* COMMIT: the guest is ours: run it (or take it over paused); RUNNING. */
static int phase_commit(struct dest *d, char *err)
{
    struct nb_mig *m = d->m;
    char e2[NB_ERRLEN];

    if ((m->p.keep_paused && m->vmm.ops->commit_paused
             ? m->vmm.ops->commit_paused(&m->vmm, err)
             : m->vmm.ops->resume(&m->vmm, err)) < 0)
        return fail(d, NB_ERR_VMM);
    nb_send_empty(&m->ctl, NB_MSG_RUNNING, e2);
    return 0;
}

/*
 * Tell the source this side failed and does not run the guest: ABORT if
 * cancelled here, else REFUSE with the session's error (a page channel's,
 * say, which the source would otherwise see only as a broken pipe).  Sent
 * only from the failure epilogue, so it always means "not running here":
 * a source that already sent COMMIT may then take its guest back.
 */
static void tell_source(struct dest *d)
{
    struct nb_mig *m = d->m;
    char why[NB_ERRLEN], e2[NB_ERRLEN];
    int cancelled = atomic_load(&m->cancel_req);

    if (d->told || m->ctl.fd < 0 || !m->ctl.seal)
        return;
    pthread_mutex_lock(&m->lock);
    snprintf(why, sizeof(why), "%s", cancelled ? "cancelled by the destination"
                                               : m->st.error);
    pthread_mutex_unlock(&m->lock);
    nb_send_text(&m->ctl, cancelled ? NB_MSG_ABORT : NB_MSG_REFUSE, why, e2);
    d->told = 1;
}

/*
 * The epilogue, the only place that decides the result and who runs the
 * guest: here only after a completed COMMIT.  A failure shuts the
 * control channel, so the source does not wait out its timeout for an
 * answer; then the page channels close so the receivers finish, and are
 * reaped.
 */
static void dest_finish(struct dest *d, int rc, const char *err)
{
    struct nb_mig *m = d->m;

    if (rc != 0)
        nb_fail(m, atomic_load(&m->cancel_req) ? NB_ERR_CANCELLED : d->kind, "%s",
                err[0] ? err : "failed");
    nb_end(m, rc == 0 ? 0 : nb_fail_kind(m), rc == 0);
    if (rc != 0)
        tell_source(d);
    if (rc != 0 && m->ctl.fd >= 0)
        shutdown(m->ctl.fd, SHUT_RDWR);     /* the source hears of it now */
    nb_shutdown_data(m);
    for (int i = 0; i < d->nrcv; i++)
        if (d->rcv[i].thread) {
            pthread_join(d->rcv[i].thread, NULL);
            ZSTD_freeDCtx(d->rcv[i].zctx);
            nb_disk_rx_free(&d->rcv[i].disk);
            free(d->rcv[i].fresh);
        }
    free(d->written);
    if (rc != 0)
        nb_disk_discard(m);     /* a file this session created goes */
    nb_stream_close(m);         /* a stream's receivers see its end */
}

typedef int (*dest_phase_fn)(struct dest *, char *);

static int run_phase(struct dest *d, int phase, dest_phase_fn fn, char *err)
{
    int rc = nb_enter_phase(d->m, phase, err);
    return rc < 0 ? fail(d, -rc) : fn(d, err);
}

/* The destination's migration thread: its phases in order, then the epilogue. */
void *nb_dest_main(void *arg)
{
    struct nb_mig *m = arg;
    struct dest d;
    char err[NB_ERRLEN] = "";
    int rc;

    memset(&d, 0, sizeof(d));
    d.m = m;
    atomic_store(&d.final_round, UINT32_MAX);
    d.deadline = nb_now_ms() + m->p.timeout_ms;
    pthread_mutex_init(&d.lock, NULL);
    pthread_cond_init(&d.cond, NULL);

    if (pipe2(d.wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        snprintf(err, NB_ERRLEN, "cannot create a pipe: %s", strerror(errno));
        rc = fail(&d, NB_ERR_RESOURCE);
    } else
        rc = phase_setup(&d, err);
    if (rc == 0)
        rc = run_phase(&d, NB_PHASE_HANDSHAKE, phase_handshake, err);
    if (rc == 0)
        rc = run_phase(&d, NB_PHASE_PRECOPY, phase_precopy, err);
    if (rc == 0)
        rc = run_phase(&d, NB_PHASE_SWITCHOVER, phase_switchover, err);
    if (rc == 0)
        rc = run_phase(&d, NB_PHASE_VERIFY, phase_verify, err);
    if (rc == 0)
        rc = run_phase(&d, NB_PHASE_COMMIT, phase_commit, err);
    dest_finish(&d, rc, err);
    if (d.wake[0] > 0) {
        close(d.wake[0]);
        close(d.wake[1]);
    }

    pthread_mutex_lock(&m->lock);
    m->done = 1;
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
    return NULL;
}
