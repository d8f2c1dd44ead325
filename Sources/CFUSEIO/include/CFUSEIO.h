// Raw /dev/fuse I/O hooks for what libfuse 3.14 cannot negotiate or pass on:
// FUSE_HANDLE_KILLPRIV_V2 (protocol 7.33); brief polling for the next
// request. See fuseio.c.
#ifndef KMSFS_CFUSEIO_H
#define KMSFS_CFUSEIO_H

struct fuse_session;

/// Routes the mounted session's reads and replies through the hooks below
/// and offers FUSE_HANDLE_KILLPRIV_V2 in the INIT reply when the kernel
/// does. Call after fuse_session_mount and before the loop. 0 or -errno.
int kmsfs_fuseio_install(struct fuse_session *se);

/// 1 when the request this thread is handling asks the filesystem to clear
/// set-ID bits: a WRITE with FUSE_WRITE_KILL_SUIDGID, a SETATTR with
/// FATTR_KILL_SUIDGID or with nothing to change (file_remove_privs before a
/// write or fallocate), an OPEN or CREATE with FUSE_OPEN_KILL_SUIDGID. Only
/// valid inside a request handler.
int kmsfs_fuseio_request_kills_suidgid(void);

/// After each request, one worker thread at a time polls the device for the
/// next one for up to `microseconds` before it sleeps in read(2) (0: never).
void kmsfs_fuseio_set_poll(long microseconds);

/// Requests found by polling, since the process started.
unsigned long long kmsfs_fuseio_polled(void);

#endif
