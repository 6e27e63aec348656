/*
 * Test-only entry points (selftest.c), also the test module's cffi cdef.
 * Compiled only into the unit tests' build, never into the engine.
 */
#ifndef NB_SELFTEST_H
#define NB_SELFTEST_H

#include <stddef.h>
#include <stdint.h>

/* Delta-encode `cur` against `old` into `out` (at most `cap` bytes). */
int nb_selftest_delta(const uint8_t *old, const uint8_t *cur, uint8_t *out,
                      size_t cap, size_t *outlen);
/* Apply a delta to `page` in place; -1 if the delta is malformed. */
int nb_selftest_undelta(const uint8_t *delta, size_t len, uint8_t *page);
/* CRC-32C of `buf` from a zero start. */
uint32_t nb_selftest_crc32c(const uint8_t *buf, size_t len);
/* The memory digest's page hash H (PROTOCOL.md) of one 4096-byte page
 * under the SipHash key (k0, k1) and the 1028 NH key words `nh`, with
 * vector code up to level `simd` (0 none, 1 AVX2) if the CPU
 * has it; returns the level used in *used. */
uint64_t nb_selftest_page_hash(const uint8_t *page, const uint32_t *nh,
                               uint64_t k0, uint64_t k1, int simd, int *used);
/* Page `pfn`'s digest term for content hash `h`, the zero page's hash
 * being `hz`, under the SipHash key (k0, k1) (PROTOCOL.md). */
uint64_t nb_selftest_digest_term(uint64_t pfn, uint64_t h, uint64_t hz,
                                 uint64_t k0, uint64_t k1);
/* Block `block` of disk `disk`'s term of the disk digest (PROTOCOL.md). */
uint64_t nb_selftest_disk_term(uint32_t disk, uint64_t block, uint64_t h,
                               uint64_t hz, uint64_t k0, uint64_t k1);
/* Sweep `ws` pages `rounds` times through a delta cache of `slots` pages
 * (as rounds of a guest rewriting its working set in order); returns the
 * hits of the last round, or -1 if a page then sent as zeros came back
 * as anything but zeros. */
long nb_selftest_xcache_sweep(uint64_t slots, uint64_t ws, uint32_t rounds);
/* A page sent with a byte set, as zeros, then with the byte changed: the
 * length of its delta against what the cache then holds, or -1 on a miss
 * (`rival` 1: a fresh page of another key took the slot first; 2: that
 * page was then sent as zeros too, and the mark gave the slot back). */
long nb_selftest_xcache_zeroed(int rival);
/* Store `n` pages (4096 bytes each, back to back) in a delta cache of
 * `slots` pages under keys 0..n-1, then read each back: returns how many
 * came back exactly as stored (-1: out of memory). */
long nb_selftest_xcache_roundtrip(uint64_t slots, const uint8_t *pages, uint64_t n);
/* Drive compress mode `mode` (0 off, 1 on, 2 auto) over `pages` data
 * pages on a link of `link_Bps`, with zstd taking in `zstd_Bps` and
 * keeping `ratio` of a page; a 256 KiB frame is sent every 64 pages.
 * `burst` > 1: the socket buffer takes burst - 1 frames at 50 times the
 * link's speed, the next waits for the rest (the same mean rate).
 * Returns the pages it compressed; *active is the final choice. */
int nb_selftest_adapt(int mode, double link_Bps, double zstd_Bps, double ratio,
                      int pages, int burst, int *active);
/* AES-256-GCM through wire/gcm.c: en- or decrypt `len` bytes of `in`
 * into `out`, fed in `npieces` pieces of the given lengths (the rest in
 * one more), and the tag; -1 if this CPU has no such path. */
int nb_selftest_gcm(const uint8_t *key, const uint8_t *iv, const uint8_t *aad,
                    size_t aadlen, const uint8_t *in, uint8_t *out, size_t len,
                    const size_t *pieces, size_t npieces, int decrypt,
                    uint8_t *tag);
/* 1 if the phase table lets a side (source: 1) go from `from` to `to`. */
int nb_selftest_phase_legal(int is_source, int from, int to);

/* converge.h: whether a round stalled, and the throttle computed. */
int nb_selftest_round_stalled(double expected_ms, double limit_ms,
                              uint64_t dirty, uint64_t prev);
uint32_t nb_selftest_converge_target(uint32_t cur, double page_ms,
                                     double dirty_per_ms);
/* nb_dest_excess_ms (core/converge.h). */
double nb_selftest_dest_excess_ms(double lag_ms, double rtt_ms, uint64_t backlog);
/* A zeroed struct nb_dest_pace (core/converge.h), and its functions. */
void *nb_selftest_pace_new(void);
void nb_selftest_pace_free(void *p);
void nb_selftest_pace_sent(void *p, uint32_t round, uint64_t units);
void nb_selftest_pace_drained(void *p, uint32_t round, uint32_t applied,
                              double t_crossed);
/* The control channel read empty at `now`. */
void nb_selftest_pace_quiet(void *p, double now);
int nb_selftest_pace_applied(void *p, uint32_t applied, int waited,
                             double now, double rtt_ms);
double nb_selftest_pace_excess_ms(void *p);
/* nb_pace_throttle_ms (core/converge.h). */
double nb_selftest_pace_throttle_ms(void *p);
uint64_t nb_selftest_pace_backlog(void *p);
/* A zeroed struct nb_fit (core/converge.h), and its functions. */
void *nb_selftest_fit_new(void);
void nb_selftest_fit_free(void *f);
void nb_selftest_fit_caught_up(void *f);
void nb_selftest_fit_counted(void *f, uint64_t dirty, uint64_t before);
int nb_selftest_fit_round_left(void *f);
/* converge.h: below how many bytes the page connections end a drain. */
uint64_t nb_selftest_drain_threshold(double bandwidth, int channels);

#endif
