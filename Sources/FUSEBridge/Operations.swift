import CFUSE
import CFUSEIO
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif


/// Requests answered and errors by errno, for the daemon's metrics: one
/// relaxed atomic add per request, a lock only on an error.
public final class RequestCounters: Sendable {
    public let requests = Atomic<Int>(0)
    private let errors = Mutex<[Int32: Int]>([:])
    public static let shared = RequestCounters()

    func error(_ code: Int32) { errors.withLock { $0[code, default: 0] += 1 } }
    /// Errors answered so far, by errno.
    public var errorCounts: [Int32: Int] { errors.withLock { $0 } }
    /// Requests a worker found by polling the device after its last one
    /// (`FUSESession.run`'s poll window), not by waking from read(2).
    public var polled: Int { Int(kmsfs_fuseio_polled()) }
}

/// Holds the filesystem for the C callbacks, which reach it through
/// `fuse_req_userdata`.
final class FileSystemBox {
    let fileSystem: any FileSystem
    let maxWrite: UInt32
    init(_ fileSystem: any FileSystem, maxWrite: UInt32) {
        self.fileSystem = fileSystem
        self.maxWrite = maxWrite
    }
}

/// The libfuse low-level operation table. Built in a library function (not
/// top-level code), so the callbacks are not main-actor isolated; each is a
/// non-capturing closure that finds the filesystem through the request.
enum Operations {
    static func fileSystem(_ req: fuse_req_t?) -> any FileSystem {
        Unmanaged<FileSystemBox>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue().fileSystem
    }

    /// The handle open, create or opendir gave this request's file (0 when the kernel sent none).
    static func handle(_ fi: UnsafeMutablePointer<fuse_file_info>?) -> HandleID {
        HandleID(rawValue: fi?.pointee.fh ?? 0)
    }

    static func context(_ req: fuse_req_t?) -> RequestContext {
        guard let ctx = fuse_req_ctx(req)?.pointee else { return RequestContext(uid: 0, gid: 0, pid: 0) }
        return RequestContext(uid: ctx.uid, gid: ctx.gid, pid: ctx.pid, umask: UInt32(ctx.umask),
                              clearsSetID: kmsfs_fuseio_request_kills_suidgid() != 0)
    }

    /// The one place where an `Errno` becomes `fuse_reply_err`.
    /// Every request that reaches the filesystem's nodes runs here, inside
    /// `RequestGrace` (descriptors taken from nodes are closed only after it).
    static func reply(_ req: fuse_req_t?, _ body: () throws(Errno) -> Void) {
        RequestCounters.shared.requests.add(1, ordering: .relaxed)
        let grace = RequestGrace.shared.enter()
        defer { RequestGrace.shared.leave(grace) }
        do throws(Errno) {
            try body()
        } catch {
            RequestCounters.shared.error(error.rawValue)
            fuse_reply_err(req, error.rawValue)
        }
    }

    static func entryParam(_ entry: EntryReply) -> fuse_entry_param {
        var e = fuse_entry_param()
        e.ino = entry.node.rawValue
        e.generation = entry.generation
        e.attr = entry.attributes
        e.attr_timeout = entry.attributeTimeout
        e.entry_timeout = entry.entryTimeout
        return e
    }

    static func replyEntry(_ req: fuse_req_t?, _ entry: EntryReply) {
        var e = entryParam(entry)
        // The request is freed by the reply: take the filesystem first.
        let fs = Operations.fileSystem(req)
        fuse_reply_entry(req, &e)
        fs.entryReplied()
    }

    /// A request's name, byte for byte.
    static func name(_ raw: UnsafePointer<CChar>?) -> FileName {
        raw.map { FileName(cString: $0) } ?? FileName(bytes: [])
    }

    /// A request's symlink target, byte for byte.
    static func target(_ raw: UnsafePointer<CChar>?) -> [UInt8] {
        guard let raw else { return [] }
        return Array(UnsafeRawBufferPointer(start: raw, count: strlen(raw)))
    }

    static func make() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let conn, let userdata else { return }
            let box = Unmanaged<FileSystemBox>.fromOpaque(userdata).takeUnretainedValue()
            conn.pointee.max_write = min(conn.pointee.max_write == 0 ? box.maxWrite : max(conn.pointee.max_write, box.maxWrite), box.maxWrite)
            // Large reads as well as writes: fewer requests per megabyte.
            conn.pointee.max_readahead = max(conn.pointee.max_readahead, 1 << 20)
            if conn.pointee.capable & UInt32(FUSE_CAP_EXPORT_SUPPORT) != 0 { conn.pointee.want |= UInt32(FUSE_CAP_EXPORT_SUPPORT) }
            // Set-ID bits are cleared by the filesystem under the protocol's
            // second scheme (FUSE_HANDLE_KILLPRIV_V2, offered by CFUSEIO's
            // hooks), not the first, whose requests carry no flag to act on.
            conn.pointee.want &= ~UInt32(FUSE_CAP_HANDLE_KILLPRIV)
            // The daemon is CIPHERDIR's only writer while mounted (as the
            // 3600 s attribute time-out assumes), so the kernel need not ask
            // for attributes before each read to see whether the file changed
            // behind it; libfuse's default makes it do so whenever a write
            // invalidated them. Each such GETATTR also cleared the inode's
            // "no set-ID bits, no capabilities" mark, so the next write asked
            // for security.capability again: a random read/write mix paid
            // two round trips per write. (Reads past the cached size still ask.)
            conn.pointee.want &= ~UInt32(FUSE_CAP_AUTO_INVAL_DATA)
        }
        ops.destroy = { userdata in
            guard let userdata else { return }
            Unmanaged<FileSystemBox>.fromOpaque(userdata).takeUnretainedValue().fileSystem.destroy()
        }
        ops.lookup = { req, parent, name in
            Operations.reply(req) { () throws(Errno) in
                Operations.replyEntry(req, try Operations.fileSystem(req).lookup(NodeID(rawValue: parent), Operations.name(name), Operations.context(req)))
            }
        }
        ops.forget = { req, ino, count in
            Operations.fileSystem(req).forget(NodeID(rawValue: ino), count)
            fuse_reply_none(req)
        }
        ops.forget_multi = { req, count, forgets in
            let fs = Operations.fileSystem(req)
            for i in 0..<count {
                guard let f = forgets?[i] else { continue }
                fs.forget(NodeID(rawValue: f.ino), f.nlookup)
            }
            fuse_reply_none(req)
        }
        ops.getattr = { req, ino, _ in
            Operations.reply(req) { () throws(Errno) in
                var (attributes, timeout) = try Operations.fileSystem(req).getattr(NodeID(rawValue: ino), Operations.context(req))
                fuse_reply_attr(req, &attributes, timeout)
            }
        }
        ops.setattr = { req, ino, attr, toSet, fi in
            Operations.reply(req) { () throws(Errno) in
                guard let attr = attr?.pointee else { throw .invalidArgument }
                var changes = AttributeChanges()
                let set = Int32(toSet)
                if set & FUSE_SET_ATTR_MODE != 0 { changes.mode = attr.st_mode }
                if set & FUSE_SET_ATTR_UID != 0 { changes.uid = attr.st_uid }
                if set & FUSE_SET_ATTR_GID != 0 { changes.gid = attr.st_gid }
                if set & FUSE_SET_ATTR_SIZE != 0 { changes.size = Int64(attr.st_size) }
                if set & FUSE_SET_ATTR_ATIME_NOW != 0 { changes.accessTime = .now } else if set & FUSE_SET_ATTR_ATIME != 0 { changes.accessTime = .at(attr.st_atim) }
                if set & FUSE_SET_ATTR_MTIME_NOW != 0 { changes.modificationTime = .now } else if set & FUSE_SET_ATTR_MTIME != 0 { changes.modificationTime = .at(attr.st_mtim) }
                var (attributes, timeout) = try Operations.fileSystem(req).setattr(NodeID(rawValue: ino), changes, handle: fi.map { HandleID(rawValue: $0.pointee.fh) }, Operations.context(req))
                fuse_reply_attr(req, &attributes, timeout)
            }
        }
        ops.readlink = { req, ino in
            Operations.reply(req) { () throws(Errno) in
                var target = try Operations.fileSystem(req).readlink(NodeID(rawValue: ino), Operations.context(req))
                guard !target.contains(0) else { throw .ioError }
                target.append(0)
                _ = target.withUnsafeBufferPointer { $0.withMemoryRebound(to: CChar.self) { fuse_reply_readlink(req, $0.baseAddress) } }
            }
        }
        ops.mknod = { req, parent, name, mode, rdev in
            Operations.reply(req) { () throws(Errno) in
                Operations.replyEntry(req, try Operations.fileSystem(req).mknod(NodeID(rawValue: parent), Operations.name(name), mode: mode, device: rdev, Operations.context(req)))
            }
        }
        ops.mkdir = { req, parent, name, mode in
            Operations.reply(req) { () throws(Errno) in
                Operations.replyEntry(req, try Operations.fileSystem(req).mkdir(NodeID(rawValue: parent), Operations.name(name), mode: mode, Operations.context(req)))
            }
        }
        ops.unlink = { req, parent, name in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).unlink(NodeID(rawValue: parent), Operations.name(name), Operations.context(req))
                fuse_reply_err(req, 0)
            }
        }
        ops.rmdir = { req, parent, name in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).rmdir(NodeID(rawValue: parent), Operations.name(name), Operations.context(req))
                fuse_reply_err(req, 0)
            }
        }
        ops.symlink = { req, link, parent, name in
            Operations.reply(req) { () throws(Errno) in
                Operations.replyEntry(req, try Operations.fileSystem(req).symlink(target: Operations.target(link), NodeID(rawValue: parent), Operations.name(name), Operations.context(req)))
            }
        }
        ops.rename = { req, parent, name, newParent, newName, flags in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).rename(NodeID(rawValue: parent), Operations.name(name), NodeID(rawValue: newParent),
                                           Operations.name(newName), flags: UInt32(flags), Operations.context(req))
                fuse_reply_err(req, 0)
            }
        }
        ops.link = { req, ino, newParent, newName in
            Operations.reply(req) { () throws(Errno) in
                Operations.replyEntry(req, try Operations.fileSystem(req).link(NodeID(rawValue: ino), NodeID(rawValue: newParent), Operations.name(newName), Operations.context(req)))
            }
        }
        ops.open = { req, ino, fi in
            Operations.reply(req) { () throws(Errno) in
                guard let fi else { throw .invalidArgument }
                let opened = try Operations.fileSystem(req).open(NodeID(rawValue: ino), flags: fi.pointee.flags, Operations.context(req))
                fi.pointee.fh = opened.handle.rawValue
                fi.pointee.direct_io = opened.directIO ? 1 : 0
                fi.pointee.keep_cache = opened.keepCache ? 1 : 0
                fi.pointee.noflush = opened.noFlush ? 1 : 0
                if fuse_reply_open(req, fi) == -ENOENT {
                    // The opener was interrupted; nobody will release this handle.
                    Operations.fileSystem(req).release(NodeID(rawValue: ino), handle: opened.handle)
                }
            }
        }
        ops.create = { req, parent, name, mode, fi in
            Operations.reply(req) { () throws(Errno) in
                guard let fi else { throw .invalidArgument }
                let (entry, opened) = try Operations.fileSystem(req).create(NodeID(rawValue: parent), Operations.name(name), mode: mode,
                                                                 flags: fi.pointee.flags, Operations.context(req))
                fi.pointee.fh = opened.handle.rawValue
                fi.pointee.direct_io = opened.directIO ? 1 : 0
                fi.pointee.keep_cache = opened.keepCache ? 1 : 0
                var e = Operations.entryParam(entry)
                let fs = Operations.fileSystem(req)  // the reply frees the request
                if fuse_reply_create(req, &e, fi) == -ENOENT {
                    fs.release(entry.node, handle: opened.handle)
                }
                fs.entryReplied()
            }
        }
        ops.read = { req, ino, size, offset, fi in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).read(NodeID(rawValue: ino), handle: Operations.handle(fi), size: size, offset: Int64(offset), Operations.context(req)) { bytes in
                    fuse_reply_buf(req, bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
                }
            }
        }
        ops.write = { req, ino, buf, size, offset, fi in
            Operations.reply(req) { () throws(Errno) in
                let data = UnsafeRawBufferPointer(start: buf, count: size)
                let written = try Operations.fileSystem(req).write(NodeID(rawValue: ino), handle: Operations.handle(fi), data: data,
                                                        offset: Int64(offset), Operations.context(req))
                fuse_reply_write(req, written)
            }
        }
        ops.flush = { req, ino, fi in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).flush(NodeID(rawValue: ino), handle: Operations.handle(fi), Operations.context(req))
                fuse_reply_err(req, 0)
            }
        }
        ops.release = { req, ino, fi in
            Operations.fileSystem(req).release(NodeID(rawValue: ino), handle: Operations.handle(fi))
            fuse_reply_err(req, 0)
        }
        ops.fsync = { req, ino, datasync, fi in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).fsync(NodeID(rawValue: ino), handle: Operations.handle(fi), dataOnly: datasync != 0)
                fuse_reply_err(req, 0)
            }
        }
        ops.opendir = { req, ino, fi in
            Operations.reply(req) { () throws(Errno) in
                guard let fi else { throw .invalidArgument }
                fi.pointee.fh = try Operations.fileSystem(req).opendir(NodeID(rawValue: ino), Operations.context(req)).rawValue
                if fuse_reply_open(req, fi) == -ENOENT {
                    Operations.fileSystem(req).releasedir(NodeID(rawValue: ino), handle: HandleID(rawValue: fi.pointee.fh))
                }
            }
        }
        ops.readdir = { req, ino, size, offset, fi in
            Operations.reply(req) { () throws(Errno) in
                let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
                defer { buffer.deallocate() }
                var used = 0
                try Operations.fileSystem(req).readdir(NodeID(rawValue: ino), handle: Operations.handle(fi), offset: Int64(offset)) { entry in
                    var attributes = stat()
                    attributes.st_ino = ino_t(entry.inode)
                    attributes.st_mode = entry.type
                    let needed = entry.name.withCString {
                        fuse_add_direntry(req, buffer + used, size - used, $0, &attributes, off_t(entry.nextOffset))
                    }
                    guard needed <= size - used else { return false }
                    used += needed
                    return true
                }
                fuse_reply_buf(req, buffer, used)
            }
        }
        ops.readdirplus = { req, ino, size, offset, fi in
            Operations.reply(req) { () throws(Errno) in
                let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
                defer { buffer.deallocate() }
                var used = 0
                var entries = false
                let fs = Operations.fileSystem(req)
                try fs.readdirplus(NodeID(rawValue: ino), handle: Operations.handle(fi), offset: Int64(offset), Operations.context(req)) { entry, reply in
                    // Without a reply (".", ".."), node id 0: the kernel takes the name and type only.
                    var e = reply.map(Operations.entryParam) ?? fuse_entry_param()
                    if reply == nil {
                        e.attr.st_ino = ino_t(entry.inode)
                        e.attr.st_mode = entry.type
                    }
                    let needed = entry.name.withCString {
                        fuse_add_direntry_plus(req, buffer + used, size - used, $0, &e, off_t(entry.nextOffset))
                    }
                    guard needed <= size - used else { return false }
                    used += needed
                    if reply != nil { entries = true }
                    return true
                }
                fuse_reply_buf(req, buffer, used)
                if entries { fs.entryReplied() }
            }
        }
        ops.releasedir = { req, ino, fi in
            Operations.fileSystem(req).releasedir(NodeID(rawValue: ino), handle: Operations.handle(fi))
            fuse_reply_err(req, 0)
        }
        ops.fsyncdir = { req, _, _, _ in fuse_reply_err(req, 0) }
        ops.access = { req, ino, mask in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).access(NodeID(rawValue: ino), mask: mask, Operations.context(req))
                fuse_reply_err(req, 0)
            }
        }
        ops.statfs = { req, ino in
            Operations.reply(req) { () throws(Errno) in
                var info = try Operations.fileSystem(req).statfs(NodeID(rawValue: ino))
                fuse_reply_statfs(req, &info)
            }
        }
        ops.setxattr = { req, ino, name, value, size, flags in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).setxattr(NodeID(rawValue: ino), Operations.name(name), value: UnsafeRawBufferPointer(start: value, count: size),
                                             flags: flags, Operations.context(req))
                fuse_reply_err(req, 0)
            }
        }
        ops.getxattr = { req, ino, name, size in
            Operations.reply(req) { () throws(Errno) in
                let value = try Operations.fileSystem(req).getxattr(NodeID(rawValue: ino), Operations.name(name), Operations.context(req))
                if size == 0 { fuse_reply_xattr(req, value.count); return }
                guard value.count <= size else { throw Errno(rawValue: ERANGE) }
                value.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
            }
        }
        ops.listxattr = { req, ino, size in
            Operations.reply(req) { () throws(Errno) in
                let names = try Operations.fileSystem(req).listxattr(NodeID(rawValue: ino), Operations.context(req))
                let packed: [UInt8] = names.flatMap { $0.bytes + [UInt8(0)] }
                if size == 0 { fuse_reply_xattr(req, packed.count); return }
                guard packed.count <= size else { throw Errno(rawValue: ERANGE) }
                packed.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
            }
        }
        ops.removexattr = { req, ino, name in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).removexattr(NodeID(rawValue: ino), Operations.name(name), Operations.context(req))
                fuse_reply_err(req, 0)
            }
        }
        ops.fallocate = { req, ino, mode, offset, length, fi in
            Operations.reply(req) { () throws(Errno) in
                try Operations.fileSystem(req).fallocate(NodeID(rawValue: ino), handle: Operations.handle(fi), mode: mode,
                                              offset: Int64(offset), length: Int64(length), Operations.context(req))
                fuse_reply_err(req, 0)
            }
        }
        return ops
    }
}
