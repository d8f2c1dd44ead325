// Linux-only system calls and constants that Swift's Glibc module hides
// behind _GNU_SOURCE. Thin wrappers, no logic.
#ifndef KMSFS_CLINUX_SHIM_H
#define KMSFS_CLINUX_SHIM_H

#include <sys/syscall.h>
#include <sys/vfs.h>
#include <sys/xattr.h>
#include <unistd.h>

static const int KMSFS_O_PATH = 010000000;
static const short KMSFS_POSIX_SPAWN_SETSID = 0x80;
static const int KMSFS_AT_EMPTY_PATH = 0x1000;
static const unsigned int KMSFS_RENAME_NOREPLACE = 1;
static const unsigned int KMSFS_RENAME_EXCHANGE = 2;
static const long KMSFS_UTIME_NOW = (1l << 30) - 1l;
static const long KMSFS_UTIME_OMIT = (1l << 30) - 2l;

/// renameat2(2); glibc declares it only under _GNU_SOURCE.
static inline int kmsfs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags) {
    return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}

#include <fcntl.h>

/// pipe2(2) with O_CLOEXEC; glibc declares pipe2 only under _GNU_SOURCE.
/// Reserves [offset, offset + length) without changing the size (keep) or
/// frees it again (punch): fallocate(2)'s KEEP_SIZE and PUNCH_HOLE modes.
static inline int kmsfs_reserve(int fd, long long offset, long long length, int punch) {
    return (int)syscall(SYS_fallocate, fd, punch ? 0x03 : 0x01, (long long)offset, (long long)length);
}

/// The filesystem type (statfs's f_type, a *_MAGIC) `fd` is on; 0 if unknown.
static inline long kmsfs_filesystem_type(int fd) {
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 ? (long)fs.f_type : 0;
}

static inline int kmsfs_pipe_cloexec(int fds[2]) {
    return (int)syscall(SYS_pipe2, fds, O_CLOEXEC);
}

#include <spawn.h>
/// glibc 2.34+ declares it only under _GNU_SOURCE.
extern int posix_spawn_file_actions_addclosefrom_np(posix_spawn_file_actions_t *actions, int from);

/// Makes a spawned child close every descriptor from `first` up before it
/// runs, so the daemon starts holding nothing its parent happened to have.
/// (Closing them in the daemon itself, as kmsfs once did, also closed the
/// epoll descriptor libdispatch had already made there: its event thread
/// then spun on EINVAL and no Dispatch source — URLSession's — ever fired.)
static inline int kmsfs_spawn_close_from(posix_spawn_file_actions_t *actions, int first) {
    return posix_spawn_file_actions_addclosefrom_np(actions, first);
}

#include <sys/socket.h>

/// The uid, gid and pid of a Unix-socket peer (SO_PEERCRED; struct ucred is
/// hidden behind _GNU_SOURCE, so its layout is spelled out here).
static inline int kmsfs_peer_credentials(int fd, unsigned int *uid, unsigned int *gid, int *pid) {
    struct { int pid; unsigned int uid; unsigned int gid; } cred;
    socklen_t length = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, 17 /* SO_PEERCRED */, &cred, &length) != 0) return -1;
    *uid = cred.uid; *gid = cred.gid; *pid = cred.pid;
    return 0;
}

#include <sys/prctl.h>
#include <sys/resource.h>

/// Keeps key material out of core dumps: no core file, and not dumpable
/// (prctl is variadic, so Swift cannot call it).
static inline int kmsfs_disable_core_dumps(void) {
    struct rlimit none = { 0, 0 };
    int a = setrlimit(RLIMIT_CORE, &none);
    int b = prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    return a == 0 && b == 0 ? 0 : -1;
}

/// Raises the open-file limit as far as allowed (the hard limit; as root up
/// to fs.nr_open): the mount keeps a descriptor for every inode the kernel
/// holds. Returns the new soft limit.
static inline long kmsfs_raise_open_file_limit(long ceiling) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return -1;
    if (ceiling > 0 && (rlim_t)ceiling > limit.rlim_max) {
        struct rlimit wider = { (rlim_t)ceiling, (rlim_t)ceiling };
        if (setrlimit(RLIMIT_NOFILE, &wider) == 0) return ceiling;
    }
    limit.rlim_cur = limit.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &limit) != 0) return -1;
    return (long)limit.rlim_cur;
}

/// A kernel file handle (struct file_handle with room for any filesystem's:
/// MAX_HANDLE_SZ is 128). glibc declares the calls only under _GNU_SOURCE.
struct kmsfs_file_handle {
    unsigned int handle_bytes;
    int handle_type;
    unsigned char f_handle[128];
};

/// name_to_handle_at(2) of the entry `fd` itself (AT_EMPTY_PATH).
static inline int kmsfs_handle_of(int fd, struct kmsfs_file_handle *handle, int *mount_id) {
    handle->handle_bytes = sizeof handle->f_handle;
    return (int)syscall(SYS_name_to_handle_at, fd, "", handle, mount_id, 0x1000);
}

/// open_by_handle_at(2): needs CAP_DAC_READ_SEARCH; `mount_fd` any
/// descriptor (not O_PATH) on the handle's filesystem.
static inline int kmsfs_open_by_handle(int mount_fd, struct kmsfs_file_handle *handle, int flags) {
    return (int)syscall(SYS_open_by_handle_at, mount_fd, handle, flags);
}

#endif
