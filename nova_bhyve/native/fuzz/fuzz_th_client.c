/*
 * Target "th_client": the engine's side of the test host's control socket
 * (vmm/vmm_testhost.c, included for its static functions): reply lines,
 * the dirty-log replies and their runs of words (whole, peek, ranged), the
 * disk's dirty-block log (disk 0, or a disk that does not exist), the
 * state blob of save-state, and the simple requests, with the input as
 * everything the test host answers.
 *
 * Input: u8 operation, u8 bitmap words - 1, u8 first, u8 count, then the
 * test host's bytes.
 */
#include "../src/vmm/vmm_testhost.c"

#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz in = { data, size };
    uint8_t op = fz_u8(&in) % 9;
    size_t words = 1 + fz_u8(&in), first = fz_u8(&in), count = fz_u8(&in);
    struct th *t = calloc(1, sizeof(*t));
    struct nb_vmm v = { .ops = &testhost_ops, .priv = t };
    uint64_t *bitmap = calloc(words, 8);
    char err[NB_ERRLEN], line[REPLY_MAX];
    uint8_t *blob = NULL;
    size_t len;
    uint64_t nblocks;
    int peer, fd = -1, rc = 0;

    if (size > 100000)
        return -1;
    pthread_mutex_init(&t->lock, NULL);
    t->memfd = -1;
    t->sock = fz_stream(in.p, in.n, &peer);
    memset(err, 'X', sizeof(err));
    switch (op) {
    case 0: rc = th_dirty_log(&v, bitmap, words, err); break;
    case 1: rc = th_dirty_peek(&v, bitmap, words, err); break;
    case 2: rc = th_dirty_log_range(&v, first, count, bitmap, words, err); break;
    case 3:
        if ((rc = th_save(&v, &blob, &len, err)) == 0 && (!len || len > (16u << 20)))
            abort();
        free(blob);
        break;
    case 4: rc = th_load(&v, (const uint8_t *)"blob", 4, err); break;
    case 5: rc = th_pause(&v, err) || th_resume(&v, err) || th_throttle(&v, 50, err); break;
    case 6:
        rc = read_reply(t, line, &fd, err);
        if (rc == 0)
            fz_debug("memfd", rc, line);
        break;
    case 7:
        while ((rc = read_reply(t, line, NULL, err)) == 0)
            field(line, "bytes");
        break;
    case 8:
        rc = th_disk_dirty_log(&v, first % 2, bitmap, words, &nblocks, err);
        if (rc == 0 && nblocks > words * 64)
            abort();
        break;
    }
    fz_debug("th_client", rc, err);
    if (fd >= 0)
        close(fd);
    close(peer);
    th_close(&v);
    free(bitmap);
    return 0;
}

/* Seeds: the replies a test host with 4 MiB low and 1 MiB high memory gives. */
static void fuzz_seeds(const char *dir)
{
    static const char *replies[] = {
        "OK bytes=168 words=20 lowpages=1024 highpages=256 lowbytes=128\n",
        "OK bytes=168 words=20 lowpages=1024 highpages=256 lowbytes=128\n",
        "OK bytes=168 words=20 lowpages=1024 highpages=256 lowbytes=128\n",
        "OK bytes=8 crc32=0badf00d\n",
        "OK state=paused\n",
        "OK state=paused\nOK state=running\nOK throttle=50\n",
        "OK size=5242880 lowmem=4194304 highmem=1048576 highbase=4294967296 "
        "highoffset=4194304 page_size=4096\n",
        "OK state=running name=vm pid=1 cpus=2 mem=5242880\nERR EINVAL no\n",
        "OK bytes=160 blocks=1280 block_size=4096\n",
    };
    for (int op = 0; op < 9; op++) {
        struct fz_buf b = { 0 };
        char name[16];
        fz_put8(&b, (uint8_t)op);
        fz_put8(&b, 19);            /* 20 words: 1280 pages */
        fz_put8(&b, 2);
        fz_put8(&b, 3);
        fz_put(&b, replies[op], strlen(replies[op]));
        if (op <= 2) {              /* one run: words 0..19 */
            static const uint8_t run[8] = { 0, 0, 0, 0, 20, 0, 0, 0 };
            fz_put(&b, run, sizeof(run));
        }
        if (op <= 3 || op == 8) {   /* the payload the reply announces */
            uint8_t bits[160];
            memset(bits, 0xa5, sizeof(bits));
            fz_put(&b, bits, op == 3 ? 8 : 160);
        }
        snprintf(name, sizeof(name), "op-%d", op);
        fz_seed(dir, name, b.p, b.len);
        free(b.p);
    }
}
