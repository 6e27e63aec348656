/*
 * The destination's gate: every connection accepted on the listener is
 * vetted (the handshake, or a page channel's JOIN) on a thread of its own,
 * at most NB_GATE_SLOTS at once and each within NB_GATE_MS, so that
 * silent, slow or failing strangers neither hold the listener nor end the
 * session: the first connection that passes is handed over, the others are
 * dropped when they fail, when room is needed (NB_GATE_EVICT_MS) or when
 * the gate closes.
 */
#ifndef NB_GATE_H
#define NB_GATE_H

#include <pthread.h>
#include <stdatomic.h>

#include "wire/wire.h"

#define NB_GATE_SLOTS 8
/* An unauthenticated connection's time to prove itself. */
#define NB_GATE_MS 3000
/* With every slot taken and another connection knocking, the oldest one
 * vetted for at least this long is dropped to make room: a flood of
 * strangers delays a real peer (who proves itself in a round trip) by
 * about this much per NB_GATE_SLOTS of them ahead of it, not by NB_GATE_MS. */
#define NB_GATE_EVICT_MS 250

/* Vet one connection: 0 if it passed (keys filled for a handshake). */
typedef int (*nb_vet_fn)(void *ctx, struct nb_chan *c,
                         struct nb_session_keys *keys, char *err);

struct nb_gate;

struct nb_gate_slot {
    struct nb_gate *gate;
    int used;
    int evicted;                /* shut down to make room */
    double since;               /* when vetting began (monotonic ms) */
    _Atomic int state;          /* 0 vetting, 1 passed, 2 failed */
    pthread_t thread;
    struct nb_chan ch;
    struct nb_session_keys keys;
    char err[NB_ERRLEN];
};

struct nb_gate {
    int listen_fd;
    int wake[2];                /* a vetting thread's end wakes the waiter */
    nb_vet_fn vet;
    void *ctx;
    _Atomic uint64_t *wire;
    struct nb_gate_slot slot[NB_GATE_SLOTS];
    const char *what;           /* what is awaited, for messages */
    uint32_t timeout_ms;        /* the session's timeout, for messages */
    int rejected;               /* connections dropped so far */
    char last[NB_ERRLEN];       /* why the last one was dropped */
};

int nb_gate_open(struct nb_gate *g, int listen_fd, nb_vet_fn vet, void *ctx,
                 const char *what, uint32_t timeout_ms, _Atomic uint64_t *wire,
                 char *err);
int nb_gate_next(struct nb_gate *g, double deadline, int watch_fd,
                 _Atomic int *cancel, struct nb_chan *out,
                 struct nb_session_keys *keys, int *kind, char *err);
void nb_gate_close(struct nb_gate *g);

#endif
