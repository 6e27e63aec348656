/*
 * Phase changes.  nb_enter_phase() is the one way a side's phase changes
 * during the migration and nb_end() the one way it ends; a transition
 * the tables of transitions.c lack is a bug: it is reported on stderr
 * and fails the migration as an internal error.
 */
#include <stdio.h>

#include "core/nbmig.h"

static void report_illegal(const struct nb_mig *m, int from, int to)
{
    fprintf(stderr, "nova-bhyve engine bug: illegal %s phase transition "
            "%s -> %s\n", m->is_source ? "source" : "destination",
            nb_phase_name(from), nb_phase_name(to));
}

/*
 * Move to `next`.  Entering COMMIT is the commit point: it sets
 * `committed` under the lock nb_mig_cancel() takes, and on the source it
 * refuses a cancel asked for before it.  Returns 0, or the negated
 * nb_error_kind with `err` set.
 */
int nb_enter_phase(struct nb_mig *m, int next, char *err)
{
    int from, legal, cancelled = 0;

    pthread_mutex_lock(&m->lock);
    from = m->st.phase;
    legal = nb_phase_legal(m->is_source, from, next);
    if (legal && next == NB_PHASE_COMMIT && m->is_source &&
        atomic_load(&m->cancel_req))
        cancelled = 1;
    else if (legal) {
        m->st.phase = next;
        if (next == NB_PHASE_COMMIT)
            m->st.committed = 1;
    }
    pthread_mutex_unlock(&m->lock);
    if (!legal) {
        report_illegal(m, from, next);
        snprintf(err, NB_ERRLEN, "internal error: illegal phase transition "
                 "%s -> %s", nb_phase_name(from), nb_phase_name(next));
        return -NB_ERR_INTERNAL;
    }
    if (cancelled) {
        snprintf(err, NB_ERRLEN, "cancelled");
        return -NB_ERR_CANCELLED;
    }
    return 0;
}

/*
 * The last step of each side's epilogue: from the failure kind (0: none)
 * the result and terminal phase, who runs the guest, and the total time,
 * set together.
 */
void nb_end(struct nb_mig *m, int kind, int guest_here)
{
    int result = !kind ? NB_RESULT_COMPLETED
                 : kind == NB_ERR_CANCELLED ? NB_RESULT_CANCELLED : NB_RESULT_FAILED;
    int phase = !kind ? NB_PHASE_DONE
                : kind == NB_ERR_CANCELLED ? NB_PHASE_CANCELLED : NB_PHASE_FAILED;
    pthread_mutex_lock(&m->lock);
    if (!nb_phase_legal(m->is_source, m->st.phase, phase)) {
        report_illegal(m, m->st.phase, phase);
        phase = NB_PHASE_FAILED;
        result = NB_RESULT_FAILED;
        kind = NB_ERR_INTERNAL;
    }
    m->st.error_kind = kind;
    m->st.phase = phase;
    m->st.result = result;
    m->st.guest_runs_here = guest_here;
    m->st.total_ms = nb_now_ms() - m->t0;
    pthread_mutex_unlock(&m->lock);
}
