/*
 * vmm port "none": a guest that is not running, whose disks move without
 * memory or device state (cold migration and resize of a stopped guest;
 * PROTOCOL.md, "Disks only").
 *
 * Both sides describe the same empty guest: no memory, no segment, no
 * vCPU, state format "none", and no CPU facts (a stopped guest boots anew
 * wherever it lands, so the hosts' CPUs need not match).  Pause, resume
 * and the commit do nothing; the device state is empty and a non-empty
 * one is refused.  There is no dirty-block log: the engine runs this port
 * in cold mode only, where the disk files do not change during the
 * session (the caller keeps the guest stopped).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vmm/vmm.h"

#define NONE_STATE_FORMAT "none"

static int none_map(struct nb_vmm *v, uint8_t **base, char *err)
{
    *base = NULL;
    return 0;
}

static int none_no_dirty_log(struct nb_vmm *v)
{
    return 0;
}

static int none_dirty_log(struct nb_vmm *v, uint64_t *bitmap, size_t words, char *err)
{
    snprintf(err, NB_ERRLEN, "a stopped guest has no dirty-page log");
    return -1;
}

static int none_nop(struct nb_vmm *v, char *err)
{
    return 0;
}

static int none_save(struct nb_vmm *v, uint8_t **blob, size_t *len, char *err)
{
    *blob = NULL;
    *len = 0;
    return 0;
}

static int none_load(struct nb_vmm *v, const uint8_t *blob, size_t len, char *err)
{
    if (len == 0)
        return 0;
    snprintf(err, NB_ERRLEN, "a stopped guest has no device state, but %zu "
             "bytes came", len);
    return -1;
}

static void none_close(struct nb_vmm *v)
{
}

static const struct nb_vmm_ops none_ops = {
    .kind = "none",
    .map_memory = none_map,
    .has_dirty_log = none_no_dirty_log,
    .dirty_log = none_dirty_log,
    .pause = none_nop,
    .resume = none_nop,
    .save_state = none_save,
    .load_state = none_load,
    .close = none_close,
};

/* Open the port for the stopped guest `name` (used in messages only). */
int nb_vmm_open_none(struct nb_vmm *v, const char *name, char *err)
{
    memset(v, 0, sizeof(*v));
    v->ops = &none_ops;
    v->spec.page_size = NB_PAGE;
    snprintf(v->spec.arch, sizeof(v->spec.arch), "any");
    snprintf(v->spec.cpu_vendor, sizeof(v->spec.cpu_vendor), "any");
    snprintf(v->spec.state_format, sizeof(v->spec.state_format), "%s",
             NONE_STATE_FORMAT);
    return 0;
}
