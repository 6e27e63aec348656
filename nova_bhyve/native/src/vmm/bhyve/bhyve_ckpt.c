/*
 * bhyve's checkpoint socket, client side, and the files `bhyve -r` reads;
 * declared in bhyve.h.  Plain POSIX (AF_UNIX, SCM_RIGHTS), so it also
 * builds on Linux, where the unit tests run it against a stand-in server.
 *
 * Protocol (usr.sbin/bhyve/snapshot.c, usr.sbin/bhyvectl/bhyvectl.c):
 * the client connects to RUNDIR/NAME and sends one nvlist with
 * nvlist_send(): the packed list, then a one-byte message carrying the
 * descriptors (SCM_RIGHTS).  bhyve's checkpoint thread accepts, runs
 * nvlist_recv(), handles {cmd="checkpoint", filename, suspend, fddir} by
 * writing FILE (guest RAM), FILE.kern and FILE.meta with openat(fddir),
 * and closes the connection without replying.  EOF therefore marks the
 * end of the checkpoint, successful or not; the files tell which.
 *
 * With suspend=false bhyve resumes the vCPUs when it is done; with
 * suspend=true (opts->exit_on_save) it destroys the VM and exits instead.
 * The checkpoint is then the only copy of the guest, so it is written to
 * the fixed directory nb_bhyve_keep_dir() names and kept: `bhyve -r
 * DIR/ckpt` restarts the source if the migration does not commit.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif

#include "vmm/bhyve/bhyve.h"

#include <sys/types.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define fail nb_errf
#define sysfail nb_syserrf



int nb_bhyve_connect(const struct nb_bhyve_opts *o, char *err)
{
    struct sockaddr_un sa;
    socklen_t salen;
    int s;

    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if ((size_t)snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/%s",
                         o->rundir, o->name) >= sizeof(sa.sun_path))
        return fail(err, "checkpoint socket path %s/%s is too long for "
                    "AF_UNIX: use a shorter rundir", o->rundir, o->name);
    salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) +
                        strlen(sa.sun_path) + 1);
#if defined(__FreeBSD__)
    sa.sun_len = (unsigned char)salen;
#endif
    if ((s = socket(PF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return sysfail(err, "socket(PF_UNIX)");
    if (connect(s, (struct sockaddr *)&sa, salen) != 0) {
        sysfail(err, "cannot connect to bhyve's checkpoint socket %s (is "
                "bhyve built with BHYVE_SNAPSHOT and running? set rundir= "
                "if its run directory differs)", sa.sun_path);
        close(s);
        return -1;
    }
    return s;
}

static int send_all(int s, const uint8_t *p, size_t len, char *err)
{
    ssize_t n;

    while (len > 0) {
        if ((n = send(s, p, len, MSG_NOSIGNAL)) < 0) {
            if (errno == EINTR)
                continue;
            return sysfail(err, "sending the checkpoint request to bhyve");
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* libnv's fd_send(): a one-byte message (0) carrying the descriptor. */
static int send_fd(int s, int fd, char *err)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    struct msghdr msg;
    struct cmsghdr *c;
    struct iovec iov;
    char byte = 0;

    memset(&u, 0, sizeof(u));
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = &byte;
    iov.iov_len = 1;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof(u.buf);
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    while (sendmsg(s, &msg, MSG_NOSIGNAL) < 0) {
        if (errno != EINTR)
            return sysfail(err, "passing the checkpoint directory to bhyve");
    }
    return 0;
}

static int wait_eof(const struct nb_bhyve_opts *o, int s, char *err)
{
    struct timespec now, end;
    struct pollfd pfd = { .fd = s, .events = POLLIN };
    char buf[256];
    ssize_t n;
    long ms;

    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += o->timeout;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        ms = (long)(end.tv_sec - now.tv_sec) * 1000 +
             (end.tv_nsec - now.tv_nsec) / 1000000;
        if (ms <= 0)
            return fail(err, "bhyve did not finish the checkpoint of %s in "
                        "%d s (raise timeout=, or check that scratch=%s has "
                        "room for all guest RAM)", o->name, o->timeout,
                        o->scratch);
        pfd.revents = 0;
        if (poll(&pfd, 1, (int)ms) < 0 && errno != EINTR)
            return sysfail(err, "waiting for bhyve's checkpoint");
        if (pfd.revents == 0)
            continue;
        if ((n = recv(s, buf, sizeof(buf), 0)) == 0)
            return 0;
        if (n < 0 && errno != EINTR && errno != EAGAIN)
            return 0;                       /* reset: bhyve closed too */
    }
}

static int read_member(int dirfd, const char *name, size_t max, uint8_t **data,
                       size_t *len, char *err)
{
    struct stat st;
    ssize_t n;
    size_t got = 0;
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);

    if (fd < 0)
        return sysfail(err, "bhyve did not write %s (see bhyve's console: "
                       "every device of the VM must support snapshots)", name);
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size <= 0 ||
        (uint64_t)st.st_size > max) {
        close(fd);
        return fail(err, "checkpoint file %s is empty, not a regular file "
                    "or larger than %zu bytes", name, max);
    }
    if ((*data = malloc((size_t)st.st_size)) == NULL) {
        close(fd);
        return fail(err, "out of memory reading %s", name);
    }
    while (got < (size_t)st.st_size) {
        n = read(fd, *data + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            close(fd);
            return n < 0 ? sysfail(err, "reading checkpoint file %s", name)
                         : fail(err, "checkpoint file %s shrank while being "
                                "read", name);
        }
        got += (size_t)n;
    }
    close(fd);
    *len = got;
    return 0;
}

/* Empty and remove the private checkpoint directory. */
static void remove_dir(int dirfd, const char *path)
{
    struct dirent *de;
    DIR *d;
    int fd = dup(dirfd);

    if (fd >= 0 && (d = fdopendir(fd)) != NULL) {
        while ((de = readdir(d)) != NULL)
            if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
                unlinkat(dirfd, de->d_name, 0);
        closedir(d);
    } else if (fd >= 0) {
        close(fd);
    }
    rmdir(path);
}

int nb_bhyve_keep_dir(const struct nb_bhyve_opts *o, char *dir, size_t cap)
{
    return (size_t)snprintf(dir, cap, "%s/nb-bhyve-%s.ckpt", o->scratch,
                            o->name) < cap ? 0 : -1;
}

int nb_bhyve_checkpoint(const struct nb_bhyve_opts *o, uint64_t ram_total,
                        int (*after)(void *ctx, char *err), void *ctx,
                        uint8_t **blob, size_t *len, char *err)
{
    uint8_t msg[512], *meta = NULL, *kern = NULL, *out = NULL;
    size_t msglen, meta_len = 0, kern_len = 0, cap;
    char dir[300];
    struct stat st;
    int dirfd = -1, s = -1, rc = -1, keep = 0;

    if (nb_bhyve_checkpoint_msg(msg, sizeof(msg), &msglen, NB_BHYVE_CKPT_NAME,
                                o->exit_on_save, err) != 0)
        return -1;
    if (o->exit_on_save) {
        if (nb_bhyve_keep_dir(o, dir, sizeof(dir)) != 0)
            return fail(err, "scratch directory path is too long");
        if (mkdir(dir, 0700) != 0)
            return sysfail(err, "cannot create %s for the final checkpoint "
                           "(if it holds an older one, restore or remove it)",
                           dir);
    } else {
        snprintf(dir, sizeof(dir), "%s/nb-bhyve-ckpt.XXXXXX", o->scratch);
        if (mkdtemp(dir) == NULL)
            return sysfail(err, "cannot create a checkpoint directory in %s "
                           "(set scratch=)", o->scratch);
    }
    if ((dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
        sysfail(err, "cannot open %s", dir);
        goto out;
    }
    if ((s = nb_bhyve_connect(o, err)) < 0)
        goto out;
    keep = o->exit_on_save;     /* from here bhyve may exit after writing */
    if (send_all(s, msg, msglen, err) != 0 || send_fd(s, dirfd, err) != 0 ||
        wait_eof(o, s, err) != 0)
        goto out;
    if (after != NULL && after(ctx, err) != 0)
        goto out;
    if (read_member(dirfd, NB_BHYVE_CKPT_NAME ".meta", NB_BHYVE_MAX_META,
                    &meta, &meta_len, err) != 0 ||
        read_member(dirfd, NB_BHYVE_CKPT_NAME ".kern", NB_BHYVE_MAX_KERN,
                    &kern, &kern_len, err) != 0)
        goto out;
    if (fstatat(dirfd, NB_BHYVE_CKPT_NAME, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(st.st_mode) || (uint64_t)st.st_size != ram_total) {
        fail(err, "bhyve's RAM file is not the %llu bytes of guest RAM: the "
             "checkpoint failed (see bhyve's console)",
             (unsigned long long)ram_total);
        goto out;
    }
    if (nb_bhyve_meta_check((const char *)meta, meta_len, kern_len,
                            (uint64_t)st.st_size, NULL, err) != 0)
        goto out;
    cap = NB_BHYVE_BLOB_HEADER + meta_len + kern_len;
    if ((out = malloc(cap)) == NULL) {
        fail(err, "out of memory for a %zu-byte state blob", cap);
        goto out;
    }
    if (nb_bhyve_blob_pack(out, cap, len, meta, meta_len, kern, kern_len,
                           err) != 0)
        goto out;
    *blob = out;
    out = NULL;
    rc = 0;
out:
    if (s >= 0)
        close(s);
    if (dirfd >= 0 && !keep)
        remove_dir(dirfd, dir);
    else if (!keep)
        rmdir(dir);
    if (dirfd >= 0)
        close(dirfd);
    free(meta);
    free(kern);
    free(out);
    return rc;
}

/* Write path atomically (temporary file, fsync, rename), mode 0600. */
static int write_member(const char *path, const uint8_t *data, size_t len,
                        char *err)
{
    char tmp[1100];
    ssize_t n;
    size_t done = 0;
    int fd;

    snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path);
    if ((fd = mkstemp(tmp)) < 0)
        return sysfail(err, "cannot create %s", tmp);
    while (done < len) {
        if ((n = write(fd, data + done, len - done)) < 0) {
            if (errno == EINTR)
                continue;
            sysfail(err, "writing %s", tmp);
            goto bad;
        }
        done += (size_t)n;
    }
    if (fchmod(fd, 0600) != 0 || fsync(fd) != 0) {
        sysfail(err, "writing %s", tmp);
        goto bad;
    }
    close(fd);
    if (rename(tmp, path) != 0) {
        sysfail(err, "cannot rename %s to %s", tmp, path);
        unlink(tmp);
        return -1;
    }
    return 0;
bad:
    close(fd);
    unlink(tmp);
    return -1;
}

int nb_bhyve_restore_files(const struct nb_bhyve_opts *o, const uint8_t *blob,
                           size_t len, char *err)
{
    size_t mo, ml, ko, kl;
    char path[1100];
    struct stat st;

    if (o->restore[0] == '\0')
        return fail(err, "load_state needs the RAM file bhyve -r will restore "
                    "from: open the VM as '%s,restore=/path/to/ram'", o->name);
    if (nb_bhyve_blob_parse(blob, len, &mo, &ml, &ko, &kl, err) != 0)
        return -1;
    if (stat(o->restore, &st) == 0 && S_ISREG(st.st_mode) &&
        nb_bhyve_meta_check((const char *)blob + mo, ml, kl,
                            (uint64_t)st.st_size, NULL, err) != 0)
        return -1;
    snprintf(path, sizeof(path), "%s.kern", o->restore);
    if (write_member(path, blob + ko, kl, err) != 0)
        return -1;
    snprintf(path, sizeof(path), "%s.meta", o->restore);
    return write_member(path, blob + mo, ml, err);
}
