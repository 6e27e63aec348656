/*
 * FILE.meta of a checkpoint file set (CHECKPOINT.md): the parser, the
 * checks and the writer; declared in ckpt_meta.h.
 *
 * The file is a flat JSON object whose values are strings or non-negative
 * integers.  It is untrusted input: the parser is strict (no duplicate
 * members, no nesting, bounded sizes) and every field is checked before
 * the engine sizes anything by it.
 */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "vmm/ckpt_meta.h"
#include "vmm/vmm.h"

/* ------------------------------------------------------------- CRC-32 */

uint32_t nb_crc32_ieee(const uint8_t *data, size_t len)
{
    static const uint32_t nibble[16] = {
        0x00000000, 0x1db71064, 0x3b6e20c8, 0x26d930ac,
        0x76dc4190, 0x6b6b51f4, 0x4db26158, 0x5005713c,
        0xedb88320, 0xf00f9344, 0xd6d6a3e8, 0xcb61b38c,
        0x9b64c2b0, 0x86d3d2d4, 0xa00ae278, 0xbdbdf21c,
    };
    uint32_t c = 0xffffffffu;

    for (size_t i = 0; i < len; i++) {
        c ^= data[i];
        c = (c >> 4) ^ nibble[c & 15];
        c = (c >> 4) ^ nibble[c & 15];
    }
    return c ^ 0xffffffffu;
}

/* ------------------------------------------------------------- fields */

enum { F_STR, F_U32, F_U64 };

/* What the parser collects: the meta and the one older-only member. */
struct parsed {
    struct nb_ckpt_meta m;
    char kern_format[32];   /* checkpoint.py's sets before version 2 */
    uint32_t seen;          /* bit i: FIELDS[i] was present */
};

#define FIELD(name, type, member) \
    { #name, type, offsetof(struct parsed, member), sizeof(((struct parsed *)0)->member) }

static const struct field {
    const char *name;
    int type;
    size_t off, size;
} FIELDS[] = {
    FIELD(version, F_U32, m.version),
    FIELD(vmname, F_STR, m.vmname),
    FIELD(ncpus, F_U32, m.ncpus),
    FIELD(memsize, F_U64, m.memsize),
    FIELD(lowmem, F_U64, m.lowmem),
    FIELD(highmem, F_U64, m.highmem),
    FIELD(highbase, F_U64, m.highbase),
    FIELD(page_size, F_U32, m.page_size),
    FIELD(state_format, F_STR, m.state_format),
    FIELD(kern_bytes, F_U64, m.kern_bytes),
    FIELD(kern_crc32, F_U32, m.kern_crc32),
    FIELD(arch, F_STR, m.arch),
    FIELD(cpu_vendor, F_STR, m.cpu_vendor),
    FIELD(kern_format, F_STR, kern_format),
};
#define NFIELDS ((int)(sizeof(FIELDS) / sizeof(FIELDS[0])))
enum { I_VERSION, I_VMNAME, I_NCPUS, I_MEMSIZE, I_LOWMEM, I_HIGHMEM, I_HIGHBASE,
       I_PAGE_SIZE, I_STATE_FORMAT, I_KERN_BYTES, I_KERN_CRC32, I_ARCH,
       I_CPU_VENDOR, I_KERN_FORMAT };
#define BIT(i) (1u << (i))
/* Every member of version 2, and the four an older set always had. */
#define V2_REQUIRED (BIT(I_KERN_FORMAT) - 1)
#define OLD_REQUIRED (BIT(I_NCPUS) | BIT(I_MEMSIZE) | BIT(I_LOWMEM) | BIT(I_HIGHMEM))

static int field_index(const char *name)
{
    for (int i = 0; i < NFIELDS; i++)
        if (strcmp(FIELDS[i].name, name) == 0)
            return i;
    return -1;
}

/* ------------------------------------------------------------- JSON */

struct reader {
    const char *s;
    size_t n, i;
    char *err;
};

static void skip_space(struct reader *r)
{
    while (r->i < r->n && (r->s[r->i] == ' ' || r->s[r->i] == '\t' ||
                           r->s[r->i] == '\n' || r->s[r->i] == '\r'))
        r->i++;
}

static int expect(struct reader *r, char c)
{
    skip_space(r);
    if (r->i >= r->n || r->s[r->i] != c) {
        snprintf(r->err, NB_ERRLEN, "not a flat JSON object: '%c' expected at "
                 "byte %zu", c, r->i);
        return -1;
    }
    r->i++;
    return 0;
}

/* One escape after the backslash: the character it stands for, or -1. */
static int unescape(struct reader *r)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    const char *hit;
    unsigned code = 0;

    if (r->i >= r->n)
        return -1;
    if ((hit = strchr(from, r->s[r->i])) != NULL && *hit) {
        r->i++;
        return to[hit - from];
    }
    if (r->s[r->i] != 'u' || r->i + 5 > r->n)
        return -1;
    for (int k = 1; k <= 4; k++) {
        char h = r->s[r->i + k];
        code = code * 16 + (h >= '0' && h <= '9' ? (unsigned)(h - '0')
                            : h >= 'a' && h <= 'f' ? (unsigned)(h - 'a' + 10)
                            : h >= 'A' && h <= 'F' ? (unsigned)(h - 'A' + 10) : 99);
    }
    if (code >= 0x80)           /* writers put non-ASCII text as UTF-8 */
        return -1;
    r->i += 5;
    return (int)code;
}

/* A string into out (cap bytes with the NUL); `what` names it in errors. */
static int read_string(struct reader *r, char *out, size_t cap, const char *what)
{
    size_t len = 0;

    if (expect(r, '"') < 0)
        return -1;
    while (r->i < r->n && r->s[r->i] != '"') {
        int c = (unsigned char)r->s[r->i++];
        if (c < 0x20 || (c == '\\' && (c = unescape(r)) < 0)) {
            snprintf(r->err, NB_ERRLEN, "%s: bad character or escape at byte %zu",
                     what, r->i - 1);
            return -1;
        }
        if (len + 1 >= cap) {
            snprintf(r->err, NB_ERRLEN, "%s is longer than %zu bytes", what, cap - 1);
            return -1;
        }
        out[len++] = (char)c;
    }
    if (r->i >= r->n) {
        snprintf(r->err, NB_ERRLEN, "%s: unterminated string", what);
        return -1;
    }
    r->i++;
    out[len] = 0;
    return 0;
}

/* A non-negative integer without sign, fraction, exponent or leading 0. */
static int read_uint(struct reader *r, uint64_t *v, const char *what)
{
    size_t start = r->i;

    *v = 0;
    while (r->i < r->n && r->s[r->i] >= '0' && r->s[r->i] <= '9') {
        unsigned d = (unsigned)(r->s[r->i++] - '0');
        if (*v > (UINT64_MAX - d) / 10) {
            snprintf(r->err, NB_ERRLEN, "%s is out of range", what);
            return -1;
        }
        *v = *v * 10 + d;
    }
    if (r->i == start || (r->s[start] == '0' && r->i - start > 1) ||
        (r->i < r->n && strchr(".eE-+", r->s[r->i]) && r->s[r->i])) {
        snprintf(r->err, NB_ERRLEN, "%s is not a non-negative integer", what);
        return -1;
    }
    return 0;
}

/* The value of member `name`: stored if it is a field, else checked and
 * dropped (a newer writer may add members). */
static int read_value(struct reader *r, struct parsed *p, const char *name)
{
    int i = field_index(name);
    int type = i >= 0 ? FIELDS[i].type : -1;
    char scratch[NB_CKPT_META_MAX];
    uint64_t v;

    skip_space(r);
    if (r->i < r->n && r->s[r->i] == '"' && type != F_U32 && type != F_U64)
        return type == F_STR
            ? read_string(r, (char *)p + FIELDS[i].off, FIELDS[i].size, name)
            : read_string(r, scratch, sizeof(scratch), name);
    if (type == F_STR) {
        snprintf(r->err, NB_ERRLEN, "%s is not a string", name);
        return -1;
    }
    if (read_uint(r, &v, name) < 0)
        return -1;
    if (type == F_U32 && v > UINT32_MAX) {
        snprintf(r->err, NB_ERRLEN, "%s is out of range", name);
        return -1;
    }
    if (type == F_U32)
        *(uint32_t *)((char *)p + FIELDS[i].off) = (uint32_t)v;
    else if (type == F_U64)
        *(uint64_t *)((char *)p + FIELDS[i].off) = v;
    return 0;
}

/* The members of the object, each name at most once. */
static int read_object(struct reader *r, struct parsed *p)
{
    char name[64];

    if (expect(r, '{') < 0)
        return -1;
    skip_space(r);
    if (r->i < r->n && r->s[r->i] == '}')
        r->i++;
    else
        for (;;) {
            int i;
            if (read_string(r, name, sizeof(name), "a member name") < 0 ||
                expect(r, ':') < 0)
                return -1;
            i = field_index(name);
            if (i >= 0 && (p->seen & BIT(i))) {
                snprintf(r->err, NB_ERRLEN, "%s appears twice", name);
                return -1;
            }
            if (read_value(r, p, name) < 0)
                return -1;
            if (i >= 0)
                p->seen |= BIT(i);
            skip_space(r);
            if (r->i < r->n && r->s[r->i] == '}') {
                r->i++;
                break;
            }
            if (expect(r, ',') < 0)
                return -1;
        }
    skip_space(r);
    if (r->i != r->n) {
        snprintf(r->err, NB_ERRLEN, "not a flat JSON object: data after it");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------- versions */

static int missing(uint32_t seen, uint32_t required, char *err)
{
    for (int i = 0; i < NFIELDS; i++)
        if ((required & BIT(i)) && !(seen & BIT(i))) {
            snprintf(err, NB_ERRLEN, "lacks %s", FIELDS[i].name);
            return -1;
        }
    return 0;
}

/* checkpoint.py's kern_format names, before version 2 named state_format. */
static int state_format_of(const char *kern_format, char *out, size_t cap, char *err)
{
    static const char *const names[][2] = {
        { "nb-testhost-state-1", "nbvmstat/1" },
        { "bhyve", "bhyve-ckpt/1" },
    };

    for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++)
        if (strcmp(kern_format, names[k][0]) == 0) {
            snprintf(out, cap, "%s", names[k][1]);
            return 0;
        }
    snprintf(err, NB_ERRLEN, "unknown kern_format \"%.64s\"", kern_format);
    return -1;
}

/* A set written before version 2: the engine's (version 1) or
 * checkpoint.py's (no version); defaults for what either lacked. */
static int fill_older(struct parsed *p, char *err)
{
    uint32_t kern = BIT(I_KERN_BYTES) | BIT(I_KERN_CRC32);

    if (missing(p->seen, OLD_REQUIRED, err) < 0)
        return -1;
    if (!(p->seen & BIT(I_HIGHBASE)))
        p->m.highbase = NB_CKPT_HIGHBASE;
    if (!(p->seen & BIT(I_PAGE_SIZE)))
        p->m.page_size = NB_PAGE;
    if ((p->seen & kern) != 0 && (p->seen & kern) != kern) {
        snprintf(err, NB_ERRLEN, "has only one of kern_bytes and kern_crc32");
        return -1;
    }
    p->m.kern_recorded = (p->seen & kern) == kern;
    if (p->seen & BIT(I_STATE_FORMAT))
        return 0;
    if (p->seen & BIT(I_KERN_FORMAT))
        return state_format_of(p->kern_format, p->m.state_format,
                               sizeof(p->m.state_format), err);
    snprintf(p->m.state_format, sizeof(p->m.state_format), "nbvmstat/1");
    return 0;
}

/* The checks every version passes: a VM the engine can size by it. */
static int check_fields(const struct nb_ckpt_meta *m, char *err)
{
    const char *why = NULL;

    if (m->ncpus < 1 || m->ncpus > NB_CKPT_MAX_CPUS)
        why = "ncpus is out of range";
    else if (m->page_size != NB_PAGE)
        why = "page_size is not 4096";
    else if (m->lowmem > m->memsize || m->memsize - m->lowmem != m->highmem)
        why = "lowmem + highmem != memsize";
    else if (m->lowmem == 0 || m->lowmem % NB_PAGE || m->highmem % NB_PAGE)
        why = "lowmem or highmem is not a positive number of pages";
    else if (m->memsize > NB_CKPT_MAX_MEMSIZE)
        why = "memsize is over 1 TiB";
    else if (m->highmem && (m->highbase < m->lowmem || m->highbase % NB_PAGE ||
                            m->highbase > NB_CKPT_MAX_HIGHBASE))
        why = "highbase is below lowmem, unaligned or out of range";
    else if (!m->state_format[0])
        why = "state_format is empty";
    else if (m->kern_recorded && (m->kern_bytes < 1 || m->kern_bytes > NB_CKPT_KERN_MAX))
        why = "kern_bytes out of range";
    if (why)
        snprintf(err, NB_ERRLEN, "%s", why);
    return why ? -1 : 0;
}

int nb_ckpt_meta_parse(const char *text, size_t len, struct nb_ckpt_meta *meta,
                       char *err)
{
    struct parsed p;
    struct reader r = { text, len, 0, err };

    memset(&p, 0, sizeof(p));
    if (len > NB_CKPT_META_MAX) {
        snprintf(err, NB_ERRLEN, "is over %d bytes", NB_CKPT_META_MAX);
        return -1;
    }
    if (read_object(&r, &p) < 0)
        return -1;
    if (p.seen & BIT(I_VERSION)) {
        if (p.m.version < 1 || p.m.version > NB_CKPT_META_VERSION) {
            snprintf(err, NB_ERRLEN, "has version %u; this reader knows 1 to %d",
                     p.m.version, NB_CKPT_META_VERSION);
            return -1;
        }
    }
    if (p.m.version == NB_CKPT_META_VERSION) {
        if (missing(p.seen, V2_REQUIRED, err) < 0)
            return -1;
        p.m.kern_recorded = 1;
    } else if (fill_older(&p, err) < 0) {
        return -1;
    }
    if (check_fields(&p.m, err) < 0)
        return -1;
    *meta = p.m;
    return 0;
}

int nb_ckpt_meta_check_sizes(const struct nb_ckpt_meta *meta, uint64_t ram_bytes,
                             uint64_t kern_bytes, char *err)
{
    if (ram_bytes != meta->memsize) {
        snprintf(err, NB_ERRLEN, "the RAM file has %llu bytes, memsize says %llu",
                 (unsigned long long)ram_bytes, (unsigned long long)meta->memsize);
        return -1;
    }
    if (meta->kern_recorded ? kern_bytes != meta->kern_bytes
                            : kern_bytes < 1 || kern_bytes > NB_CKPT_KERN_MAX) {
        snprintf(err, NB_ERRLEN, "the state file has %llu bytes, %s",
                 (unsigned long long)kern_bytes,
                 meta->kern_recorded ? "not kern_bytes" : "out of range");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------- writer */

/* `s` as a JSON string, escaped as Python's json module does for ASCII. */
static size_t put_string(char *out, size_t cap, const char *s)
{
    size_t n = 0;

#define PUT(...) (n += (size_t)snprintf(out + (n < cap ? n : cap), \
                                        n < cap ? cap - n : 0, __VA_ARGS__))
    PUT("\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        const char *esc = c == '"' ? "\\\"" : c == '\\' ? "\\\\" : c == '\n' ? "\\n"
                        : c == '\r' ? "\\r" : c == '\t' ? "\\t" : c == '\b' ? "\\b"
                        : c == '\f' ? "\\f" : NULL;
        if (esc)
            PUT("%s", esc);
        else if (c < 0x20)
            PUT("\\u%04x", c);
        else
            PUT("%c", c);
    }
    PUT("\"");
#undef PUT
    return n;
}

int nb_ckpt_meta_format(const struct nb_ckpt_meta *m, char *out, size_t cap,
                        size_t *len, char *err)
{
    size_t n = 0;

    if (!m->kern_recorded) {
        snprintf(err, NB_ERRLEN, "kern_bytes and kern_crc32 are not set");
        return -1;
    }
    if (check_fields(m, err) < 0)
        return -1;
#define AT out + (n < cap ? n : cap), n < cap ? cap - n : 0
    n += (size_t)snprintf(AT, "{\n \"arch\": ");
    n += put_string(AT, m->arch);
    n += (size_t)snprintf(AT, ",\n \"cpu_vendor\": ");
    n += put_string(AT, m->cpu_vendor);
    n += (size_t)snprintf(AT,
            ",\n \"highbase\": %llu,\n \"highmem\": %llu,\n \"kern_bytes\": %llu,"
            "\n \"kern_crc32\": %u,\n \"lowmem\": %llu,\n \"memsize\": %llu,"
            "\n \"ncpus\": %u,\n \"page_size\": %u,\n \"state_format\": ",
            (unsigned long long)m->highbase, (unsigned long long)m->highmem,
            (unsigned long long)m->kern_bytes, m->kern_crc32,
            (unsigned long long)m->lowmem, (unsigned long long)m->memsize,
            m->ncpus, m->page_size);
    n += put_string(AT, m->state_format);
    n += (size_t)snprintf(AT, ",\n \"version\": %d,\n \"vmname\": ",
                          NB_CKPT_META_VERSION);
    n += put_string(AT, m->vmname);
    n += (size_t)snprintf(AT, "\n}\n");
#undef AT
    if (n >= cap) {
        snprintf(err, NB_ERRLEN, "checkpoint metadata is over %zu bytes", cap - 1);
        return -1;
    }
    *len = n;
    return 0;
}
