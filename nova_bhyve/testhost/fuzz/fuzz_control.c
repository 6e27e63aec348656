/*
 * Target "control": the test host's control-socket request handling
 * (control.c, handle_input and every command it dispatches to, included
 * here for its static functions) on a client whose bytes are the input,
 * read as nb_control_serve reads them.  The VM is fake_vm.h's, without
 * KVM; pausing and resuming only change its state (vcpu.c is not built).
 *
 * Input: u8 mode, then the client's bytes.
 *   mode bits 0-1: the VM's state (running, paused, incoming, failed)
 *        bit 2: the VM has highmem
 */
#include "../src/control.c"
#include "../src/state.c"

#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>

#include "fake_vm.h"

/* vcpu.c, for a VM without vCPU threads. */
void nb_vcpus_pause(struct nb_vm *vm) { vm->state = NB_STATE_PAUSED; }
void nb_vcpus_resume(struct nb_vm *vm) { vm->state = NB_STATE_RUNNING; }
void nb_vcpus_kick(struct nb_vm *vm, int throttle) {}

/*
 * Read and throw away what the server replies (show it with
 * NB_FUZZ_DEBUG), on a thread of its own until the server's end closes: a
 * client that never reads would fill the socket buffer, and the server
 * then waits, as designed, up to IO_TIMEOUT_S for it.  One thread serves
 * every input (creating one per input would slow the target tenfold).
 */
static sem_t drain_start, drain_done;
static int drain_fd;

static void *drain(void *arg)
{
    char buf[4096];
    ssize_t n;

    (void)arg;
    for (;;) {
        while (sem_wait(&drain_start) < 0)
            ;
        while ((n = recv(drain_fd, buf, sizeof(buf), 0)) > 0)
            if (FZ_DEBUG)
                fprintf(stderr, "%.*s", (int)n, buf);
        sem_post(&drain_done);
    }
    return NULL;
}

static void drain_begin(int peer)
{
    static pthread_t reader;

    if (!reader && (sem_init(&drain_start, 0, 0) || sem_init(&drain_done, 0, 0) ||
                    pthread_create(&reader, NULL, drain, NULL)))
        abort();
    fcntl(peer, F_SETFL, fcntl(peer, F_GETFL) & ~O_NONBLOCK);
    drain_fd = peer;
    sem_post(&drain_start);
}

static void drain_end(void)
{
    while (sem_wait(&drain_done) < 0)
        ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct nb_vm vms[2];
    struct fz in = { data, size };
    uint8_t mode = fz_u8(&in);
    struct nb_vm *vm = &vms[(mode >> 2) & 1];
    struct client c = { .len = 0 };
    int peer;

    if (size > 100000)
        return -1;
    if (!vm->ncpus)
        fake_vm_init(vm, 1, (mode >> 2) & 1);
    vm->state = (enum nb_vm_state)(mode & 3);
    vm->throttle_pct = 0;
    c.fd = fz_stream(in.p, in.n, &peer);
    drain_begin(peer);
    for (;;) {
        ssize_t r = recv(c.fd, c.buf + c.len, MAX_LINE - c.len, 0);
        if (r <= 0 || (c.len += (size_t)r, handle_input(vm, &c)) != 0)
            break;
        if (c.len > MAX_LINE)
            abort();
    }
    close(c.fd);
    drain_end();
    close(peer);
    return 0;
}

/* Seeds: every request once, and a load-state with a valid blob. */
static void fuzz_seeds(const char *dir)
{
    static const char requests[] = "\x00status\nthrottle 30\npause\nsave-state\n"
        "resume\ndirty-log\ndirty-log peek\ndirty-log 0 1\nbogus 1 2\n"
        "throttle 100\n\nmemfd\nshutdown\n";
    struct fz_buf b = { 0 };
    struct nb_vm vm;
    uint8_t *blob;
    size_t len;
    char line[64];

    fz_seed(dir, "requests", requests, sizeof(requests) - 1);
    fz_seed(dir, "dirty-log-highmem", "\x05" "dirty-log 1 18446744073709551615\r\n"
            "dirty-log 2 1\n", 49);
    fake_vm_init(&vm, 1, 0);
    blob = fake_blob(&vm, &len);
    fz_put8(&b, NB_STATE_INCOMING);
    snprintf(line, sizeof(line), "load-state %zu\n", len);
    fz_put(&b, line, strlen(line));
    fz_put(&b, blob, len);
    fz_put(&b, "status\n", 7);
    fz_seed(dir, "load-state", b.p, b.len);
    free(blob);
    free(b.p);
}
