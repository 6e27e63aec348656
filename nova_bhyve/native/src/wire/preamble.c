/*
 * The compatibility preamble: "key=value" lines each side writes, the
 * destination's check, and what the destination takes from the source's
 * (the guest's shape for a new checkpoint, mode, channels, verification).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/wire.h"

/* Write this side's preamble: "key=value\n" lines (see PROTOCOL.md). */
int nb_preamble_write(const struct nb_guest_spec *s, const struct nb_mig_params *p,
                      const struct nb_disk_spec *d, char *out, size_t cap)
{
    static const char *modes[] = { "live", "warm", "cold" };
    size_t n = 0;
    int w;

#define ADD(...)                                                        \
    do {                                                                \
        w = snprintf(out + n, cap - n, __VA_ARGS__);                    \
        if (w < 0 || (size_t)w >= cap - n)                              \
            return -1;                                                  \
        n += (size_t)w;                                                 \
    } while (0)

    ADD("protocol=%d\nengine=nova-bhyve-live/0.1\n", NB_PROTO_VERSION);
    ADD("mode=%s\n", modes[p->mode >= 0 && p->mode <= 2 ? p->mode : 0]);
    ADD("arch=%s\npage_size=%u\ncpu_vendor=%s\nncpus=%u\nstate_format=%s\n",
        s->arch, s->page_size, s->cpu_vendor, s->ncpus, s->state_format);
    ADD("memory=%llu\nsegments=%d\n", (unsigned long long)s->layout.total,
        s->layout.nsegs);
    for (int i = 0; i < s->layout.nsegs; i++)
        ADD("segment.%d=%llx:%llx\n", i, (unsigned long long)s->layout.seg[i].gpa,
            (unsigned long long)s->layout.seg[i].len);
    for (uint32_t i = 0; i < s->nfeat && i < NB_MAX_CPUID_WORDS; i++)
        ADD("cpuid.%x.%x.%c=%08x\n", s->feat[i].leaf, s->feat[i].sub,
            "abcd"[s->feat[i].reg & 3], s->feat[i].bits);
    ADD("channels=%d\ncompress=%s\nverify=%s\npaused=%d\ncipher=%s\n", p->channels,
        p->compress == NB_COMPRESS_AUTO ? "auto" : p->compress ? "zstd" : "none",
        p->verify == NB_VERIFY_FULL ? "full" : "incremental",
        p->keep_paused ? 1 : 0, p->plaintext_pages ? "none" : "aes-256-gcm");
    ADD("disks=%u\n", d ? d->ndisks : 0);
    for (uint32_t i = 0; d && i < d->ndisks && i < NB_MAX_DISKS; i++)
        ADD("disk.%u=%llu:%u\n", i, (unsigned long long)d->size[i], NB_DISK_BLOCK);
    if (d && d->nstreams)       /* absent means 0: a v4 peer without streams */
        ADD("streams=%u\n", d->nstreams);
#undef ADD
    return (int)n;
}

/* Copy the value of `key` from preamble text; returns 0 if present. */
int nb_preamble_get(const char *text, const char *key, char *out, size_t cap)
{
    size_t kl = strlen(key);
    for (const char *p = text; p && *p;) {
        const char *e = strchr(p, '\n');
        size_t ll = e ? (size_t)(e - p) : strlen(p);
        if (ll > kl && strncmp(p, key, kl) == 0 && p[kl] == '=') {
            size_t vl = ll - kl - 1;
            if (vl >= cap)
                vl = cap - 1;
            memcpy(out, p + kl + 1, vl);
            out[vl] = 0;
            return 0;
        }
        p = e ? e + 1 : NULL;
    }
    return -1;
}

/*
 * Decide whether a guest described by the source preamble may run on the
 * destination.  Layout, page size, vCPUs, architecture, CPU vendor and
 * device-state format must be equal; every CPU feature the guest may be
 * using must exist on the destination.
 */
/* -1 with a message if `key` differs between the two preambles (a
 * missing `disks` or `streams` reads as 0, as nb_preamble_read_disks
 * takes it). */
static int differs(const char *src, const char *dst, const char *key, char *err,
                   size_t errlen)
{
    char a[128], b[128];
    int ha = nb_preamble_get(src, key, a, sizeof(a)) == 0;
    int hb = nb_preamble_get(dst, key, b, sizeof(b)) == 0;

    if (!strcmp(key, "disks") || !strcmp(key, "streams")) {
        if (!ha)
            snprintf(a, sizeof(a), "0");
        if (!hb)
            snprintf(b, sizeof(b), "0");
        ha = hb = 1;
    }
    if (ha == hb && (!ha || strcmp(a, b) == 0))
        return 0;
    snprintf(err, errlen, "incompatible hosts: %s is %s on the source and %s on "
             "the destination", key, ha ? a : "(absent)", hb ? b : "(absent)");
    return -1;
}

int nb_preamble_check(const char *src, const char *dst, char *err, size_t errlen)
{
    static const char *equal[] = { "protocol", "cipher", "arch", "page_size", "cpu_vendor",
                                   "ncpus", "memory", "segments", "segment.0",
                                   "segment.1", "state_format", "disks",
                                   "streams" };
    char b[128], disk[32];

    for (size_t i = 0; i < sizeof(equal) / sizeof(equal[0]); i++)
        if (differs(src, dst, equal[i], err, errlen) < 0)
            return -1;
    for (int i = 0; i < NB_MAX_DISKS; i++) {
        snprintf(disk, sizeof(disk), "disk.%d", i);
        if (differs(src, dst, disk, err, errlen) < 0)
            return -1;
    }
    for (const char *p = src; p && *p;) {
        const char *e = strchr(p, '\n');
        if (strncmp(p, "cpuid.", 6) == 0) {
            char key[64], *eq;
            size_t ll = e ? (size_t)(e - p) : strlen(p);
            unsigned long sv, dv;
            if (ll >= sizeof(key))
                ll = sizeof(key) - 1;
            memcpy(key, p, ll);
            key[ll] = 0;
            eq = strchr(key, '=');
            if (!eq) {          /* no value, or one past the key buffer */
                snprintf(err, errlen, "incompatible hosts: the source's CPU "
                         "feature line %.40s... is malformed", key);
                return -1;
            }
            *eq = 0;
            sv = strtoul(eq + 1, NULL, 16);
            if (nb_preamble_get(dst, key, b, sizeof(b)) < 0) {
                snprintf(err, errlen, "incompatible hosts: the destination does "
                         "not describe CPU feature word %s", key);
                return -1;
            }
            dv = strtoul(b, NULL, 16);
            if (sv & ~dv) {
                snprintf(err, errlen, "incompatible CPUs: feature word %s has bits "
                         "%08lx on the source that the destination lacks",
                         key, sv & ~dv);
                return -1;
            }
        }
        p = e ? e + 1 : NULL;
    }
    return 0;
}

static int parse_u(const char *text, const char *key, uint64_t *v)
{
    char buf[64], *end;
    if (nb_preamble_get(text, key, buf, sizeof(buf)) < 0)
        return -1;
    *v = strtoull(buf, &end, 0);
    return *end ? -1 : 0;
}

/* The guest described by a preamble (a destination checkpoint takes it). */
int nb_preamble_read_spec(const char *text, struct nb_guest_spec *s, char *err)
{
    uint64_t v, nsegs;
    memset(s, 0, sizeof(*s));
    if (nb_preamble_get(text, "arch", s->arch, sizeof(s->arch)) < 0 ||
        nb_preamble_get(text, "cpu_vendor", s->cpu_vendor, sizeof(s->cpu_vendor)) < 0 ||
        nb_preamble_get(text, "state_format", s->state_format,
                        sizeof(s->state_format)) < 0 ||
        parse_u(text, "page_size", &v) < 0 || v != NB_PAGE ||
        parse_u(text, "ncpus", &v) < 0 || v < 1 || v > 1024)
        goto bad;
    s->page_size = NB_PAGE;
    parse_u(text, "ncpus", &v);
    s->ncpus = (uint32_t)v;
    if (parse_u(text, "segments", &nsegs) < 0 || nsegs < 1 || nsegs > NB_MAX_SEGS)
        goto bad;
    s->layout.nsegs = (int)nsegs;
    for (int i = 0; i < (int)nsegs; i++) {
        char key[32], val[64], *colon;
        snprintf(key, sizeof(key), "segment.%d", i);
        if (nb_preamble_get(text, key, val, sizeof(val)) < 0 ||
            !(colon = strchr(val, ':')))
            goto bad;
        *colon = 0;
        s->layout.seg[i].gpa = strtoull(val, NULL, 16);
        s->layout.seg[i].len = strtoull(colon + 1, NULL, 16);
        s->layout.seg[i].offset = s->layout.total;
        if (s->layout.seg[i].len == 0 || s->layout.seg[i].len > (1ULL << 40) ||
            s->layout.seg[i].gpa % NB_PAGE || s->layout.seg[i].len % NB_PAGE)
            goto bad;
        s->layout.total += s->layout.seg[i].len;
    }
    /* the guest's CPU feature words travel with it */
    for (const char *p = text; p && *p && s->nfeat < NB_MAX_CPUID_WORDS;) {
        unsigned leaf, sub, bits;
        char reg;
        if (sscanf(p, "cpuid.%x.%x.%c=%x", &leaf, &sub, &reg, &bits) == 4 &&
            reg >= 'a' && reg <= 'd')
            s->feat[s->nfeat++] = (typeof(s->feat[0])){ leaf, sub,
                                                        (uint32_t)(reg - 'a'), bits };
        p = strchr(p, '\n');
        p = p ? p + 1 : NULL;
    }
    return 0;
bad:
    snprintf(err, NB_ERRLEN, "the source's preamble does not describe a guest "
             "this host can hold");
    return -1;
}

/* Mode, verification, paused and channel count from the source's preamble. */
int nb_preamble_read_opts(const char *text, struct nb_preamble_opts *o, char *err)
{
    char mode[16] = "live", verify[16] = "full", paused[4] = "0";
    uint64_t channels;

    if (parse_u(text, "channels", &channels) < 0 || channels < 1 ||
        channels > NB_MAX_CHANNELS) {
        snprintf(err, NB_ERRLEN, "source asks for an invalid channel count");
        return -1;
    }
    nb_preamble_get(text, "mode", mode, sizeof(mode));
    nb_preamble_get(text, "verify", verify, sizeof(verify));
    nb_preamble_get(text, "paused", paused, sizeof(paused));
    o->channels = (int)channels;
    o->mode = !strcmp(mode, "warm") ? NB_MODE_WARM
              : !strcmp(mode, "cold") ? NB_MODE_COLD : NB_MODE_LIVE;
    o->verify = strcmp(verify, "incremental") ? NB_VERIFY_FULL
                                              : NB_VERIFY_INCREMENTAL;
    o->keep_paused = !strcmp(paused, "1");  /* arrives paused */
    return 0;
}

/* One `disk.N=size:block_size` line, checked: a size of 1 byte to 16 TiB
 * in whole sectors, blocks of NB_DISK_BLOCK bytes. */
static int read_disk_line(const char *text, uint32_t i, uint64_t *size, char *err)
{
    char key[32], val[64], *colon, *end;
    unsigned long long bs;

    snprintf(key, sizeof(key), "disk.%u", i);
    if (nb_preamble_get(text, key, val, sizeof(val)) < 0 ||
        !(colon = strchr(val, ':'))) {
        snprintf(err, NB_ERRLEN, "the source announces disk %u without its "
                 "size and block size", i);
        return -1;
    }
    *colon = 0;
    *size = strtoull(val, &end, 10);
    if (*end || *size == 0 || *size % 512 || *size > NB_MAX_DISK_SIZE) {
        snprintf(err, NB_ERRLEN, "disk %u: size %s is not a whole number of "
                 "512-byte sectors up to 16 TiB", i, val);
        return -1;
    }
    bs = strtoull(colon + 1, &end, 10);
    if (*end || bs != NB_DISK_BLOCK) {
        snprintf(err, NB_ERRLEN, "disk %u: block size %s is not supported (this "
                 "engine moves %u-byte blocks)", i, colon + 1, NB_DISK_BLOCK);
        return -1;
    }
    return 0;
}

/* The disks a source's preamble announces (none without `disks`), and
 * its stream disks (none without `streams`). */
int nb_preamble_read_disks(const char *text, struct nb_disk_spec *d, char *err)
{
    uint64_t n = 0;
    char buf[24];

    memset(d, 0, sizeof(*d));
    if (nb_preamble_get(text, "disks", buf, sizeof(buf)) == 0 &&
        (parse_u(text, "disks", &n) < 0 || n > NB_MAX_DISKS)) {
        snprintf(err, NB_ERRLEN, "the source announces an invalid disk count "
                 "(0..%d)", NB_MAX_DISKS);
        return -1;
    }
    d->ndisks = (uint32_t)n;
    for (uint32_t i = 0; i < d->ndisks; i++)
        if (read_disk_line(text, i, &d->size[i], err) < 0)
            return -1;
    n = 0;
    if (nb_preamble_get(text, "streams", buf, sizeof(buf)) == 0 &&
        (parse_u(text, "streams", &n) < 0 || n > NB_MAX_STREAMS)) {
        snprintf(err, NB_ERRLEN, "the source announces an invalid stream count "
                 "(0..%d)", NB_MAX_STREAMS);
        return -1;
    }
    d->nstreams = (uint32_t)n;
    return 0;
}
