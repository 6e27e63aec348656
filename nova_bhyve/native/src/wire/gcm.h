/*
 * AES-256-GCM with VAES and VPCLMULQDQ (AVX-512): the same cipher as
 * OpenSSL's EVP_aes_256_gcm(), for CPUs whose OpenSSL has no such path
 * (OpenSSL 3.0 processes one 128-bit lane at a time).  The sealed
 * channels (seal.c) use it when nb_gcm_new() gives one, OpenSSL's
 * otherwise; both ends interoperate either way.  Only 96-bit IVs.
 *
 * One nb_gcm carries one message at a time, like an EVP_CIPHER_CTX:
 * nb_gcm_start (IV and the additional data), nb_gcm_crypt over the text
 * in order and in pieces of any length, nb_gcm_finish for the tag.
 */
#ifndef NB_GCM_H
#define NB_GCM_H

#include <stddef.h>
#include <stdint.h>

struct nb_gcm;

/* A context for `key`; NULL if this CPU lacks VAES, VPCLMULQDQ or
 * AVX-512 (F, BW, VL), or on a failed allocation, or if the start-up
 * check against OpenSSL failed. */
struct nb_gcm *nb_gcm_new(const uint8_t key[32]);
/* Wipe and free (NULL is fine). */
void nb_gcm_free(struct nb_gcm *g);
/* Begin a message: the 12-byte IV and `n` bytes of additional data. */
void nb_gcm_start(struct nb_gcm *g, const uint8_t iv[12], const uint8_t *aad,
                  size_t n);
/* En- or decrypt (`decrypt` 1) the next `n` bytes; `out` may be `in`. */
void nb_gcm_crypt(struct nb_gcm *g, const uint8_t *in, uint8_t *out, size_t n,
                  int decrypt);
/* The 16-byte tag of the message. */
void nb_gcm_finish(struct nb_gcm *g, uint8_t tag[16]);

#endif
