/*
 * The phase transition tables of both sides (transitions.c).
 */
#ifndef NB_TRANSITIONS_H
#define NB_TRANSITIONS_H

#include "engine.h"

#define NB_PHASE_COUNT 10

const char *nb_phase_name(int phase);
int nb_phase_legal(int is_source, int from, int to);

#endif
