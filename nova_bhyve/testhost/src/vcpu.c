/*
 * vCPU threads: the KVM_RUN loop, the COM1 console, pause/resume and the
 * CPU throttle used for auto-converge.
 *
 * Kicking a vCPU out of KVM_RUN: SIG_KICK is blocked in vCPU threads
 * except inside KVM_RUN (KVM_SET_SIGNAL_MASK).  A kick that arrives while
 * the thread is in user space stays pending, so the next KVM_RUN first
 * completes any port or MMIO access the guest had in flight and then
 * returns EINTR without entering the guest: no kick is lost, and a vCPU
 * parks only after such an EINTR, so the state it leaves is consistent.
 * (run->immediate_exit is not used: on some kernels it returns before the
 * in-flight access is completed, and a saved state would then replay it.)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "testhost.h"

#define SIG_KICK SIGUSR1
#define COM1_BASE 0x3f8

static void eat_kicks(void);

static void kick_handler(int sig)
{
    (void)sig;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Append console bytes; complete lines also go to the timestamped log. */
static void console_write(struct nb_vm *vm, const uint8_t *buf, size_t n)
{
    pthread_mutex_lock(&vm->console_lock);
    if (vm->console_fd >= 0 && write(vm->console_fd, buf, n) < 0) {
        /* a full disk must not stop the guest */
    }
    for (size_t i = 0; i < n; i++) {
        char c = (char)buf[i];
        if (c == '\n') {
            vm->console_lines++;
            if (vm->tlog_fd >= 0) {
                char out[320];
                int len = snprintf(out, sizeof(out), "%llu %.*s\n",
                                   (unsigned long long)now_ns(),
                                   (int)vm->line_len, vm->line);
                if (len > 0 && write(vm->tlog_fd, out, (size_t)len) < 0) {
                    /* ignored, as above */
                }
            }
            vm->line_len = 0;
        } else if (vm->line_len < sizeof(vm->line)) {
            vm->line[vm->line_len++] = c;
        }
    }
    pthread_mutex_unlock(&vm->console_lock);
}

static void handle_io(struct nb_vcpu *v)
{
    struct kvm_run *run = v->run;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    size_t bytes = (size_t)run->io.size * run->io.count;
    uint16_t port = run->io.port;

    if (v->vm->ata.present && nb_ata_claims(port)) {
        nb_ata_io(&v->vm->ata, port, run->io.direction == KVM_EXIT_IO_OUT,
                  data, run->io.size, run->io.count);
        return;
    }
    if (run->io.direction == KVM_EXIT_IO_OUT) {
        if (port == COM1_BASE && run->io.size == 1)
            console_write(v->vm, data, bytes);
        return;
    }
    /* Reads: COM1 line status says "transmitter empty"; others float. */
    if (port >= COM1_BASE && port < COM1_BASE + 8)
        memset(data, port == COM1_BASE + 5 ? 0x60 : 0, bytes);
    else
        memset(data, 0xff, bytes);
}

static void vm_end(struct nb_vm *vm, int status)
{
    pthread_mutex_lock(&vm->lock);
    if (!vm->quit) {
        vm->quit = 1;
        vm->exit_status = status;
    }
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    nb_vm_notify(vm);   /* the control loop notices vm->quit */
}

/* `*t` = CLOCK_REALTIME now plus `ns` (a pthread_cond_timedwait deadline). */
static void deadline_after(struct timespec *t, uint64_t ns)
{
    clock_gettime(CLOCK_REALTIME, t);
    t->tv_sec += (time_t)(ns / 1000000000ULL);
    t->tv_nsec += (long)(ns % 1000000000ULL);
    if (t->tv_nsec >= 1000000000L) {
        t->tv_sec++;
        t->tv_nsec -= 1000000000L;
    }
}

/*
 * Sleep off a throttle of `pct` percent: as long, against the time the
 * vCPU ran since its last such sleep, as makes it run (100 - pct) percent
 * of the time whatever the kicks' timing.  The run counted is at most a
 * tick: a kick the host was late to send (a busy host) must not bring a
 * sleep of several ticks' worth, a silence the guest sees; the vCPU then
 * runs a little more than its share.  Kicks that came during the sleep
 * are stale: eaten, so that the vCPU then runs.  Called with the lock.
 */
static void throttle_sleep(struct nb_vcpu *v, int pct)
{
    struct nb_vm *vm = v->vm;
    uint64_t ran = now_ns() - v->ran_from_ns, sleep_ns;
    uint64_t tick_ns = (uint64_t)nb_throttle_tick_ms(pct) * 1000000ULL;
    struct timespec until;

    if (ran > tick_ns)
        ran = tick_ns;
    sleep_ns = ran * (uint64_t)pct / (uint64_t)(100 - pct);
    deadline_after(&until, sleep_ns);
    while (!vm->pause_req && !vm->quit &&
           pthread_cond_timedwait(&vm->cond, &vm->lock, &until) == 0) {
    }
    eat_kicks();
    v->throttle_pending = 0;
    v->ran_from_ns = now_ns();
}

/* Park while paused; sleep off a throttle tick.  Called with the lock. */
static void park_if_requested(struct nb_vcpu *v)
{
    struct nb_vm *vm = v->vm;

    if (v->throttle_pending && !vm->pause_req && !vm->quit) {
        int pct = vm->throttle_pct;
        v->throttle_pending = 0;
        if (pct > 0)
            throttle_sleep(v, pct);
    }
    if (vm->pause_req && !vm->quit) {
        v->parked = 1;
        pthread_cond_broadcast(&vm->cond);
        while (vm->pause_req && !vm->quit)
            pthread_cond_wait(&vm->cond, &vm->lock);
        v->parked = 0;
    }
}

/* Block SIG_KICK in this thread; let KVM_RUN unblock it while it runs. */
static int block_kicks(struct nb_vcpu *v)
{
    sigset_t kick, run_mask;
    struct {
        struct kvm_signal_mask hdr;
        uint8_t set[8];     /* the kernel's sigset_t is 64 bits on x86-64 */
    } km;

    sigemptyset(&kick);
    sigaddset(&kick, SIG_KICK);
    if (pthread_sigmask(SIG_BLOCK, &kick, &run_mask) != 0)
        return -1;
    sigdelset(&run_mask, SIG_KICK);
    km.hdr.len = 8;
    memcpy(km.set, &run_mask, 8);
    return ioctl(v->fd, KVM_SET_SIGNAL_MASK, &km);
}

/* Consume pending kicks so the next KVM_RUN enters the guest. */
static void eat_kicks(void)
{
    sigset_t kick;
    struct timespec zero = { 0, 0 };

    sigemptyset(&kick);
    sigaddset(&kick, SIG_KICK);
    while (sigtimedwait(&kick, NULL, &zero) == SIG_KICK) {
    }
}

static void *vcpu_main(void *arg)
{
    struct nb_vcpu *v = arg;
    struct nb_vm *vm = v->vm;
    char tname[16];
    int interrupted = 1;

    snprintf(tname, sizeof(tname), "vcpu %d", v->index);
    prctl(PR_SET_NAME, tname);
    if (block_kicks(v) < 0) {
        nb_log("vcpu %d: cannot set up signals: %s", v->index, strerror(errno));
        vm_end(vm, NB_EXIT_ERROR);
        return NULL;
    }
    for (;;) {
        pthread_mutex_lock(&vm->lock);
        if (vm->quit) {
            pthread_mutex_unlock(&vm->lock);
            break;
        }
        if (interrupted)
            park_if_requested(v);
        if (vm->quit) {
            /* woken from a pause to exit: a paused guest never runs again */
            pthread_mutex_unlock(&vm->lock);
            break;
        }
        pthread_mutex_unlock(&vm->lock);

        interrupted = 0;
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                eat_kicks();
                interrupted = 1;
                continue;
            }
            nb_log("vcpu %d: KVM_RUN: %s", v->index, strerror(errno));
            vm_end(vm, NB_EXIT_ERROR);
            break;
        }
        __atomic_add_fetch(&vm->exits, 1, __ATOMIC_RELAXED);
        switch (v->run->exit_reason) {
        case KVM_EXIT_IO:
            handle_io(v);
            break;
        case KVM_EXIT_MMIO:
            if (!v->run->mmio.is_write)
                memset(v->run->mmio.data, 0xff, sizeof(v->run->mmio.data));
            break;
        case KVM_EXIT_INTR:
            interrupted = 1;
            break;
        case KVM_EXIT_HLT:
            vm_end(vm, NB_EXIT_HALT);
            return NULL;
        case KVM_EXIT_SHUTDOWN:
            nb_log("vcpu %d: triple fault", v->index);
            vm_end(vm, NB_EXIT_TRIPLEFAULT);
            return NULL;
        case KVM_EXIT_SYSTEM_EVENT:
            vm_end(vm, v->run->system_event.type == KVM_SYSTEM_EVENT_RESET
                           ? NB_EXIT_REBOOT : NB_EXIT_POWEROFF);
            return NULL;
        default:
            nb_log("vcpu %d: unhandled exit reason %u", v->index,
                   v->run->exit_reason);
            vm_end(vm, NB_EXIT_ERROR);
            return NULL;
        }
    }
    return NULL;
}

/* Interrupt every vCPU's KVM_RUN; with throttle set, ask for a sleep. */
void nb_vcpus_kick(struct nb_vm *vm, int throttle)
{
    for (int i = 0; i < vm->ncpus; i++) {
        struct nb_vcpu *v = &vm->vcpus[i];
        if (throttle)
            v->throttle_pending = 1;
        if (v->thread)
            pthread_kill(v->thread, SIG_KICK);
    }
}

/* Start the vCPU threads, parked until nb_vcpus_resume(). */
int nb_vcpus_start(struct nb_vm *vm)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIG_KICK, &sa, NULL) < 0)
        return -1;
    vm->pause_req = 1;
    for (int i = 0; i < vm->ncpus; i++) {
        if (pthread_create(&vm->vcpus[i].thread, NULL, vcpu_main,
                           &vm->vcpus[i]) != 0)
            return -1;
    }
    pthread_mutex_lock(&vm->lock);
    for (;;) {
        int parked = 0;
        for (int i = 0; i < vm->ncpus; i++)
            parked += vm->vcpus[i].parked;
        if (parked == vm->ncpus || vm->quit)
            break;
        pthread_cond_wait(&vm->cond, &vm->lock);
    }
    pthread_mutex_unlock(&vm->lock);
    return 0;
}

/* Stop all vCPUs and wait until every one has parked. */
void nb_vcpus_pause(struct nb_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    vm->pause_req = 1;
    pthread_cond_broadcast(&vm->cond);
    nb_vcpus_kick(vm, 0);
    for (;;) {
        int parked = 0;
        for (int i = 0; i < vm->ncpus; i++)
            parked += vm->vcpus[i].parked;
        if (parked == vm->ncpus || vm->quit)
            break;
        pthread_mutex_unlock(&vm->lock);
        nb_vcpus_kick(vm, 0);   /* in case a vCPU re-entered the guest */
        pthread_mutex_lock(&vm->lock);
        struct timespec t;
        deadline_after(&t, 1000000);
        pthread_cond_timedwait(&vm->cond, &vm->lock, &t);
    }
    vm->state = NB_STATE_PAUSED;
    pthread_mutex_unlock(&vm->lock);
}

/* Mark the VM running; its parked vCPUs go once nb_vcpus_wake() wakes them. */
void nb_vcpus_release(struct nb_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    vm->pause_req = 0;
    vm->state = NB_STATE_RUNNING;
    pthread_mutex_unlock(&vm->lock);
}

/* Wake parked vCPUs to look at the pause request again. */
void nb_vcpus_wake(struct nb_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
}

void nb_vcpus_resume(struct nb_vm *vm)
{
    nb_vcpus_release(vm);
    nb_vcpus_wake(vm);
}

/* End all vCPU threads (process exit path). */
void nb_vcpus_stop(struct nb_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    vm->quit = 1;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    nb_vcpus_kick(vm, 0);
    for (int i = 0; i < vm->ncpus; i++) {
        if (vm->vcpus[i].thread && !pthread_equal(vm->vcpus[i].thread,
                                                  pthread_self()))
            pthread_join(vm->vcpus[i].thread, NULL);
    }
}
