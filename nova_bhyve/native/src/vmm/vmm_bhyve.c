/*
 * The FreeBSD bhyve vmm port (FreeBSD amd64; elsewhere nb_vmm_open_bhyve
 * fails with "only available on FreeBSD").  Written against FreeBSD 15.x
 * interfaces: vmm(4) ioctls on /dev/vmm/NAME, bhyve's checkpoint socket
 * (BHYVE_SNAPSHOT builds), rctl(4).  The portable pieces (nvlist packing,
 * dirty-list conversion, layout, options; .meta validation and the state
 * blob; the checkpoint socket client) are in bhyve_msg.c, bhyve_meta.c and
 * bhyve_ckpt.c.
 *
 * Target: "NAME[,key=value...]", keys (bhyve_msg.c):
 *   rundir=DIR      checkpoint socket directory (/var/run/bhyve; the
 *                   socket is DIR/NAME, as bhyvectl uses)
 *   scratch=DIR     where save_state lets bhyve write a checkpoint
 *                   (/var/tmp; needs free space for all of guest RAM)
 *   restore=PATH    RAM file load_state writes PATH.kern/PATH.meta beside
 *   pid=N / pidfile=PATH   the bhyve process, for throttling
 *   timeout=S       seconds to wait for a checkpoint (600)
 *   exit_on_save=1  save_state sends suspend=true: bhyve exits after it
 *
 * Memory.  VM_MMAP_GETNEXT + VM_GET_MEMSEG list the mappings; unnamed
 * segments are guest RAM (named ones are bootrom/framebuffer devmem).
 * Lowmem (GPA 0, up to 3 GiB) and highmem (GPA 4 GiB) are mapped MAP_SHARED
 * from /dev/vmm/NAME, whose mmap offset is the GPA, at base+0 and
 * base+lowmem inside one MAP_GUARD reservation.  next_data reports all of
 * RAM as data: residency (mincore) cannot tell swapped-out pages from
 * never-written ones, so no holes are skipped.
 *
 * Dirty log.  Stock vmm(4) has none.  The University Politehnica of
 * Bucharest (UPB) migration branch adds VM_GET_DIRTY_PAGE_LIST ('v', 117):
 * one byte per page over a compacted index (lowmem pages, then highmem
 * pages), for resident pages only; other bytes are left untouched, so the
 * port zeroes the list first.  Unlike the engine's get-and-clear contract
 * the call only tests: a page's dirty state is cleared when the page is
 * copied out with VM_COPY_VMM_PAGES ('v', 118, VMM_GET_PAGES), which is
 * how UPB's own bhyve sends pages.  The port therefore follows each list
 * with VM_COPY_VMM_PAGES over the dirty pages into a scratch buffer (the
 * data is discarded), then returns the bitmap; the engine copies those
 * pages from the mapping afterwards, so a write racing the clear is either
 * in the engine's copy or dirty again next round.  Costs one extra kernel
 * copy per dirty page.  has_dirty_log is 1 only when the probe at open
 * succeeds (an ioctl with empty segments: it matches no map entry and
 * writes nothing) and it is safe to use:
 *   - guest memory is wired (bhyve -S): the list misses pages that were
 *     paged out after being dirtied;
 *   - the CPU has no SMAP: VM_COPY_VMM_PAGES memcpy()s into the user
 *     buffer without copyout(9), a fatal fault under SMAP (early UPB
 *     versions do the same in VM_GET_DIRTY_PAGE_LIST);
 *   - lowmem is exactly 3 GiB when highmem exists (UPB hard-codes it).
 * The UPB handlers return -1 (ERESTART, an endless restart) on a NULL
 * list or segments matching no map entry; the port never passes those.
 * The upstreamable alternative is illumos bhyve's VM_TRACK_DIRTY_PAGES
 * (struct vmm_dirty_tracker {start GPA, length, bit vector}): one bit per
 * page of a GPA range, read from the nested page tables' dirty bits and
 * cleared as they are read, i.e. get-and-clear by design (newer illumos:
 * VM_NPT_OPERATION with separate get/reset-dirty flags).
 *
 * Pause/resume.  VM_SUSPEND_CPU / VM_RESUME_CPU with vcpuid -1 (all
 * vCPUs; MAYBE_ALLOC_VCPU in 15.x vmm_dev.c).  The ioctl only requests the
 * stop, so pause then freezes each active vCPU once with VM_GET_REGISTER
 * (it waits until the vCPU has left the guest; bhyve's vCPU threads then
 * spin in vmexit_debug).  Device emulation threads keep running: DMA can
 * change guest RAM while vCPUs are paused; only bhyve's checkpoint pauses
 * devices, and only during the checkpoint.
 *
 * Throttle.  rctl_add_rule(2) "process:PID:pcpu:deny=N" with N =
 * ncpus * (100 - percent), as `rctl -a` does; percent 0 and close remove
 * the rule.  The PID is pid=, else pidfile=, else the checkpoint socket
 * peer (LOCAL_PEERCRED, whose xucred carries the listener's pid; bhyve
 * logs one "nvlist_recv() failed" for that probe connection); it must
 * name a process called "bhyve".  Needs kern.racct.enable=1.
 *
 * save_state.  Device and vCPU state exist only inside bhyve; its one
 * outside entry is the checkpoint socket (bhyve_ckpt.c).  save_state makes
 * a private directory under scratch and sends what `bhyvectl --checkpoint`
 * sends: nvlist {cmd, filename, suspend, fddir}, the directory by
 * SCM_RIGHTS.  bhyve pauses vCPUs and devices, writes ckpt (ALL of guest
 * RAM: downtime grows by RAM size / scratch write bandwidth; put scratch on
 * fast storage or tmpfs), ckpt.kern and ckpt.meta, and closes the
 * connection: EOF marks completion.  The files are validated (.meta is
 * untrusted: bhyve checks it only with assert()), and ckpt.meta + ckpt.kern
 * come back as one malloc()ed blob (bhyve_meta.c; the caller frees it).
 *   Default (suspend=false): bhyve resumes the vCPUs when done, and the
 *   port pauses them again at once.  The guest may run for a moment in
 *   between, after its device state was saved; the engine's memory digest
 *   then differs and the migration fails safely (and can be retried).
 *   exit_on_save=1 (suspend=true): bhyve destroys the VM and exits instead
 *   of resuming, so nothing runs after the checkpoint; the mapping keeps
 *   guest RAM readable for the digest.  The checkpoint is kept in
 *   SCRATCH/nb-bhyve-NAME.ckpt: if the migration does not commit, restart
 *   the source with `bhyve -r SCRATCH/nb-bhyve-NAME.ckpt/ckpt`; remove the
 *   directory after a commit.  pause/resume then fail saying so.
 *
 * load_state.  A running bhyve cannot take state: restore is `bhyve -r
 * PATH` at process start.  On an open VM, load_state validates the blob
 * and writes PATH.kern and PATH.meta (atomically, 0600) for restore=PATH,
 * checking PATH's size when the RAM file already exists, and returns 0;
 * starting `bhyve -r PATH` is the driver's job.
 *
 * Restore-only mode (the migration destination).  If /dev/vmm/NAME does
 * not exist and restore= is given, the port opens in restore-only mode
 * (bhyve_restore.c, portable): it needs ncpus= and memsize= as well,
 * creates PATH sized to memsize= and maps it as guest RAM (libvmmapi's
 * layout), so the engine receives memory straight into the file `bhyve -r
 * PATH` reads; load_state keeps the checked state and the commit (resume)
 * flushes PATH and writes PATH.kern, then PATH.meta.  Only this mode is
 * available off FreeBSD amd64.
 *   restore=PATH    RAM file to create (restore-only mode)
 *   ncpus=N         vCPUs of the incoming VM (bhyve -c N)
 *   memsize=BYTES   its guest RAM (bhyve -m), a multiple of 4096
 */
#include "vmm/vmm.h"
#include "vmm/bhyve/bhyve.h"

#include <stdio.h>
#include <string.h>

#if defined(__FreeBSD__) && defined(__amd64__)

#include <sys/param.h>
#include <sys/types.h>
#include <sys/cpuset.h>
#include <sys/domainset.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/rctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysctl.h>
#include <sys/ucred.h>
#include <sys/un.h>
#include <sys/user.h>

#include <machine/vmm.h>
#include <machine/vmm_dev.h>

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <unistd.h>

#define fail nb_errf
#define sysfail nb_syserrf

/* The UPB migration branch's ABI (its sys/amd64/include/vmm_dev.h and
 * vmm_migration.h); stock headers do not have it. */
struct nb_upb_segment {
    uint64_t start, end;                    /* vm_offset_t: GPA range */
};
struct nb_upb_dirty_list {
    uint8_t *page_list;
    size_t num_pages;
    struct nb_upb_segment lowmem, highmem;
};
#define NB_UPB_PAGE_CHUNK   10              /* VMM_PAGE_CHUNK */
#define NB_UPB_GET_PAGES    0               /* VMM_GET_PAGES */
struct nb_upb_page {
    uint64_t pindex;                        /* compacted page index */
    uint8_t *page;
};
struct nb_upb_pages_req {
    size_t pages_required;
    int req_type;                           /* enum migration_req_type */
    struct nb_upb_segment lowmem_segment, highmem_segment;
    struct nb_upb_page pages[NB_UPB_PAGE_CHUNK];
};
#define NB_VM_GET_DIRTY_PAGE_LIST \
    _IOWR('v', 117, struct nb_upb_dirty_list)
#define NB_VM_COPY_VMM_PAGES \
    _IOWR('v', 118, struct nb_upb_pages_req)

#define NB_MAX_MAPS 32

struct bhyve {
    struct nb_bhyve_opts o;
    int fd;                 /* /dev/vmm/NAME */
    uint8_t *map;
    int wired, has_dirty, paused, throttled, ncpus;
    int exited;             /* bhyve exited after an exit_on_save checkpoint */
    pid_t pid;
    char dirty_reason[NB_ERRLEN];
    uint8_t *list;          /* UPB list: one byte per page (mlock()ed) */
    uint8_t *scratch;       /* NB_UPB_PAGE_CHUNK pages (mlock()ed) */
    size_t npages;
};



static struct bhyve *B(struct nb_vmm *vmm)
{
    return vmm->priv;
}

static int need_vm(struct bhyve *b, char *err)
{
    char dir[300];

    if (b->exited) {
        nb_bhyve_keep_dir(&b->o, dir, sizeof(dir));
        return fail(err, "VM %s exited after its final checkpoint "
                    "(exit_on_save=1): if the migration did not commit, "
                    "restart it with bhyve -r %s/%s", b->o.name, dir,
                    NB_BHYVE_CKPT_NAME);
    }
    if (b->fd >= 0)
        return 0;
    return fail(err, "VM %s is not open (/dev/vmm/%s)", b->o.name,
                b->o.name);
}

/* ----------------------------------------------------------- memory */

static int read_layout(struct nb_vmm *vmm, struct bhyve *b, char *err)
{
    struct nb_bhyve_map maps[NB_MAX_MAPS];
    struct vm_memmap mm;
    struct vm_memseg ms;
    vm_paddr_t gpa = 0;
    int n = 0;

    for (;;) {
        memset(&mm, 0, sizeof(mm));
        mm.gpa = gpa;
        if (ioctl(b->fd, VM_MMAP_GETNEXT, &mm) != 0) {
            if (errno == ENOENT)
                break;
            return sysfail(err, "VM_MMAP_GETNEXT on /dev/vmm/%s", b->o.name);
        }
        if (n == NB_MAX_MAPS)
            return fail(err, "VM %s has more than %d memory mappings",
                        b->o.name, NB_MAX_MAPS);
        memset(&ms, 0, sizeof(ms));
        ms.segid = mm.segid;
        if (ioctl(b->fd, VM_GET_MEMSEG, &ms) != 0)
            return sysfail(err, "VM_GET_MEMSEG %d on /dev/vmm/%s", mm.segid,
                           b->o.name);
        maps[n].gpa = mm.gpa;
        maps[n].len = mm.len;
        maps[n].sysmem = ms.name[0] == '\0';
        maps[n].wired = (mm.flags & VM_MEMMAP_F_WIRED) != 0;
        n++;
        gpa = mm.gpa + mm.len;
    }
    return nb_bhyve_layout(maps, n, &vmm->layout, &b->wired, err);
}

static int bh_map_memory(struct nb_vmm *vmm, uint8_t **base, char *err)
{
    struct bhyve *b = B(vmm);
    const struct nb_layout *l = &vmm->layout;
    uint8_t *p, *q;
    int i;

    if (need_vm(b, err) != 0)
        return -1;
    if (b->map == NULL) {
        p = mmap(NULL, l->total, PROT_NONE, MAP_GUARD | MAP_ALIGNED_SUPER, -1,
                 0);
        if (p == MAP_FAILED)
            return sysfail(err, "cannot reserve %llu bytes of address space "
                           "for guest RAM", (unsigned long long)l->total);
        for (i = 0; i < l->nsegs; i++) {
            q = mmap(p + l->seg[i].offset, l->seg[i].len,
                     PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_FIXED | MAP_NOCORE, b->fd,
                     (off_t)l->seg[i].gpa);
            if (q == MAP_FAILED) {
                sysfail(err, "cannot map guest RAM GPA 0x%llx+0x%llx from "
                        "/dev/vmm/%s", (unsigned long long)l->seg[i].gpa,
                        (unsigned long long)l->seg[i].len, b->o.name);
                munmap(p, l->total);
                return -1;
            }
        }
        b->map = p;
        vmm->mem = p;
    }
    *base = b->map;
    return 0;
}

static int bh_next_data(struct nb_vmm *vmm, uint64_t offset,
                        uint64_t *data_off, uint64_t *data_end)
{
    if (offset >= vmm->layout.total)
        return 1;
    *data_off = offset;
    *data_end = vmm->layout.total;
    return 0;
}

/* ------------------------------------------------------------ dirty log */

static void upb_segments(const struct nb_layout *l, struct nb_upb_segment *lo,
                         struct nb_upb_segment *hi)
{
    lo->start = 0;
    lo->end = l->seg[0].len;
    hi->start = hi->end = 0;
    if (l->nsegs == 2) {
        hi->start = l->seg[1].gpa;
        hi->end = l->seg[1].gpa + l->seg[1].len;
    }
}

static int cpu_has_smap(void)
{
    uint32_t a = 0, bx, c = 0, d;

    __asm__ volatile("cpuid" : "+a"(a), "=b"(bx), "+c"(c), "=d"(d));
    if (a < 7)
        return 0;
    a = 7;
    c = 0;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(bx), "+c"(c), "=d"(d));
    return (bx >> 20) & 1;                  /* CPUID.(7,0):EBX.SMAP */
}

static void probe_dirty_log(struct nb_vmm *vmm, struct bhyve *b)
{
    struct nb_upb_dirty_list dl;
    uint8_t byte = 0;
    int rc, e;

    /* Empty segments match no map entry: the kernel writes nothing. */
    memset(&dl, 0, sizeof(dl));
    dl.page_list = &byte;
    dl.num_pages = 1;
    rc = ioctl(b->fd, NB_VM_GET_DIRTY_PAGE_LIST, &dl);
    e = rc != 0 ? errno : 0;
    b->has_dirty = nb_bhyve_probe_decide(rc, e, b->wired, cpu_has_smap(),
                                         &vmm->layout, b->dirty_reason);
    if (!b->has_dirty)
        return;
    b->npages = vmm->layout.total / NB_PAGE;
    b->list = malloc(b->npages);
    b->scratch = malloc(NB_UPB_PAGE_CHUNK * NB_PAGE);
    /* The kernel writes these through user pointers: keep them resident. */
    if (b->list == NULL || b->scratch == NULL ||
        mlock(b->list, b->npages) != 0 ||
        mlock(b->scratch, NB_UPB_PAGE_CHUNK * NB_PAGE) != 0) {
        snprintf(b->dirty_reason, NB_ERRLEN, "cannot allocate and lock %zu "
                 "bytes for the dirty-page list: %s", b->npages,
                 strerror(errno));
        b->has_dirty = 0;
    }
}

static int bh_has_dirty_log(struct nb_vmm *vmm)
{
    return B(vmm)->has_dirty;
}

/* Clear the UPB dirty state of every page set in b->list. */
static int upb_clear(struct nb_vmm *vmm, struct bhyve *b, char *err)
{
    struct nb_upb_pages_req req;
    size_t i, n = 0;

    memset(&req, 0, sizeof(req));
    req.req_type = NB_UPB_GET_PAGES;
    upb_segments(&vmm->layout, &req.lowmem_segment, &req.highmem_segment);
    for (i = 0; i <= b->npages; i++) {
        if (n == NB_UPB_PAGE_CHUNK || (i == b->npages && n > 0)) {
            req.pages_required = n;
            if (ioctl(b->fd, NB_VM_COPY_VMM_PAGES, &req) != 0)
                return sysfail(err, "VM_COPY_VMM_PAGES (clearing dirty "
                               "pages) on /dev/vmm/%s", b->o.name);
            n = 0;
        }
        if (i < b->npages && b->list[i] != 0) {
            req.pages[n].pindex = i;
            req.pages[n].page = b->scratch + n * NB_PAGE;
            n++;
        }
    }
    return 0;
}

static int bh_dirty_log(struct nb_vmm *vmm, uint64_t *bitmap, size_t words,
                        char *err)
{
    struct bhyve *b = B(vmm);
    struct nb_upb_dirty_list dl;

    if (!b->has_dirty)
        return fail(err, "no dirty-page log for VM %s: %s", b->o.name,
                    b->dirty_reason);
    memset(b->list, 0, b->npages);
    memset(&dl, 0, sizeof(dl));
    dl.page_list = b->list;
    dl.num_pages = b->npages;
    upb_segments(&vmm->layout, &dl.lowmem, &dl.highmem);
    if (ioctl(b->fd, NB_VM_GET_DIRTY_PAGE_LIST, &dl) != 0)
        return sysfail(err, "VM_GET_DIRTY_PAGE_LIST on /dev/vmm/%s",
                       b->o.name);
    if (upb_clear(vmm, b, err) != 0)
        return -1;
    return nb_bhyve_dirty_to_bitmap(&vmm->layout, b->list, b->npages, bitmap,
                                    words, NULL, err);
}

/* ------------------------------------------------------- pause, resume */

static int active_cpus(struct bhyve *b, cpuset_t *set, char *err)
{
    struct vm_cpuset vc;

    memset(&vc, 0, sizeof(vc));
    CPU_ZERO(set);
    vc.which = VM_ACTIVE_CPUS;
    vc.cpusetsize = sizeof(*set);
    vc.cpus = set;
    if (ioctl(b->fd, VM_GET_CPUS, &vc) != 0)
        return sysfail(err, "VM_GET_CPUS on /dev/vmm/%s", b->o.name);
    return 0;
}

static int pause_all(struct bhyve *b, char *err)
{
    struct vm_activate_cpu ac;
    struct vm_register reg;
    cpuset_t set;
    int i;

    memset(&ac, 0, sizeof(ac));
    ac.vcpuid = -1;
    if (ioctl(b->fd, VM_SUSPEND_CPU, &ac) != 0)
        return sysfail(err, "VM_SUSPEND_CPU (all vCPUs) on /dev/vmm/%s",
                       b->o.name);
    if (active_cpus(b, &set, err) != 0)
        return -1;
    /* Freezing a vCPU waits until it is out of the guest; suspended, it
     * does not enter it again. */
    for (i = 0; i < CPU_SETSIZE; i++) {
        if (!CPU_ISSET(i, &set))
            continue;
        memset(&reg, 0, sizeof(reg));
        reg.cpuid = i;
        reg.regnum = VM_REG_GUEST_RIP;
        if (ioctl(b->fd, VM_GET_REGISTER, &reg) != 0)
            return sysfail(err, "waiting for vCPU %d of %s to stop", i,
                           b->o.name);
    }
    b->paused = 1;
    return 0;
}

static int bh_pause(struct nb_vmm *vmm, char *err)
{
    struct bhyve *b = B(vmm);

    if (need_vm(b, err) != 0)
        return -1;
    return pause_all(b, err);
}

static int bh_resume(struct nb_vmm *vmm, char *err)
{
    struct bhyve *b = B(vmm);
    struct vm_activate_cpu ac;

    if (need_vm(b, err) != 0)
        return -1;
    memset(&ac, 0, sizeof(ac));
    ac.vcpuid = -1;
    if (ioctl(b->fd, VM_RESUME_CPU, &ac) != 0)
        return sysfail(err, "VM_RESUME_CPU (all vCPUs) on /dev/vmm/%s",
                       b->o.name);
    b->paused = 0;
    return 0;
}

/* ------------------------------------------------------------- throttle */

static int resolve_pid(struct bhyve *b, char *err)
{
    int mib[4] = { CTL_KERN, KERN_PROC, KERN_PROC_PID, 0 };
    struct kinfo_proc kp;
    struct xucred xu;
    socklen_t xl = sizeof(xu);
    size_t kl = sizeof(kp);
    long pid = b->o.pid;
    char buf[32], *end;
    FILE *f;
    int s;

    if (b->pid > 0)
        return 0;
    if (pid == 0 && b->o.pidfile[0] != '\0') {
        if ((f = fopen(b->o.pidfile, "re")) == NULL)
            return sysfail(err, "cannot read bhyve pidfile %s", b->o.pidfile);
        if (fgets(buf, sizeof(buf), f) == NULL)
            buf[0] = '\0';
        fclose(f);
        pid = strtol(buf, &end, 10);
        if (end == buf || pid <= 0)
            return fail(err, "pidfile %s does not hold a process id",
                        b->o.pidfile);
    }
    if (pid == 0) {
        if ((s = nb_bhyve_connect(&b->o, err)) < 0)
            return fail(err, "cannot find the bhyve process of %s: give "
                        "pid= or pidfile=", b->o.name);
        if (getsockopt(s, SOL_LOCAL, LOCAL_PEERCRED, &xu, &xl) == 0 &&
            xu.cr_version == XUCRED_VERSION)
            pid = xu.cr_pid;
        close(s);
        if (pid <= 0)
            return fail(err, "cannot find the bhyve process of %s from its "
                        "checkpoint socket: give pid= or pidfile=", b->o.name);
    }
    mib[3] = (int)pid;
    if (sysctl(mib, 4, &kp, &kl, NULL, 0) != 0 || kl != sizeof(kp))
        return fail(err, "process %ld does not exist: stale pid or pidfile "
                    "for VM %s", pid, b->o.name);
    if (strcmp(kp.ki_comm, "bhyve") != 0)
        return fail(err, "process %ld is '%s', not bhyve: stale pid or "
                    "pidfile for VM %s", pid, kp.ki_comm, b->o.name);
    b->pid = (pid_t)pid;
    return 0;
}

static int rctl_error(struct bhyve *b, const char *rule, char *err)
{
    if (errno == ENOSYS)
        return fail(err, "cannot throttle VM %s: RACCT/RCTL is disabled; set "
                    "kern.racct.enable=1 in /boot/loader.conf and reboot",
                    b->o.name);
    if (errno == EPERM)
        return fail(err, "cannot throttle VM %s: rctl needs root", b->o.name);
    return sysfail(err, "rctl rule '%s' for VM %s", rule, b->o.name);
}

static int unthrottle(struct bhyve *b, char *err)
{
    char filter[64];

    snprintf(filter, sizeof(filter), "process:%d:pcpu:deny", (int)b->pid);
    if (rctl_remove_rule(filter, strlen(filter) + 1, NULL, 0) != 0 &&
        errno != ESRCH)
        return rctl_error(b, filter, err);
    b->throttled = 0;
    return 0;
}

static int bh_throttle(struct nb_vmm *vmm, int percent, char *err)
{
    struct bhyve *b = B(vmm);
    char rule[64];
    int limit;

    if (need_vm(b, err) != 0 ||
        nb_bhyve_pcpu_limit(percent, b->ncpus, &limit, err) != 0)
        return -1;
    if (limit == 0 && !b->throttled)
        return 0;
    if (resolve_pid(b, err) != 0)
        return -1;
    if (limit == 0)
        return unthrottle(b, err);
    /* A deny rule replaces the process's pcpu deny rule of another amount. */
    snprintf(rule, sizeof(rule), "process:%d:pcpu:deny=%d", (int)b->pid,
             limit);
    if (rctl_add_rule(rule, strlen(rule) + 1, NULL, 0) != 0)
        return rctl_error(b, rule, err);
    b->throttled = 1;
    return 0;
}

/* -------------------------------------------------------- device state */

/* bhyve resumed the vCPUs when it finished: pause them again at once. */
static int repause(void *ctx, char *err)
{
    struct bhyve *b = ctx;

    return b->paused && !b->o.exit_on_save ? pause_all(b, err) : 0;
}

static int bh_save_state(struct nb_vmm *vmm, uint8_t **blob, size_t *len,
                         char *err)
{
    struct bhyve *b = B(vmm);
    char dir[300];
    size_t n;

    if (need_vm(b, err) != 0)
        return -1;
    if (nb_bhyve_checkpoint(&b->o, vmm->layout.total, repause, b, blob, len,
                            err) != 0) {
        if (b->o.exit_on_save && nb_bhyve_keep_dir(&b->o, dir, sizeof(dir))
            == 0 && access(dir, F_OK) == 0) {
            n = strlen(err);
            snprintf(err + n, NB_ERRLEN - n, " (bhyve may have exited: its "
                     "checkpoint stays in %s)", dir);
        }
        return -1;
    }
    b->exited = b->o.exit_on_save;
    return 0;
}

static int bh_load_state(struct nb_vmm *vmm, const uint8_t *blob, size_t len,
                         char *err)
{
    return nb_bhyve_restore_files(&B(vmm)->o, blob, len, err);
}

/* ---------------------------------------------------------------- open */

static void bh_close(struct nb_vmm *vmm)
{
    struct bhyve *b = B(vmm);
    char err[NB_ERRLEN];

    if (b == NULL)
        return;
    if (b->throttled)
        unthrottle(b, err);     /* never leave the VM throttled */
    if (b->map != NULL)
        munmap(b->map, vmm->layout.total);
    if (b->fd >= 0)
        close(b->fd);
    free(b->list);
    free(b->scratch);
    free(b);
    vmm->priv = NULL;
    vmm->mem = NULL;
}

static const struct nb_vmm_ops bhyve_ops = {
    .kind = "bhyve",
    .map_memory = bh_map_memory,
    .next_data = bh_next_data,
    .has_dirty_log = bh_has_dirty_log,
    .dirty_log = bh_dirty_log,
    .pause = bh_pause,
    .resume = bh_resume,
    .throttle = bh_throttle,
    /* none: rctl's pcpu limit stops the whole process from one pass of
     * racctd to a later one, a second apart (kern_racct.c) */
    .brief_throttle = 0,
    .save_state = bh_save_state,
    .load_state = bh_load_state,
    .close = bh_close,
    /* no disk_dirty_log yet: bhyve's block devices keep no dirty-block
     * log, so the engine refuses to move disks from bhyve ("not
     * supported on bhyve yet") */
};

static int fill_spec(struct nb_vmm *vmm, struct bhyve *b, char *err)
{
    cpuset_t set;

    if (active_cpus(b, &set, err) != 0)
        return -1;
    b->ncpus = CPU_COUNT(&set);
    if (b->ncpus < 1)
        return fail(err, "VM %s has no active vCPU yet: is bhyve still "
                    "starting?", b->o.name);
    memset(&vmm->spec, 0, sizeof(vmm->spec));
    nb_spec_fill_cpu(&vmm->spec);
    snprintf(vmm->spec.arch, sizeof(vmm->spec.arch), "x86_64");
    snprintf(vmm->spec.state_format, sizeof(vmm->spec.state_format),
             "bhyve-ckpt/1");
    vmm->spec.page_size = NB_PAGE;
    vmm->spec.ncpus = (uint32_t)b->ncpus;
    vmm->spec.layout = vmm->layout;
    return 0;
}

/* Open VM `target` ("NAME[,key=value...]", see the top of this file). */
int nb_vmm_open_bhyve(struct nb_vmm *vmm, const char *target, char *err)
{
    struct bhyve *b;
    char path[300];

    memset(vmm, 0, sizeof(*vmm));
    if ((b = calloc(1, sizeof(*b))) == NULL)
        return fail(err, "out of memory");
    b->fd = -1;
    if (nb_bhyve_parse_target(target, &b->o, err) != 0)
        goto bad;
    vmm->ops = &bhyve_ops;
    vmm->priv = b;
    snprintf(path, sizeof(path), "/dev/vmm/%s", b->o.name);
    if ((b->fd = open(path, O_RDWR | O_CLOEXEC)) < 0) {
        if (errno == ENOENT && b->o.restore[0] != '\0') {
            struct nb_bhyve_opts o = b->o;  /* restore-only mode */

            free(b);
            return nb_bhyve_open_restore(vmm, &o, err);
        }
        if (errno == ENOENT)
            fail(err, "no VM named %s: %s does not exist (is bhyve running "
                 "and vmm.ko loaded?)", b->o.name, path);
        else
            sysfail(err, "cannot open %s (run as root; in a jail set "
                    "allow.vmm)", path);
        goto bad;
    }
    if (read_layout(vmm, b, err) != 0 || fill_spec(vmm, b, err) != 0)
        goto bad;
    probe_dirty_log(vmm, b);
    return 0;
bad:
    if (b->fd >= 0)
        close(b->fd);
    free(b);
    memset(vmm, 0, sizeof(*vmm));
    return -1;
}

#else /* !(__FreeBSD__ && __amd64__) */

/* Open VM `target`: only restore-only mode works off FreeBSD amd64. */
int nb_vmm_open_bhyve(struct nb_vmm *vmm, const char *target, char *err)
{
    struct nb_bhyve_opts o;

    memset(vmm, 0, sizeof(*vmm));
    if (nb_bhyve_parse_target(target, &o, err) != 0)
        return -1;
    if (o.restore[0] != '\0')
        return nb_bhyve_open_restore(vmm, &o, err);
#if defined(__FreeBSD__)
    snprintf(err, NB_ERRLEN, "the bhyve vmm port supports FreeBSD amd64 only");
#else
    snprintf(err, NB_ERRLEN, "the bhyve vmm port is only available on FreeBSD");
#endif
    return -1;
}

#endif
