import CFUSE
import SystemPackage

/// A FUSE node id (the kernel's handle for an inode). 1 is the root.
public struct NodeID: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// The root directory of the mount.
    public static let root = NodeID(rawValue: UInt64(FUSE_ROOT_ID))
    public var description: String { String(rawValue) }
}

/// Who made a request: the caller's uid, gid, pid and umask.
public struct RequestContext: Sendable {
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    public var umask: UInt32
    /// The kernel asks the filesystem to clear the set-user-ID bit and a
    /// group-executable set-group-ID bit as part of this write, truncate,
    /// chown or truncating open (the caller lacks CAP_FSETID; see
    /// FUSE_HANDLE_KILLPRIV_V2 in Sources/CFUSEIO).
    public var clearsSetID: Bool

    public init(uid: UInt32, gid: UInt32, pid: Int32, umask: UInt32 = 0o022, clearsSetID: Bool = false) {
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.umask = umask
        self.clearsSetID = clearsSetID
    }
}

/// A reply to lookup, mkdir, create, symlink and link: a node and its attributes.
public struct EntryReply {
    public var node: NodeID
    public var generation: UInt64 = 0
    public var attributes: stat
    public var attributeTimeout: Double
    public var entryTimeout: Double

    public init(node: NodeID, attributes: stat, attributeTimeout: Double, entryTimeout: Double) {
        self.node = node
        self.attributes = attributes
        self.attributeTimeout = attributeTimeout
        self.entryTimeout = entryTimeout
    }
}

/// An open file's or directory's handle: what open, create and opendir
/// return, and what the kernel gives back with every request on it.
public struct HandleID: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public var description: String { String(rawValue) }
}

/// A reply to open and create.
public struct OpenReply: Sendable {
    public var handle: HandleID
    public var directIO = false
    public var keepCache = false
    /// The kernel skips FLUSH when this handle is closed (FOPEN_NOFLUSH):
    /// for handles whose close has nothing to write or report.
    public var noFlush = false
    public init(handle: HandleID, directIO: Bool = false, keepCache: Bool = false, noFlush: Bool = false) {
        self.handle = handle
        self.directIO = directIO
        self.keepCache = keepCache
        self.noFlush = noFlush
    }
}

/// A time to set: a given instant or "now".
public enum TimeChange: Sendable {
    case now
    case at(timespec)
}

/// The attribute changes of a setattr request; nil fields are unchanged.
public struct AttributeChanges: Sendable {
    public var mode: mode_t?
    public var uid: uid_t?
    public var gid: gid_t?
    public var size: Int64?
    public var accessTime: TimeChange?
    public var modificationTime: TimeChange?
    public init() {}
}

/// One directory entry for readdir.
public struct DirectoryEntry: Sendable {
    public var name: FileName
    public var inode: UInt64
    public var type: mode_t
    /// The offset of the entry after this one.
    public var nextOffset: Int64
    public init(name: FileName, inode: UInt64, type: mode_t, nextOffset: Int64) {
        self.name = name
        self.inode = inode
        self.type = type
        self.nextOffset = nextOffset
    }
}

/// The operations of a low-level FUSE filesystem, typed. Every operation
/// throws an `Errno`; `FUSEBridge` turns it into the reply in one place.
/// Operations left out reply ENOSYS.
public protocol FileSystem: AnyObject, Sendable {
    func lookup(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> EntryReply
    func forget(_ node: NodeID, _ count: UInt64)
    /// Called on the request's thread after a reply that gave the kernel a
    /// new entry (lookup, create, mkdir, mknod, symlink, link), once the
    /// kernel has released the directory: where a filesystem may apply back-pressure.
    func entryReplied()
    func getattr(_ node: NodeID, _ context: RequestContext) throws(Errno) -> (stat, Double)
    func setattr(_ node: NodeID, _ changes: AttributeChanges, handle: HandleID?, _ context: RequestContext) throws(Errno) -> (stat, Double)
    func readlink(_ node: NodeID, _ context: RequestContext) throws(Errno) -> [UInt8]
    func mknod(_ parent: NodeID, _ name: FileName, mode: mode_t, device: dev_t, _ context: RequestContext) throws(Errno) -> EntryReply
    func mkdir(_ parent: NodeID, _ name: FileName, mode: mode_t, _ context: RequestContext) throws(Errno) -> EntryReply
    func unlink(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno)
    func rmdir(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno)
    func symlink(target: [UInt8], _ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> EntryReply
    func rename(_ parent: NodeID, _ name: FileName, _ newParent: NodeID, _ newName: FileName, flags: UInt32, _ context: RequestContext) throws(Errno)
    func link(_ node: NodeID, _ newParent: NodeID, _ newName: FileName, _ context: RequestContext) throws(Errno) -> EntryReply
    func open(_ node: NodeID, flags: Int32, _ context: RequestContext) throws(Errno) -> OpenReply
    /// Reads up to `size` bytes at `offset` and hands them to `reply` (valid only during the call).
    func read(_ node: NodeID, handle: HandleID, size: Int, offset: Int64, _ context: RequestContext, _ reply: (UnsafeRawBufferPointer) -> Void) throws(Errno)
    func write(_ node: NodeID, handle: HandleID, data: UnsafeRawBufferPointer, offset: Int64, _ context: RequestContext) throws(Errno) -> Int
    func flush(_ node: NodeID, handle: HandleID, _ context: RequestContext) throws(Errno)
    func release(_ node: NodeID, handle: HandleID)
    func fsync(_ node: NodeID, handle: HandleID, dataOnly: Bool) throws(Errno)
    func opendir(_ node: NodeID, _ context: RequestContext) throws(Errno) -> HandleID
    /// Lists entries from `offset`; `add` returns false when the reply buffer is full.
    func readdir(_ node: NodeID, handle: HandleID, offset: Int64, _ add: (DirectoryEntry) -> Bool) throws(Errno)
    /// READDIRPLUS: lists entries from `offset`, each with what a lookup of
    /// it would reply (nil for "." and "..", or an entry gone meanwhile), so
    /// the kernel needs no LOOKUP or GETATTR for what it lists. `add`
    /// returns false when the reply buffer is full; the filesystem then
    /// takes back the lookup it made for that entry.
    func readdirplus(_ node: NodeID, handle: HandleID, offset: Int64, _ context: RequestContext,
                     _ add: (DirectoryEntry, EntryReply?) -> Bool) throws(Errno)
    func releasedir(_ node: NodeID, handle: HandleID)
    func statfs(_ node: NodeID) throws(Errno) -> statvfs
    /// access(2) with `mask` (R_OK, W_OK, X_OK or F_OK). The kernel asks only
    /// when it does not check permissions itself (no `default_permissions`).
    func access(_ node: NodeID, mask: Int32, _ context: RequestContext) throws(Errno)
    func setxattr(_ node: NodeID, _ name: FileName, value: UnsafeRawBufferPointer, flags: Int32, _ context: RequestContext) throws(Errno)
    func getxattr(_ node: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> [UInt8]
    func listxattr(_ node: NodeID, _ context: RequestContext) throws(Errno) -> [FileName]
    func removexattr(_ node: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno)
    func create(_ parent: NodeID, _ name: FileName, mode: mode_t, flags: Int32, _ context: RequestContext) throws(Errno) -> (EntryReply, OpenReply)
    func fallocate(_ node: NodeID, handle: HandleID, mode: Int32, offset: Int64, length: Int64, _ context: RequestContext) throws(Errno)
    /// Called once when the session ends.
    func destroy()
}

extension FileSystem {
    public func entryReplied() {}
    public func forget(_ node: NodeID, _ count: UInt64) {}
    public func setattr(_ node: NodeID, _ changes: AttributeChanges, handle: HandleID?, _ context: RequestContext) throws(Errno) -> (stat, Double) { throw .noFunction }
    public func readlink(_ node: NodeID, _ context: RequestContext) throws(Errno) -> [UInt8] { throw .noFunction }
    public func mknod(_ parent: NodeID, _ name: FileName, mode: mode_t, device: dev_t, _ context: RequestContext) throws(Errno) -> EntryReply { throw .noFunction }
    public func mkdir(_ parent: NodeID, _ name: FileName, mode: mode_t, _ context: RequestContext) throws(Errno) -> EntryReply { throw .noFunction }
    public func unlink(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) { throw .noFunction }
    public func rmdir(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) { throw .noFunction }
    public func symlink(target: [UInt8], _ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> EntryReply { throw .noFunction }
    public func rename(_ parent: NodeID, _ name: FileName, _ newParent: NodeID, _ newName: FileName, flags: UInt32, _ context: RequestContext) throws(Errno) { throw .noFunction }
    public func link(_ node: NodeID, _ newParent: NodeID, _ newName: FileName, _ context: RequestContext) throws(Errno) -> EntryReply { throw .noFunction }
    public func write(_ node: NodeID, handle: HandleID, data: UnsafeRawBufferPointer, offset: Int64, _ context: RequestContext) throws(Errno) -> Int { throw .readOnlyFileSystem }
    public func flush(_ node: NodeID, handle: HandleID, _ context: RequestContext) throws(Errno) {}
    public func release(_ node: NodeID, handle: HandleID) {}
    public func fsync(_ node: NodeID, handle: HandleID, dataOnly: Bool) throws(Errno) {}
    public func releasedir(_ node: NodeID, handle: HandleID) {}
    public func readdirplus(_ node: NodeID, handle: HandleID, offset: Int64, _ context: RequestContext,
                            _ add: (DirectoryEntry, EntryReply?) -> Bool) throws(Errno) {
        try readdir(node, handle: handle, offset: offset) { add($0, nil) }
    }
    public func access(_ node: NodeID, mask: Int32, _ context: RequestContext) throws(Errno) { throw .noFunction }
    public func setxattr(_ node: NodeID, _ name: FileName, value: UnsafeRawBufferPointer, flags: Int32, _ context: RequestContext) throws(Errno) { throw .notSupported }
    public func getxattr(_ node: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> [UInt8] { throw .notSupported }
    public func listxattr(_ node: NodeID, _ context: RequestContext) throws(Errno) -> [FileName] { [] }
    public func removexattr(_ node: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) { throw .notSupported }
    public func create(_ parent: NodeID, _ name: FileName, mode: mode_t, flags: Int32, _ context: RequestContext) throws(Errno) -> (EntryReply, OpenReply) { throw .noFunction }
    public func fallocate(_ node: NodeID, handle: HandleID, mode: Int32, offset: Int64, length: Int64, _ context: RequestContext) throws(Errno) { throw .notSupported }
    public func destroy() {}
}
