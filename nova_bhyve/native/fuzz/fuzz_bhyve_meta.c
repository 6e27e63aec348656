/*
 * Target "bhyve_meta": the bhyve port's checks of untrusted checkpoint
 * data (vmm/bhyve/): the .meta JSON validator (bhyve_meta.c,
 * nb_bhyve_meta_check), the save_state blob parser (nb_bhyve_blob_parse)
 * and the restore-side writer of a received blob (bhyve_ckpt.c,
 * nb_bhyve_restore_files, into a private temporary directory whose RAM
 * file has RAM_BYTES).
 *
 * Input: u8 mode, then
 *   mode 0: u32 .kern length, u8 RAM selector, the .meta text
 *   mode 1: a blob
 *   mode 2: a blob, written as restore files
 */
#include <sys/stat.h>

#include "fuzz_util.h"
#include "vmm/bhyve/bhyve.h"

#define RAM_BYTES (1u << 20)

static char DIR_[64], RAM[128];

static void remove_files(void)
{
    char path[160];
    snprintf(path, sizeof(path), "%s.kern", RAM);
    unlink(path);
    snprintf(path, sizeof(path), "%s.meta", RAM);
    unlink(path);
    unlink(RAM);
    rmdir(DIR_);
}

/* The restore target: DIR/ram of RAM_BYTES, removed at exit. */
static void ram_init(void)
{
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    int fd;

    snprintf(DIR_, sizeof(DIR_), "%s/nb-fuzz-XXXXXX", base);
    if (!mkdtemp(DIR_))
        abort();
    snprintf(RAM, sizeof(RAM), "%s/ram", DIR_);
    if ((fd = open(RAM, O_CREAT | O_RDWR | O_CLOEXEC, 0600)) < 0 ||
        ftruncate(fd, RAM_BYTES) < 0)
        abort();
    close(fd);
    atexit(remove_files);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint64_t rams[4] = { 0, RAM_BYTES, NB_PAGE, 3ull << 30 };
    struct fz in = { data, size };
    uint8_t mode = fz_u8(&in) % 3;
    char err[NB_ERRLEN];
    size_t mo, ml, ko, kl;

    if (size > NB_BHYVE_MAX_META + 64)
        return -1;
    memset(err, 'X', sizeof(err));
    if (mode == 0) {
        uint32_t kern = fz_u32(&in);
        uint64_t ram = rams[fz_u8(&in) & 3];
        struct nb_bhyve_meta meta;
        int rc = nb_bhyve_meta_check((const char *)in.p, in.n, kern, ram, &meta, err);
        if (fz_debug("meta_check", rc, err) == 0 &&
            (meta.nkern == 0 || meta.kern_used > kern || !meta.vmname[0] ||
             (ram && meta.memsize != ram)))
            abort();    /* accepted a checkpoint the checks should refuse */
    } else if (mode == 1) {
        int rc = nb_bhyve_blob_parse(in.p, in.n, &mo, &ml, &ko, &kl, err);
        if (fz_debug("blob_parse", rc, err) == 0 &&
            (mo + ml != ko || ko + kl != in.n))
            abort();
    } else {
        struct nb_bhyve_opts o;
        if (!RAM[0])
            ram_init();
        memset(&o, 0, sizeof(o));
        strcpy(o.name, "fuzz");
        strcpy(o.restore, RAM);
        fz_debug("restore_files", nb_bhyve_restore_files(&o, in.p, in.n, err), err);
    }
    return 0;
}

/* Seeds: a .meta as bhyve's snapshot.c writes it, alone and in blobs. */
static void fuzz_seeds(const char *dir)
{
    static const char meta[] =
        "{\n  \"basic metadata\": {\n    \"ncpus\": 2,\n    \"vmname\": "
        "\"guest\\u0031\",\n    \"memsize\": 1048576,\n    \"memflags\": 0\n  },\n"
        "  \"kern_structs\": [\n    {\"device\": \"vhpet\", \"size\": 64, "
        "\"file_offset\": 0},\n    {\"device\": \"vm\", \"size\": 32, "
        "\"file_offset\": 64}\n  ],\n  \"devices\": [\n    {\"device\": "
        "\"atkbdc\", \"size\": 16, \"file_offset\": 96},\n    {\"device\": "
        "\"virtio-net\", \"size\": 8, \"file_offset\": 112, \"extra\": "
        "[true, null, -1.5e3]}\n  ]\n}\n";
    uint8_t kern[128], blob[16 + sizeof(meta) + sizeof(kern)];
    struct fz_buf b = { 0 };
    char err[NB_ERRLEN];
    size_t len;

    memset(kern, 0xee, sizeof(kern));
    fz_put8(&b, 0);
    fz_put32(&b, sizeof(kern));
    fz_put8(&b, 1);
    fz_put(&b, meta, sizeof(meta) - 1);
    fz_seed(dir, "meta", b.p, b.len);
    if (nb_bhyve_blob_pack(blob + 1, sizeof(blob) - 1, &len, (const uint8_t *)meta,
                           sizeof(meta) - 1, kern, sizeof(kern), err) < 0)
        abort();
    blob[0] = 1;
    fz_seed(dir, "blob", blob, len + 1);
    blob[0] = 2;
    fz_seed(dir, "restore", blob, len + 1);
    free(b.p);
}
