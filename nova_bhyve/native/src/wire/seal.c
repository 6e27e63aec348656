/*
 * Sealed frames: AES-256-GCM over every frame after the handshake
 * (../PROTOCOL.md, "Encryption").  Each connection has one key per
 * direction, derived from the session key with the protocol's magic and
 * version, the channel index and the direction; the nonce is the frame's
 * sequence number, so a frame cannot be injected, replayed, reordered or
 * moved to another connection without failing its tag.
 */
#define _GNU_SOURCE
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/wire.h"

struct nb_seal {
    EVP_CIPHER_CTX *tx, *rx;
    uint8_t *sbuf;              /* ciphertext of the frame being sent */
    size_t scap;
};

/* HMAC-SHA256(key, label || magic || u16 version || u16 channel || u8 dir). */
static int direction_key(const uint8_t *session_key, uint16_t channel, uint8_t dir,
                         uint8_t out[NB_KEY])
{
    static const char label[] = "nbmig-aead";
    uint8_t tail[NB_MAGIC_LEN + 5];

    memcpy(tail, NB_WIRE_MAGIC, NB_MAGIC_LEN);
    nb_put16(tail + NB_MAGIC_LEN, NB_PROTO_VERSION);
    nb_put16(tail + NB_MAGIC_LEN + 2, channel);
    tail[NB_MAGIC_LEN + 4] = dir;
    return nb_hmac3(session_key, NB_KEY, label, sizeof(label) - 1, tail,
                    sizeof(tail), NULL, 0, out);
}

static EVP_CIPHER_CTX *cipher_for(const uint8_t *session_key, uint16_t channel,
                                  uint8_t dir, int encrypt)
{
    uint8_t key[NB_KEY];
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int ok = ctx && direction_key(session_key, channel, dir, key) == 0 &&
             EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL, encrypt);
    OPENSSL_cleanse(key, sizeof(key));
    if (!ok) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

/* Seal every later frame on `c` (both directions); `is_source`: our side. */
int nb_seal_start(struct nb_chan *c, const uint8_t *session_key, int is_source,
                  char *err)
{
    struct nb_seal *s = calloc(1, sizeof(*s));
    uint8_t out = is_source ? NB_DIR_TO_DEST : NB_DIR_TO_SOURCE;
    uint8_t in = is_source ? NB_DIR_TO_SOURCE : NB_DIR_TO_DEST;

    if (s) {
        s->tx = cipher_for(session_key, c->index, out, 1);
        s->rx = cipher_for(session_key, c->index, in, 0);
    }
    if (!s || !s->tx || !s->rx) {
        if (s) {
            EVP_CIPHER_CTX_free(s->tx);
            EVP_CIPHER_CTX_free(s->rx);
        }
        free(s);
        snprintf(err, NB_ERRLEN, "cannot set up AES-256-GCM for channel %u",
                 c->index);
        return nb_wire_fail(c, NB_ERR_INTERNAL);
    }
    c->seal = s;
    return 0;
}

void nb_seal_free(struct nb_chan *c)
{
    if (!c->seal)
        return;
    EVP_CIPHER_CTX_free(c->seal->tx);
    EVP_CIPHER_CTX_free(c->seal->rx);
    free(c->seal->sbuf);
    free(c->seal);
    c->seal = NULL;
}

/* The 96-bit nonce: u32 sequence, then zeros (the key is per direction). */
static void frame_nonce(const uint8_t *hdr, uint8_t iv[NB_GCM_IV])
{
    memset(iv, 0, NB_GCM_IV);
    memcpy(iv, hdr + 4, 4);
}

/* AES-256-GCM of `len` bytes from `in` to `out` (which may be `in`). */
static int seal(struct nb_seal *s, const uint8_t *hdr, const uint8_t *in,
                uint8_t *out, uint32_t len, uint8_t tag[NB_TAG])
{
    uint8_t iv[NB_GCM_IV];
    int n = 0;

    frame_nonce(hdr, iv);
    return EVP_EncryptInit_ex(s->tx, NULL, NULL, NULL, iv) &&
           EVP_EncryptUpdate(s->tx, NULL, &n, hdr, NB_FRAME_CRC_AT) &&
           (!len || EVP_EncryptUpdate(s->tx, out, &n, in, (int)len)) &&
           EVP_EncryptFinal_ex(s->tx, out + (len ? n : 0), &n) &&
           EVP_CIPHER_CTX_ctrl(s->tx, EVP_CTRL_GCM_GET_TAG, NB_TAG, tag) ? 0 : -1;
}

/*
 * Encrypt `len` bytes of `pt` for the frame whose header bytes 0..11 are
 * `hdr` (the additional data); *ct points at the ciphertext, valid until
 * the next call.
 */
int nb_seal_frame(struct nb_chan *c, const uint8_t *hdr, const void *pt,
                  uint32_t len, const uint8_t **ct, uint8_t tag[NB_TAG])
{
    struct nb_seal *s = c->seal;

    if (len > s->scap || !s->sbuf) {    /* never NULL, even for len 0 */
        uint8_t *b = realloc(s->sbuf, len ? len : 1);
        if (!b)
            return -1;
        s->sbuf = b;
        s->scap = len ? len : 1;
    }
    *ct = s->sbuf;
    return seal(s, hdr, pt, s->sbuf, len, tag);
}

/*
 * nb_seal_frame for a payload the caller lets go of: encrypted in place,
 * so the bytes are read and written once, where they already are.
 */
int nb_seal_in_place(struct nb_chan *c, const uint8_t *hdr, uint8_t *buf,
                     uint32_t len, uint8_t tag[NB_TAG])
{
    return seal(c->seal, hdr, buf, buf, len, tag);
}

/*
 * Opening a frame, piece by piece as its payload arrives (so that each
 * piece is decrypted while it is still in cache): nb_open_begin with the
 * header bytes 0..11, nb_open_update over the payload in order (in place),
 * then nb_open_end with the tag, -1 if it does not verify.  The plaintext
 * must not be used before nb_open_end has returned 0.
 */
int nb_open_begin(struct nb_chan *c, const uint8_t *hdr)
{
    uint8_t iv[NB_GCM_IV];
    int n = 0;

    frame_nonce(hdr, iv);
    return EVP_DecryptInit_ex(c->seal->rx, NULL, NULL, NULL, iv) &&
           EVP_DecryptUpdate(c->seal->rx, NULL, &n, hdr, NB_FRAME_CRC_AT) ? 0 : -1;
}

int nb_open_update(struct nb_chan *c, uint8_t *buf, uint32_t len)
{
    int n = 0;
    return !len || EVP_DecryptUpdate(c->seal->rx, buf, &n, buf, (int)len) ? 0 : -1;
}

int nb_open_end(struct nb_chan *c, uint8_t *end, const uint8_t *tag)
{
    uint8_t t[NB_TAG];
    int n = 0;

    memcpy(t, tag, NB_TAG);
    return EVP_CIPHER_CTX_ctrl(c->seal->rx, EVP_CTRL_GCM_SET_TAG, NB_TAG, t) &&
           EVP_DecryptFinal_ex(c->seal->rx, end, &n) > 0 ? 0 : -1;
}
