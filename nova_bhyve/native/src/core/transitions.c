/*
 * Each side of a migration is a state machine over enum nb_phase
 * (engine.h).  These tables are its only legal transitions, drawn in
 * PROTOCOL.md ("Phases"); phase.c enforces them.  Self-contained, so the
 * unit tests' build checks them too.
 */
#include "core/transitions.h"

#define BIT(p) (1u << (p))
#define ENDS (BIT(NB_PHASE_FAILED) | BIT(NB_PHASE_CANCELLED))

static const unsigned SOURCE_NEXT[NB_PHASE_COUNT] = {
    [NB_PHASE_SETUP] = BIT(NB_PHASE_HANDSHAKE) | ENDS,
    [NB_PHASE_HANDSHAKE] = BIT(NB_PHASE_PRECOPY) | ENDS,
    [NB_PHASE_PRECOPY] = BIT(NB_PHASE_ITERATE) | BIT(NB_PHASE_SWITCHOVER) | ENDS,
    [NB_PHASE_ITERATE] = BIT(NB_PHASE_SWITCHOVER) | ENDS,
    [NB_PHASE_SWITCHOVER] = BIT(NB_PHASE_VERIFY) | ENDS,
    [NB_PHASE_VERIFY] = BIT(NB_PHASE_COMMIT) | ENDS,
    /* after COMMIT the guest is the destination's: never "cancelled" */
    [NB_PHASE_COMMIT] = BIT(NB_PHASE_DONE) | BIT(NB_PHASE_FAILED),
};

/* The destination mirrors the source but has no ITERATE of its own. */
static const unsigned DEST_NEXT[NB_PHASE_COUNT] = {
    [NB_PHASE_SETUP] = BIT(NB_PHASE_HANDSHAKE) | ENDS,
    [NB_PHASE_HANDSHAKE] = BIT(NB_PHASE_PRECOPY) | ENDS,
    [NB_PHASE_PRECOPY] = BIT(NB_PHASE_SWITCHOVER) | ENDS,
    [NB_PHASE_SWITCHOVER] = BIT(NB_PHASE_VERIFY) | ENDS,
    [NB_PHASE_VERIFY] = BIT(NB_PHASE_COMMIT) | ENDS,
    [NB_PHASE_COMMIT] = BIT(NB_PHASE_DONE) | BIT(NB_PHASE_FAILED),
};

/* The phase's name as PROTOCOL.md's diagram spells it. */
const char *nb_phase_name(int phase)
{
    static const char *names[NB_PHASE_COUNT] = {
        "SETUP", "HANDSHAKE", "PRECOPY", "ITERATE", "SWITCHOVER", "VERIFY",
        "COMMIT", "DONE", "FAILED", "CANCELLED",
    };
    return phase >= 0 && phase < NB_PHASE_COUNT ? names[phase] : "?";
}

/* 1 if the table lets this side go from `from` to `to`. */
int nb_phase_legal(int is_source, int from, int to)
{
    const unsigned *next = is_source ? SOURCE_NEXT : DEST_NEXT;
    if (from < 0 || from >= NB_PHASE_COUNT || to < 0 || to >= NB_PHASE_COUNT)
        return 0;
    return (next[from] & BIT(to)) != 0;
}
