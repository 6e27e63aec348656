/*
 * Auto-converge's two decisions, apart from the source's state so that the
 * unit tests can drive them (source.c applies them through the vmm port):
 * whether a round stalled, and how hard to throttle the guest when it did.
 *
 * A round stalls when the pause expected after it does not fit the limit
 * and it shrank the dirty set by less than a tenth, or at a pace that
 * would need more than NB_CONVERGE_ROUNDS rounds like it to make the pause
 * fit (pace^n x expected <= limit).  One such round is enough: a round
 * that resent the dirty set while the guest dirtied nearly as much again
 * says the next one will do the same.
 *
 * Only the part of the pause that rounds (and a throttle) shorten is
 * weighed, against what the final sync and the round trips leave of the
 * limit: where they leave nothing, no throttle makes the pause fit, and
 * no round stalls.
 */
#ifndef NB_CONVERGE_H
#define NB_CONVERGE_H

#include <stdint.h>

#define NB_CONVERGE_ROUNDS 8

/* Whether the round that left `dirty` pages (and blocks) of the `prev`
 * before it stalled, the shortenable part of the pause it leaves being
 * `expected_ms` against the `limit_ms` left for it (0 or less: none). */
int nb_round_stalled(double expected_ms, double limit_ms, uint64_t dirty,
                     uint64_t prev);
/* The throttle, in percent, under which the guest would dirty pages at
 * half the rate they go out (one every `page_ms`), from the rate it
 * dirtied them (`dirty_per_ms`) under the throttle `cur`; 0: none needed
 * or no estimate. */
uint32_t nb_converge_target(uint32_t cur, double page_ms, double dirty_per_ms);

#endif
