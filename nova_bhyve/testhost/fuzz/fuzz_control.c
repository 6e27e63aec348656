/*
 * Target "control": the test host's control-socket request handling
 * (control.c, handle_input and every command it dispatches to, included
 * here for its static functions) on a client whose bytes are the input,
 * read as nb_control_serve reads them.  The VM is fake_vm.h's, without
 * KVM; pausing and resuming only change its state (vcpu.c is not built).
 *
 * Input: u8 mode, then the client's bytes.
 *   mode bits 0-1: the VM's state (running, paused, incoming, failed)
 *        bit 2: the VM has highmem and a disk (its dirty-block log)
 */
#define _GNU_SOURCE
#include <sys/socket.h>

/*
 * The server's replies go through reply_send: a client that never reads
 * would fill the socket buffer, and the server then waits, as designed,
 * up to IO_TIMEOUT_S for it.  The harness is that client, so when the
 * buffer is full it reads and throws away what the server replied (shown
 * with NB_FUZZ_DEBUG), then lets the send go on.
 */
static ssize_t reply_send(int fd, const void *buf, size_t len, int flags);
#define send reply_send
#include "../src/control.c"
#undef send
#include "../src/state.c"

#include "fake_vm.h"

/* vcpu.c, for a VM without vCPU threads. */
void nb_vcpus_pause(struct nb_vm *vm) { vm->state = NB_STATE_PAUSED; }
void nb_vcpus_resume(struct nb_vm *vm) { vm->state = NB_STATE_RUNNING; }
void nb_vcpus_release(struct nb_vm *vm) { vm->state = NB_STATE_RUNNING; }
void nb_vcpus_wake(struct nb_vm *vm) {}
void nb_vcpus_kick(struct nb_vm *vm, int throttle) {}

static int client_fd = -1;

static void drain(void)
{
    char buf[4096];
    ssize_t n;
    while ((n = recv(client_fd, buf, sizeof(buf), MSG_DONTWAIT)) > 0)
        if (FZ_DEBUG)
            fprintf(stderr, "%.*s", (int)n, buf);
}

static ssize_t reply_send(int fd, const void *buf, size_t len, int flags)
{
    ssize_t w = send(fd, buf, len, flags);
    if (w < 0 && errno == EAGAIN && client_fd >= 0) {
        drain();
        w = send(fd, buf, len, flags);
    }
    return w;
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
    if (!vm->ncpus) {
        fake_vm_init(vm, 1, (mode >> 2) & 1);
        if (mode & 4)
            fake_vm_add_disk(vm);
    }
    vm->state = (enum nb_vm_state)(mode & 3);
    vm->throttle_pct = 0;
    c.fd = fz_stream(in.p, in.n, &peer);
    client_fd = peer;
    for (;;) {
        ssize_t r = recv(c.fd, c.buf + c.len, MAX_LINE - c.len, 0);
        if (r <= 0 || (c.len += (size_t)r, handle_input(vm, &c)) != 0)
            break;
        if (c.len > MAX_LINE)
            abort();
        drain();
    }
    drain();
    client_fd = -1;
    close(c.fd);
    close(peer);
    return 0;
}

/* Seeds: every request once, and a load-state with a valid blob. */
static void fuzz_seeds(const char *dir)
{
    static const char requests[] = "\x00status\nthrottle 30\npause\nsave-state\n"
        "resume\ndirty-log\ndirty-log peek\ndirty-log 0 1\nbogus 1 2\n"
        "throttle 100\n\nmemfd\ndisk-dirty-log\nshutdown\n";
    static const char highmem[] = "\x05" "dirty-log 1 18446744073709551615\r\n"
        "dirty-log 2 1\ndisk-dirty-log\ndisk-dirty-log peek\n"
        "disk-dirty-log 1\n";
    struct fz_buf b = { 0 };
    struct nb_vm vm;
    uint8_t *blob;
    size_t len;
    char line[64];

    fz_seed(dir, "requests", requests, sizeof(requests) - 1);
    fz_seed(dir, "dirty-log-highmem", highmem, sizeof(highmem) - 1);
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
