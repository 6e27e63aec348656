/*
 * Sealed frames: AES-256-GCM over every frame after the handshake
 * (../PROTOCOL.md, "Encryption").  Each connection has one key per
 * direction, derived from the session key with the protocol's magic and
 * version, the channel index and the direction; the nonce is the frame's
 * sequence number, so a frame cannot be injected, replayed, reordered or
 * moved to another connection without failing its tag.  The cipher is
 * OpenSSL's, or gcm.c's on CPUs with VAES (the same AES-256-GCM, faster
 * than OpenSSL 3.0's); the choice is local, the bytes on the wire are
 * the same.
 */
#define _GNU_SOURCE
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/gcm.h"
#include "wire/wire.h"

/* One direction's cipher: OpenSSL's, or gcm.c's when `fast` is set. */
struct direction {
    EVP_CIPHER_CTX *evp;
    struct nb_gcm *fast;
};

struct nb_seal {
    struct direction tx, rx;
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

static int cipher_for(const uint8_t *session_key, uint16_t channel, uint8_t dir,
                      int encrypt, struct direction *d)
{
    uint8_t key[NB_KEY];
    int ok = direction_key(session_key, channel, dir, key) == 0;

    if (ok)
        d->fast = nb_gcm_new(key);
    if (ok && !d->fast) {
        d->evp = EVP_CIPHER_CTX_new();
        ok = d->evp && EVP_CipherInit_ex(d->evp, EVP_aes_256_gcm(), NULL, key,
                                         NULL, encrypt);
    }
    OPENSSL_cleanse(key, sizeof(key));
    return ok ? 0 : -1;
}

static void direction_free(struct direction *d)
{
    EVP_CIPHER_CTX_free(d->evp);
    nb_gcm_free(d->fast);
    d->evp = NULL;
    d->fast = NULL;
}

/* Seal every later frame on `c` (both directions); `is_source`: our side. */
int nb_seal_start(struct nb_chan *c, const uint8_t *session_key, int is_source,
                  char *err)
{
    struct nb_seal *s = calloc(1, sizeof(*s));
    uint8_t out = is_source ? NB_DIR_TO_DEST : NB_DIR_TO_SOURCE;
    uint8_t in = is_source ? NB_DIR_TO_SOURCE : NB_DIR_TO_DEST;

    if (!s || cipher_for(session_key, c->index, out, 1, &s->tx) < 0 ||
        cipher_for(session_key, c->index, in, 0, &s->rx) < 0) {
        if (s) {
            direction_free(&s->tx);
            direction_free(&s->rx);
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
    direction_free(&c->seal->tx);
    direction_free(&c->seal->rx);
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
    EVP_CIPHER_CTX *x = s->tx.evp;
    uint8_t iv[NB_GCM_IV];
    int n = 0;

    frame_nonce(hdr, iv);
    if (s->tx.fast) {
        nb_gcm_start(s->tx.fast, iv, hdr, NB_FRAME_CRC_AT);
        nb_gcm_crypt(s->tx.fast, in, out, len, 0);
        nb_gcm_finish(s->tx.fast, tag);
        return 0;
    }
    return EVP_EncryptInit_ex(x, NULL, NULL, NULL, iv) &&
           EVP_EncryptUpdate(x, NULL, &n, hdr, NB_FRAME_CRC_AT) &&
           (!len || EVP_EncryptUpdate(x, out, &n, in, (int)len)) &&
           EVP_EncryptFinal_ex(x, out + (len ? n : 0), &n) &&
           EVP_CIPHER_CTX_ctrl(x, EVP_CTRL_GCM_GET_TAG, NB_TAG, tag) ? 0 : -1;
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
    struct direction *d = &c->seal->rx;
    uint8_t iv[NB_GCM_IV];
    int n = 0;

    frame_nonce(hdr, iv);
    if (d->fast) {
        nb_gcm_start(d->fast, iv, hdr, NB_FRAME_CRC_AT);
        return 0;
    }
    return EVP_DecryptInit_ex(d->evp, NULL, NULL, NULL, iv) &&
           EVP_DecryptUpdate(d->evp, NULL, &n, hdr, NB_FRAME_CRC_AT) ? 0 : -1;
}

int nb_open_update(struct nb_chan *c, uint8_t *buf, uint32_t len)
{
    struct direction *d = &c->seal->rx;
    int n = 0;

    if (d->fast) {
        nb_gcm_crypt(d->fast, buf, buf, len, 1);
        return 0;
    }
    return !len || EVP_DecryptUpdate(d->evp, buf, &n, buf, (int)len) ? 0 : -1;
}

int nb_open_end(struct nb_chan *c, uint8_t *end, const uint8_t *tag)
{
    struct direction *d = &c->seal->rx;
    uint8_t t[NB_TAG];
    int n = 0;

    if (d->fast) {
        nb_gcm_finish(d->fast, t);
        return CRYPTO_memcmp(t, tag, NB_TAG) ? -1 : 0;
    }
    memcpy(t, tag, NB_TAG);
    return EVP_CIPHER_CTX_ctrl(d->evp, EVP_CTRL_GCM_SET_TAG, NB_TAG, t) &&
           EVP_DecryptFinal_ex(d->evp, end, &n) > 0 ? 0 : -1;
}
