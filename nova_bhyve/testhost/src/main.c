/*
 * nb-testhost entry point: parse arguments, build the VM, boot a multiboot
 * kernel (or wait for incoming state), then serve the control socket.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testhost.h"

static struct nb_vm the_vm;

static void usage(FILE *f)
{
    fprintf(f,
        "usage: nb-testhost --name NAME --rundir DIR --mem SIZE [--cpus N]\n"
        "                   (--kernel ELF [--cmdline STR] [--paused] | --incoming)\n"
        "                   [--console-tlog] [--disk FILE] [--dirty-log-whole]\n"
        "                   [--flush-delay-ms MS]\n"
        "\n"
        "Runs one KVM guest laid out as bhyve does (lowmem below 3 GiB at GPA 0,\n"
        "the rest at 4 GiB).  DIR receives control.sock, console.log and\n"
        "testhost.pid.  SIZE takes a K, M or G suffix.  --disk attaches FILE (a raw\n"
        "image, not a symbolic link) as the ATA master on the primary IDE ports.\n"
        "--dirty-log-whole offers only the whole get-and-clear dirty log, as\n"
        "bhyve's does: no peek, no ranges.  --flush-delay-ms (with --disk)\n"
        "holds each fdatasync of the disk MS (1..10000) milliseconds, as a\n"
        "drive on slow storage (for tests).\n"
        "A test and development backend for nova-bhyve, not a production\n"
        "hypervisor.\n"
        "Exit status as bhyve(8): 1 powered off, 2 halted, 3 triple fault, 4 error.\n");
}

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || end == s || *s == '-')
        return -1;
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: break;
    }
    if (*end)
        return -1;
    *out = v;
    return 0;
}

static void on_signal(int sig)
{
    (void)sig;
    the_vm.quit = 1;
    if (the_vm.exit_status < 0)
        the_vm.exit_status = NB_EXIT_POWEROFF;
    nb_vm_notify(&the_vm);
}

static void write_pidfile(const char *rundir)
{
    char tmp[600], path[600], buf[32];
    int fd, n;
    snprintf(tmp, sizeof(tmp), "%s/testhost.pid.tmp", rundir);
    snprintf(path, sizeof(path), "%s/testhost.pid", rundir);
    n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, buf, (size_t)n) != n || close(fd) < 0 ||
        rename(tmp, path) < 0)
        nb_die("writing %s: %s", path, strerror(errno));
}

static int open_log(const char *rundir, const char *name)
{
    char path[600];
    int fd;
    snprintf(path, sizeof(path), "%s/%s", rundir, name);
    fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd < 0)
        nb_die("opening %s: %s", path, strerror(errno));
    return fd;
}

/* The decimal integer an option gives, which must lie in [lo, hi]. */
static long parse_bounded(const char *option, const char *arg, long lo, long hi)
{
    char *end;
    long v = strtol(arg, &end, 10);

    if (*end || end == arg || v < lo || v > hi)
        nb_die("--%s %s: must be %ld..%ld", option, arg, lo, hi);
    return v;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "name", required_argument, NULL, 'n' },
        { "rundir", required_argument, NULL, 'd' },
        { "mem", required_argument, NULL, 'm' },
        { "cpus", required_argument, NULL, 'c' },
        { "kernel", required_argument, NULL, 'k' },
        { "cmdline", required_argument, NULL, 'a' },
        { "paused", no_argument, NULL, 'p' },
        { "incoming", no_argument, NULL, 'i' },
        { "console-tlog", no_argument, NULL, 't' },
        { "disk", required_argument, NULL, 'D' },
        { "dirty-log-whole", no_argument, NULL, 'W' },
        { "flush-delay-ms", required_argument, NULL, 'F' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct nb_vm *vm = &the_vm;
    const char *name = NULL, *rundir = NULL, *kernel = NULL, *cmdline = "";
    const char *disk = NULL;
    uint64_t mem = 0;
    long cpus = 1, flush_delay_ms = 0;
    int paused = 0, incoming = 0, tlog = 0, opt, status;
    char sock[600], err[512], title[16];
    struct sigaction sa;
    struct stat st;

    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'n': name = optarg; break;
        case 'd': rundir = optarg; break;
        case 'm':
            if (parse_size(optarg, &mem) < 0)
                nb_die("--mem %s: not a size (e.g. 1024M or 4G)", optarg);
            break;
        case 'c': cpus = parse_bounded("cpus", optarg, 1, NB_MAX_VCPUS); break;
        case 'k': kernel = optarg; break;
        case 'a': cmdline = optarg; break;
        case 'p': paused = 1; break;
        case 'i': incoming = 1; break;
        case 't': tlog = 1; break;
        case 'D': disk = optarg; break;
        case 'W': vm->dirty_log_whole = 1; break;
        case 'F':
            flush_delay_ms = parse_bounded("flush-delay-ms", optarg, 1, 10000);
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return NB_EXIT_ERROR;
        }
    }
    if (optind != argc || !name || !rundir || !mem || (!kernel == !incoming)) {
        usage(stderr);
        nb_die("need --name, --rundir, --mem and exactly one of --kernel "
               "or --incoming");
    }
    if (flush_delay_ms && !disk)
        nb_die("--flush-delay-ms needs --disk");
    if (strlen(name) >= sizeof(vm->name) || strchr(name, '/') || !*name)
        nb_die("--name must be 1..%zu characters without '/'", sizeof(vm->name) - 1);
    if (mem % (2u << 20) || mem < (16u << 20) || mem > (1ULL << 40))
        nb_die("--mem must be a multiple of 2 MiB between 16 MiB and 1 TiB");
    if (stat(rundir, &st) < 0 || !S_ISDIR(st.st_mode))
        nb_die("--rundir %s is not a directory", rundir);
    if (strlen(rundir) >= sizeof(vm->rundir) - 32)
        nb_die("--rundir path too long");

    snprintf(vm->name, sizeof(vm->name), "%s", name);
    snprintf(vm->rundir, sizeof(vm->rundir), "%s", rundir);
    snprintf(title, sizeof(title), "nbh:%s", name);
    prctl(PR_SET_NAME, title);
    pthread_mutex_init(&vm->lock, NULL);
    pthread_mutex_init(&vm->console_lock, NULL);
    pthread_cond_init(&vm->cond, NULL);
    vm->exit_status = -1;
    vm->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (vm->event_fd < 0)
        nb_die("eventfd: %s", strerror(errno));
    vm->console_fd = open_log(rundir, "console.log");
    vm->tlog_fd = tlog ? open_log(rundir, "console.tlog") : -1;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    nb_ata_init(&vm->ata);
    vm->ata.flush_delay_ms = (uint32_t)flush_delay_ms;
    if (disk)
        nb_ata_open(&vm->ata, disk);
    nb_vm_create(vm, (int)cpus, mem);
    if (kernel) {
        uint64_t entry, mbi;
        if (nb_load_multiboot(vm, kernel, cmdline, &entry, &mbi, err,
                              sizeof(err)) < 0)
            nb_die("%s", err);
        if (nb_vm_setup_boot(vm, entry, mbi) < 0)
            nb_die("setting boot registers: %s", strerror(errno));
    }
    vm->state = incoming ? NB_STATE_INCOMING : NB_STATE_PAUSED;
    if (nb_vcpus_start(vm) < 0)
        nb_die("starting vCPU threads: %s", strerror(errno));
    if (kernel && !paused)
        nb_vcpus_resume(vm);

    snprintf(sock, sizeof(sock), "%s/control.sock", rundir);
    write_pidfile(rundir);
    nb_log("%s: %d vcpu(s), %llu MiB (%s), control socket %s", vm->name,
           vm->ncpus, (unsigned long long)(mem >> 20),
           incoming ? "incoming" : "booted", sock);
    status = nb_control_serve(vm, sock);
    nb_vcpus_stop(vm);
    {
        char pid[600];
        snprintf(pid, sizeof(pid), "%s/testhost.pid", rundir);
        unlink(pid);
    }
    nb_log("%s: exiting with status %d", vm->name, status);
    return status;
}
