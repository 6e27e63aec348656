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

/*
 * Encrypt `len` bytes of `pt` for the frame whose header bytes 0..11 are
 * `hdr` (the additional data); *ct points at the ciphertext, valid until
 * the next call.
 */
int nb_seal_frame(struct nb_chan *c, const uint8_t *hdr, const void *pt,
                  uint32_t len, const uint8_t **ct, uint8_t tag[NB_TAG])
{
    struct nb_seal *s = c->seal;
    uint8_t iv[NB_GCM_IV];
    int n = 0;

    if (len > s->scap || !s->sbuf) {    /* never NULL, even for len 0 */
        uint8_t *b = realloc(s->sbuf, len ? len : 1);
        if (!b)
            return -1;
        s->sbuf = b;
        s->scap = len ? len : 1;
    }
    frame_nonce(hdr, iv);
    if (!EVP_EncryptInit_ex(s->tx, NULL, NULL, NULL, iv) ||
        !EVP_EncryptUpdate(s->tx, NULL, &n, hdr, NB_FRAME_CRC_AT) ||
        (len && !EVP_EncryptUpdate(s->tx, s->sbuf, &n, pt, (int)len)) ||
        !EVP_EncryptFinal_ex(s->tx, s->sbuf + (len ? n : 0), &n) ||
        !EVP_CIPHER_CTX_ctrl(s->tx, EVP_CTRL_GCM_GET_TAG, NB_TAG, tag))
        return -1;
    *ct = s->sbuf;
    return 0;
}

/* Decrypt `len` bytes of `buf` in place; -1 if the tag does not verify. */
int nb_open_frame(struct nb_chan *c, const uint8_t *hdr, uint8_t *buf,
                  uint32_t len, const uint8_t *tag)
{
    struct nb_seal *s = c->seal;
    uint8_t iv[NB_GCM_IV], t[NB_TAG];
    int n = 0;

    memcpy(t, tag, NB_TAG);
    frame_nonce(hdr, iv);
    if (!EVP_DecryptInit_ex(s->rx, NULL, NULL, NULL, iv) ||
        !EVP_DecryptUpdate(s->rx, NULL, &n, hdr, NB_FRAME_CRC_AT) ||
        (len && !EVP_DecryptUpdate(s->rx, buf, &n, buf, (int)len)) ||
        !EVP_CIPHER_CTX_ctrl(s->rx, EVP_CTRL_GCM_SET_TAG, NB_TAG, t))
        return -1;
    return EVP_DecryptFinal_ex(s->rx, buf + (len ? n : 0), &n) > 0 ? 0 : -1;
}
