#!/usr/bin/env python3
"""POSIX conformance probe for kmsfs.

Runs the same operations in DIR (as root, switching to other uids where a
case says so) and prints one JSON object: case name -> outcome (an errno
name, "ok", or the values the operation produced). Nothing in it knows what
the answers should be: the test runs it on an ext4 directory and on a kmsfs
mount and compares the two outcome maps (Tests/MountTests/ConformanceTests.swift).

Cases: every node type (regular, directory, fifo, socket, symlink, block,
char) through create, stat, chmod, chown, utimes, link, rename (onto every
other type), unlink/rmdir, open modes, truncate, readlink, xattrs, lookups
through it, d_type; permission and ownership rules as another uid; sticky
and setgid directories; setuid/setgid clearing; ctime/mtime/nlink updates
of each operation; ENAMETOOLONG at 256 bytes (and 255 working) for every
call that takes a name; ELOOP; symlink targets up to PATH_MAX-1; names as
bytes (every byte but '/' and NUL).

Usage: posix.py DIR
"""
import ctypes
import ctypes.util
import errno
import json
import os
import socket
import stat
import sys
import time

TYPES = ["reg", "dir", "fifo", "sock", "symlink", "blk", "chr"]
OTHER, OTHER_GID = 4242, 4242
THIRD, THIRD_GID = 4343, 4343
results = {}
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def plain(value):
    """JSON for what json does not know: bytes as hex."""
    return value.hex() if isinstance(value, bytes) else str(value)


def outcome(fn):
    try:
        value = fn()
        return "ok" if value is None else value
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def rec(name, fn):
    assert name not in results, name
    results[name] = outcome(fn)


def as_user(uid, gid, fn):
    """fn's outcome, run in a child process as uid/gid with no supplementary groups."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            out = outcome(fn)
        except BaseException as e:  # noqa: BLE001 - reported, not hidden
            out = "exception " + type(e).__name__
        os.write(w, json.dumps(out, default=plain).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def rec_as(name, uid, gid, fn):
    assert name not in results, name
    results[name] = as_user(uid, gid, fn)


def make(kind, path, mode=0o640):
    if kind == "reg":
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    elif kind == "dir":
        os.mkdir(path, mode)
    elif kind == "fifo":
        os.mkfifo(path, mode)
    elif kind == "sock":
        os.mknod(path, stat.S_IFSOCK | mode)
    elif kind == "symlink":
        os.symlink("dangling-target", path)
    elif kind == "blk":
        os.mknod(path, stat.S_IFBLK | mode, os.makedev(7, 200))
    elif kind == "chr":
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(1, 3))


def attrs(path):
    st = os.lstat(path)
    a = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)), "nlink": st.st_nlink,
         "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        a["size"] = st.st_size
    if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        a["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    return a


def tick():
    """Waits until the coarse clock (the one inode times come from) moves on."""
    start = time.clock_gettime_ns(COARSE)
    while time.clock_gettime_ns(COARSE) == start:
        pass


def changes(paths, op):
    """Which of each path's mtime, ctime and nlink `op` changed."""
    before = {p: os.lstat(p) for p in paths}
    tick()
    op()
    out = {}
    for p in paths:
        try:
            after = os.lstat(p)
        except OSError as e:
            out[p] = errno.errorcode[e.errno]
            continue
        b = before[p]
        out[p] = {"mtime": after.st_mtime_ns != b.st_mtime_ns, "ctime": after.st_ctime_ns != b.st_ctime_ns,
                  "nlink": after.st_nlink - b.st_nlink}
    return out


def d_types(path):
    """Name -> d_type, from readdir(3) itself (os.scandir hides d_type)."""
    class Dirent(ctypes.Structure):
        _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                    ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.POINTER(Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    d = libc.opendir(os.fsencode(path))
    if not d:
        raise OSError(ctypes.get_errno(), "opendir")
    out = {}
    try:
        while True:
            e = libc.readdir(d)
            if not e:
                break
            out[e.contents.d_name.decode("utf-8", "surrogateescape")] = e.contents.d_type
    finally:
        libc.closedir(d)
    return out


def renameat2(old, new, flags):
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # Linux: where inode times come from


def node_types():
    os.mkdir("types", 0o755)
    os.mkdir("types/sub", 0o755)
    for t in TYPES:
        p = "types/n_" + t
        rec(f"{t}/create", lambda: make(t, p))
        rec(f"{t}/create-again", lambda: make(t, p))
        rec(f"{t}/attrs", lambda: attrs(p))
        if t != "symlink":
            rec(f"{t}/chmod", lambda: (os.chmod(p, 0o604), attrs(p)["mode"])[1])
            rec(f"{t}/chmod-suid-sgid-sticky", lambda: (os.chmod(p, 0o7755), attrs(p)["mode"])[1])
            os.chmod(p, 0o640)
        rec(f"{t}/chown", lambda: (os.chown(p, OTHER, THIRD_GID, follow_symlinks=False), attrs(p)["uid"], attrs(p)["gid"])[1:])
        rec(f"{t}/chown-back", lambda: (os.chown(p, 0, 0, follow_symlinks=False), attrs(p)["uid"])[1])
        rec(f"{t}/utime", lambda: (os.utime(p, ns=(1_000_000_123, 2_000_000_456), follow_symlinks=False),
                                   os.lstat(p).st_atime_ns, os.lstat(p).st_mtime_ns)[1:])
        rec(f"{t}/open-rdonly", lambda: os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK)))
        rec(f"{t}/open-nofollow", lambda: os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)))
        rec(f"{t}/open-wronly", lambda: os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK)))
        rec(f"{t}/open-creat-excl", lambda: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)))
        rec(f"{t}/open-directory", lambda: os.close(os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)))
        rec(f"{t}/truncate", lambda: os.truncate(p, 0))
        rec(f"{t}/readlink", lambda: os.readlink(p))
        rec(f"{t}/xattr-set-user", lambda: os.setxattr(p, "user.k", b"v", follow_symlinks=False))
        rec(f"{t}/xattr-get-user", lambda: os.getxattr(p, "user.k", follow_symlinks=False).decode())
        rec(f"{t}/xattr-get-missing", lambda: os.getxattr(p, "user.none", follow_symlinks=False))
        rec(f"{t}/xattr-list", lambda: sorted(os.listxattr(p, follow_symlinks=False)))
        rec(f"{t}/xattr-remove", lambda: os.removexattr(p, "user.k", follow_symlinks=False))
        rec(f"{t}/listdir", lambda: sorted(os.listdir(p)))
        rec(f"{t}/lookup-child", lambda: os.lstat(p + "/x") and None)
        rec(f"{t}/mkdir-child", lambda: os.mkdir(p + "/x"))
        rec(f"{t}/rmdir", lambda: os.rmdir(p) if t != "dir" else "skipped")
        rec(f"{t}/access-x", lambda: os.access(p, os.X_OK, follow_symlinks=False))
        rec(f"{t}/link", lambda: (os.link(p, p + "_l", follow_symlinks=False), attrs(p)["nlink"], attrs(p + "_l")["type"])[1:])
        rec(f"{t}/rename-same", lambda: (os.rename(p, p), attrs(p)["type"])[1])
        if os.path.lexists(p + "_l"):
            rec(f"{t}/rename-hardlink-onto-itself", lambda: (os.rename(p, p + "_l"), os.path.lexists(p), os.path.lexists(p + "_l"))[1:])
            rec(f"{t}/unlink-one-link", lambda: (os.unlink(p + "_l"), attrs(p)["nlink"])[1])
        rec(f"{t}/rename-to-subdir", lambda: (os.rename(p, "types/sub/m_" + t), os.path.lexists(p), attrs("types/sub/m_" + t)["type"])[1:])
        q = "types/sub/m_" + t
        rec(f"{t}/d_type", lambda: d_types("types/sub").get("m_" + t))
        rec(f"{t}/unlink", lambda: (os.unlink(q), os.path.lexists(q))[1])
        if os.path.lexists(q):
            rec(f"{t}/rmdir-it", lambda: (os.rmdir(q), os.path.lexists(q))[1])


def rename_matrix():
    os.mkdir("matrix", 0o755)
    for s in TYPES:
        for d in TYPES:
            src, dst = f"matrix/s_{s}_{d}", f"matrix/d_{s}_{d}"
            make(s, src)
            make(d, dst)
            rec(f"rename/{s}-over-{d}", lambda: (renameat2(src, dst, 0), attrs(dst)["type"], os.path.lexists(src))[1:])
    make("dir", "matrix/full")
    make("reg", "matrix/full/x")
    make("dir", "matrix/empty")
    rec("rename/dir-over-nonempty-dir", lambda: os.rename("matrix/empty", "matrix/full"))
    rec("rename/dir-into-own-child", lambda: os.rename("matrix/full", "matrix/full/inner"))
    rec("rename/noreplace", lambda: renameat2("matrix/empty", "matrix/full", RENAME_NOREPLACE))
    make("reg", "matrix/x1")
    make("symlink", "matrix/x2")
    rec("rename/exchange", lambda: (renameat2("matrix/x1", "matrix/x2", RENAME_EXCHANGE),
                                     attrs("matrix/x1")["type"], attrs("matrix/x2")["type"])[1:])
    rec("rename/exchange-missing", lambda: renameat2("matrix/x1", "matrix/nothing", RENAME_EXCHANGE))
    rec("rename/missing-source", lambda: os.rename("matrix/nothing", "matrix/x1"))
    rec("rmdir/nonempty", lambda: os.rmdir("matrix/full"))
    rec("rmdir/dot", lambda: os.rmdir("matrix/empty/."))
    rec("rmdir/dotdot", lambda: os.rmdir("matrix/empty/.."))
    rec("unlink/dir", lambda: os.unlink("matrix/empty"))
    rec("link/dir", lambda: os.link("matrix/empty", "matrix/empty2"))
    rec("link/missing", lambda: os.link("matrix/nothing", "matrix/n2"))
    rec("link/onto-existing", lambda: os.link("matrix/x1", "matrix/x2"))


def permissions():
    os.mkdir("perm", 0o755)
    for t in TYPES:
        p = f"perm/o_{t}"
        make(t, p, 0o640)
        rec_as(f"as-other/{t}/chmod", OTHER, OTHER_GID, lambda: os.chmod(p, 0o777) if t != "symlink" else "skipped")
        rec_as(f"as-other/{t}/chown-to-self", OTHER, OTHER_GID, lambda: os.chown(p, OTHER, -1, follow_symlinks=False))
        rec_as(f"as-other/{t}/utime-now", OTHER, OTHER_GID, lambda: os.utime(p, None, follow_symlinks=False) if t != "symlink" else "skipped")
        rec_as(f"as-other/{t}/utime-set", OTHER, OTHER_GID, lambda: os.utime(p, (5, 5), follow_symlinks=False))
        rec_as(f"as-other/{t}/unlink", OTHER, OTHER_GID, lambda: os.unlink(p) if t != "dir" else os.rmdir(p))
        rec_as(f"as-other/{t}/rename", OTHER, OTHER_GID, lambda: os.rename(p, p + "x"))
        rec_as(f"as-other/{t}/open-read", OTHER, OTHER_GID, lambda: os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK)))
        rec_as(f"as-other/{t}/access-r", OTHER, OTHER_GID, lambda: os.access(p, os.R_OK))
        rec_as(f"as-other/{t}/xattr-set", OTHER, OTHER_GID, lambda: os.setxattr(p, "user.o", b"1", follow_symlinks=False))
    rec_as("as-other/create-in-root-dir", OTHER, OTHER_GID, lambda: make("reg", "perm/mine"))
    rec_as("as-other/mkdir-in-root-dir", OTHER, OTHER_GID, lambda: make("dir", "perm/mine"))
    os.mkdir("perm/open", 0o777)
    for t in TYPES:
        if t in ("blk", "chr"):
            rec_as(f"as-other/{t}/mknod", OTHER, OTHER_GID, lambda: make(t, f"perm/open/{t}"))
            continue
        rec_as(f"as-other/{t}/create-in-open-dir", OTHER, OTHER_GID, lambda: (make(t, f"perm/open/{t}"), attrs(f"perm/open/{t}"))[1])
    # Ownership a root caller gives, and what a new owner may then do.
    make("reg", "perm/given", 0o600)
    os.chown("perm/given", OTHER, OTHER_GID)
    rec_as("as-other/write-given-file", OTHER, OTHER_GID, lambda: os.close(os.open("perm/given", os.O_WRONLY)))
    rec_as("as-other/chmod-given-file", OTHER, OTHER_GID, lambda: (os.chmod("perm/given", 0o640), attrs("perm/given")["mode"])[1])
    rec_as("as-other/chgrp-to-foreign-group", OTHER, OTHER_GID, lambda: os.chown("perm/given", -1, THIRD_GID))
    rec_as("as-third/read-given-file", THIRD, THIRD_GID, lambda: os.close(os.open("perm/given", os.O_RDONLY)))
    # A directory without search permission hides what is in it.
    os.mkdir("perm/closed", 0o700)
    make("reg", "perm/closed/f", 0o644)
    rec_as("as-other/stat-in-closed-dir", OTHER, OTHER_GID, lambda: os.stat("perm/closed/f") and None)
    rec_as("as-other/list-closed-dir", OTHER, OTHER_GID, lambda: os.listdir("perm/closed"))
    os.mkdir("perm/searchonly", 0o711)
    make("reg", "perm/searchonly/f", 0o644)
    rec_as("as-other/stat-in-search-only-dir", OTHER, OTHER_GID, lambda: attrs("perm/searchonly/f")["mode"])
    rec_as("as-other/list-search-only-dir", OTHER, OTHER_GID, lambda: os.listdir("perm/searchonly"))


def sticky_setgid():
    os.mkdir("sticky", 0o1777)
    rec("sticky/mode", lambda: attrs("sticky")["mode"])
    for t in ("reg", "dir", "symlink", "fifo"):
        p = f"sticky/{t}"
        rec_as(f"sticky/{t}/create-as-other", OTHER, OTHER_GID, lambda: make(t, p, 0o666) if t != "dir" else make(t, p, 0o777))
        rec_as(f"sticky/{t}/unlink-as-third", THIRD, THIRD_GID, lambda: os.unlink(p) if t != "dir" else os.rmdir(p))
        rec_as(f"sticky/{t}/rename-as-third", THIRD, THIRD_GID, lambda: os.rename(p, p + "2"))
        rec_as(f"sticky/{t}/rename-over-as-third", THIRD, THIRD_GID,
               lambda: (make("reg", f"sticky/{t}-third", 0o666), os.rename(f"sticky/{t}-third", p))[1] if t != "dir" else "skipped")
        rec_as(f"sticky/{t}/unlink-as-owner", OTHER, OTHER_GID, lambda: os.unlink(p) if t != "dir" else os.rmdir(p))
    make("reg", "sticky/rootfile", 0o666)
    rec_as("sticky/root-file-unlink-as-other", OTHER, OTHER_GID, lambda: os.unlink("sticky/rootfile"))
    rec("sticky/root-unlinks-any", lambda: os.unlink("sticky/rootfile"))

    os.mkdir("sgid", 0o777)
    os.chown("sgid", 0, THIRD_GID)
    os.chmod("sgid", 0o2777)
    rec("sgid/mode", lambda: attrs("sgid")["mode"])
    for t in TYPES:
        rec(f"sgid/{t}/root-creates", lambda: (make(t, f"sgid/r_{t}", 0o2755 if t == "dir" else 0o755), attrs(f"sgid/r_{t}")["gid"],
                                               attrs(f"sgid/r_{t}")["mode"])[1:])
    rec_as("sgid/other-creates-file", OTHER, OTHER_GID, lambda: (make("reg", "sgid/o", 0o2755), attrs("sgid/o")["gid"], attrs("sgid/o")["mode"])[1:])
    rec_as("sgid/other-creates-dir", OTHER, OTHER_GID, lambda: (make("dir", "sgid/od", 0o755), attrs("sgid/od")["gid"], attrs("sgid/od")["mode"])[1:])
    rec_as("sgid/other-sets-sgid-on-foreign-group-file", OTHER, OTHER_GID, lambda: (os.chmod("sgid/o", 0o2755), attrs("sgid/o")["mode"])[1])

    # setuid and setgid bits are cleared by a write of a non-owner... and by chown.
    make("reg", "suid", 0o666)
    os.chown("suid", OTHER, OTHER_GID)
    os.chmod("suid", 0o6777)
    rec_as("suid/write-by-third-clears", THIRD, THIRD_GID, lambda: (write_one("suid"), attrs("suid")["mode"])[1])
    os.chmod("suid", 0o6755)
    rec("suid/chown-clears", lambda: (os.chown("suid", THIRD, THIRD_GID), attrs("suid")["mode"])[1])
    os.chmod("suid", 0o6777)
    rec("suid/truncate-by-root", lambda: (os.truncate("suid", 0), attrs("suid")["mode"])[1])


def times():
    os.mkdir("t", 0o755)
    os.mkdir("t/a", 0o755)
    os.mkdir("t/b", 0o755)
    make("reg", "t/a/f", 0o644)
    rec("times/create", lambda: changes(["t/a"], lambda: make("reg", "t/a/g")))
    rec("times/write", lambda: changes(["t/a/f", "t/a"], lambda: (lambda fd: (os.write(fd, b"data"), os.close(fd)))(os.open("t/a/f", os.O_WRONLY))))
    rec("times/read", lambda: changes(["t/a/f"], lambda: (lambda fd: (os.read(fd, 10), os.close(fd)))(os.open("t/a/f", os.O_RDONLY))))
    rec("times/truncate", lambda: changes(["t/a/f"], lambda: os.truncate("t/a/f", 2)))
    rec("times/truncate-same-size", lambda: changes(["t/a/f"], lambda: os.truncate("t/a/f", 2)))
    rec("times/open-trunc", lambda: changes(["t/a/f"], lambda: os.close(os.open("t/a/f", os.O_WRONLY | os.O_TRUNC))))
    rec("times/chmod", lambda: changes(["t/a/f", "t/a"], lambda: os.chmod("t/a/f", 0o600)))
    rec("times/chown", lambda: changes(["t/a/f"], lambda: os.chown("t/a/f", OTHER, OTHER_GID)))
    rec("times/utime", lambda: changes(["t/a/f"], lambda: os.utime("t/a/f", None)))
    rec("times/setxattr", lambda: changes(["t/a/f"], lambda: os.setxattr("t/a/f", "user.t", b"1")))
    rec("times/link", lambda: changes(["t/a/f", "t/a", "t/b"], lambda: os.link("t/a/f", "t/b/f2")))
    rec("times/unlink-one-link", lambda: changes(["t/a/f", "t/b"], lambda: os.unlink("t/b/f2")))
    rec("times/rename-within", lambda: changes(["t/a/f", "t/a"], lambda: os.rename("t/a/f", "t/a/f3")))
    rec("times/rename-across", lambda: changes(["t/a/f3", "t/a", "t/b"], lambda: os.rename("t/a/f3", "t/b/f")))
    rec("times/mkdir", lambda: changes(["t/a"], lambda: os.mkdir("t/a/d")))
    rec("times/rename-dir-across", lambda: changes(["t/a/d", "t/a", "t/b"], lambda: os.rename("t/a/d", "t/b/d")))
    rec("times/rmdir", lambda: changes(["t/b"], lambda: os.rmdir("t/b/d")))
    rec("times/symlink", lambda: changes(["t/a"], lambda: os.symlink("x", "t/a/s")))
    rec("times/mknod-fifo", lambda: changes(["t/a"], lambda: os.mkfifo("t/a/p")))
    rec("times/unlink", lambda: changes(["t/a"], lambda: os.unlink("t/a/p")))
    rec("times/rename-over", lambda: changes(["t/b/f", "t/b"], lambda: (make("reg", "t/b/new"), os.rename("t/b/new", "t/b/f"))))
    rec("times/listdir", lambda: changes(["t/b"], lambda: os.listdir("t/b")))


def names():
    os.mkdir("names", 0o755)
    long255 = "n" * 255
    long256 = "n" * 256
    rec("name/create-255", lambda: make("reg", "names/" + long255))
    rec("name/stat-255", lambda: attrs("names/" + long255)["type"])
    for t in TYPES:
        rec(f"name/{t}-256", lambda: make(t, "names/" + long256))
    rec("name/stat-256", lambda: os.lstat("names/" + long256) and None)
    rec("name/rename-to-256", lambda: os.rename("names/" + long255, "names/" + long256))
    rec("name/link-to-256", lambda: os.link("names/" + long255, "names/" + long256))
    rec("name/unlink-256", lambda: os.unlink("names/" + long256))
    rec("name/rmdir-256", lambda: os.rmdir("names/" + long256))
    rec("name/setxattr-name-256", lambda: os.setxattr("names/" + long255, "user." + "x" * 251, b"v"))
    rec("name/setxattr-name-255", lambda: os.setxattr("names/" + long255, "user." + "x" * 250, b"v"))
    # Names are bytes.
    created = []
    for b in range(1, 256):
        if b == ord("/"):
            continue
        n = b"names/b" + bytes([b])
        with open(n, "wb") as f:
            f.write(bytes([b]))
        created.append(bytes([b]))
    listed = set(os.listdir(b"names"))
    rec("name/every-byte-listed", lambda: all((b"b" + c) in listed for c in created))
    rec("name/every-byte-content", lambda: all(open(b"names/b" + c, "rb").read() == c for c in created))
    for raw in (b"caf\xe9", b"caf\xe8", b"\x80" * 255, b"\xff\xfe", b"\xc3\x28"):
        with open(b"names/" + raw, "wb") as f:
            f.write(raw)
    listed = set(os.listdir(b"names"))
    rec("name/latin1-distinct", lambda: [open(b"names/caf\xe9", "rb").read().hex(), open(b"names/caf\xe8", "rb").read().hex(),
                                          b"caf\xe9" in listed, b"caf\xe8" in listed])
    rec("name/255-non-utf8", lambda: (b"\x80" * 255) in listed and open(b"names/" + b"\x80" * 255, "rb").read() == b"\x80" * 255)
    rec("name/dir-non-utf8", lambda: (os.mkdir(b"names/d\xff"), os.rename(b"names/caf\xe9", b"names/d\xff/\xfe"),
                                      os.listdir(b"names/d\xff") == [b"\xfe"])[2])
    rec("name/xattr-non-utf8", lambda: (os.setxattr(b"names/\xff\xfe", b"user.\xff", b"1"),
                                        [os.fsencode(n) for n in os.listxattr(b"names/\xff\xfe")],
                                        os.getxattr(b"names/\xff\xfe", b"user.\xff"))[1:])


def symlinks():
    os.mkdir("links", 0o755)
    make("reg", "links/target", 0o644)
    rec("symlink/readlink-bytes", lambda: os.readlink(b"links/t1") if os.symlink(b"/x\xff\xfe/y", b"links/t1") is None else None)
    for n in (1, 100, 3000, 3100, 4000, 4095):
        target = "/" + "x" * (n - 1)
        rec(f"symlink/target-{n}", lambda: (os.symlink(target, f"links/len{n}"), os.readlink(f"links/len{n}") == target,
                                             os.lstat(f"links/len{n}").st_size)[1:])
    rec("symlink/target-4096", lambda: os.symlink("/" + "x" * 4095, "links/len4096"))
    rec("symlink/long-survives-link-and-unlink", lambda: (os.link("links/len4095", "links/len4095b", follow_symlinks=False),
                                                           os.unlink("links/len4095"), len(os.readlink("links/len4095b")))[2])
    os.symlink("loop2", "links/loop1")
    os.symlink("loop1", "links/loop2")
    rec("symlink/loop-open", lambda: os.close(os.open("links/loop1", os.O_RDONLY)))
    rec("symlink/loop-stat", lambda: os.stat("links/loop1") and None)
    rec("symlink/loop-lstat", lambda: attrs("links/loop1")["type"])
    prev = "target"
    for i in range(45):
        os.symlink(prev, f"links/c{i}")
        prev = f"c{i}"
    rec("symlink/chain-39", lambda: attrs(os.path.realpath("links/c38"))["type"] if os.stat("links/c38") else None)
    rec("symlink/chain-40", lambda: os.stat("links/c39") and "resolved")
    rec("symlink/chain-41", lambda: os.stat("links/c40") and "resolved")
    rec("symlink/chain-45", lambda: os.stat("links/c44") and "resolved")
    os.symlink("made-through-link", "links/dangling")
    rec("symlink/creat-through-dangling", lambda: (os.close(os.open("links/dangling", os.O_WRONLY | os.O_CREAT, 0o644)),
                                                    attrs("links/made-through-link")["type"])[1])
    rec("symlink/creat-excl-on-dangling", lambda: os.close(os.open("links/loop1", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)))
    os.symlink("target", "links/good")
    rec("symlink/follow-size", lambda: os.stat("links/good").st_size)
    rec("symlink/lstat-size", lambda: os.lstat("links/good").st_size)
    rec("symlink/empty-target", lambda: os.symlink("", "links/empty"))


def data():
    os.mkdir("data", 0o755)
    fd = os.open("data/f", os.O_RDWR | os.O_CREAT, 0o644)
    rec("data/pwrite-past-end", lambda: (os.pwrite(fd, b"end", 100_000), os.fstat(fd).st_size)[1])
    rec("data/hole-reads-zeros", lambda: os.pread(fd, 16, 50_000) == b"\0" * 16)
    rec("data/read-at-eof", lambda: os.pread(fd, 16, 100_003))
    rec("data/truncate-down", lambda: (os.ftruncate(fd, 10), os.fstat(fd).st_size, os.pread(fd, 20, 0))[1:2])
    rec("data/truncate-up-zeros", lambda: (os.ftruncate(fd, 70_000), os.pread(fd, 8, 69_990) == b"\0" * 8)[1])
    os.close(fd)
    fd = os.open("data/f", os.O_WRONLY | os.O_APPEND)
    rec("data/append", lambda: (os.write(fd, b"tail"), os.stat("data/f").st_size)[1])
    os.close(fd)
    rec("data/read-from-wronly", lambda: (lambda fd: os.read(fd, 1))(os.open("data/f", os.O_WRONLY)))
    rec("data/write-to-rdonly", lambda: (lambda fd: os.write(fd, b"x"))(os.open("data/f", os.O_RDONLY)))
    rec("data/read-dir", lambda: (lambda fd: os.read(fd, 1))(os.open("data", os.O_RDONLY)))
    rec("data/statvfs-namemax", lambda: os.statvfs(".").f_namemax)
    rec("data/umask0-create-mode", lambda: (make("reg", "data/m666", 0o666), attrs("data/m666")["mode"])[1])
    rec("data/mkdir-mode-bits", lambda: (os.mkdir("data/m", 0o3777), attrs("data/m")["mode"])[1])
    rec("data/mknod-regular", lambda: (os.mknod("data/r", stat.S_IFREG | 0o600), attrs("data/r"))[1])
    rec("data/dir-nlink", lambda: (os.mkdir("data/n"), os.mkdir("data/n/a"), os.mkdir("data/n/b"), attrs("data/n")["nlink"])[3])
    rec("data/chmod-on-symlink-follows", lambda: (os.symlink("f", "data/sl"), os.chmod("data/sl", 0o611), attrs("data/f")["mode"])[2])
    rec("data/unix-socket-bind", lambda: (lambda s: (s.bind("data/s.sock"), s.close(), attrs("data/s.sock")["type"])[2])(
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)))
    rec("data/unix-socket-connect", lambda: (lambda srv: (srv.bind("data/c.sock"), srv.listen(1),
                                                          (lambda c: (c.connect("data/c.sock"), c.close()))(socket.socket(socket.AF_UNIX)),
                                                          srv.close())[2] and "connected")(socket.socket(socket.AF_UNIX)))
    rec("data/fifo-roundtrip", fifo_roundtrip)
    rec("data/char-device-null", lambda: (os.mknod("data/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
                                          (lambda fd: (os.write(fd, b"gone"), os.read(fd, 4), os.close(fd))[:2])(os.open("data/null", os.O_RDWR)))[1])
    rec("data/char-device-zero", lambda: (os.mknod("data/zero", stat.S_IFCHR | 0o444, os.makedev(1, 5)),
                                          (lambda fd: (os.read(fd, 4), os.close(fd))[0])(os.open("data/zero", os.O_RDONLY)).hex())[1])
    rec("xattr/trusted-as-root", lambda: os.setxattr("data/f", "trusted.k", b"v"))
    rec("xattr/security", lambda: os.setxattr("data/f", "security.k", b"v"))
    rec("xattr/create-flag-existing", lambda: (os.setxattr("data/f", "user.c", b"1"), os.setxattr("data/f", "user.c", b"2", os.XATTR_CREATE)))
    rec("xattr/replace-flag-missing", lambda: os.setxattr("data/f", "user.nothere", b"2", os.XATTR_REPLACE))
    rec("xattr/value-4000", lambda: (os.setxattr("data/f", "user.big", b"v" * 4000), len(os.getxattr("data/f", "user.big")))[1])
    rec("xattr/empty-value", lambda: (os.setxattr("data/f", "user.empty", b""), os.getxattr("data/f", "user.empty"))[1].hex())


def write_one(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def fifo_roundtrip():
    os.mkfifo("data/pipe", 0o600)
    r = os.open("data/pipe", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open("data/pipe", os.O_WRONLY)
    os.write(w, b"through")
    got = os.read(r, 7)
    os.close(w)
    os.close(r)
    return got.decode()


def main():
    base = sys.argv[1]
    os.umask(0)
    os.chdir(base)
    for part in (node_types, rename_matrix, permissions, sticky_setgid, times, names, symlinks, data):
        try:
            part()
        except Exception as e:  # a part that breaks is itself an outcome to compare
            results[part.__name__ + "/aborted"] = f"{type(e).__name__}: {e}"
    json.dump(results, sys.stdout, indent=0, sort_keys=True, default=plain)


if __name__ == "__main__":
    main()
