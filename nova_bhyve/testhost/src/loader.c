/*
 * Multiboot v1 loader: places an ELF32 kernel (or an a.out-kludge image)
 * in guest memory and builds the multiboot information structure, as
 * `qemu-system-x86_64 -kernel` does.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testhost.h"

#define MB_MAGIC 0x1badb002u
#define MB_SEARCH 8192
#define MB_AOUT_KLUDGE (1u << 16)
#define MB_MAX_IMAGE (64u << 20)

/* Where the boot information lives (conventional memory, below 1 MiB). */
#define MBI_ADDR 0x9000u
#define MBI_NAME_ADDR 0x9100u
#define MBI_MMAP_ADDR 0x9200u
#define MBI_CMDLINE_ADDR 0x9800u
#define MBI_CMDLINE_MAX 2048u
#define MBI_AREA_END 0xa000u

struct mb_header {
    uint32_t magic, flags, checksum;
    uint32_t header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr;
};

struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
    uint32_t mods_count, mods_addr, syms[4];
    uint32_t mmap_length, mmap_addr, drives_length, drives_addr;
    uint32_t config_table, boot_loader_name, apm_table;
    uint32_t vbe[6];
} __attribute__((packed));

struct mb_mmap {
    uint32_t size;
    uint64_t addr, len;
    uint32_t type;
} __attribute__((packed));

/* Guest-physical range [gpa, gpa+len) -> host pointer, or NULL. */
static uint8_t *gpa_ptr(struct nb_vm *vm, uint64_t gpa, uint64_t len)
{
    if (gpa + len < gpa)
        return NULL;
    if (gpa + len <= vm->lowmem)
        return vm->mem + gpa;
    if (gpa >= NB_HIGHMEM_BASE && gpa + len <= NB_HIGHMEM_BASE + vm->highmem)
        return vm->mem + vm->lowmem + (gpa - NB_HIGHMEM_BASE);
    return NULL;
}

static int place(struct nb_vm *vm, uint64_t gpa, const uint8_t *src,
                 uint64_t filesz, uint64_t memsz, char *err, size_t errlen)
{
    uint8_t *dst;
    if (memsz < filesz || gpa < MBI_AREA_END ||
        !(dst = gpa_ptr(vm, gpa, memsz))) {
        snprintf(err, errlen, "kernel segment at 0x%llx (+0x%llx) does not "
                 "fit in guest RAM above 0x%x", (unsigned long long)gpa,
                 (unsigned long long)memsz, MBI_AREA_END);
        return -1;
    }
    memcpy(dst, src, filesz);
    memset(dst + filesz, 0, memsz - filesz);
    return 0;
}

static int load_elf32(struct nb_vm *vm, const uint8_t *img, size_t size,
                      uint64_t *entry, char *err, size_t errlen)
{
    const Elf32_Ehdr *eh = (const Elf32_Ehdr *)img;
    int loaded = 0;

    if (size < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 ||
        eh->e_ident[EI_CLASS] != ELFCLASS32 || eh->e_machine != EM_386) {
        snprintf(err, errlen, "not an ELF32 i386 image (64-bit ELF kernels "
                 "are not multiboot v1; use the a.out kludge or ELF32)");
        return -1;
    }
    if (eh->e_phentsize != sizeof(Elf32_Phdr) ||
        (uint64_t)eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf32_Phdr) > size) {
        snprintf(err, errlen, "ELF program headers out of bounds");
        return -1;
    }
    for (int i = 0; i < eh->e_phnum; i++) {
        const Elf32_Phdr *ph = (const Elf32_Phdr *)(img + eh->e_phoff) + i;
        if (ph->p_type != PT_LOAD || ph->p_memsz == 0)
            continue;
        if ((uint64_t)ph->p_offset + ph->p_filesz > size) {
            snprintf(err, errlen, "ELF segment %d extends past end of file", i);
            return -1;
        }
        if (place(vm, ph->p_paddr, img + ph->p_offset, ph->p_filesz,
                  ph->p_memsz, err, errlen) < 0)
            return -1;
        loaded++;
    }
    if (!loaded) {
        snprintf(err, errlen, "ELF image has no loadable segment");
        return -1;
    }
    *entry = eh->e_entry;
    return 0;
}

static int load_aout(struct nb_vm *vm, const uint8_t *img, size_t size,
                     const struct mb_header *h, size_t hoff, uint64_t *entry,
                     char *err, size_t errlen)
{
    uint64_t file_off, load_end, bss_end, filesz;

    if (h->load_addr > h->header_addr || hoff < h->header_addr - h->load_addr) {
        snprintf(err, errlen, "multiboot a.out header addresses inconsistent");
        return -1;
    }
    file_off = hoff - (h->header_addr - h->load_addr);
    load_end = h->load_end_addr ? h->load_end_addr
                                : h->load_addr + (size - file_off);
    if (load_end < h->load_addr || file_off + (load_end - h->load_addr) > size) {
        snprintf(err, errlen, "multiboot a.out load range exceeds the file");
        return -1;
    }
    filesz = load_end - h->load_addr;
    bss_end = h->bss_end_addr > load_end ? h->bss_end_addr : load_end;
    if (place(vm, h->load_addr, img + file_off, filesz,
              bss_end - h->load_addr, err, errlen) < 0)
        return -1;
    *entry = h->entry_addr;
    return 0;
}

static void build_mbi(struct nb_vm *vm, const char *cmdline)
{
    struct mb_info *mbi = (struct mb_info *)(vm->mem + MBI_ADDR);
    struct mb_mmap *mm = (struct mb_mmap *)(vm->mem + MBI_MMAP_ADDR);
    int n = 0;

    memset(vm->mem + MBI_ADDR, 0, MBI_AREA_END - MBI_ADDR);
    mm[n++] = (struct mb_mmap){ 20, 0, 0x9fc00, 1 };
    mm[n++] = (struct mb_mmap){ 20, 0x9fc00, 0x400, 2 };
    mm[n++] = (struct mb_mmap){ 20, 0xf0000, 0x10000, 2 };
    mm[n++] = (struct mb_mmap){ 20, 0x100000, vm->lowmem - 0x100000, 1 };
    if (vm->highmem)
        mm[n++] = (struct mb_mmap){ 20, NB_HIGHMEM_BASE, vm->highmem, 1 };

    strcpy((char *)vm->mem + MBI_NAME_ADDR, "nb-testhost");
    snprintf((char *)vm->mem + MBI_CMDLINE_ADDR, MBI_CMDLINE_MAX, "%s",
             cmdline ? cmdline : "");
    mbi->flags = 0x1 | 0x4 | 0x40 | 0x200; /* mem, cmdline, mmap, loader */
    mbi->mem_lower = 639;
    mbi->mem_upper = (uint32_t)((vm->lowmem - 0x100000) / 1024);
    mbi->cmdline = MBI_CMDLINE_ADDR;
    mbi->mmap_addr = MBI_MMAP_ADDR;
    mbi->mmap_length = (uint32_t)(n * (int)sizeof(*mm));
    mbi->boot_loader_name = MBI_NAME_ADDR;
}

int nb_load_multiboot(struct nb_vm *vm, const char *path, const char *cmdline,
                      uint64_t *entry, uint64_t *mbi, char *err, size_t errlen)
{
    struct stat st;
    uint8_t *img = NULL;
    size_t got = 0;
    int fd, rc = -1;
    const struct mb_header *h = NULL;
    size_t hoff = 0;

    if (cmdline && strlen(cmdline) >= MBI_CMDLINE_MAX) {
        snprintf(err, errlen, "kernel command line longer than %u bytes",
                 MBI_CMDLINE_MAX - 1);
        return -1;
    }
    if (vm->lowmem < (16u << 20)) {
        snprintf(err, errlen, "guest needs at least 16 MiB of memory");
        return -1;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) < 0) {
        snprintf(err, errlen, "cannot open kernel %s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode) || st.st_size < 64 || st.st_size > MB_MAX_IMAGE) {
        snprintf(err, errlen, "kernel %s is not a regular file of 64 B to "
                 "64 MiB", path);
        goto out;
    }
    img = malloc((size_t)st.st_size);
    if (!img) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, img + got, (size_t)st.st_size - got);
        if (r <= 0) {
            snprintf(err, errlen, "reading kernel %s failed", path);
            goto out;
        }
        got += (size_t)r;
    }
    for (size_t off = 0; off + sizeof(*h) <= got && off < MB_SEARCH; off += 4) {
        const struct mb_header *c = (const struct mb_header *)(img + off);
        if (c->magic == MB_MAGIC && c->magic + c->flags + c->checksum == 0) {
            h = c;
            hoff = off;
            break;
        }
    }
    if (!h) {
        snprintf(err, errlen, "%s has no multiboot v1 header in its first "
                 "8 KiB", path);
        goto out;
    }
    if (h->flags & MB_AOUT_KLUDGE)
        rc = load_aout(vm, img, got, h, hoff, entry, err, errlen);
    else
        rc = load_elf32(vm, img, got, entry, err, errlen);
    if (rc == 0) {
        build_mbi(vm, cmdline);
        *mbi = MBI_ADDR;
    }
out:
    free(img);
    if (fd >= 0)
        close(fd);
    return rc;
}
