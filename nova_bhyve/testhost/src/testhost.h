/*
 * nb-testhost: a small KVM virtual machine monitor that stands in for bhyve
 * on Linux development and CI machines.  One process runs one VM.
 *
 * It mimics bhyve where nova-bhyve touches it: guest RAM laid out as
 * libvmmapi does (lowmem below 3 GiB at GPA 0, the rest at 4 GiB, one
 * backing object), pause/resume of all vCPUs, a versioned vCPU + device
 * state blob, a dirty-page log, and a control socket.  It is a test and
 * development backend, not a production hypervisor.
 */
#ifndef NB_TESTHOST_H
#define NB_TESTHOST_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define NB_GIB ((uint64_t)1 << 30)
#define NB_LOWMEM_LIMIT ((uint64_t)3 << 30)  /* bhyve: VM_LOWMEM_LIMIT */
#define NB_HIGHMEM_BASE ((uint64_t)4 << 30)  /* bhyve: VM_HIGHMEM_BASE */
#define NB_PAGE_SIZE ((uint64_t)4096)
#define NB_MAX_VCPUS 16
#define NB_MAX_MSRS 64

/* Exit statuses, as bhyve(8) documents them. */
enum nb_exit_status {
    NB_EXIT_REBOOT = 0,
    NB_EXIT_POWEROFF = 1,
    NB_EXIT_HALT = 2,
    NB_EXIT_TRIPLEFAULT = 3,
    NB_EXIT_ERROR = 4,
};

enum nb_vm_state {
    NB_STATE_RUNNING,   /* vCPUs executing guest code */
    NB_STATE_PAUSED,    /* vCPUs parked; state may be saved */
    NB_STATE_INCOMING,  /* memory allocated, waiting for a state blob */
    NB_STATE_FAILED,    /* a state load failed half-way; never runs again */
};

struct nb_vcpu {
    int index;
    int fd;
    struct kvm_run *run;
    pthread_t thread;
    struct nb_vm *vm;
    int parked;             /* protected by vm->lock */
    int throttle_pending;   /* protected by vm->lock */
    uint64_t ran_from_ns;   /* when the vCPU last came back from a throttle sleep */
};

/*
 * The ATA disk (ata.c): legacy PIO on the primary IDE ports, one master
 * drive backed by a raw file, and its dirty-block log.  `lock` guards
 * everything below it (vCPU threads do port I/O, the control loop reads
 * the log).
 */
#define NB_SECTOR 512
#define NB_DISK_BLOCK ((uint64_t)4096)      /* dirty-block log granularity */
#define NB_ATA_STATE_LEN 552                /* bytes of the state section */

struct nb_ata {
    pthread_mutex_t lock;
    int present;            /* 0: no --disk, the ports float */
    int fd;
    uint64_t sectors;       /* disk size / 512 */
    uint64_t *dirty;        /* one bit per NB_DISK_BLOCK */
    uint64_t nblocks;
    /* task-file registers and the PIO transfer in flight */
    uint8_t feature, nsector, lbal, lbam, lbah, select;
    uint8_t status, error, control, command, xfer;
    uint64_t lba;           /* sector in buf */
    uint32_t remaining;     /* sectors left, the one in buf included */
    uint32_t pos;           /* byte position in buf */
    uint8_t buf[NB_SECTOR];
    /* FLUSH CACHE runs on the drive's own thread (ata.c, "flusher") */
    pthread_cond_t flush_cv;
    uint64_t flush_asked;   /* flushes asked for, counted from 1 */
    uint64_t flush_done;    /* the last of them the flusher finished */
    uint32_t flush_delay_ms; /* --flush-delay-ms: a slow drive, for tests */
};

struct nb_vm {
    char name[64];
    char rundir[512];
    int ncpus;
    uint64_t mem_size;
    uint64_t lowmem;        /* bytes at GPA 0 */
    uint64_t highmem;       /* bytes at GPA 4 GiB */
    int kvm_fd;
    int vm_fd;
    int mem_fd;             /* memfd: lowmem at offset 0, highmem after it */
    uint8_t *mem;           /* mapping of mem_fd */
    int run_size;
    int xsave_size;         /* bytes moved by KVM_GET/SET_XSAVE(2) */
    int nmsrs;
    uint32_t msr_index[NB_MAX_MSRS];
    struct nb_vcpu vcpus[NB_MAX_VCPUS];

    pthread_mutex_t lock;
    pthread_cond_t cond;
    enum nb_vm_state state;
    int pause_req;          /* vCPUs must park */
    int quit;               /* vCPU threads must exit */
    int exit_status;        /* set when a vCPU ends the VM */
    int event_fd;           /* eventfd: wakes the control loop */
    int throttle_pct;
    int dirty_log_whole;        /* --dirty-log-whole: no peek, no ranges */
    uint64_t exits;

    /* console (COM1) */
    pthread_mutex_t console_lock;
    int console_fd;
    int tlog_fd;            /* -1 unless --console-tlog */
    char line[256];
    size_t line_len;
    uint64_t console_lines;

    struct nb_ata ata;
};

/* vm.c */
int nb_vm_create(struct nb_vm *vm, int ncpus, uint64_t mem_size);
int nb_vm_setup_boot(struct nb_vm *vm, uint64_t entry, uint64_t mbi);
int nb_vm_dirty_log(struct nb_vm *vm, uint8_t *out, size_t out_len);
int nb_vm_dirty_log_range(struct nb_vm *vm, uint8_t *out, size_t out_len,
                          uint64_t first, uint64_t count, int peek);
size_t nb_vm_dirty_log_bytes(const struct nb_vm *vm);
uint64_t nb_bitmap_bytes(uint64_t pages);
void nb_die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void nb_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void nb_vm_notify(struct nb_vm *vm);

/* vcpu.c */
int nb_vcpus_start(struct nb_vm *vm);
void nb_vcpus_pause(struct nb_vm *vm);
void nb_vcpus_resume(struct nb_vm *vm);
void nb_vcpus_release(struct nb_vm *vm);
void nb_vcpus_wake(struct nb_vm *vm);
void nb_vcpus_stop(struct nb_vm *vm);
void nb_vcpus_kick(struct nb_vm *vm, int throttle);

/*
 * How often the vCPUs of a guest throttled by `pct` percent are kicked, in
 * ms: every 10 ms up to 50 %; above, often enough that the sleep a kick
 * brings (the time run since the last, times pct / (100 - pct)) stays
 * about 10 ms, but at most every 1 ms (the sleeps grow again above 91 %,
 * to 99 ms at 99 %).  Kicked only every 10 ms, a vCPU at 93 % slept up to
 * 133 ms at a time, a gap the guest sees.
 */
static inline int nb_throttle_tick_ms(int pct)
{
    int tick = pct > 50 ? 10 * (100 - pct) / pct : 10;

    return tick < 1 ? 1 : tick;
}

/* loader.c */
int nb_load_multiboot(struct nb_vm *vm, const char *path, const char *cmdline,
                      uint64_t *entry, uint64_t *mbi, char *err, size_t errlen);

/* state.c */
int nb_state_save(struct nb_vm *vm, uint8_t **blob, size_t *len,
                  char *err, size_t errlen);
int nb_state_load(struct nb_vm *vm, const uint8_t *blob, size_t len,
                  char *err, size_t errlen);
uint32_t nb_crc32(const uint8_t *buf, size_t len);

/* ata.c */
void nb_ata_init(struct nb_ata *ata);
void nb_ata_open(struct nb_ata *ata, const char *path);
int nb_ata_claims(uint16_t port);
void nb_ata_io(struct nb_ata *ata, uint16_t port, int is_write, uint8_t *data,
               size_t size, size_t count);
size_t nb_ata_dirty_bytes(const struct nb_ata *ata);
void nb_ata_dirty_log(struct nb_ata *ata, uint8_t *out, int peek);
void nb_ata_save(struct nb_ata *ata, uint8_t *out);
int nb_ata_check(const struct nb_ata *ata, const uint8_t *in,
                 char *err, size_t errlen);
void nb_ata_restore(struct nb_ata *ata, const uint8_t *in);

/* control.c */
int nb_control_serve(struct nb_vm *vm, const char *sock_path);

#endif
