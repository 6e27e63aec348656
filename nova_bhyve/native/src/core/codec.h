/*
 * Page codecs (codec.c): zero detection, delta encoding, the keyed page
 * hash and digest terms, and the source's delta cache.
 */
#ifndef NB_CODEC_H
#define NB_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "vmm/vmm.h"
#include "wire/wire.h"

struct nb_xcache;
/* A page of zeros: what never-written memory holds. */
extern const uint8_t nb_zero_page[NB_PAGE];
int nb_page_is_zero(const uint8_t *page);
size_t nb_delta_encode(const uint8_t *old, const uint8_t *cur, uint8_t *out, size_t cap);
int nb_delta_decode(const uint8_t *in, size_t len, uint8_t *page);
/* vector code: -1 (default) the best the CPU has, 0 none, 1 AVX2 */
extern int nb_codec_simd;
int nb_simd_level(void);
uint64_t nb_page_hash(const uint8_t *page, const struct nb_hash_key *k);
uint64_t nb_zero_page_hash(const struct nb_hash_key *k);
uint64_t nb_digest_term(uint64_t pfn, uint64_t h, uint64_t hz,
                        const struct nb_hash_key *k);
uint64_t nb_disk_term(uint32_t disk, uint64_t block, uint64_t h, uint64_t hz,
                      const struct nb_hash_key *k);
struct nb_xcache *nb_xcache_new(uint64_t bytes);
void nb_xcache_free(struct nb_xcache *c);
const uint8_t *nb_xcache_get(struct nb_xcache *c, uint64_t pfn, uint8_t *buf);
int nb_xcache_has(const struct nb_xcache *c, uint64_t pfn);
int nb_xcache_put(struct nb_xcache *c, uint64_t pfn, const uint8_t *page,
                  uint32_t round, const uint8_t *zdelta, size_t zlen);
int nb_xcache_put_zero(struct nb_xcache *c, uint64_t pfn, uint32_t round);

#endif
