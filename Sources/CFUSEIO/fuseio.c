// Hand-written because libfuse 3.14 (Debian 12) stops short of it: the
// kernel has offered FUSE_HANDLE_KILLPRIV_V2 since 5.11, but libfuse only
// learned to negotiate it in 3.17, and 3.14 drops the flags that come with it
// (FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID)
// before a request reaches the filesystem.
//
// Why it matters: without it the kernel asks for the security.capability
// attribute before every write(2) (one GETXATTR round trip per write; a
// third of the requests of an untar), because it must check whether the
// write has privileges to remove. With it the filesystem removes them
// itself, the kernel marks the superblock SB_NOSEC and asks once per inode.
//
// How: libfuse's custom I/O (fuse_session_custom_io, 3.14) lets us see every
// request as read and every reply as written. The read hook notes the INIT
// request's offer and, per thread, whether the request about to be handled
// asks to kill set-user-ID/set-group-ID bits (libfuse's multi-threaded loop
// reads and handles a request on the same thread). The writev hook adds
// FUSE_HANDLE_KILLPRIV_V2 to the INIT reply if the kernel offered it.
//
// The read hook also polls (kmsfs_fuseio_set_poll): a request answered
// within the window is usually followed by the next one within microseconds
// (tar, cp -r, rm -rf, make: one syscall after another), and a thread
// asleep in read(2) costs that next request a wake-up — on this VM most of
// a request's round trip (a GETXATTR that does nothing took 16 µs, 8 µs
// polled). So one thread at a time (never more) looks at the device without
// sleeping for up to the window after its last request, then sleeps in
// read(2) as before. libfuse has no such mode; the kernel's FUSE-over-io_uring
// (6.14+) is the lasting answer and needs libfuse 3.17.
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include "CFUSEIO.h"

#include <errno.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <poll.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static atomic_uint_fast64_t init_unique;
static atomic_uint_fast32_t init_offered;
static atomic_int init_seen;
static atomic_int killpriv_v2;
static _Thread_local int kills_suidgid;
static atomic_long poll_ns;
static atomic_int polling;
static atomic_uint_fast64_t polled;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

// Waits up to the poll window for a request without sleeping, if no other
// thread is; returns with one readable, or the window over (read(2) sleeps).
static void poll_briefly(int fd) {
    long window = atomic_load(&poll_ns);
    if (window <= 0 || atomic_exchange(&polling, 1)) return;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    long start = now_ns();
    int ready;
    while ((ready = poll(&p, 1, 0)) == 0 && now_ns() - start < window) {}
    if (ready > 0) atomic_fetch_add(&polled, 1);
    atomic_store(&polling, 0);
}

static const void *argument(const void *buf, ssize_t n, size_t size) {
    if (n < (ssize_t)(sizeof(struct fuse_in_header) + size)) return NULL;
    return (const char *)buf + sizeof(struct fuse_in_header);
}

static ssize_t hook_read(int fd, void *buf, size_t len, void *userdata) {
    (void)userdata;
    poll_briefly(fd);
    ssize_t n = read(fd, buf, len);
    int saved = errno;
    kills_suidgid = 0;
    if (n >= (ssize_t)sizeof(struct fuse_in_header)) {
        const struct fuse_in_header *in = buf;
        switch (in->opcode) {
        case FUSE_INIT: {
            const struct fuse_init_in *arg = argument(buf, n, offsetof(struct fuse_init_in, flags) + sizeof(arg->flags));
            if (arg) {
                atomic_store(&init_offered, arg->flags);
                atomic_store(&init_unique, in->unique);
                atomic_store(&init_seen, 1);
            }
            break;
        }
        case FUSE_WRITE: {
            const struct fuse_write_in *arg = argument(buf, n, sizeof(struct fuse_write_in));
            kills_suidgid = arg && (arg->write_flags & FUSE_WRITE_KILL_SUIDGID);
            break;
        }
        case FUSE_SETATTR: {
            // A truncate or chown says so with FATTR_KILL_SUIDGID. A SETATTR
            // that changes nothing at all is the kernel's file_remove_privs
            // having found bits to remove before a write, fallocate or
            // copy into the file: under this scheme it strips its own kill
            // flags and sends the request empty, so empty means "remove them".
            const struct fuse_setattr_in *arg = argument(buf, n, sizeof(struct fuse_setattr_in));
            // (Only under that scheme: otherwise the kernel clears the bits with a mode change itself.)
            kills_suidgid = arg && ((arg->valid & FATTR_KILL_SUIDGID)
                                    || (atomic_load(&killpriv_v2) && (arg->valid & ~(uint32_t)(FATTR_FH | FATTR_LOCKOWNER)) == 0));
            break;
        }
        case FUSE_OPEN: {
            const struct fuse_open_in *arg = argument(buf, n, sizeof(struct fuse_open_in));
            kills_suidgid = arg && (arg->open_flags & FUSE_OPEN_KILL_SUIDGID);
            break;
        }
        case FUSE_CREATE: {
            const struct fuse_create_in *arg = argument(buf, n, sizeof(struct fuse_create_in));
            kills_suidgid = arg && (arg->open_flags & FUSE_OPEN_KILL_SUIDGID);
            break;
        }
        default: break;
        }
    }
    errno = saved;
    return n;
}

static ssize_t hook_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)userdata;
    if (atomic_load(&init_seen) && count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header)
        && iov[1].iov_len >= offsetof(struct fuse_init_out, flags) + sizeof(uint32_t)) {
        const struct fuse_out_header *out = iov[0].iov_base;
        if (out->error == 0 && out->unique == atomic_load(&init_unique)) {
            atomic_store(&init_seen, 0);
            struct fuse_init_out *arg = iov[1].iov_base;
            if (atomic_load(&init_offered) & FUSE_HANDLE_KILLPRIV_V2) {
                arg->flags |= FUSE_HANDLE_KILLPRIV_V2;
                atomic_store(&killpriv_v2, 1);
            }
        }
    }
    return writev(fd, iov, count);
}

int kmsfs_fuseio_install(struct fuse_session *se) {
    const struct fuse_custom_io io = { .writev = hook_writev, .read = hook_read };
    return fuse_session_custom_io(se, &io, fuse_session_fd(se));
}

int kmsfs_fuseio_request_kills_suidgid(void) { return kills_suidgid; }

void kmsfs_fuseio_set_poll(long microseconds) { atomic_store(&poll_ns, microseconds > 0 ? microseconds * 1000 : 0); }

unsigned long long kmsfs_fuseio_polled(void) { return atomic_load(&polled); }
