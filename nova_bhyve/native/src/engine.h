/*
 * nova-bhyve migration engine: public C API (also the cffi cdef).
 *
 * A migration is started on each side and runs in its own native threads;
 * every call here returns promptly except nb_mig_wait().  Strings in
 * params are copied; the caller may free them after the start call.
 */
#ifndef NB_ENGINE_H
#define NB_ENGINE_H

#include <stddef.h>
#include <stdint.h>

enum nb_mode { NB_MODE_LIVE = 0, NB_MODE_WARM = 1, NB_MODE_COLD = 2 };
enum nb_vmm_kind { NB_VMM_TESTHOST = 0, NB_VMM_BHYVE = 1, NB_VMM_CKPT = 2,
                   NB_VMM_NONE = 3 /* disks only: a stopped guest, cold mode */ };
enum nb_verify { NB_VERIFY_INCREMENTAL = 0, NB_VERIFY_FULL = 1 };
enum nb_compress { NB_COMPRESS_OFF = 0, NB_COMPRESS_ON = 1, NB_COMPRESS_AUTO = 2 };

enum nb_phase {
    NB_PHASE_SETUP = 0,      /* opening the VM, listening or connecting */
    NB_PHASE_HANDSHAKE = 1,  /* authentication and compatibility preamble */
    NB_PHASE_PRECOPY = 2,    /* round 0: every page that holds data */
    NB_PHASE_ITERATE = 3,    /* later rounds: pages dirtied since the last */
    NB_PHASE_SWITCHOVER = 4, /* source paused: last pages and device state */
    NB_PHASE_VERIFY = 5,     /* memory digests compared */
    NB_PHASE_COMMIT = 6,     /* ownership handed over */
    NB_PHASE_DONE = 7,
    NB_PHASE_FAILED = 8,
    NB_PHASE_CANCELLED = 9,
};

/* Why a request or a migration failed (nb_mig_stats.error_kind; the
 * negated return value of a refused call).  The message says more. */
enum nb_error_kind {
    NB_ERR_NONE = 0,
    NB_ERR_INVALID = 1,      /* a parameter or request the engine refuses */
    NB_ERR_AUTH = 2,         /* a side failed authentication */
    NB_ERR_INCOMPATIBLE = 3, /* the hosts cannot hold the same guest */
    NB_ERR_PEER_GONE = 4,    /* the peer closed, reset or aborted the session */
    NB_ERR_REFUSED = 5,      /* the peer refused (its reason in the message) */
    NB_ERR_CANCELLED = 6,    /* cancelled on request, or by the source */
    NB_ERR_TIMEOUT = 7,      /* nothing heard within the timeout */
    NB_ERR_CORRUPT = 8,      /* a frame or page failed its checks, digests differ */
    NB_ERR_VMM = 9,          /* the vmm port failed (open, pause, state, memory) */
    NB_ERR_RESOURCE = 10,    /* out of memory, threads, sockets or randomness */
    NB_ERR_TOO_LATE = 11,    /* a cancel after the guest was handed over */
    NB_ERR_INTERNAL = 12,    /* an engine bug, e.g. an illegal phase transition */
};

enum nb_result {
    NB_RESULT_RUNNING = 0,
    NB_RESULT_COMPLETED = 1,
    NB_RESULT_FAILED = 2,
    NB_RESULT_CANCELLED = 3,
};

struct nb_mig_params {
    int mode;                   /* enum nb_mode */
    int vmm_kind;               /* enum nb_vmm_kind */
    const char *vmm_target;     /* socket path, VM name or checkpoint base
                                 * (none: the guest's name, for messages) */
    const uint8_t *secret;      /* per-migration secret, >= 16 bytes */
    size_t secret_len;
    const char *host;           /* source: where to connect; dest: bind address */
    int port;                   /* dest: 0 picks a free port */
    int channels;               /* TCP connections for page data, 1..16;
                                 * 0 (auto): one per host CPU the guest's
                                 * running vCPUs leave free, 1..2 */
    int compress;               /* enum nb_compress: zstd for pages not sent
                                 * as zeros or deltas: never, always, or
                                 * while the link is the bottleneck */
    int zstd_level;             /* default 1 */
    uint64_t delta_cache;       /* bytes of delta cache; 0 disables deltas */
    int delta_cache_auto;       /* 1: size the cache from the guest and the
                                 * host's free memory (delta_cache, if not
                                 * 0, caps it) */
    int auto_converge;          /* 1: throttle the guest's vCPUs when rounds
                                 * stop shrinking and the rest does not fit */
    uint64_t max_bandwidth;     /* bytes/s, 0 = unlimited */
    uint32_t max_downtime_ms;   /* switch over once the rest fits in this */
    int verify;                 /* enum nb_verify */
    uint32_t timeout_ms;        /* connect, handshake and idle timeout */
    int plaintext_pages;        /* 1: page channels unencrypted (measuring the
                                 * cipher's cost only; both sides must agree) */
    int keep_paused;            /* the guest was paused before it moved and
                                 * stays so: the source never resumes it,
                                 * the destination takes it over paused */
    int ndisks;                 /* disks moved with the memory, 0..8 */
    const char **disk_paths;    /* source: the VM's disk files, in the vmm's
                                 * order (their writes come from its
                                 * dirty-block log); destination: the files
                                 * to write, created or truncated to the size
                                 * the source announces.  Opened without
                                 * following a link as the last component. */
    uint32_t disks_detached;    /* source: bit i set: disk i is not attached
                                 * to the VM (a swap or ephemeral file it
                                 * does not have open), so nothing may write
                                 * it while it moves: it has no dirty-block
                                 * log and is sent whole in round 0.  The
                                 * attached disks are the vmm's, in order. */
    int nstreams;               /* stream disks moved with the memory, 0..8
                                 * (PROTOCOL.md, "Streams"), each in two
                                 * parts: 0 while the guest runs, 1 once it
                                 * is paused.  The engine duplicates every
                                 * descriptor below; the caller closes its own. */
    const int *stream_fds;      /* 2 per stream (part 0, part 1): the source
                                 * reads each to its end; the destination
                                 * writes each part's bytes there and closes it */
    const int *stream_notify_fds; /* source, 1 per stream: one byte is written
                                 * there once the guest is paused (part 1's
                                 * producer may start), then it is closed;
                                 * closed without a byte if it never pauses */
    const int *stream_status_fds; /* 1 per stream, read to its end once the
                                 * stream's parts are done: "ok" from its
                                 * producers (source) or consumers
                                 * (destination), else their error, which
                                 * fails the migration before the commit */
};

struct nb_round_stat {
    double start_ms;            /* since the migration started */
    double duration_ms;
    uint64_t pages;             /* pages sent in this round */
    uint64_t bytes;             /* bytes on the wire in this round */
    uint64_t dirty;             /* pages dirty at the sync that began it */
    uint64_t blocks;            /* disk blocks sent in this round */
    uint64_t dirty_blocks;      /* disk blocks dirty at that sync */
    double expected_ms;         /* the pause the count that began it
                                 * predicted; the final round's, the
                                 * prediction the switch-over was made
                                 * on (the last count before the pause);
                                 * 0 for round 0 and in warm or cold mode */
    uint32_t throttle;          /* percent the guest was slowed by meanwhile */
    uint32_t log_reads;         /* chunks of the dirty log it read and
                                 * cleared (a vmm request each); 0 where
                                 * the count read the whole log before it
                                 * (and in the final round), or where
                                 * every chunk was clean */
};

#define NB_MAX_ROUND_STATS 64

struct nb_mig_stats {
    int phase;                  /* enum nb_phase */
    int result;                 /* enum nb_result */
    int is_source;
    int mode;
    int port;                   /* dest: the port it listens on */
    uint32_t round;
    uint64_t mem_total;         /* bytes of guest RAM */
    uint64_t bytes_transferred; /* bytes on the wire, all channels */
    uint64_t bytes_remaining;   /* estimate: dirty pages x bytes per page */
    uint64_t pages_sent;
    uint64_t pages_zero;
    uint64_t pages_delta;
    uint64_t pages_compressed;
    uint64_t pages_raw;
    uint64_t dirty_pages;       /* dirty at the last sync */
    double dirty_rate;          /* pages per second */
    double bandwidth;           /* bytes per second the link took, over
                                 * the rounds that timed it (0: none yet) */
    double expected_downtime_ms;
    double dest_excess_us;      /* source: the time per page (or block)
                                 * the destination took beyond the
                                 * source's, as the last round timed on
                                 * it showed, which that estimate adds for
                                 * each page and block (0: it kept up, or
                                 * no round timed since round 0) */
    double downtime_ms;         /* measured: source stopped -> RUNNING heard */
    /* source: downtime_ms in its parts (warm and cold: "final" holds every
     * round after the pause) */
    double pause_stop_ms;       /* pausing the guest, the last log syncs */
    double pause_final_ms;      /* the final round's pages and blocks sent,
                                 * the device state saved and sent */
    double pause_verify_ms;     /* DIGEST until READY: the destination
                                 * applies the final round, fsyncs, compares */
    double pause_commit_ms;     /* COMMIT until RUNNING: the destination
                                 * resumes the guest */
    double catchup_ms;          /* source: waited, guest running, for the
                                 * link to carry what was sent and the
                                 * destination to apply it */
    double total_ms;
    double rtt_ms;              /* source: the control channel's least round
                                 * trip (the pause has two) */
    uint32_t max_downtime_ms;
    uint32_t throttle;          /* percent applied through the vmm port */
    uint32_t converge_steps;    /* throttle steps taken because rounds
                                 * stopped shrinking (auto-converge) */
    uint32_t trim_steps;        /* throttle steps taken to shorten a pause
                                 * that already fitted the limit */
    uint64_t delta_cache_bytes; /* the delta cache's size (auto: as chosen) */
    uint32_t compressing;       /* page channels compressing now */
    uint32_t channels;          /* page channels of this session (auto: as
                                 * chosen) */
    int committed;              /* ownership passed to the destination */
    int guest_runs_here;        /* 1 if the guest is running on this side */
    uint64_t digest;            /* memory digest (after verify) */
    int error_kind;             /* enum nb_error_kind of `error` */
    uint64_t disk_total;        /* bytes of all disks moved */
    uint64_t disk_bytes;        /* bytes on the wire in DISK frames */
    uint64_t disk_blocks;       /* disk blocks sent (source) or written (dest.) */
    uint64_t dirty_blocks;      /* disk blocks dirty at the last sync */
    uint64_t disk_digest;       /* digest of the disks (after verify) */
    uint64_t stream_bytes;      /* stream disks' bytes sent (source) or
                                 * written (destination) */
    uint32_t nrounds;           /* rounds run so far; rounds[] holds the
                                 * first NB_MAX_ROUND_STATS of them */
    struct nb_round_stat rounds[NB_MAX_ROUND_STATS];
    char error[256];
};

typedef struct nb_mig nb_mig;

int nb_mig_send(const struct nb_mig_params *p, nb_mig **out, char *err, size_t errlen);
int nb_mig_receive(const struct nb_mig_params *p, nb_mig **out, char *err, size_t errlen);
void nb_mig_stats(nb_mig *m, struct nb_mig_stats *out);
int nb_mig_set_param(nb_mig *m, const char *name, uint64_t value, char *err, size_t errlen);
int nb_mig_force_complete(nb_mig *m);
int nb_mig_cancel(nb_mig *m, char *err, size_t errlen);
int nb_mig_wait(nb_mig *m, int timeout_ms);
void nb_mig_free(nb_mig *m);

/* Prepare this process for migrations: seed OpenSSL's random generator
 * now (about 2 ms) rather than in the first handshake, on either side.
 * 0, or -1 if there is no randomness (each handshake then fails, saying
 * so). */
int nb_engine_init(void);

/* Compare two compatibility preambles (the destination's check). */
int nb_spec_check(const char *src_preamble, const char *dst_preamble,
                  char *err, size_t errlen);

#endif
