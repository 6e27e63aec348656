/*
 * Helpers shared by the libFuzzer targets (engine and test host): a reader
 * that takes fields off the front of the input, a stream socket already
 * holding bytes for a receive path to read, and seed output.
 *
 * Every target defines fuzz_seeds(dir): with NB_FUZZ_SEEDS=DIR in the
 * environment the target writes its valid example inputs into DIR (made
 * with the project's own encoders) and exits instead of fuzzing.
 */
#ifndef NB_FUZZ_UTIL_H
#define NB_FUZZ_UTIL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* The input, consumed from the front; reads past the end give zeros. */
struct fz {
    const uint8_t *p;
    size_t n;
};

static inline uint8_t fz_u8(struct fz *f)
{
    if (!f->n)
        return 0;
    f->n--;
    return *f->p++;
}

static inline uint16_t fz_u16(struct fz *f)
{
    uint16_t lo = fz_u8(f);
    return (uint16_t)(lo | fz_u8(f) << 8);
}

static inline uint32_t fz_u32(struct fz *f)
{
    uint32_t lo = fz_u16(f);
    return lo | (uint32_t)fz_u16(f) << 16;
}

static inline uint64_t fz_u64(struct fz *f)
{
    uint64_t lo = fz_u32(f);
    return lo | (uint64_t)fz_u32(f) << 32;
}

/* Up to `want` bytes; *got says how many there were. */
static inline const uint8_t *fz_take(struct fz *f, size_t want, size_t *got)
{
    const uint8_t *p = f->p;
    *got = want < f->n ? want : f->n;
    f->p += *got;
    f->n -= *got;
    return p;
}

/* The next `want` bytes (fewer at the end) as an input of their own. */
static inline struct fz fz_split(struct fz *f, size_t want)
{
    size_t got;
    const uint8_t *p = fz_take(f, want, &got);
    return (struct fz){ p, got };
}

/* The rest of the input as a malloc()ed NUL-terminated string. */
static inline char *fz_cstr(struct fz *f)
{
    char *s = malloc(f->n + 1);
    if (!s)
        abort();
    memcpy(s, f->p, f->n);
    s[f->n] = 0;
    f->p += f->n;
    f->n = 0;
    return s;
}

/*
 * A connected stream socket whose peer has sent `len` bytes of `buf` and
 * shut its sending side: a receive path reads them, then end of stream.
 * Both ends are non-blocking so that nothing can hang; what does not fit
 * the socket buffer is dropped (a truncated stream).  *peer is the other
 * end, kept open so that replies do not fail; close both afterwards.
 */
static inline int fz_stream(const void *buf, size_t len, int *peer)
{
    int sv[2], big = 1 << 20;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
        abort();
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
    if (len && send(sv[1], buf, len, MSG_NOSIGNAL) < 0) {
        /* nothing sent: an empty stream */
    }
    shutdown(sv[1], SHUT_WR);
    *peer = sv[1];
    return sv[0];
}

/* Write one seed file DIR/NAME. */
static inline void fz_seed(const char *dir, const char *name, const void *buf,
                           size_t len)
{
    char path[4096];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if (!(f = fopen(path, "wb")) || fwrite(buf, 1, len, f) != len || fclose(f)) {
        perror(path);
        exit(1);
    }
}

/* A growable byte buffer for building seeds. */
struct fz_buf {
    uint8_t *p;
    size_t len, cap;
};

static inline void fz_put(struct fz_buf *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        b->cap = (b->len + len) * 2 + 64;
        if (!(b->p = realloc(b->p, b->cap)))
            abort();
    }
    memcpy(b->p + b->len, data, len);
    b->len += len;
}

static inline void fz_put8(struct fz_buf *b, uint8_t v) { fz_put(b, &v, 1); }

static inline void fz_put16(struct fz_buf *b, uint16_t v)
{
    uint8_t le[2] = { (uint8_t)v, (uint8_t)(v >> 8) };
    fz_put(b, le, 2);
}

static inline void fz_put32(struct fz_buf *b, uint32_t v)
{
    fz_put16(b, (uint16_t)v);
    fz_put16(b, (uint16_t)(v >> 16));
}

static void fuzz_seeds(const char *dir);

/*
 * With NB_FUZZ_DEBUG set, say what a call returned (checking seeds).  A
 * failure must say why: targets fill `err` (256 bytes or more) with 'X'
 * before the call, and a -1 that left no message there is a finding.
 */
static int FZ_DEBUG;

static inline int fz_debug(const char *what, int rc, const char *err)
{
    if (rc < 0 && !memchr(err, 0, 256)) {
        fprintf(stderr, "%s failed without an error message\n", what);
        abort();
    }
    if (FZ_DEBUG)
        fprintf(stderr, "%s: %d%s%s\n", what, rc, rc ? ": " : "", rc ? err : "");
    return rc;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *dir = getenv("NB_FUZZ_SEEDS");

    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN);
    FZ_DEBUG = getenv("NB_FUZZ_DEBUG") != NULL;
    if (dir) {
        fuzz_seeds(dir);
        exit(0);
    }
    return 0;
}

#endif
