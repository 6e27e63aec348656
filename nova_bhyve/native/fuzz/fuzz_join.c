/*
 * Target "join": nb_join_check, a page channel joining a session of fixed
 * keys, as the destination's listener runs it on every new connection;
 * after a successful JOIN the channel is sealed and one page-channel
 * frame is received, as the destination's receivers do.
 *
 * Input: u8 mode, u8 channels, u8 index, corruptions, then the stream.
 *   mode bit 0: the stream is the rest of the input as raw bytes; else
 *               frames built from records (fuzz_wire.h)
 *        bit 1: the built stream starts with the valid JOIN for `index`
 *               (nb_join_send), and the frames after it are sealed
 *        bits 2-3: number of corruptions (u16 offset, u8 xor each)
 *   channels: the session's page channels (0..NB_MAX_CHANNELS)
 */
#include "fuzz_wire.h"

static struct nb_session_keys KEYS;

static void keys_init(void)
{
    memcpy(KEYS.key, FZ_KEY, NB_KEY);
    memcpy(KEYS.sid, FZ_SID, NB_SID);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz in = { data, size };
    uint8_t mode = fz_u8(&in), nch = fz_u8(&in) % (NB_MAX_CHANNELS + 1);
    uint16_t index = fz_u8(&in);
    struct fz cz = fz_split(&in, 3u * ((mode >> 2) & 3));
    struct nb_chan c = { .index = 0 };
    char err[NB_ERRLEN];
    uint8_t *stream;
    size_t len;
    int peer;

    if (size > 100000)
        return -1;
    if (!KEYS.sid[0])
        keys_init();
    if (mode & 1) {
        len = in.n;
        stream = malloc(len + 1);
        memcpy(stream, in.p, len);
    } else {
        struct nb_chan w;
        fz_writer_open(&w, index, 0);
        if (mode & 2 && (nb_join_send(&w, &KEYS, err) < 0 ||
                         nb_seal_start(&w, KEYS.key, 1, err) < 0))
            abort();
        fz_send_frames(&in, &w, FZ_MAX_FRAMES);
        stream = fz_writer_take(&w, &len);
    }
    fz_corrupt(cz, stream, len);
    c.fd = fz_stream(stream, len, &peer);
    free(stream);
    memset(err, 'X', sizeof(err));
    if (fz_debug("join", nb_join_check(&c, &KEYS, nch, err), err) == 0) {
        struct nb_frame f;
        if (c.index < 1 || c.index > nch)
            abort();    /* a JOIN accepted for a channel the session lacks */
        if (nb_seal_start(&c, KEYS.key, 0, err) < 0)
            abort();
        memset(err, 'X', sizeof(err));
        fz_debug("sealed frame", nb_recv_frame(&c, &f, NB_MAX_PAGES_FRAME, err), err);
    }
    nb_seal_free(&c);
    free(c.rbuf);
    close(c.fd);
    close(peer);
    return 0;
}

/* Seeds: valid JOINs followed by a sealed ROUND_END, and a forged one. */
static void fuzz_seeds(const char *dir)
{
    uint8_t rend[NB_ROUND_END_LEN] = { 0 };
    struct fz_buf b = { 0 };

    fz_put8(&b, 2);
    fz_put8(&b, 4);
    fz_put8(&b, 3);
    fz_put_frame(&b, NB_MSG_ROUND_END, rend, sizeof(rend));
    fz_seed(dir, "join-3-of-4", b.p, b.len);
    b.len = 0;
    fz_put8(&b, 2);
    fz_put8(&b, 2);
    fz_put8(&b, 3);
    fz_seed(dir, "join-3-of-2", b.p, b.len);
    b.len = 0;
    {   /* a JOIN with the right layout and a wrong proof */
        uint8_t msg[NB_JOIN_LEN] = { 0 };
        memcpy(msg, NB_WIRE_MAGIC, NB_MAGIC_LEN);
        memcpy(msg + 8, FZ_SID, NB_SID);
        nb_put16(msg + 24, 1);
        fz_put8(&b, 0);
        fz_put8(&b, 1);
        fz_put8(&b, 1);
        fz_put_frame(&b, NB_MSG_JOIN, msg, sizeof(msg));
        fz_seed(dir, "join-forged", b.p, b.len);
    }
    free(b.p);
}
