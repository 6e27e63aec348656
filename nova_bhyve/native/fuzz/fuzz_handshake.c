/*
 * Target "handshake": nb_handshake_dest with the input as the source's
 * bytes (HELLO, then AUTH).  The destination's nonce comes from
 * RAND_bytes, replaced here by a fixed pattern, so that the target can
 * append the AUTH a source holding the secret would send and reach the
 * end of the handshake (key derivation, sealing).
 *
 * Input: u8 mode, corruptions, then the stream.
 *   mode bit 0: the stream is the rest of the input as raw bytes; else
 *               frames built from records (fuzz_wire.h)
 *        bit 1: after the first built frame, append the valid AUTH for
 *               the nonce in it
 *        bits 2-3: number of corruptions (u16 offset, u8 xor each)
 */
#include "fuzz_wire.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

static const uint8_t SECRET[] = "fuzz-shared-secret";
#define FZ_NONCE_BYTE 0x5a

/* The destination's randomness: fixed, so that its nonce is known. */
int RAND_bytes(unsigned char *buf, int num)
{
    memset(buf, FZ_NONCE_BYTE, (size_t)num);
    return 1;
}

/* The source's AUTH proof for its HELLO payload `hello` (PROTOCOL.md). */
static void auth_proof(const uint8_t *hello, size_t len, uint8_t out[NB_PROOF])
{
    uint8_t msg[9 + 2 * NB_NONCE], ns[NB_NONCE] = { 0 };
    unsigned olen = NB_PROOF;

    if (len >= NB_HELLO_LEN)
        memcpy(ns, hello + 16, NB_NONCE);
    memcpy(msg, "nbmig-src", 9);
    memset(msg + 9, FZ_NONCE_BYTE, NB_NONCE);
    memcpy(msg + 9 + NB_NONCE, ns, NB_NONCE);
    if (!HMAC(EVP_sha256(), SECRET, sizeof(SECRET) - 1, msg, sizeof(msg), out, &olen))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz in = { data, size };
    uint8_t mode = fz_u8(&in);
    struct fz cz = fz_split(&in, 3u * ((mode >> 2) & 3));
    struct nb_chan c = { .index = 0 };
    struct nb_session_keys keys;
    char err[NB_ERRLEN];
    uint8_t *stream;
    size_t len;
    int peer;

    if (size > 100000)
        return -1;
    if (mode & 1) {
        len = in.n;
        stream = malloc(len + 1);
        memcpy(stream, in.p, len);
    } else {
        struct nb_chan w;
        size_t before = in.n;
        fz_writer_open(&w, 0, 0);
        fz_send_frames(&in, &w, 1);
        if (mode & 2) {     /* the HELLO payload follows its 3-byte record head */
            uint8_t proof[NB_PROOF];
            size_t used = before - in.n;
            auth_proof(in.p - used + 3, used > 3 ? used - 3 : 0, proof);
            if (nb_send_frame(&w, NB_MSG_AUTH, proof, NB_PROOF, err) < 0)
                abort();
        }
        fz_send_frames(&in, &w, FZ_MAX_FRAMES);
        stream = fz_writer_take(&w, &len);
    }
    fz_corrupt(cz, stream, len);
    c.fd = fz_stream(stream, len, &peer);
    free(stream);
    memset(err, 'X', sizeof(err));
    fz_debug("handshake", nb_handshake_dest(&c, SECRET, sizeof(SECRET) - 1, &keys, err), err);
    nb_seal_free(&c);
    free(c.rbuf);
    close(c.fd);
    close(peer);
    return 0;
}

/* Seeds: the HELLO a source sends, with and without the valid AUTH. */
static void fuzz_seeds(const char *dir)
{
    uint8_t hello[NB_HELLO_LEN];
    struct fz_buf b = { 0 };

    memcpy(hello, NB_WIRE_MAGIC, NB_MAGIC_LEN);
    nb_put16(hello + 8, NB_PROTO_VERSION);
    nb_put16(hello + 10, NB_PROTO_VERSION);
    nb_put32(hello + 12, 0);
    memset(hello + 16, 0x33, NB_NONCE);
    fz_put8(&b, 2);
    fz_put_frame(&b, NB_MSG_HELLO, hello, sizeof(hello));
    fz_seed(dir, "hello-auth", b.p, b.len);
    b.len = 0;
    fz_put8(&b, 0);
    fz_put_frame(&b, NB_MSG_HELLO, hello, sizeof(hello));
    fz_put_frame(&b, NB_MSG_AUTH, hello, NB_PROOF);
    fz_seed(dir, "hello-bad-auth", b.p, b.len);
    b.len = 0;
    nb_put16(hello + 8, 3);
    nb_put16(hello + 10, 3);
    fz_put8(&b, 0);
    fz_put_frame(&b, NB_MSG_HELLO, hello, sizeof(hello));
    fz_seed(dir, "hello-version-3", b.p, b.len);
    free(b.p);
}
