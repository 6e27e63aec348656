/*
 * The destination's gate (gate.h): accept and vet connections
 * concurrently, hand over the first that passes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/gate.h"
#include "core/nbmig.h"

enum { VETTING = 0, PASSED = 1, FAILED = 2 };

static void *vet_main(void *arg)
{
    struct nb_gate_slot *s = arg;
    struct nb_gate *g = s->gate;
    int ok = g->vet(g->ctx, &s->ch, &s->keys, s->err) == 0;

    atomic_store(&s->state, ok ? PASSED : FAILED);
    if (write(g->wake[1], "x", 1) < 0) {
        /* the pipe is full: the waiter is awake anyway */
    }
    return NULL;
}

/* Open the gate on a listening socket. */
int nb_gate_open(struct nb_gate *g, int listen_fd, nb_vet_fn vet, void *ctx,
                 const char *what, uint32_t timeout_ms, _Atomic uint64_t *wire,
                 char *err)
{
    memset(g, 0, sizeof(*g));
    g->listen_fd = listen_fd;
    g->vet = vet;
    g->ctx = ctx;
    g->what = what;
    g->timeout_ms = timeout_ms;
    g->wire = wire;
    g->wake[0] = g->wake[1] = -1;
    if (pipe2(g->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        snprintf(err, NB_ERRLEN, "cannot create a pipe: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static void drop_chan(struct nb_chan *c)
{
    if (c->fd >= 0)
        close(c->fd);
    free(c->rbuf);
    nb_seal_free(c);
    c->fd = -1;
    c->rbuf = NULL;
}

/* Join the finished vetting threads; hand over the first that passed. */
static int reap(struct nb_gate *g, struct nb_chan *out, struct nb_session_keys *keys)
{
    for (int i = 0; i < NB_GATE_SLOTS; i++) {
        struct nb_gate_slot *s = &g->slot[i];
        int state = atomic_load(&s->state);
        if (!s->used || state == VETTING)
            continue;
        pthread_join(s->thread, NULL);
        s->used = 0;
        if (state == PASSED) {
            *out = s->ch;
            if (keys)
                *keys = s->keys;
            return 1;
        }
        g->rejected++;
        snprintf(g->last, sizeof(g->last), "%s", s->err);
        drop_chan(&s->ch);
    }
    return 0;
}

static struct nb_gate_slot *free_slot(struct nb_gate *g)
{
    for (int i = 0; i < NB_GATE_SLOTS; i++)
        if (!g->slot[i].used)
            return &g->slot[i];
    return NULL;
}

/* The oldest slot still vetting, or NULL while an eviction is under way
 * (one knocking connection makes room for one). */
static struct nb_gate_slot *oldest_slot(struct nb_gate *g)
{
    struct nb_gate_slot *old = NULL;
    for (int i = 0; i < NB_GATE_SLOTS; i++) {
        struct nb_gate_slot *s = &g->slot[i];
        if (s->used && s->evicted)
            return NULL;
        if (s->used && (!old || s->since < old->since))
            old = s;
    }
    return old;
}

/* Drop the oldest vetting connection; its thread then fails and is reaped. */
static void evict(struct nb_gate_slot *s)
{
    s->evicted = 1;
    shutdown(s->ch.fd, SHUT_RDWR);
}

/* Accept one connection into `s` and start vetting it; -1 if accept failed. */
static int admit(struct nb_gate *g, struct nb_gate_slot *s, double deadline)
{
    double left = deadline - nb_now_ms();
    int fd = accept4(g->listen_fd, NULL, NULL, SOCK_CLOEXEC);

    if (fd < 0)
        return errno == EAGAIN || errno == EINTR || errno == ECONNABORTED ? 0 : -1;
    nb_set_timeouts(fd, left < NB_GATE_MS ? (uint32_t)(left > 0 ? left : 0) + 1
                                          : NB_GATE_MS);
    nb_set_nodelay(fd);
    memset(s, 0, sizeof(*s));
    s->since = nb_now_ms();
    s->gate = g;
    s->ch.fd = fd;
    s->ch.wire = g->wire;
    if (pthread_create(&s->thread, NULL, vet_main, s) != 0) {
        close(fd);              /* dropped; try again with the next one */
        return 0;
    }
    s->used = 1;
    return 0;
}

static int timed_out(struct nb_gate *g, _Atomic int *cancel, int *kind, char *err)
{
    if (atomic_load(cancel)) {
        snprintf(err, NB_ERRLEN, "stopped waiting for the source");
        *kind = NB_ERR_CANCELLED;
    } else if (g->rejected) {
        snprintf(err, NB_ERRLEN, "rejected %d connection(s) and no %s followed "
                 "within %u ms; last: %.150s", g->rejected, g->what, g->timeout_ms,
                 g->last);
        *kind = NB_ERR_AUTH;
    } else {
        snprintf(err, NB_ERRLEN, "no %s connected within %u ms", g->what,
                 g->timeout_ms);
        *kind = NB_ERR_TIMEOUT;
    }
    return -1;
}

/*
 * The next connection that passed, by `deadline` (monotonic ms): 0 with
 * it in `out` (and `keys`); 1 if `watch_fd` (if >= 0) became readable
 * first; -1 with `kind` and `err` on timeout, cancel or a failed listener.
 */
int nb_gate_next(struct nb_gate *g, double deadline, int watch_fd,
                 _Atomic int *cancel, struct nb_chan *out,
                 struct nb_session_keys *keys, int *kind, char *err)
{
    for (;;) {
        struct pollfd p[3] = { { .fd = g->wake[0], .events = POLLIN },
                               { .fd = watch_fd, .events = POLLIN },
                               { .fd = -1, .events = POLLIN } };
        struct nb_gate_slot *s, *old;
        double left, wait;
        char drain[64];

        if (reap(g, out, keys))
            return 0;
        s = free_slot(g);
        old = s ? NULL : oldest_slot(g);
        left = deadline - nb_now_ms();
        if (left <= 0 || atomic_load(cancel))
            return timed_out(g, cancel, kind, err);
        wait = left < 250 ? left + 1 : 250;
        if (s || (old && nb_now_ms() - old->since >= NB_GATE_EVICT_MS))
            p[2].fd = g->listen_fd;     /* room, or room to be made */
        else if (old && old->since + NB_GATE_EVICT_MS - nb_now_ms() + 1 < wait)
            wait = old->since + NB_GATE_EVICT_MS - nb_now_ms() + 1;
        if (poll(p, 3, (int)wait) < 0 && errno != EINTR)
            return timed_out(g, cancel, kind, err);
        if (p[1].revents)
            return 1;
        while (read(g->wake[0], drain, sizeof(drain)) > 0) {
        }
        if (p[2].revents && !s) {
            evict(old);         /* admitted once its thread is reaped */
            continue;
        }
        if (p[2].revents && admit(g, s, deadline) < 0) {
            snprintf(err, NB_ERRLEN, "accept failed: %s", strerror(errno));
            *kind = atomic_load(cancel) ? NB_ERR_CANCELLED : NB_ERR_RESOURCE;
            return -1;
        }
    }
}

/* Drop every connection still being vetted and close the gate. */
void nb_gate_close(struct nb_gate *g)
{
    for (int i = 0; i < NB_GATE_SLOTS; i++)
        if (g->slot[i].used)
            shutdown(g->slot[i].ch.fd, SHUT_RDWR);
    for (int i = 0; i < NB_GATE_SLOTS; i++) {
        struct nb_gate_slot *s = &g->slot[i];
        if (!s->used)
            continue;
        pthread_join(s->thread, NULL);
        drop_chan(&s->ch);
        s->used = 0;
    }
    if (g->wake[0] >= 0)
        close(g->wake[0]);
    if (g->wake[1] >= 0)
        close(g->wake[1]);
    g->wake[0] = g->wake[1] = -1;
}
