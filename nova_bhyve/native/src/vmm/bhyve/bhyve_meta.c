/*
 * The checkpoint .meta validator and the save_state blob container of the
 * bhyve vmm port; declared in bhyve.h.
 *
 * bhyve's snapshot.c writes FILE.meta with libxo (JSON, pretty-printed;
 * numbers unquoted, strings quoted):
 *
 *   { "basic metadata": { "ncpus": N, "vmname": "S", "memsize": N,
 *                         "memflags": N },
 *     "kern_structs": [ { "device": "vhpet", "size": N, "file_offset": N },
 *                       ... ],
 *     "devices":      [ { "device": "NAME", "size": N, "file_offset": N },
 *                       ... ] }
 *
 * On restore (bhyve -r) it trusts size/file_offset into FILE.kern after
 * only assert()s (lookup_check_dev), so a truncated or tampered checkpoint
 * makes bhyve read out of bounds.  The validator parses strict JSON (what
 * libxo emits) with bounded depth and size and checks every range bhyve
 * will dereference.  Unknown members are ignored so that a newer bhyve
 * that adds fields still passes.
 *
 * Blob (save_state output, load_state input), little-endian:
 *
 *   0   8 bytes  "NBBHYVE1"
 *   8   u32      length of FILE.meta
 *   12  u32      length of FILE.kern
 *   16           FILE.meta, then FILE.kern; nothing after
 */
#include "vmm/bhyve/bhyve.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define fail nb_errf
#define sysfail nb_syserrf


/* ------------------------------------------------------------- JSON */

enum { J_OBJ = 1, J_ARR, J_STR, J_NUM, J_LIT };

struct jnode {
    uint8_t type;
    uint8_t num_ok;         /* J_NUM: an integer in 0..INT64_MAX */
    int32_t child, last, next;
    uint32_t key;           /* member name in the pool (object members) */
    uint32_t str, slen;     /* J_STR value in the pool */
    uint64_t num;
};

struct jp {
    const char *s;
    size_t n, i;
    struct jnode *nodes;
    int nn, cap;
    char *pool;             /* decoded strings, NUL-terminated */
    size_t plen;
    char *err;
};

#define J_MAX_NODES 65536
#define J_MAX_DEPTH 16

static void jws(struct jp *p)
{
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' ||
                           p->s[p->i] == '\n' || p->s[p->i] == '\r'))
        p->i++;
}

static int jnew(struct jp *p, uint8_t type)
{
    struct jnode *node;

    if (p->nn == p->cap) {
        int cap = p->cap ? p->cap * 2 : 64;
        struct jnode *nn;

        if (cap > J_MAX_NODES)
            return fail(p->err, ".meta has more than %d JSON values",
                        J_MAX_NODES);
        nn = realloc(p->nodes, (size_t)cap * sizeof(*nn));
        if (nn == NULL)
            return fail(p->err, "out of memory parsing .meta");
        p->nodes = nn;
        p->cap = cap;
    }
    node = &p->nodes[p->nn];
    memset(node, 0, sizeof(*node));
    node->type = type;
    node->child = node->last = node->next = -1;
    return p->nn++;
}

static int jhex(char h)
{
    return h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ?
           h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
}

/* Decode the string at p->i (its opening quote) into the pool. */
static int jstr(struct jp *p, uint32_t *off, uint32_t *len)
{
    static const char esc_in[] = "\"\\/bfnrt", esc_out[] = "\"\\/\b\f\n\r\t";
    size_t start = p->plen;

    p->i++;
    while (p->i < p->n && p->s[p->i] != '"') {
        unsigned char c = (unsigned char)p->s[p->i++];
        const char *e;
        unsigned v = 0;
        int k, d;

        if (c < 0x20)
            return fail(p->err, ".meta: control character in a string at "
                        "byte %zu", p->i - 1);
        if (c == '\\' && p->i < p->n) {
            c = (unsigned char)p->s[p->i++];
            if (c == 'u') {
                for (k = 0; k < 4; k++, p->i++) {
                    if (p->i >= p->n || (d = jhex(p->s[p->i])) < 0)
                        return fail(p->err, ".meta: bad \\u escape at byte "
                                    "%zu", p->i);
                    v = v * 16 + (unsigned)d;
                }
                if (v == 0 || v >= 0x80)
                    return fail(p->err, ".meta: \\u%04x at byte %zu: only "
                                "ASCII escapes are expected", v, p->i);
                c = (unsigned char)v;
            } else if (c != 0 && (e = strchr(esc_in, c)) != NULL) {
                c = (unsigned char)esc_out[e - esc_in];
            } else {
                return fail(p->err, ".meta: bad escape at byte %zu", p->i - 1);
            }
        }
        p->pool[p->plen++] = (char)c;
    }
    if (p->i >= p->n)
        return fail(p->err, ".meta: unterminated string (file truncated?)");
    p->i++;
    p->pool[p->plen++] = '\0';
    *off = (uint32_t)start;
    *len = (uint32_t)(p->plen - start - 1);
    return 0;
}

static int jvalue(struct jp *p, int depth);

static int jcontainer(struct jp *p, int depth, int is_obj)
{
    int node = jnew(p, is_obj ? J_OBJ : J_ARR), v;
    char close = is_obj ? '}' : ']';
    uint32_t key = 0, klen;

    if (node < 0)
        return -1;
    p->i++;
    jws(p);
    if (p->i < p->n && p->s[p->i] == close) {
        p->i++;
        return node;
    }
    for (;;) {
        jws(p);
        if (is_obj) {
            if (p->i >= p->n || p->s[p->i] != '"')
                return fail(p->err, ".meta: expected a member name at byte "
                            "%zu%s", p->i, p->i >= p->n ? " (truncated?)" : "");
            if (jstr(p, &key, &klen) != 0)
                return -1;
            jws(p);
            if (p->i >= p->n || p->s[p->i] != ':')
                return fail(p->err, ".meta: expected ':' at byte %zu", p->i);
            p->i++;
        }
        if ((v = jvalue(p, depth + 1)) < 0)
            return -1;
        p->nodes[v].key = key;
        if (p->nodes[node].last < 0)
            p->nodes[node].child = v;
        else
            p->nodes[p->nodes[node].last].next = v;
        p->nodes[node].last = v;
        jws(p);
        if (p->i < p->n && p->s[p->i] == ',') {
            p->i++;
            continue;
        }
        if (p->i < p->n && p->s[p->i] == close) {
            p->i++;
            return node;
        }
        return fail(p->err, ".meta: expected ',' or '%c' at byte %zu%s", close,
                    p->i, p->i >= p->n ? " (file truncated?)" : "");
    }
}

static size_t jdigits(struct jp *p)
{
    size_t start = p->i;

    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9')
        p->i++;
    return p->i - start;
}

static int jnumber(struct jp *p)
{
    int node = jnew(p, J_NUM), plain = 1;
    size_t start, nd;
    uint64_t v = 0;

    if (node < 0)
        return -1;
    if (p->s[p->i] == '-') {
        plain = 0;
        p->i++;
    }
    start = p->i;
    if ((nd = jdigits(p)) == 0 || (nd > 1 && p->s[start] == '0'))
        return fail(p->err, ".meta: bad number at byte %zu", start);
    if (p->i < p->n && p->s[p->i] == '.') {
        p->i++;
        plain = 0;
        if (jdigits(p) == 0)
            return fail(p->err, ".meta: bad number at byte %zu", p->i);
    }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        p->i++;
        plain = 0;
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-'))
            p->i++;
        if (jdigits(p) == 0)
            return fail(p->err, ".meta: bad number at byte %zu", p->i);
    }
    for (; plain && nd > 0; nd--, start++) {
        unsigned d = (unsigned)(p->s[start] - '0');

        if (v > (UINT64_C(0x7fffffffffffffff) - d) / 10)
            plain = 0;          /* beyond int64, which bhyve reads into */
        v = v * 10 + d;
    }
    p->nodes[node].num = v;
    p->nodes[node].num_ok = (uint8_t)plain;
    return node;
}

static int jvalue(struct jp *p, int depth)
{
    static const char *const lits[] = { "true", "false", "null" };
    int node, k;

    if (depth > J_MAX_DEPTH)
        return fail(p->err, ".meta nests deeper than %d levels", J_MAX_DEPTH);
    jws(p);
    if (p->i >= p->n)
        return fail(p->err, ".meta ends where a value was expected (file "
                    "truncated?)");
    if (p->s[p->i] == '{' || p->s[p->i] == '[')
        return jcontainer(p, depth, p->s[p->i] == '{');
    if (p->s[p->i] == '"') {
        uint32_t off, len;

        if ((node = jnew(p, J_STR)) < 0 || jstr(p, &off, &len) != 0)
            return -1;
        p->nodes[node].str = off;
        p->nodes[node].slen = len;
        return node;
    }
    if (p->s[p->i] == '-' || (p->s[p->i] >= '0' && p->s[p->i] <= '9'))
        return jnumber(p);
    for (k = 0; k < 3; k++) {
        size_t l = strlen(lits[k]);

        if (p->n - p->i >= l && memcmp(p->s + p->i, lits[k], l) == 0) {
            p->i += l;
            return jnew(p, J_LIT);
        }
    }
    return fail(p->err, ".meta: unexpected character at byte %zu", p->i);
}

/* The member `key` of object `obj`: it must exist once, with `type`. */
static int jget(struct jp *p, int obj, const char *key, int type,
                const char *where)
{
    static const char *const names[] = { "", "an object", "an array",
                                         "a string", "a number", "" };
    int c, found = -1;

    for (c = p->nodes[obj].child; c >= 0; c = p->nodes[c].next) {
        if (strcmp(p->pool + p->nodes[c].key, key) != 0)
            continue;
        if (found >= 0)
            return fail(p->err, ".meta: \"%s\" appears twice in %s", key,
                        where);
        found = c;
    }
    if (found < 0)
        return fail(p->err, ".meta: %s has no \"%s\" (not a bhyve checkpoint, "
                    "or one from an incompatible bhyve)", where, key);
    if (p->nodes[found].type != type)
        return fail(p->err, ".meta: \"%s\" in %s must be %s", key, where,
                    names[type]);
    return found;
}

static int jint(struct jp *p, int obj, const char *key, const char *where,
                uint64_t min, uint64_t max, uint64_t *out)
{
    int n = jget(p, obj, key, J_NUM, where);

    if (n < 0)
        return -1;
    if (!p->nodes[n].num_ok || p->nodes[n].num < min || p->nodes[n].num > max)
        return fail(p->err, ".meta: \"%s\" in %s must be an integer in "
                    "%llu..%llu", key, where, (unsigned long long)min,
                    (unsigned long long)max);
    *out = p->nodes[n].num;
    return 0;
}

/* ------------------------------------------------------ .meta checks */

struct jrange { uint64_t off, len; };

static int range_cmp(const void *a, const void *b)
{
    const struct jrange *x = a, *y = b;

    return x->off < y->off ? -1 : x->off > y->off;
}

/* Check the "kern_structs" or "devices" array; collect its ranges. */
static int check_entries(struct jp *p, int root, const char *key,
                         uint64_t kern_len, struct jrange *r, uint32_t *nr,
                         uint32_t *count)
{
    int arr = jget(p, root, key, J_ARR, "the top level"), e, name, o;
    int is_kern = strcmp(key, "kern_structs") == 0;
    uint32_t i = 0;
    char where[64];

    if (arr < 0)
        return -1;
    for (e = p->nodes[arr].child; e >= 0; e = p->nodes[e].next, i++) {
        uint64_t size = 0, off = 0;
        const char *dev;

        snprintf(where, sizeof(where), "%s[%u]", key, i);
        if (*nr >= NB_BHYVE_MAX_ENTRIES)
            return fail(p->err, ".meta lists more than %d saved structures",
                        NB_BHYVE_MAX_ENTRIES);
        if (p->nodes[e].type != J_OBJ)
            return fail(p->err, ".meta: %s must be an object", where);
        if ((name = jget(p, e, "device", J_STR, where)) < 0)
            return -1;
        dev = p->pool + p->nodes[name].str;
        if (p->nodes[name].slen == 0 || p->nodes[name].slen > 255)
            return fail(p->err, ".meta: %s has an empty or overlong name",
                        where);
        /* Kernel structures are looked up by name: one entry each.  Device
         * names may repeat in some bhyve versions, so only kern_structs. */
        for (o = p->nodes[arr].child; is_kern && o != e; o = p->nodes[o].next)
            if (strcmp(p->pool + p->nodes[jget(p, o, "device", J_STR, key)].str,
                       dev) == 0)
                return fail(p->err, ".meta: kernel structure \"%s\" is saved "
                            "twice", dev);
        /* bhyve's restore refuses zero sizes ("data with zero size"). */
        if (jint(p, e, "size", where, 1, NB_BHYVE_MAX_KERN, &size) != 0 ||
            jint(p, e, "file_offset", where, 0, NB_BHYVE_MAX_KERN, &off) != 0)
            return -1;
        if (off > kern_len || size > kern_len - off)
            return fail(p->err, ".meta: %s (\"%s\") covers .kern bytes "
                        "%llu..%llu but the .kern file has %llu: the "
                        "checkpoint is truncated or its files do not belong "
                        "together", where, dev, (unsigned long long)off,
                        (unsigned long long)(off + size),
                        (unsigned long long)kern_len);
        r[*nr].off = off;
        r[*nr].len = size;
        (*nr)++;
    }
    *count = i;
    return 0;
}

/* The "basic metadata" object. */
static int check_basic(struct jp *p, int root, uint64_t ram_len,
                       struct nb_bhyve_meta *m)
{
    const char *bm = "\"basic metadata\"";
    int basic, name;
    uint64_t v = 0;

    if ((basic = jget(p, root, "basic metadata", J_OBJ, "the top level")) < 0
        || jint(p, basic, "ncpus", bm, 1, NB_BHYVE_MAX_CPUS, &v) != 0)
        return -1;
    m->ncpus = (uint32_t)v;
    if (jint(p, basic, "memsize", bm, NB_PAGE, NB_BHYVE_MAX_MEMSIZE,
             &m->memsize) != 0 ||
        jint(p, basic, "memflags", bm, 0, INT32_MAX, &v) != 0)
        return -1;
    m->memflags = (int32_t)v;
    if (m->memsize % NB_PAGE != 0)
        return fail(p->err, ".meta: memsize %llu is not a multiple of the "
                    "page size", (unsigned long long)m->memsize);
    if (ram_len != 0 && ram_len != m->memsize)
        return fail(p->err, ".meta says %llu bytes of guest RAM but the RAM "
                    "file has %llu: the files are from different checkpoints",
                    (unsigned long long)m->memsize,
                    (unsigned long long)ram_len);
    if ((name = jget(p, basic, "vmname", J_STR, bm)) < 0)
        return -1;
    if (p->nodes[name].slen == 0 || p->nodes[name].slen >= sizeof(m->vmname) ||
        strchr(p->pool + p->nodes[name].str, '/') != NULL)
        return fail(p->err, ".meta: vmname must be 1..255 bytes without '/'");
    memcpy(m->vmname, p->pool + p->nodes[name].str, p->nodes[name].slen + 1);
    return 0;
}

int nb_bhyve_meta_check(const char *json, size_t len, uint64_t kern_len,
                        uint64_t ram_len, struct nb_bhyve_meta *meta,
                        char *err)
{
    struct jp p = { .s = json, .n = len, .err = err };
    struct jrange *r = NULL;
    struct nb_bhyve_meta m;
    uint32_t nr = 0, i;
    int root, rc = -1;

    memset(&m, 0, sizeof(m));
    if (json == NULL || len == 0)
        return fail(err, ".meta is empty: bhyve did not finish the checkpoint");
    if (len > NB_BHYVE_MAX_META)
        return fail(err, ".meta is %zu bytes, more than %u: not a bhyve "
                    "checkpoint", len, NB_BHYVE_MAX_META);
    if (kern_len == 0 || kern_len > NB_BHYVE_MAX_KERN)
        return fail(err, ".kern is %llu bytes: expected 1..%u",
                    (unsigned long long)kern_len, NB_BHYVE_MAX_KERN);
    p.pool = malloc(len + 1);
    r = calloc(NB_BHYVE_MAX_ENTRIES, sizeof(*r));
    if (p.pool == NULL || r == NULL) {
        fail(err, "out of memory checking .meta");
        goto out;
    }
    if ((root = jvalue(&p, 0)) < 0)
        goto out;
    jws(&p);
    if (p.i != p.n) {
        fail(err, ".meta: unexpected data after the JSON document at byte %zu",
             p.i);
        goto out;
    }
    if (p.nodes[root].type != J_OBJ) {
        fail(err, ".meta: the top level must be a JSON object");
        goto out;
    }
    if (check_basic(&p, root, ram_len, &m) != 0 ||
        check_entries(&p, root, "kern_structs", kern_len, r, &nr,
                      &m.nkern) != 0 ||
        check_entries(&p, root, "devices", kern_len, r, &nr, &m.ndev) != 0)
        goto out;
    if (m.nkern == 0) {
        fail(err, ".meta lists no kernel structures: bhyve did not finish "
             "the checkpoint");
        goto out;
    }
    qsort(r, nr, sizeof(*r), range_cmp);
    for (i = 0; i < nr; i++) {
        if (i > 0 && r[i - 1].off + r[i - 1].len > r[i].off) {
            fail(err, ".meta: saved structures overlap at .kern byte %llu: "
                 "the checkpoint is corrupt", (unsigned long long)r[i].off);
            goto out;
        }
        if (r[i].off + r[i].len > m.kern_used)
            m.kern_used = r[i].off + r[i].len;
    }
    if (meta != NULL)
        *meta = m;
    rc = 0;
out:
    free(p.nodes);
    free(p.pool);
    free(r);
    return rc;
}

/* ------------------------------------------------------------- blob */

static void put32le(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get32le(const uint8_t *p)
{
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

int nb_bhyve_blob_pack(uint8_t *out, size_t cap, size_t *len,
                       const uint8_t *meta, size_t meta_len,
                       const uint8_t *kern, size_t kern_len, char *err)
{
    if (meta_len == 0 || meta_len > NB_BHYVE_MAX_META || kern_len == 0 ||
        kern_len > NB_BHYVE_MAX_KERN)
        return fail(err, "checkpoint files of %zu (.meta) and %zu (.kern) "
                    "bytes are out of range", meta_len, kern_len);
    if (cap < NB_BHYVE_BLOB_HEADER + meta_len + kern_len)
        return fail(err, "blob buffer of %zu bytes is too small", cap);
    memcpy(out, NB_BHYVE_BLOB_MAGIC, 8);
    put32le(out + 8, (uint32_t)meta_len);
    put32le(out + 12, (uint32_t)kern_len);
    memcpy(out + NB_BHYVE_BLOB_HEADER, meta, meta_len);
    memcpy(out + NB_BHYVE_BLOB_HEADER + meta_len, kern, kern_len);
    *len = NB_BHYVE_BLOB_HEADER + meta_len + kern_len;
    return 0;
}

int nb_bhyve_blob_parse(const uint8_t *blob, size_t len,
                        size_t *meta_off, size_t *meta_len,
                        size_t *kern_off, size_t *kern_len, char *err)
{
    uint32_t ml, kl;

    if (blob == NULL || len < NB_BHYVE_BLOB_HEADER ||
        memcmp(blob, NB_BHYVE_BLOB_MAGIC, 8) != 0)
        return fail(err, "device state is not a bhyve checkpoint blob (no %s "
                    "magic): was it saved by another vmm port?",
                    NB_BHYVE_BLOB_MAGIC);
    ml = get32le(blob + 8);
    kl = get32le(blob + 12);
    if (ml == 0 || ml > NB_BHYVE_MAX_META || kl == 0 ||
        kl > NB_BHYVE_MAX_KERN ||
        (uint64_t)NB_BHYVE_BLOB_HEADER + ml + kl != len)
        return fail(err, "bhyve checkpoint blob of %zu bytes declares %u "
                    "(.meta) + %u (.kern) bytes: truncated or corrupt",
                    len, ml, kl);
    if (nb_bhyve_meta_check((const char *)blob + NB_BHYVE_BLOB_HEADER, ml, kl,
                            0, NULL, err) != 0)
        return -1;
    *meta_off = NB_BHYVE_BLOB_HEADER;
    *meta_len = ml;
    *kern_off = NB_BHYVE_BLOB_HEADER + ml;
    *kern_len = kl;
    return 0;
}
