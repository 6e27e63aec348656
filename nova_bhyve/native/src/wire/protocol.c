/*
 * The migration wire protocol: framing, mutual authentication and channel
 * joins.  With preamble.c and messages.c beside it, wire/ is the only
 * place that encodes or decodes protocol bytes; ../PROTOCOL.md is the spec.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "wire/wire.h"

const uint8_t NB_WIRE_MAGIC[NB_MAGIC_LEN] = { 'N', 'B', 'M', 'I', 'G', 0, 0, 1 };
#define MAGIC NB_WIRE_MAGIC

#define FLAG_SEALED 0x01

const char *nb_msg_name(unsigned type)
{
    static const char *names[] = {
        "?", "HELLO", "CHALLENGE", "AUTH", "JOIN", "PREAMBLE", "ACCEPT",
        "PAGES", "ROUND_END", "STATE", "DIGEST", "READY", "COMMIT",
        "RUNNING", "ABORT", "REFUSE", "APPLIED", "DISK", "STREAM",
    };
    return type < sizeof(names) / sizeof(names[0]) ? names[type] : "?";
}

/* HMAC-SHA256 over the concatenation of up to three parts. */
int nb_hmac3(const uint8_t *key, size_t klen, const void *a, size_t al,
             const void *b, size_t bl, const void *c, size_t cl, uint8_t out[32])
{
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *ctx = mac ? EVP_MAC_CTX_new(mac) : NULL;
    OSSL_PARAM params[2];
    size_t olen = 0;
    int ok;

    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                                 (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    ok = ctx && EVP_MAC_init(ctx, key, klen, params) &&
         (!al || EVP_MAC_update(ctx, a, al)) &&
         (!bl || EVP_MAC_update(ctx, b, bl)) &&
         (!cl || EVP_MAC_update(ctx, c, cl)) &&
         EVP_MAC_final(ctx, out, &olen, 32) && olen == 32;
    EVP_MAC_CTX_free(ctx);
    EVP_MAC_free(mac);
    return ok ? 0 : -1;
}

static int write_all(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        ssize_t w = writev(fd, iov, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static int read_all(int fd, uint8_t *buf, size_t len)
{
    while (len) {
        ssize_t r = recv(fd, buf, len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r == 0 ? -2 : -1;
        buf += r;
        len -= (size_t)r;
    }
    return 0;
}

/* Header bytes 0..11 of the next frame on `c` (the CRC comes last). */
static void frame_header(struct nb_chan *c, uint8_t type, uint32_t len,
                         uint8_t hdr[NB_FRAME_HDR])
{
    hdr[0] = type;
    hdr[1] = c->seal ? FLAG_SEALED : 0;
    nb_put16(hdr + 2, c->index);
    nb_put32(hdr + 4, c->send_seq);
    nb_put32(hdr + 8, len);
}

/* Complete the header with its CRC and write the frame: header, body and,
 * if sealed, the tag (which may directly follow the body). */
static int write_frame(struct nb_chan *c, uint8_t hdr[NB_FRAME_HDR],
                       const uint8_t *body, uint32_t len, const uint8_t *tag,
                       char *err)
{
    uint32_t crc = nb_crc32c(0, hdr, NB_FRAME_CRC_AT);
    struct iovec iov[3];
    int n = 2;

    if (!c->seal)
        crc = nb_crc32c(crc, body, len);
    nb_put32(hdr + NB_FRAME_CRC_AT, crc);
    iov[0] = (struct iovec){ hdr, NB_FRAME_HDR };
    iov[1] = (struct iovec){ (void *)body, len };
    if (c->seal && tag == body + len)
        iov[1].iov_len += NB_TAG;
    else if (c->seal)
        iov[n++] = (struct iovec){ (void *)tag, NB_TAG };
    if (write_all(c->fd, iov, n) < 0) {
        snprintf(err, NB_ERRLEN, "sending %s on channel %u: %s",
                 nb_msg_name(hdr[0]), c->index, strerror(errno));
        return nb_wire_fail(c, errno == EAGAIN || errno == EWOULDBLOCK ? NB_ERR_TIMEOUT : NB_ERR_PEER_GONE);
    }
    c->send_seq++;
    if (c->wire)
        atomic_fetch_add(c->wire, NB_FRAME_HDR + len + (c->seal ? NB_TAG : 0));
    return 0;
}

static int seal_failed(struct nb_chan *c, uint8_t type, char *err)
{
    snprintf(err, NB_ERRLEN, "encrypting a %s frame failed", nb_msg_name(type));
    return nb_wire_fail(c, NB_ERR_INTERNAL);
}

/* Send one frame; sealed (encrypted and authenticated) once the channel is. */
int nb_send_frame(struct nb_chan *c, uint8_t type, const void *payload,
                  uint32_t len, char *err)
{
    uint8_t hdr[NB_FRAME_HDR], tag[NB_TAG];
    const uint8_t *body = payload;

    frame_header(c, type, len, hdr);
    if (c->seal && nb_seal_frame(c, hdr, payload, len, &body, tag) < 0)
        return seal_failed(c, type, err);
    return write_frame(c, hdr, body, len, tag, err);
}

/*
 * nb_send_frame for a payload the caller lets go of, with NB_TAG bytes to
 * spare after it: a sealed channel encrypts it in place and puts the tag
 * in those bytes, so the page data is neither copied nor buffered twice.
 * Afterwards the buffer holds what was sent.
 */
int nb_send_frame_in_place(struct nb_chan *c, uint8_t type, uint8_t *payload,
                           uint32_t len, char *err)
{
    uint8_t hdr[NB_FRAME_HDR];

    frame_header(c, type, len, hdr);
    if (c->seal && nb_seal_in_place(c, hdr, payload, len, payload + len) < 0)
        return seal_failed(c, type, err);
    return write_frame(c, hdr, payload, len, payload + len, err);
}

/* Check a received header: flags, length limit, channel, sequence, sealing. */
static int check_header(struct nb_chan *c, const uint8_t *hdr,
                        uint32_t max_len, char *err)
{
    uint32_t len = nb_get32(hdr + 8), seq = nb_get32(hdr + 4);
    int sealed = hdr[1] & FLAG_SEALED;

    if (hdr[1] & ~FLAG_SEALED) {
        snprintf(err, NB_ERRLEN, "channel %u: unknown frame flags 0x%x", c->index, hdr[1]);
        return nb_wire_fail(c, NB_ERR_CORRUPT);
    }
    if (len > max_len) {
        snprintf(err, NB_ERRLEN, "channel %u: %s frame of %u bytes exceeds the "
                 "limit of %u", c->index, nb_msg_name(hdr[0]), len, max_len);
        return nb_wire_fail(c, NB_ERR_CORRUPT);
    }
    if ((c->index != 0xffff && nb_get16(hdr + 2) != c->index) ||
        seq != c->recv_seq) {
        snprintf(err, NB_ERRLEN, "channel %u: frame for channel %u with sequence "
                 "%u, expected %u (replayed, reordered or spliced stream)",
                 c->index, nb_get16(hdr + 2), seq, c->recv_seq);
        return nb_wire_fail(c, NB_ERR_CORRUPT);
    }
    if (!!sealed != !!c->seal) {
        snprintf(err, NB_ERRLEN, "channel %u: %s frame %s", c->index,
                 nb_msg_name(hdr[0]), sealed ? "sealed before the keys were agreed"
                                             : "not sealed (plaintext refused)");
        return nb_wire_fail(c, NB_ERR_CORRUPT);
    }
    return 0;
}

static int grow_rbuf(struct nb_chan *c, size_t need, char *err)
{
    uint8_t *b;
    if (need <= c->rcap)
        return 0;
    b = realloc(c->rbuf, need);
    if (!b) {
        snprintf(err, NB_ERRLEN, "out of memory for a %zu byte frame", need);
        return nb_wire_fail(c, NB_ERR_RESOURCE);
    }
    c->rbuf = b;
    c->rcap = need;
    return 0;
}

/*
 * Read a sealed frame's payload and tag into c->rbuf, decrypting each
 * piece in place as it arrives, while it is still in cache; the plaintext
 * is used only once check_body has verified the tag.  Returns 0, -1/-2 as
 * read_all, or -3 if the cipher failed.
 */
static int read_sealed(struct nb_chan *c, const uint8_t *hdr, uint32_t len)
{
    size_t got = 0, opened = 0, total = (size_t)len + NB_TAG;

    if (nb_open_begin(c, hdr) < 0)
        return -3;
    while (got < total) {
        ssize_t r = recv(c->fd, c->rbuf + got, total - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r == 0 ? -2 : -1;
        got += (size_t)r;
        size_t upto = got < len ? got : len;
        if (upto > opened &&
            nb_open_update(c, c->rbuf + opened, (uint32_t)(upto - opened)) < 0)
            return -3;
        opened = upto;
    }
    return 0;
}

/* Check the CRC, then (sealed) the tag of the payload read_sealed opened. */
static int check_body(struct nb_chan *c, const uint8_t *hdr, uint32_t len,
                      char *err)
{
    uint32_t crc = nb_crc32c(0, hdr, NB_FRAME_CRC_AT);
    if (!c->seal)
        crc = nb_crc32c(crc, c->rbuf, len);
    if (crc != nb_get32(hdr + NB_FRAME_CRC_AT)) {
        snprintf(err, NB_ERRLEN, "channel %u: %s frame failed its CRC (corrupted)",
                 c->index, nb_msg_name(hdr[0]));
        return nb_wire_fail(c, NB_ERR_CORRUPT);
    }
    if (c->seal && nb_open_end(c, c->rbuf + len, c->rbuf + len) < 0) {
        snprintf(err, NB_ERRLEN, "channel %u: %s frame failed authentication "
                 "(altered, injected or misplaced)", c->index, nb_msg_name(hdr[0]));
        return nb_wire_fail(c, NB_ERR_CORRUPT);
    }
    return 0;
}

/* Receive one frame, checking size, sequence, CRC and (sealed) its tag. */
int nb_recv_frame(struct nb_chan *c, struct nb_frame *f, uint32_t max_len,
                  char *err)
{
    uint8_t hdr[NB_FRAME_HDR];
    uint32_t len, tail;
    int r;

    r = read_all(c->fd, hdr, NB_FRAME_HDR);
    if (r < 0) {
        snprintf(err, NB_ERRLEN, r == -2 ? "channel %u: connection closed by peer"
                 : "channel %u: receive failed: %s", c->index, strerror(errno));
        return nb_wire_fail(c, r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK) ? NB_ERR_TIMEOUT : NB_ERR_PEER_GONE);
    }
    if (check_header(c, hdr, max_len, err) < 0)
        return -1;
    len = nb_get32(hdr + 8);
    tail = c->seal ? NB_TAG : 0;
    if (grow_rbuf(c, (size_t)len + tail, err) < 0)
        return -1;
    r = c->seal ? read_sealed(c, hdr, len) : read_all(c->fd, c->rbuf, len);
    if (r == -3) {
        snprintf(err, NB_ERRLEN, "channel %u: decrypting a %s frame failed",
                 c->index, nb_msg_name(hdr[0]));
        return nb_wire_fail(c, NB_ERR_INTERNAL);
    }
    if (r < 0) {
        snprintf(err, NB_ERRLEN, "channel %u: stream truncated inside a %s frame",
                 c->index, nb_msg_name(hdr[0]));
        return nb_wire_fail(c, NB_ERR_PEER_GONE);
    }
    if (check_body(c, hdr, len, err) < 0)
        return -1;
    if (c->wire)
        atomic_fetch_add(c->wire, NB_FRAME_HDR + len + tail);
    c->recv_seq++;
    f->type = hdr[0];
    f->flags = hdr[1];
    f->channel = nb_get16(hdr + 2);
    f->seq = nb_get32(hdr + 4);
    f->len = len;
    f->payload = c->rbuf;
    return 0;
}

/*
 * The peer's REFUSE or ABORT text, fit to log and show: at most
 * NB_PEER_TEXT - 1 bytes, anything but printable ASCII as '?'.
 */
const char *nb_peer_text(const struct nb_frame *f, char out[NB_PEER_TEXT])
{
    uint32_t n = f->len < NB_PEER_TEXT - 1 ? f->len : NB_PEER_TEXT - 1;
    for (uint32_t i = 0; i < n; i++)
        out[i] = f->payload[i] >= 0x20 && f->payload[i] < 0x7f
                 ? (char)f->payload[i] : '?';
    out[n] = 0;
    return out;
}

/*
 * The peer spoke on a control channel that should be silent (`when`, e.g.
 * "during the copy"): describe what it said (`f`, or NULL if reading it
 * failed), in `err` and the channel's err_kind, as why the session is over.
 */
void nb_peer_said(struct nb_chan *c, const struct nb_frame *f, const char *peer,
                  const char *when, char *err)
{
    char text[NB_PEER_TEXT];
    if (f) {
        snprintf(err, NB_ERRLEN, "%s %s %s: %s", peer,
                 f->type == NB_MSG_REFUSE ? "refused" :
                 f->type == NB_MSG_ABORT ? "aborted" : "spoke out of turn",
                 when, nb_peer_text(f, text));
        c->err_kind = f->type == NB_MSG_REFUSE ? NB_ERR_REFUSED
                      : f->type == NB_MSG_ABORT ? NB_ERR_PEER_GONE : NB_ERR_CORRUPT;
    } else
        snprintf(err + strlen(err), NB_ERRLEN - strlen(err),
                 " (the %s ended the session %s)", peer, when);
}

/* Check that a received frame is of one type; REFUSE/ABORT become errors. */
int nb_frame_expect(struct nb_chan *c, const struct nb_frame *f, uint8_t type,
                    uint32_t max_len, char *err)
{
    if (f->type == type && f->len <= max_len)
        return 0;
    if (f->type == NB_MSG_REFUSE || f->type == NB_MSG_ABORT) {
        char text[NB_PEER_TEXT];
        snprintf(err, NB_ERRLEN, "peer %s: %s",
                 f->type == NB_MSG_REFUSE ? "refused" : "aborted",
                 nb_peer_text(f, text));
        return nb_wire_fail(c, f->type == NB_MSG_REFUSE ? NB_ERR_REFUSED : NB_ERR_PEER_GONE);
    }
    snprintf(err, NB_ERRLEN, "expected %s (<= %u bytes), got %s of %u bytes",
             nb_msg_name(type), max_len, nb_msg_name(f->type), f->len);
    return nb_wire_fail(c, NB_ERR_CORRUPT);
}

/* Receive a frame of one type; REFUSE/ABORT from the peer become errors. */
int nb_expect(struct nb_chan *c, struct nb_frame *f, uint8_t type,
              uint32_t max_len, char *err)
{
    if (nb_recv_frame(c, f, max_len > NB_MAX_REASON ? max_len : NB_MAX_REASON, err) < 0)
        return -1;
    return nb_frame_expect(c, f, type, max_len, err);
}

/* The digest keys: HMAC-SHA256(K, "nbmig-hash" || u32 i) for i = 0, 1, ... */
static int derive_hash_key(const uint8_t *key, struct nb_hash_key *h)
{
    uint8_t t[32], idx[4];
    size_t nh_bytes = sizeof(h->nh);

    for (uint32_t i = 0; 32 * (size_t)i < 32 + nh_bytes; i++) {
        nb_put32(idx, i);
        if (nb_hmac3(key, NB_KEY, "nbmig-hash", 10, idx, 4, NULL, 0, t) < 0)
            return -1;
        if (i == 0) {
            h->page_k0 = nb_get64(t);
            h->page_k1 = nb_get64(t + 8);
            h->term_k0 = nb_get64(t + 16);
            h->term_k1 = nb_get64(t + 24);
            continue;
        }
        for (size_t w = 0; w < 8 && (i - 1) * 8 + w < NB_NH_WORDS; w++)
            h->nh[(i - 1) * 8 + w] = nb_get32(t + 4 * w);
    }
    OPENSSL_cleanse(t, sizeof(t));
    return 0;
}

static int derive_keys(const uint8_t *secret, size_t slen, const uint8_t *ns,
                       const uint8_t *nd, struct nb_session_keys *k)
{
    uint8_t t[32];
    if (nb_hmac3(secret, slen, "nbmig-key", 9, ns, NB_NONCE, nd, NB_NONCE, k->key) < 0 ||
        nb_hmac3(k->key, NB_KEY, "nbmig-sid", 9, NULL, 0, NULL, 0, t) < 0)
        return -1;
    memcpy(k->sid, t, 16);
    return derive_hash_key(k->key, &k->hash);
}

/*
 * Source side: HELLO(nonce_s) -> CHALLENGE(nonce_d, proof_d) -> AUTH(proof_s).
 * Each proof is an HMAC under the shared secret with a distinct label, so
 * the secret never crosses the wire and neither side's proof can be
 * reflected; fresh nonces make a recorded stream useless.
 */
int nb_handshake_source(struct nb_chan *ctl, const uint8_t *secret, size_t slen,
                        struct nb_session_keys *keys, char *err)
{
    uint8_t hello[NB_HELLO_LEN], ns[NB_NONCE], want[NB_PROOF], proof[NB_PROOF];
    const uint8_t *nd;
    struct nb_frame f;

    if (RAND_bytes(ns, NB_NONCE) != 1) {
        snprintf(err, NB_ERRLEN, "no randomness for the nonce");
        return nb_wire_fail(ctl, NB_ERR_RESOURCE);
    }
    memcpy(hello, MAGIC, NB_MAGIC_LEN);
    nb_put16(hello + 8, NB_PROTO_VERSION);
    nb_put16(hello + 10, NB_PROTO_VERSION);
    nb_put32(hello + 12, 0);
    memcpy(hello + 16, ns, NB_NONCE);
    if (nb_send_frame(ctl, NB_MSG_HELLO, hello, sizeof(hello), err) < 0 ||
        nb_expect(ctl, &f, NB_MSG_CHALLENGE, NB_CHALLENGE_LEN, err) < 0)
        return -1;
    if (f.len != NB_CHALLENGE_LEN || memcmp(f.payload, MAGIC, NB_MAGIC_LEN) != 0 ||
        nb_get16(f.payload + 8) != NB_PROTO_VERSION) {
        snprintf(err, NB_ERRLEN, "destination speaks another protocol or version");
        return nb_wire_fail(ctl, NB_ERR_INCOMPATIBLE);
    }
    nd = f.payload + 12;
    if (nb_hmac3(secret, slen, "nbmig-dst", 9, ns, NB_NONCE, nd, NB_NONCE, want) < 0 ||
        CRYPTO_memcmp(want, f.payload + 12 + NB_NONCE, NB_PROOF) != 0) {
        snprintf(err, NB_ERRLEN, "the destination failed authentication: it does "
                 "not hold this migration's secret");
        return nb_wire_fail(ctl, NB_ERR_AUTH);
    }
    if (derive_keys(secret, slen, ns, nd, keys) < 0 ||
        nb_hmac3(secret, slen, "nbmig-src", 9, nd, NB_NONCE, ns, NB_NONCE, proof) < 0) {
        snprintf(err, NB_ERRLEN, "key derivation failed");
        return nb_wire_fail(ctl, NB_ERR_INTERNAL);
    }
    if (nb_send_frame(ctl, NB_MSG_AUTH, proof, NB_AUTH_LEN, err) < 0)
        return -1;
    return nb_seal_start(ctl, keys->key, 1, err);
}

/* Destination side of the handshake; sends REFUSE when the source fails it. */
int nb_handshake_dest(struct nb_chan *ctl, const uint8_t *secret, size_t slen,
                      struct nb_session_keys *keys, char *err)
{
    uint8_t chal[NB_CHALLENGE_LEN], ns[NB_NONCE], nd[NB_NONCE], want[NB_PROOF];
    struct nb_frame f;
    char e2[NB_ERRLEN];

    if (nb_expect(ctl, &f, NB_MSG_HELLO, NB_HELLO_LEN, err) < 0)
        return -1;
    if (f.len != NB_HELLO_LEN || memcmp(f.payload, MAGIC, NB_MAGIC_LEN) != 0) {
        snprintf(err, NB_ERRLEN, "not a migration stream (bad HELLO)");
        return -1;
    }
    if (nb_get16(f.payload + 8) > NB_PROTO_VERSION ||
        nb_get16(f.payload + 10) < NB_PROTO_VERSION) {
        snprintf(err, NB_ERRLEN, "source supports protocol versions %u..%u, this "
                 "host speaks %d", nb_get16(f.payload + 8),
                 nb_get16(f.payload + 10), NB_PROTO_VERSION);
        nb_send_text(ctl, NB_MSG_REFUSE, err, e2);
        return nb_wire_fail(ctl, NB_ERR_INCOMPATIBLE);
    }
    memcpy(ns, f.payload + 16, NB_NONCE);
    if (RAND_bytes(nd, NB_NONCE) != 1 ||
        nb_hmac3(secret, slen, "nbmig-dst", 9, ns, NB_NONCE, nd, NB_NONCE,
              chal + 12 + NB_NONCE) < 0) {
        snprintf(err, NB_ERRLEN, "no randomness or HMAC failure");
        return nb_wire_fail(ctl, NB_ERR_RESOURCE);
    }
    memcpy(chal, MAGIC, NB_MAGIC_LEN);
    nb_put16(chal + 8, NB_PROTO_VERSION);
    nb_put16(chal + 10, 0);
    memcpy(chal + 12, nd, NB_NONCE);
    if (nb_send_frame(ctl, NB_MSG_CHALLENGE, chal, sizeof(chal), err) < 0 ||
        nb_expect(ctl, &f, NB_MSG_AUTH, NB_AUTH_LEN, err) < 0)
        return -1;
    if (f.len != NB_AUTH_LEN ||
        nb_hmac3(secret, slen, "nbmig-src", 9, nd, NB_NONCE, ns, NB_NONCE, want) < 0 ||
        CRYPTO_memcmp(want, f.payload, NB_PROOF) != 0) {
        snprintf(err, NB_ERRLEN, "the source failed authentication: it does not "
                 "hold this migration's secret");
        nb_send_text(ctl, NB_MSG_REFUSE, "authentication failed", e2);
        return nb_wire_fail(ctl, NB_ERR_AUTH);
    }
    if (derive_keys(secret, slen, ns, nd, keys) < 0) {
        snprintf(err, NB_ERRLEN, "key derivation failed");
        return nb_wire_fail(ctl, NB_ERR_INTERNAL);
    }
    return nb_seal_start(ctl, keys->key, 0, err);
}

/* A page channel joins the session: JOIN(sid, index, HMAC(key, ...)). */
int nb_join_send(struct nb_chan *c, const struct nb_session_keys *keys, char *err)
{
    uint8_t msg[NB_JOIN_LEN], idx[2];
    memcpy(msg, MAGIC, NB_MAGIC_LEN);
    memcpy(msg + 8, keys->sid, NB_SID);
    nb_put16(msg + 24, c->index);
    nb_put16(msg + 26, 0);
    nb_put16(idx, c->index);
    if (nb_hmac3(keys->key, NB_KEY, "nbmig-join", 10, keys->sid, NB_SID, idx, 2,
              msg + 28) < 0) {
        snprintf(err, NB_ERRLEN, "HMAC failure");
        return nb_wire_fail(c, NB_ERR_INTERNAL);
    }
    return nb_send_frame(c, NB_MSG_JOIN, msg, sizeof(msg), err);
}

/* Check a JOIN; on success c->index is the channel it claimed. */
int nb_join_check(struct nb_chan *c, const struct nb_session_keys *keys,
                  int nchannels, char *err)
{
    struct nb_frame f;
    uint8_t want[NB_PROOF], idx[2];
    uint16_t index;

    c->index = 0xffff;  /* unknown until the JOIN names it */
    if (nb_recv_frame(c, &f, NB_MAX_JOIN_FRAME, err) < 0)
        return -1;
    if (f.type != NB_MSG_JOIN || f.len != NB_JOIN_LEN ||
        memcmp(f.payload, MAGIC, NB_MAGIC_LEN) ||
        memcmp(f.payload + 8, keys->sid, NB_SID)) {
        snprintf(err, NB_ERRLEN, "connection is not a page channel of this session");
        return nb_wire_fail(c, NB_ERR_AUTH);
    }
    index = nb_get16(f.payload + 24);
    nb_put16(idx, index);
    if (index < 1 || index > nchannels || f.channel != index ||
        nb_hmac3(keys->key, NB_KEY, "nbmig-join", 10, keys->sid, NB_SID, idx, 2, want) < 0 ||
        CRYPTO_memcmp(want, f.payload + 28, NB_PROOF) != 0) {
        snprintf(err, NB_ERRLEN, "page channel join failed authentication");
        return nb_wire_fail(c, NB_ERR_AUTH);
    }
    c->index = index;
    return 0;
}
