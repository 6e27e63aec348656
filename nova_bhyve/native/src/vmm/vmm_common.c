/*
 * Helpers shared by the vmm ports: the guest-visible CPU facts of this
 * host (for the compatibility preamble), hole-skipping over a memory file
 * and whole-page writes into one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "vmm/vmm.h"

static void add(struct nb_guest_spec *s, uint32_t leaf, uint32_t sub, uint32_t reg,
                uint32_t bits)
{
    if (s->nfeat < sizeof(s->feat) / sizeof(s->feat[0]))
        s->feat[s->nfeat++] = (typeof(s->feat[0])){ leaf, sub, reg, bits };
}

/* Fill arch, CPU vendor and feature words (registers a=0, b=1, c=2, d=3). */
void nb_spec_fill_cpu(struct nb_guest_spec *s)
{
    struct utsname u;
    s->nfeat = 0;
    if (uname(&u) == 0 && !s->arch[0])
        snprintf(s->arch, sizeof(s->arch), "%s", strcmp(u.machine, "amd64") == 0
                 ? "x86_64" : u.machine);
#if defined(__x86_64__)
    {
        unsigned a, b, c, d, max, maxext;
        __cpuid(0, max, b, c, d);
        memcpy(s->cpu_vendor, &b, 4);
        memcpy(s->cpu_vendor + 4, &d, 4);
        memcpy(s->cpu_vendor + 8, &c, 4);
        s->cpu_vendor[12] = 0;
        __cpuid(1, a, b, c, d);
        /* OSXSAVE (ECX bit 27) reflects the OS's CR4, not the CPU */
        add(s, 1, 0, 2, c & ~(1u << 27));
        add(s, 1, 0, 3, d);
        if (max >= 7) {
            __cpuid_count(7, 0, a, b, c, d);
            add(s, 7, 0, 1, b);
            add(s, 7, 0, 2, c & ~(1u << 4));  /* OSPKE: OS state too */
            add(s, 7, 0, 3, d);
        }
        if (max >= 0xd) {
            __cpuid_count(0xd, 1, a, b, c, d);
            add(s, 0xd, 1, 0, a);
        }
        __cpuid(0x80000000, maxext, b, c, d);
        if (maxext >= 0x80000001) {
            __cpuid(0x80000001, a, b, c, d);
            add(s, 0x80000001, 0, 2, c);
            add(s, 0x80000001, 0, 3, d);
        }
    }
#else
    snprintf(s->cpu_vendor, sizeof(s->cpu_vendor), "unknown");
#endif
}

/* pwritev `n` whole pages to `fd` at `offset`, retrying short writes. */
int nb_file_write_pages(int fd, uint64_t offset, const uint8_t *const *pages,
                        int n, char *err)
{
    struct iovec iov[NB_WRITE_BATCH];
    size_t want = (size_t)n * NB_PAGE, done = 0;

    if (n < 1 || n > NB_WRITE_BATCH) {
        snprintf(err, NB_ERRLEN, "page batch of %d out of range", n);
        return -1;
    }
    while (done < want) {
        int first = (int)(done / NB_PAGE), k = 0;
        size_t skip = done % NB_PAGE;
        ssize_t w;
        for (int i = first; i < n; i++, k++) {
            iov[k].iov_base = (void *)(pages[i] + (i == first ? skip : 0));
            iov[k].iov_len = NB_PAGE - (i == first ? skip : 0);
        }
        w = pwritev(fd, iov, k, (off_t)(offset + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            snprintf(err, NB_ERRLEN, "writing guest memory at 0x%llx: %s",
                     (unsigned long long)(offset + done),
                     w < 0 ? strerror(errno) : "no progress");
            return -1;
        }
        done += (size_t)w;
    }
    return 0;
}

/* Next data extent at or after `off` in a sparse file of `size` bytes;
 * returns 1 when only holes remain. */
int nb_file_next_data(int fd, uint64_t size, uint64_t off, uint64_t *doff,
                      uint64_t *dend)
{
    off_t d = lseek(fd, (off_t)off, SEEK_DATA), h;
    if (d < 0)
        return 1;
    h = lseek(fd, d, SEEK_HOLE);
    *doff = (uint64_t)d;
    *dend = h < 0 ? size : (uint64_t)h;
    return 0;
}
