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
                      char *out, size_t cap)
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
int nb_preamble_check(const char *src, const char *dst, char *err, size_t errlen)
{
    static const char *equal[] = { "protocol", "cipher", "arch", "page_size", "cpu_vendor",
                                   "ncpus", "memory", "segments", "segment.0",
                                   "segment.1", "state_format" };
    char a[128], b[128];

    for (size_t i = 0; i < sizeof(equal) / sizeof(equal[0]); i++) {
        int ha = nb_preamble_get(src, equal[i], a, sizeof(a)) == 0;
        int hb = nb_preamble_get(dst, equal[i], b, sizeof(b)) == 0;
        if (ha != hb || (ha && strcmp(a, b) != 0)) {
            snprintf(err, errlen, "incompatible hosts: %s is %s on the source "
                     "and %s on the destination", equal[i], ha ? a : "(absent)",
                     hb ? b : "(absent)");
            return -1;
        }
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
