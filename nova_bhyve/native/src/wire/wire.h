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

#define NB_NONCE 32
#define NB_KEY 32
#define NB_MAC 16

/* the memory digest's key, derived in the handshake */
struct nb_hash_key {
    uint64_t k0, k1;
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
    NB_MSG_PING = 16,
    NB_MSG_PONG = 17,
};

enum nb_enc { NB_ENC_ZERO = 0, NB_ENC_RAW = 1, NB_ENC_DELTA = 2, NB_ENC_ZSTD = 3 };

#define NB_FRAME_HDR 16
#define NB_REC_HDR 8
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
    const uint8_t *key;     /* session key once authenticated, else NULL */
    _Atomic uint64_t *wire; /* byte counter to add to */
};

int nb_send_frame(struct nb_chan *c, uint8_t type, const void *payload,
                  uint32_t len, char *err);
int nb_recv_frame(struct nb_chan *c, struct nb_frame *f, uint32_t max_len,
                  char *err);
void nb_peer_gave_up(struct nb_chan *c, const char *peer, const char *when,
                     char *err);
int nb_expect(struct nb_chan *c, struct nb_frame *f, uint8_t type,
              uint32_t max_len, char *err);
const char *nb_msg_name(unsigned type);

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
int nb_preamble_write(const struct nb_guest_spec *s, const struct nb_mig_params *p,
                      char *out, size_t cap);
int nb_preamble_check(const char *src, const char *dst, char *err, size_t errlen);
int nb_preamble_get(const char *text, const char *key, char *out, size_t cap);

/* little-endian helpers */
static inline void nb_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void nb_put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static inline void nb_put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static inline uint16_t nb_get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t nb_get32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = (v << 8) | p[i]; return v; }
static inline uint64_t nb_get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | p[i]; return v; }

/* crc32c.c */
uint32_t nb_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
