/*
 * The wire layer: framing, the handshake, channel joins, the preamble and
 * every message's layout (spec: ../PROTOCOL.md).  Nothing outside wire/
 * encodes or decodes protocol bytes.
 */
#ifndef NB_WIRE_H
#define NB_WIRE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "vmm/vmm.h"

#define NB_PROTO_VERSION 4
#define NB_MAX_CHANNELS 16      /* page channels per session */
#define NB_NONCE 32
#define NB_KEY 32
#define NB_TAG 16               /* AES-256-GCM tag after a sealed payload */
#define NB_GCM_IV 12
#define NB_DIR_TO_DEST 0        /* key directions (PROTOCOL.md, "Encryption") */
#define NB_DIR_TO_SOURCE 1

extern const uint8_t NB_WIRE_MAGIC[8];

/* the memory digest's keys, derived in the handshake (PROTOCOL.md,
 * "Memory digest"): two NH passes, then SipHash-2-4 twice */
#define NB_NH_WORDS (4096 / 4 + 4)  /* a page's 32-bit words + the shift */
struct nb_hash_key {
    uint64_t page_k0, page_k1;      /* SipHash key of a page's NH pair */
    uint64_t term_k0, term_k1;      /* SipHash key of (pfn, page hash) */
    uint32_t nh[NB_NH_WORDS];
};

enum nb_msg {
    NB_MSG_HELLO = 1,
    NB_MSG_CHALLENGE = 2,
    NB_MSG_AUTH = 3,
    NB_MSG_JOIN = 4,
    NB_MSG_PREAMBLE = 5,
    NB_MSG_ACCEPT = 6,
    NB_MSG_PAGES = 7,
    NB_MSG_ROUND_END = 8,
    NB_MSG_STATE = 9,
    NB_MSG_DIGEST = 10,
    NB_MSG_READY = 11,
    NB_MSG_COMMIT = 12,
    NB_MSG_RUNNING = 13,
    NB_MSG_ABORT = 14,
    NB_MSG_REFUSE = 15,
    NB_MSG_APPLIED = 16,
    NB_MSG_DISK = 17,
    NB_MSG_STREAM = 18,
};

enum nb_enc { NB_ENC_ZERO = 0, NB_ENC_RAW = 1, NB_ENC_DELTA = 2, NB_ENC_ZSTD = 3 };

/* Sizes on the wire (PROTOCOL.md), in bytes. */
#define NB_FRAME_HDR 16         /* type, flags, channel, seq, length, CRC */
#define NB_FRAME_CRC_AT 12      /* the CRC covers the header bytes before it */
#define NB_MAGIC_LEN 8
#define NB_PROOF 32             /* HMAC-SHA256 proofs and join tokens */
#define NB_SID 16               /* session id */
#define NB_HELLO_LEN (NB_MAGIC_LEN + 8 + NB_NONCE)
#define NB_CHALLENGE_LEN (NB_MAGIC_LEN + 4 + NB_NONCE + NB_PROOF)
#define NB_AUTH_LEN NB_PROOF
#define NB_JOIN_LEN (NB_MAGIC_LEN + NB_SID + 4 + NB_PROOF)
#define NB_PAGES_HDR 8          /* u32 round, u32 record count */
#define NB_REC_HDR 8            /* u32 pfn, u8 encoding, u8 0, u16 length */
#define NB_ROUND_END_LEN 16     /* u32 round, u32 0, u64 pages */
#define NB_DIGEST_LEN 40        /* u32 round, u32 0, u64 memory digest,
                                 * u64 pages, u64 disk digest, u64 blocks */
#define NB_DISK_HDR 8           /* DISK: u32 round, u32 record count */
#define NB_DREC_HDR 16          /* u64 block, u16 disk, u8 encoding, u8 0,
                                 * u16 length, u16 0 */
#define NB_MAX_DISKS 8          /* disks per session */
#define NB_MAX_DISK_SIZE (1ULL << 44)   /* 16 TiB */
#define NB_STREAM_HDR 8         /* STREAM: u32 round, u16 stream, u8 part, u8 flags */
#define NB_STREAM_END_LEN 16    /* the end of a part: u64 bytes, u32 CRC-32C, u32 0 */
#define NB_STREAM_END 1         /* STREAM flags: this frame ends its part */
#define NB_MAX_STREAMS 8        /* stream disks per session */
#define NB_STREAM_PARTS 2       /* part 0: guest running; part 1: guest paused */
#define NB_APPLIED_LEN 8        /* u32 round, u32 0 */
#define NB_PREAMBLE_CAP 4096    /* the preamble this side writes */
#define NB_MAX_PREAMBLE 8192    /* the peer's preamble, at most */
#define NB_MAX_JOIN_FRAME 64
#define NB_MAX_ACK 64           /* READY, RUNNING (empty) */
#define NB_MAX_REASON 4096      /* REFUSE / ABORT text, at most */
#define NB_MAX_PAGES_FRAME (256u << 10) /* page frame payload limit */
#define NB_MAX_CTRL_FRAME (16u << 20)   /* state blobs */

struct nb_frame {
    uint8_t type;
    uint8_t flags;
    uint16_t channel;
    uint32_t seq;
    uint32_t len;
    uint8_t *payload;       /* owned by the channel's receive buffer */
};

struct nb_chan {
    int fd;
    uint16_t index;         /* 0 = control, 1.. = page data */
    uint32_t send_seq;
    uint32_t recv_seq;
    uint8_t *rbuf;          /* receive buffer */
    size_t rcap;
    struct nb_seal *seal;   /* AES-256-GCM once sealed (seal.c), else NULL */
    _Atomic uint64_t *wire; /* byte counter to add to */
    int err_kind;           /* enum nb_error_kind of the last failure */
};

/* Record why the last call on `c` failed; returns -1. */
static inline int nb_wire_fail(struct nb_chan *c, int kind)
{
    c->err_kind = kind;
    return -1;
}

int nb_send_frame(struct nb_chan *c, uint8_t type, const void *payload,
                  uint32_t len, char *err);
int nb_send_frame_in_place(struct nb_chan *c, uint8_t type, uint8_t *payload,
                           uint32_t len, char *err);
int nb_recv_frame(struct nb_chan *c, struct nb_frame *f, uint32_t max_len,
                  char *err);
void nb_peer_said(struct nb_chan *c, const struct nb_frame *f, const char *peer,
                  const char *when, char *err);
int nb_frame_expect(struct nb_chan *c, const struct nb_frame *f, uint8_t type,
                    uint32_t max_len, char *err);
int nb_expect(struct nb_chan *c, struct nb_frame *f, uint8_t type,
              uint32_t max_len, char *err);
const char *nb_msg_name(unsigned type);
#define NB_PEER_TEXT 201        /* a peer's reason text as we show it, with NUL */
const char *nb_peer_text(const struct nb_frame *f, char out[NB_PEER_TEXT]);

int nb_hmac3(const uint8_t *key, size_t klen, const void *a, size_t al,
             const void *b, size_t bl, const void *c, size_t cl, uint8_t out[32]);

/* seal.c: AES-256-GCM per connection and direction */
struct nb_seal;
int nb_seal_start(struct nb_chan *c, const uint8_t *session_key, int is_source,
                  char *err);
void nb_seal_free(struct nb_chan *c);
int nb_seal_frame(struct nb_chan *c, const uint8_t *hdr, const void *pt,
                  uint32_t len, const uint8_t **ct, uint8_t tag[NB_TAG]);
int nb_seal_in_place(struct nb_chan *c, const uint8_t *hdr, uint8_t *buf,
                     uint32_t len, uint8_t tag[NB_TAG]);
int nb_open_begin(struct nb_chan *c, const uint8_t *hdr);
int nb_open_update(struct nb_chan *c, uint8_t *buf, uint32_t len);
int nb_open_end(struct nb_chan *c, uint8_t *end, const uint8_t *tag);

struct nb_session_keys {
    uint8_t key[NB_KEY];    /* session key */
    uint8_t sid[16];        /* session id, names the session in JOINs */
    struct nb_hash_key hash;
};

int nb_handshake_source(struct nb_chan *ctl, const uint8_t *secret, size_t slen,
                        struct nb_session_keys *keys, char *err);
int nb_handshake_dest(struct nb_chan *ctl, const uint8_t *secret, size_t slen,
                      struct nb_session_keys *keys, char *err);
int nb_join_send(struct nb_chan *c, const struct nb_session_keys *keys, char *err);
int nb_join_check(struct nb_chan *c, const struct nb_session_keys *keys,
                  int nchannels, char *err);
/* The disks a source announces (preamble `disks`, `disk.N`). */
struct nb_disk_spec {
    uint32_t ndisks;
    uint32_t nstreams;              /* stream disks (preamble `streams`) */
    uint64_t size[NB_MAX_DISKS];    /* bytes, a multiple of 512 */
};

int nb_preamble_write(const struct nb_guest_spec *s, const struct nb_mig_params *p,
                      const struct nb_disk_spec *d, char *out, size_t cap);
int nb_preamble_check(const char *src, const char *dst, char *err, size_t errlen);
int nb_preamble_get(const char *text, const char *key, char *out, size_t cap);

/* little-endian helpers */
static inline void nb_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void nb_put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static inline void nb_put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static inline uint16_t nb_get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t nb_get32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = (v << 8) | p[i]; return v; }
static inline uint64_t nb_get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | p[i]; return v; }

/* ---- messages.c: the typed messages ---------------------------------- */
struct nb_round_end {
    uint32_t round;
    uint64_t pages;         /* pages this channel sent in the round */
};

struct nb_digest_msg {
    uint32_t round;         /* the final round */
    uint64_t digest;        /* guest memory */
    uint64_t npages;
    uint64_t disk_digest;   /* every disk's blocks */
    uint64_t nblocks;       /* blocks of all disks */
};

/* One record of a DISK frame (PROTOCOL.md, "Disk records"). */
struct nb_disk_rec {
    uint64_t block;
    uint16_t disk;
    uint8_t enc;            /* NB_ENC_ZERO, NB_ENC_RAW or NB_ENC_ZSTD */
    uint16_t len;
    const uint8_t *data;    /* `len` bytes inside the frame */
};


struct nb_page_rec {
    uint32_t pfn;
    uint8_t enc;            /* enum nb_enc */
    uint16_t len;
    const uint8_t *data;    /* `len` bytes inside the frame */
};

/* What the destination takes from the source's preamble. */
struct nb_preamble_opts {
    int mode;               /* enum nb_mode */
    int verify;             /* enum nb_verify */
    int keep_paused;
    int channels;
};

int nb_send_text(struct nb_chan *c, uint8_t type, const char *text, char *err);
int nb_send_empty(struct nb_chan *c, uint8_t type, char *err);
void nb_pages_finish(uint8_t *frame, uint32_t round, uint32_t nrec);
void nb_page_rec_put(uint8_t *rec, uint32_t pfn, uint8_t enc, uint16_t len);
int nb_pages_parse(const struct nb_frame *f, uint32_t *round, uint32_t *nrec);
int nb_page_rec_parse(const uint8_t *rec, size_t avail, struct nb_page_rec *r,
                      char *err);
int nb_page_rec_next_pfn(const struct nb_page_rec *r, size_t avail,
                         uint32_t *pfn);
int nb_round_end_send(struct nb_chan *c, const struct nb_round_end *e, char *err);
int nb_round_end_parse(const struct nb_frame *f, struct nb_round_end *e);
int nb_digest_send(struct nb_chan *c, const struct nb_digest_msg *d, char *err);
int nb_digest_parse(const struct nb_frame *f, struct nb_digest_msg *d);
int nb_applied_send(struct nb_chan *c, uint32_t round, char *err);
int nb_applied_parse(const struct nb_frame *f, uint32_t *round);
int nb_preamble_read_spec(const char *text, struct nb_guest_spec *s, char *err);
int nb_preamble_read_opts(const char *text, struct nb_preamble_opts *o, char *err);
int nb_preamble_read_disks(const char *text, struct nb_disk_spec *d, char *err);
void nb_disk_finish(uint8_t *frame, uint32_t round, uint32_t nrec);
void nb_disk_rec_put(uint8_t *rec, uint64_t block, uint16_t disk, uint8_t enc,
                     uint16_t len);
int nb_disk_parse(const struct nb_frame *f, uint32_t *round, uint32_t *nrec);
int nb_disk_rec_parse(const uint8_t *rec, size_t avail, struct nb_disk_rec *r,
                      char *err);

/* streams.c: STREAM frames (PROTOCOL.md, "Streams") */
struct nb_stream_msg {
    uint32_t round;
    uint16_t stream;
    uint8_t part;           /* 0 or 1 */
    uint8_t end;            /* 1: the part ends here (total and crc set) */
    uint32_t len;           /* data bytes (0 in an end frame) */
    const uint8_t *data;    /* inside the frame */
    uint64_t total;         /* end frame: the part's bytes */
    uint32_t crc;           /* end frame: CRC-32C of the part's bytes */
};

void nb_stream_data_put(uint8_t *frame, uint32_t round, uint16_t stream,
                        uint8_t part);
size_t nb_stream_end_put(uint8_t *frame, uint32_t round, uint16_t stream,
                         uint8_t part, uint64_t total, uint32_t crc);
int nb_stream_parse(const struct nb_frame *f, struct nb_stream_msg *s, char *err);

/* crc32c.c */
uint32_t nb_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
