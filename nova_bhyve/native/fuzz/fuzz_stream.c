/*
 * Target "stream": STREAM frames applied in order as the destination's
 * receiver on a page channel applies them (core/stream.c,
 * nb_stream_apply): nb_stream_parse, the channel, round, stream and part
 * checks, the bytes written to each part's descriptor (/dev/null here),
 * and an END frame's length and CRC-32C against what was written.
 *
 * Input: u8 channel, u8 round, then frames, each u16 length and that many
 * payload bytes, applied until one is refused.  Two streams.
 */
#include "fuzz_util.h"

#include "core/nbmig.h"

#define STREAMS 2

static struct nb_mig M;

static void session_reset(void)
{
    nb_stream_close(&M);
    M.nstreams = STREAMS;
    for (int i = 0; i < STREAMS; i++) {
        struct nb_stream *s = &M.stream[i];
        for (int p = 0; p < NB_STREAM_PARTS; p++)
            if ((s->fd[p] = open("/dev/null", O_WRONLY | O_CLOEXEC)) < 0)
                abort();
        s->notify_fd = s->status_fd = -1;
        s->part = 0;
        s->bytes = 0;
        s->crc = 0;
        atomic_store(&s->precopied, 0);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz in = { data, size };
    int chan = fz_u8(&in) % 3;
    uint32_t round = fz_u8(&in);
    char err[NB_ERRLEN];
    int kind;

    if (!M.nstreams) {
        for (int i = 0; i < NB_MAX_STREAMS; i++)
            M.stream[i].fd[0] = M.stream[i].fd[1] = M.stream[i].notify_fd =
                M.stream[i].status_fd = -1;
        pthread_mutex_init(&M.lock, NULL);
    }
    session_reset();
    while (in.n) {
        size_t want = fz_u16(&in), got;
        const uint8_t *p = fz_take(&in, want, &got);
        uint8_t *copy = malloc(got ? got : 1);
        struct nb_frame f = { .type = NB_MSG_STREAM, .channel = (uint16_t)chan,
                              .len = (uint32_t)got, .payload = copy };
        int rc;

        memcpy(copy, p, got);
        memset(err, 'X', sizeof(err));
        rc = fz_debug("stream", nb_stream_apply(&M, chan, &f, round, &kind, err), err);
        free(copy);
        for (int i = 0; i < STREAMS; i++) {
            const struct nb_stream *s = &M.stream[i];
            if (s->part > NB_STREAM_PARTS || (s->part > 0 && s->fd[0] >= 0) ||
                (s->part > 1 && s->fd[1] >= 0))
                abort();    /* a part ended but its consumer never saw it */
        }
        if (rc < 0)
            break;
    }
    return 0;
}

/* Seeds: both parts of stream 1 whole, and an END whose CRC is wrong. */
static void put_data(struct fz_buf *b, uint16_t stream, uint8_t part,
                     const char *text)
{
    uint8_t frame[NB_STREAM_HDR + 64];
    size_t n = strlen(text);

    nb_stream_data_put(frame, 0, stream, part);
    memcpy(frame + NB_STREAM_HDR, text, n);
    fz_put16(b, (uint16_t)(NB_STREAM_HDR + n));
    fz_put(b, frame, NB_STREAM_HDR + n);
}

static void put_end(struct fz_buf *b, uint16_t stream, uint8_t part,
                    const char *text, uint32_t crc_xor)
{
    uint8_t frame[NB_STREAM_HDR + NB_STREAM_END_LEN];
    size_t n = nb_stream_end_put(frame, 0, stream, part, strlen(text),
                                 nb_crc32c(0, text, strlen(text)) ^ crc_xor);
    fz_put16(b, (uint16_t)n);
    fz_put(b, frame, n);
}

static void fuzz_seeds(const char *dir)
{
    struct fz_buf b = { 0 };

    fz_put8(&b, 1);
    fz_put8(&b, 0);
    put_data(&b, 1, 0, "the full send");
    put_end(&b, 1, 0, "the full send", 0);
    put_data(&b, 1, 1, "the increment");
    put_end(&b, 1, 1, "the increment", 0);
    fz_seed(dir, "two-parts", b.p, b.len);
    b.len = 0;
    fz_put8(&b, 1);
    fz_put8(&b, 0);
    put_data(&b, 0, 0, "bytes");
    put_end(&b, 0, 0, "bytes", 1);
    fz_seed(dir, "bad-crc", b.p, b.len);
    free(b.p);
}
