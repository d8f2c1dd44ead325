import ChunkCipher
import FUSEBridge
import KeyManager
import Logging
import CLinux
import SystemPackage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Counters for `kmsfs status`.
public struct FilesystemStatistics: Sendable, Codable {
    public var openFiles: Int
    public var nodes: Int
    public var bytesRead: Int
    public var bytesWritten: Int
    public var integrityFailures: Int
    public var deniedRequests: Int
    /// Entries the daemon asked the kernel to forget to stay under its descriptor limit.
    public var forgottenOnRequest: Int = 0
}

/// The encrypted filesystem: maps the plaintext tree onto CIPHERDIR, one
/// ciphertext file per plaintext file, names encrypted per directory, data
/// keys from the key manager, policy checked with each request's uid/gid.
/// Testable without a mount: call the `FileSystem` operations directly.
public final class EncryptedFileSystem: FileSystem, @unchecked Sendable {
    public let cipherdir: String
    public let keyManager: KeyManager
    let layout: ChunkLayout
    let plaintextNames: Bool
    let nodes: NodeTable
    /// Set by the mount: keeps the nodes' descriptors under the limit (for statistics).
    nonisolated(unsafe) public var relief: DescriptorRelief?
    let logger = Logger(label: "kmsfs.fs")
    /// Seconds the kernel may cache attributes and names.
    let timeout: Double = 1.0
    let runningAsRoot = geteuid() == 0

    private struct OpenState: ~Copyable {
        var files: [InodeKey: OpenFile] = [:]
        var handles: [UInt64: OpenFile] = [:]
        var directories: [UInt64: Listing] = [:]
        var next: UInt64 = 1
    }
    private let open = Mutex(OpenState())
    /// Striped by inode: serialises making an inode's open state (see `openShared`).
    private let creationLocks = (0..<64).map { _ in ReadWriteLock() }
    private let bytesRead = Atomic<Int>(0)
    private let bytesWritten = Atomic<Int>(0)
    private let integrityFailures = Atomic<Int>(0)
    private let denied = Atomic<Int>(0)

    /// Names in CIPHERDIR beginning with this belong to kmsfs, never to the user.
    static let reservedPrefix = ".kmsfs"

    /// Opens the filesystem rooted at `cipherdir` (already initialised).
    public init(cipherdir: String, keyManager: KeyManager) throws {
        self.cipherdir = cipherdir
        self.keyManager = keyManager
        self.layout = try ChunkLayout(chunkSize: keyManager.chunkSize)
        self.plaintextNames = keyManager.plaintextNames
        let fd = try Syscall.openat(AT_FDCWD, cipherdir, KMSFS_O_PATH | O_DIRECTORY)
        let st = try Syscall.fstat(fd)
        nodes = NodeTable(root: Node(id: .root, fd: fd, key: InodeKey(st), type: S_IFDIR, parent: nil, name: ""))
    }

    /// Writes the root directory's keys; `kmsfs init` calls this once.
    public static func initializeRoot(cipherdir: String, keyManager: KeyManager, principal: Principal) throws {
        let fd = try Syscall.openat(AT_FDCWD, cipherdir, KMSFS_O_PATH | O_DIRECTORY)
        defer { close(fd) }
        let layout = try ChunkLayout(chunkSize: keyManager.chunkSize)
        _ = try DirectoryKeys.create(in: fd, key: try keyManager.boundKey(forDirectory: "/"), keyManager: keyManager,
                                     principal: principal, layout: layout, isRoot: true)
    }

    var openFileKeys: [KeyID] { open.withLock { $0.files.values.map(\.keyID) } }

    public func entryReplied() { relief?.throttle() }

    public var statistics: FilesystemStatistics {
        FilesystemStatistics(openFiles: open.withLock { $0.files.count }, nodes: nodes.count,
                             bytesRead: bytesRead.load(ordering: .relaxed), bytesWritten: bytesWritten.load(ordering: .relaxed),
                             integrityFailures: integrityFailures.load(ordering: .relaxed), deniedRequests: denied.load(ordering: .relaxed),
                             forgottenOnRequest: relief?.evictions.load(ordering: .relaxed) ?? 0)
    }

    // MARK: Helpers

    func principal(_ context: RequestContext) -> Principal {
        Principal(uid: context.uid, gid: context.gid, pid: context.pid)
    }

    /// Runs a key-manager call, turning its refusal into the errno of DESIGN.md §10.
    func keys<T: ~Copyable>(_ body: () throws(KeyManagerError) -> T) throws(Errno) -> T {
        do throws(KeyManagerError) { return try body() } catch {
            if case .accessDenied = error { denied.add(1, ordering: .relaxed) }
            logger.notice("key refused", metadata: ["error": .string(error.description)])
            throw Errno(error)
        }
    }

    /// The keys of a directory node, checking the caller may use them.
    func directoryKeys(_ node: Node, _ context: RequestContext) throws(Errno) -> DirectoryKeys {
        guard node.isDirectory else { throw .notDirectory }
        let who = principal(context)
        let loaded = try nodes.keys(of: node) { () throws(Errno) in
            try DirectoryKeys.load(from: node.fd, keyManager: keyManager, principal: who, layout: layout,
                                   isRoot: node.id == .root, logger: logger)
        }
        try keys { () throws(KeyManagerError) in
            try keyManager.checkUse(who, .decrypt, key: loaded.keyID, version: loaded.version, object: loaded.directoryID) { self.nodes.path(of: node.id).description }
        }
        return loaded
    }

    /// The volume keys, loaded as the daemon: callers check the policy of
    /// the key that governs what they touch (the entry's directory or the
    /// object itself), not the root's.
    func volumeKeys(_ context: RequestContext) throws(Errno) -> VolumeKeys {
        let root = try nodes.node(.root)
        let daemon = Principal(uid: getuid(), gid: getgid(), pid: getpid(), processName: "kmsfs")
        let loaded: DirectoryKeys
        do throws(Errno) {
            loaded = try nodes.keys(of: root) { () throws(Errno) in
                try DirectoryKeys.load(from: root.fd, keyManager: keyManager, principal: daemon, layout: layout, isRoot: true, logger: logger)
            }
        } catch {
            loaded = try directoryKeys(root, context)
        }
        guard let volume = loaded.volume else { throw .ioError }
        return volume
    }

    /// Checks `context` may use the key of the directory holding `node`
    /// (for a symlink's target: decrypt to read it, encrypt to make one).
    func checkParentKey(of node: Node, _ operation: KeyOperation, _ context: RequestContext) throws(Errno) {
        guard let parentID = nodes.parent(of: node) else { return }
        try checkDirectoryKey(try nodes.node(parentID), operation, context)
    }

    func checkDirectoryKey(_ dir: Node, _ operation: KeyOperation, _ context: RequestContext) throws(Errno) {
        let keys = try directoryKeys(dir, context)
        if operation == .encrypt {
            try self.keys { () throws(KeyManagerError) in
                try keyManager.checkUse(principal(context), .encrypt, key: keys.keyID, object: keys.directoryID) { self.nodes.path(of: dir.id).description }
            }
        }
    }

    /// The name stored in CIPHERDIR for plaintext `name` in directory `node`.
    func storedName(_ name: FileName, in node: Node, _ context: RequestContext) throws(Errno) -> FileName {
        guard !name.isEmpty, !name.isDotOrDotDot else { throw .invalidArgument }
        guard name.count <= 255 else { throw .fileNameTooLong }
        if plaintextNames {
            guard !name.hasPrefix(Self.reservedPrefix) else { throw .notPermitted }
            return name
        }
        let dir = try directoryKeys(node, context)
        if let known = node.storedNames.withLock({ $0[name] }) { return known }
        let stored: FileName
        do throws(CipherError) { stored = FileName(LongName.storedName(for: try dir.names.encrypt(name.bytes))) } catch { throw .invalidArgument }
        node.storedNames.withLock { cache in
            if cache.count >= Node.storedNamesLimit { cache.removeAll(keepingCapacity: true) }
            cache[name] = stored
        }
        return stored
    }

    /// For a hashed long name, writes the sidecar holding the full encoded name.
    func writeSidecar(_ stored: FileName, plaintext name: FileName, in node: Node, _ context: RequestContext) throws(Errno) {
        guard !plaintextNames, stored.isHashedLongName else { return }
        let names = try directoryKeys(node, context).names
        let encoded: String
        do throws(CipherError) { encoded = try names.encrypt(name.bytes) } catch { throw .ioError }
        let fd = try Syscall.openat(node.fd, stored.appending(LongName.sidecarSuffix), O_WRONLY | O_CREAT | O_TRUNC, 0o400)
        defer { close(fd) }
        try Syscall.pwrite(fd, Array(encoded.utf8), at: 0)
    }

    func removeSidecar(_ stored: FileName, in node: Node) {
        guard stored.isHashedLongName else { return }
        Syscall.unlinkQuietly(node.fd, stored.appending(LongName.sidecarSuffix))
    }

    /// The plaintext name of a stored entry, or nil for kmsfs's own files and undecryptable names.
    func plaintextName(_ stored: FileName, inDirectory dirFD: Int32, keys dir: DirectoryKeys?) -> FileName? {
        if case .name(let name) = decodeName(stored, inDirectory: dirFD, keys: dir) { return name }
        return nil
    }

    /// What a backing entry's name is to the mount.
    enum DecodedName {
        case name(FileName)
        /// kmsfs's own (`.kmsfs.dir`, a long name's sidecar, `.kmsfs`).
        case internalEntry
        /// A name that does not authenticate (or a long name whose sidecar is missing or does not match).
        case damaged
    }

    func decodeName(_ stored: FileName, inDirectory dirFD: Int32, keys dir: DirectoryKeys?) -> DecodedName {
        if stored.hasPrefix(Self.reservedPrefix) {
            guard stored.isHashedLongName else { return .internalEntry }
            guard let dir else { return plaintextNames ? .internalEntry : .damaged }
            guard let fd = try? Syscall.openat(dirFD, stored.appending(LongName.sidecarSuffix), O_RDONLY) else { return .damaged }
            defer { close(fd) }
            let encoded = String(decoding: (try? Syscall.pread(fd, count: 4096, at: 0)) ?? [], as: UTF8.self)
            guard LongName.storedName(for: encoded) == stored.description, let name = try? dir.names.decrypt(encoded) else { return .damaged }
            return .name(FileName(bytes: name))
        }
        if plaintextNames { return .name(stored) }
        // Encrypted names are base64url: one that is not even ASCII is damage.
        guard let dir, let encoded = stored.text else { return .damaged }
        do throws(CipherError) { return .name(FileName(bytes: try dir.names.decrypt(encoded))) } catch { return .damaged }
    }

    /// Backing attributes turned into what the application sees.
    func plaintextAttributes(_ st: stat, symlinkTarget: () -> [UInt8]?) -> stat {
        var out = st
        switch st.st_mode & S_IFMT {
        case S_IFREG:
            out.st_size = off_t((try? layout.plaintextSize(ciphertextSize: Int(st.st_size))) ?? 0)
        case S_IFLNK:
            if let target = symlinkTarget() { out.st_size = off_t(target.count) }
        default: break
        }
        return out
    }

    func entry(_ node: Node, _ st: stat, _ context: RequestContext) -> EntryReply {
        var attributes = plaintextAttributes(st) { node.isSymlink ? try? self.decryptedTarget(of: node, context) : nil }
        if node.isDevice {
            // Its record is a regular file in CIPHERDIR (DeviceNode).
            attributes.st_mode = node.type | (st.st_mode & 0o7777)
            attributes.st_rdev = node.device
            attributes.st_size = 0
            attributes.st_blocks = 0
        }
        return EntryReply(node: node.id, attributes: attributes, attributeTimeout: timeout, entryTimeout: timeout)
    }

    func decryptedTarget(of node: Node, _ context: RequestContext) throws(Errno) -> [UInt8] {
        let stored = try Syscall.readlinkat(node.fd, "")
        if plaintextNames { return stored }
        try checkParentKey(of: node, .decrypt, context)
        let volume = try volumeKeys(context)
        do throws(CipherError) {
            if let id = LongSymlinkTarget.reference(in: stored) {
                let text: String
                do throws(Errno) { text = try longTargetText(id) } catch { throw CipherError.malformed("its out-of-line target \(id.hex) is missing: \(error)") }
                return try volume.symlinks.openEncoded(text, context: LongSymlinkTarget.context(id))
            }
            return try volume.symlinks.openEncoded(String(decoding: stored, as: UTF8.self))
        } catch {
            integrityFailure(error, object: nil, what: "symlink target", path: nodes.filePath(of: node), principal: principal(context))
            throw .ioError
        }
    }

    /// Counts, logs (without the path: logs never hold names) and audits an
    /// authentication failure; the record holds the path as the audit-path
    /// setting says (a keyed hash by default).
    func integrityFailure(_ error: CipherError, object: ID128?, what: String, key: KeyID? = nil, path: String? = nil,
                          principal: Principal? = nil) {
        integrityFailures.add(1, ordering: .relaxed)
        logger.error("integrity failure", metadata: ["what": .string(what), "object": .string(object?.hex ?? "-"), "error": .string(error.description)])
        keyManager.audit(AuditEvent("IntegrityFailure", outcome: "failure", key: key, principal: principal, object: object,
                                    error: "\(what): \(error)", path: path))
    }

    /// Gives a new entry to the requesting user when the daemon runs as root.
    /// In a setgid directory the entry keeps the directory's group, which
    /// the backing entry inherited (as on ext4).
    func adopt(_ parent: Node, _ stored: FileName, _ context: RequestContext) {
        guard runningAsRoot, context.uid != 0 || context.gid != 0 else { return }
        let setgid = ((try? Syscall.fstat(parent.fd).st_mode) ?? 0) & S_ISGID != 0
        _ = stored.withCString { fchownat(parent.fd, $0, context.uid, setgid ? gid_t.max : context.gid, AT_SYMLINK_NOFOLLOW) }
    }

    /// The object id in the header of a backing file (a regular file, or a
    /// directory's `.kmsfs.dir`), if readable.
    func fileID(in directoryFD: Int32, stored: FileName) -> ID128? {
        guard let fd = try? Syscall.openat(directoryFD, stored, O_RDONLY | O_NOFOLLOW) else { return nil }
        defer { close(fd) }
        return Self.header(of: fd)?.fileID.rawValue
    }

    /// The header of open backing file `fd` if it parses (shape only: not authenticated).
    static func header(of fd: Int32) -> FileHeader? {
        guard let raw = try? Syscall.pread(fd, count: ChunkLayout.headerSize, at: 0) else { return nil }
        return try? FileHeader(decoding: raw)
    }

    // MARK: Names and attributes

    public func lookup(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> EntryReply {
        let dir = try nodes.node(parent)
        return try lookup(stored: try storedName(name, in: dir, context), name: name, in: dir, parent, context)
    }

    /// Looks up the entry stored as `stored` in directory node `dir` (`parent`), whose plaintext name is `name`.
    func lookup(stored: FileName, name: FileName, in dir: Node, _ parent: NodeID, _ context: RequestContext) throws(Errno) -> EntryReply {
        var st = try Syscall.fstatat(dir.fd, stored)
        var device: dev_t = 0
        if DeviceNode.mayBeRecord(st),
           let node = deviceNode(in: dir.fd, stored: stored, path: self.nodes.path(of: parent).appending(name).description, context) {
            st.st_mode = node.type | (st.st_mode & 0o7777)
            device = node.device
        }
        let node = try nodes.remember(parentFD: dir.fd, storedName: stored, st: st, parent: parent, name: name, device: device)
        return entry(node, st, context)
    }

    public func forget(_ node: NodeID, _ count: UInt64) {
        nodes.forget(node, count)
    }

    public func getattr(_ id: NodeID, _ context: RequestContext) throws(Errno) -> (stat, Double) {
        let node = try nodes.node(id)
        let st = try Syscall.fstatat(node.fd, "", flags: KMSFS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
        return (entry(node, st, context).attributes, timeout)
    }

    public func setattr(_ id: NodeID, _ changes: AttributeChanges, handle: UInt64?, _ context: RequestContext) throws(Errno) -> (stat, Double) {
        let node = try nodes.node(id)
        if let mode = changes.mode, !node.isSymlink {
            try Syscall.call { chmod(node.procPath, mode & 0o7777) }
        }
        if changes.uid != nil || changes.gid != nil {
            let uid = changes.uid ?? uid_t.max, gid = changes.gid ?? gid_t.max
            try Syscall.call { fchownat(node.fd, "", uid, gid, KMSFS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) }
        }
        if let size = changes.size {
            guard node.isRegular else { throw node.isDirectory ? .isDirectory : .invalidArgument }
            guard size >= 0 else { throw .invalidArgument }
            if let handle, let file = open.withLock({ $0.handles[handle] }) {
                try file.truncate(to: Int(size))
            } else {
                let file = try openFile(node, flags: O_RDWR, context)
                defer { releaseFile(file) }
                try file.truncate(to: Int(size))
            }
        }
        if changes.accessTime != nil || changes.modificationTime != nil {
            func spec(_ change: TimeChange?) -> timespec {
                switch change {
                case nil: return timespec(tv_sec: 0, tv_nsec: Int(KMSFS_UTIME_OMIT))
                case .now: return timespec(tv_sec: 0, tv_nsec: Int(KMSFS_UTIME_NOW))
                case .at(let t): return t
                }
            }
            var times = [spec(changes.accessTime), spec(changes.modificationTime)]
            if node.isSymlink {
                try Syscall.call { utimensat(node.fd, "", &times, KMSFS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) }
            } else {
                try Syscall.call { utimensat(AT_FDCWD, node.procPath, &times, 0) }
            }
        }
        return try getattr(id, context)
    }

    public func readlink(_ id: NodeID, _ context: RequestContext) throws(Errno) -> [UInt8] {
        let node = try nodes.node(id)
        guard node.isSymlink else { throw .invalidArgument }
        return try decryptedTarget(of: node, context)
    }

    /// Asked only on a private mount (no `default_permissions`), whose one
    /// user is the daemon's: the backing entry answers for that user, so
    /// `test -x` on a file without execute bits is false, as it would be on
    /// the backing filesystem. (Without an answer the kernel would take
    /// every access(2) as allowed.)
    public func access(_ id: NodeID, mask: Int32, _ context: RequestContext) throws(Errno) {
        let node = try nodes.node(id)
        guard mask != F_OK else { return }
        try Syscall.call { faccessat(AT_FDCWD, node.procPath, mask, 0) }
    }

    public func statfs(_ id: NodeID) throws(Errno) -> statvfs {
        let root = try nodes.node(.root)
        var info = statvfs()
        try Syscall.call { fstatvfs(root.fd, &info) }
        info.f_namemax = 255
        return info
    }

    // MARK: Creating and removing

    public func mknod(_ parent: NodeID, _ name: FileName, mode: mode_t, device: dev_t, _ context: RequestContext) throws(Errno) -> EntryReply {
        switch mode & S_IFMT {
        case S_IFREG:
            let (entry, opened) = try create(parent, name, mode: mode, flags: O_WRONLY, context)
            release(entry.node, handle: opened.handle)
            return entry
        case S_IFIFO, S_IFSOCK:
            let dir = try nodes.node(parent)
            let stored = try storedName(name, in: dir, context)
            try writeSidecar(stored, plaintext: name, in: dir, context)
            try Syscall.call { stored.withCString { mknodat(dir.fd, $0, mode, 0) } }
            adopt(dir, stored, context)
            return try lookup(parent, name, context)
        case S_IFBLK, S_IFCHR:
            return try makeDeviceNode(try nodes.node(parent), parent, name, mode: mode, device: device, context)
        default:
            throw .invalidArgument
        }
    }

    public func mkdir(_ parent: NodeID, _ name: FileName, mode: mode_t, _ context: RequestContext) throws(Errno) -> EntryReply {
        let dir = try nodes.node(parent)
        let stored = try storedName(name, in: dir, context)
        let path = nodes.path(of: parent).appending(name)
        let key = try keys { () throws(KeyManagerError) in try keyManager.boundKey(forDirectory: path.bindingPath) }
        try writeSidecar(stored, plaintext: name, in: dir, context)
        // The daemon needs to write .kmsfs.dir; the mode is set after.
        try Syscall.call { stored.withCString { mkdirat(dir.fd, $0, 0o700) } }
        do throws(Errno) {
            let fd = try Syscall.openat(dir.fd, stored, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
            defer { close(fd) }
            _ = try DirectoryKeys.create(in: fd, key: key, keyManager: keyManager, principal: principal(context),
                                         layout: layout, isRoot: false)
            // mkdir(2) never passes S_ISGID: a directory made in a setgid
            // directory inherits it, as the backing one just did.
            let inherited = try Syscall.fstat(fd).st_mode & S_ISGID
            try Syscall.call { stored.withCString { fchmodat(dir.fd, $0, (mode & 0o7777) | inherited, 0) } }
        } catch {
            Syscall.unlinkQuietly(dir.fd, FileName(bytes: stored.bytes + [UInt8(ascii: "/")] + DirectoryKeys.fileName.bytes))
            Syscall.unlinkQuietly(dir.fd, stored, AT_REMOVEDIR)
            removeSidecar(stored, in: dir)
            throw error
        }
        adopt(dir, stored, context)
        return try lookup(parent, name, context)
    }

    public func symlink(target: [UInt8], _ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> EntryReply {
        let dir = try nodes.node(parent)
        let stored = try storedName(name, in: dir, context)
        guard !target.isEmpty, !target.contains(0) else { throw target.isEmpty ? .noSuchFileOrDirectory : .invalidArgument }
        guard target.count < Int(PATH_MAX) else { throw .fileNameTooLong }
        var sealed: [UInt8]
        var outOfLine: ID128?
        if plaintextNames { sealed = target } else {
            try checkDirectoryKey(dir, .encrypt, context)
            let volume = try volumeKeys(context)
            do throws(CipherError) { sealed = Array(try volume.symlinks.sealEncoded(target).utf8) } catch { throw .ioError }
            if LongSymlinkTarget.needed(sealedCount: sealed.count) {
                sealed = try storeLongTarget(target, volume: volume)
                outOfLine = LongSymlinkTarget.reference(in: sealed)
            }
        }
        sealed.append(0)
        do throws(Errno) {
            try writeSidecar(stored, plaintext: name, in: dir, context)
            try Syscall.call { stored.withCString { s in sealed.withUnsafeBufferPointer { t in t.withMemoryRebound(to: CChar.self) { symlinkat($0.baseAddress!, dir.fd, s) } } } }
        } catch {
            removeLongTarget(outOfLine)
            throw error
        }
        adopt(dir, stored, context)
        return try lookup(parent, name, context)
    }

    public func link(_ id: NodeID, _ newParent: NodeID, _ newName: FileName, _ context: RequestContext) throws(Errno) -> EntryReply {
        let node = try nodes.node(id)
        let dir = try nodes.node(newParent)
        guard !node.isDirectory else { throw .notPermitted }
        let stored = try storedName(newName, in: dir, context)
        if node.isDevice { try markHoldsDeviceNodes(dir.fd) }
        try writeSidecar(stored, plaintext: newName, in: dir, context)
        if node.isSymlink {
            try Syscall.call { stored.withCString { linkat(node.fd, "", dir.fd, $0, KMSFS_AT_EMPTY_PATH) } }
        } else {
            try Syscall.call { stored.withCString { linkat(AT_FDCWD, node.procPath, dir.fd, $0, AT_SYMLINK_FOLLOW) } }
        }
        return try lookup(newParent, newName, context)
    }

    public func unlink(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) {
        let dir = try nodes.node(parent)
        let stored = try storedName(name, in: dir, context)
        let st = try Syscall.fstatat(dir.fd, stored)
        guard st.st_mode & S_IFMT != S_IFDIR else { throw .isDirectory }
        let lastLink = st.st_mode & S_IFMT == S_IFREG && st.st_nlink == 1 && !DeviceNode.mayBeRecord(st)
        let object = lastLink ? nodes.fileID(of: InodeKey(st)) ?? fileID(in: dir.fd, stored: stored) : nil
        let longTarget = lastLongTarget(in: dir.fd, stored: stored, st)
        try Syscall.unlinkat(dir.fd, stored)
        removeSidecar(stored, in: dir)
        removeLongTarget(longTarget)
        if let object { try? keyManager.forgetUsage(object) }
    }

    public func rmdir(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) {
        let dir = try nodes.node(parent)
        let stored = try storedName(name, in: dir, context)
        let object = try removingDirectoryKeys(dir, stored) { () throws(Errno) in
            try Syscall.unlinkat(dir.fd, stored, AT_REMOVEDIR)
        }
        removeSidecar(stored, in: dir)
        if let object { try? keyManager.forgetUsage(object) }
    }

    /// Where a directory's keys wait, in its parent, while the directory is removed.
    static let setAsidePrefix = reservedPrefix + ".rmdir-"

    /// Removes an empty backing directory with `remove` (rmdir, or a rename
    /// over it) and returns its directory id; ENOTEMPTY if it holds more than
    /// its `.kmsfs.dir`. The keys file is first hard-linked into the parent
    /// under a reserved name and only then unlinked from the directory, so
    /// if `remove` fails the directory gets its very keys back and stays
    /// readable; a crash in between leaves at most a hidden set-aside file,
    /// which the parent's own removal clears.
    private func removingDirectoryKeys(_ parent: Node, _ stored: FileName, _ remove: () throws(Errno) -> Void) throws(Errno) -> ID128? {
        let fd = try Syscall.openat(parent.fd, stored, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
        defer { close(fd) }
        let entries = try Syscall.listDirectory(fd)
        guard entries.allSatisfy({ $0.name == DirectoryKeys.fileName || $0.name == DeviceNode.marker || $0.name.hasPrefix(Self.setAsidePrefix) })
        else { throw .directoryNotEmpty }
        for stale in entries where stale.name.hasPrefix(Self.setAsidePrefix) || stale.name == DeviceNode.marker { Syscall.unlinkQuietly(fd, stale.name) }
        guard entries.contains(where: { $0.name == DirectoryKeys.fileName }) else {
            try remove()
            return nil
        }
        let object = fileID(in: fd, stored: DirectoryKeys.fileName)
        let aside = Self.setAsidePrefix + ID128.random().hex
        try Syscall.call { DirectoryKeys.fileName.withCString { linkat(fd, $0, parent.fd, aside, 0) } }
        do throws(Errno) {
            try Syscall.unlinkat(fd, DirectoryKeys.fileName)
            try remove()
        } catch {
            // Put the keys back (the link in the directory is gone only if the unlink ran).
            if DirectoryKeys.fileName.withCString({ linkat(parent.fd, aside, fd, $0, 0) }) != 0, errno != EEXIST {
                logger.error("a failed rmdir could not restore the directory's keys", metadata: ["kept as": "\(aside)", "errno": "\(errno)"])
                throw error
            }
            unlinkat(parent.fd, aside, 0)
            throw error
        }
        unlinkat(parent.fd, aside, 0)
        return object
    }

    public func rename(_ parent: NodeID, _ name: FileName, _ newParent: NodeID, _ newName: FileName, flags: UInt32,
                       _ context: RequestContext) throws(Errno) {
        let from = try nodes.node(parent)
        let to = try nodes.node(newParent)
        let oldStored = try storedName(name, in: from, context)
        let newStored = try storedName(newName, in: to, context)
        let moving = try Syscall.fstatat(from.fd, oldStored)
        let exchanged = flags & (KMSFS_RENAME_EXCHANGE) != 0 ? try Syscall.fstatat(to.fd, newStored) : nil
        var replacedObject: ID128?
        var replacedTarget: ID128?
        var replacingDirectory = false
        if flags & (KMSFS_RENAME_EXCHANGE) == 0, let target = try? Syscall.fstatat(to.fd, newStored) {
            if flags & (KMSFS_RENAME_NOREPLACE) != 0 { throw .fileExists }
            switch target.st_mode & S_IFMT {
            case S_IFDIR:
                guard moving.st_mode & S_IFMT == S_IFDIR else { throw .isDirectory }
                replacingDirectory = true
            case S_IFREG where target.st_nlink == 1 && InodeKey(target) != InodeKey(moving) && !DeviceNode.mayBeRecord(target):
                replacedObject = nodes.fileID(of: InodeKey(target)) ?? fileID(in: to.fd, stored: newStored)
            case S_IFLNK where InodeKey(target) != InodeKey(moving):
                replacedTarget = lastLongTarget(in: to.fd, stored: newStored, target)
            default: break
            }
        }
        if from.id != to.id {
            if DeviceNode.mayBeRecord(moving) { try markHoldsDeviceNodes(to.fd) }
            if let exchanged, DeviceNode.mayBeRecord(exchanged) { try markHoldsDeviceNodes(from.fd) }
        }
        try writeSidecar(newStored, plaintext: newName, in: to, context)
        if replacingDirectory {
            // The replaced directory's keys go only if the rename succeeds.
            replacedObject = try removingDirectoryKeys(to, newStored) { () throws(Errno) in
                try Syscall.withNames(oldStored, newStored) { (a, b) throws(Errno) in _ = try Syscall.call { kmsfs_renameat2(from.fd, a, to.fd, b, flags) } }
            }
        } else {
            try Syscall.withNames(oldStored, newStored) { (a, b) throws(Errno) in _ = try Syscall.call { kmsfs_renameat2(from.fd, a, to.fd, b, flags) } }
        }
        if flags & (KMSFS_RENAME_EXCHANGE) != 0 {
            try writeSidecar(oldStored, plaintext: name, in: from, context)
        } else if oldStored != newStored || from.id != to.id {
            removeSidecar(oldStored, in: from)
        }
        nodes.moved(InodeKey(moving), to: newParent, name: newName)
        if let exchanged { nodes.moved(InodeKey(exchanged), to: parent, name: name) }
        if let replacedObject { try? keyManager.forgetUsage(replacedObject) }
        removeLongTarget(replacedTarget)
    }

    // MARK: Directories

    public func opendir(_ id: NodeID, _ context: RequestContext) throws(Errno) -> UInt64 {
        let node = try nodes.node(id)
        let dir = plaintextNames ? nil : try directoryKeys(node, context)
        var entries = [DirectoryEntry(name: ".", inode: node.key.inode, type: S_IFDIR, nextOffset: 1),
                       DirectoryEntry(name: "..", inode: UInt64((try? Syscall.fstatat(node.fd, "..").st_ino) ?? 1), type: S_IFDIR, nextOffset: 2)]
        var stored: [FileName?] = [nil, nil]
        var damaged = 0
        let backing = try Syscall.listDirectory(node.fd)
        let holdsDevices = backing.contains { $0.name == DeviceNode.marker }
        for raw in backing {
            switch decodeName(raw.name, inDirectory: node.fd, keys: dir) {
            case .name(let name):
                var type = mode_t(raw.type) << 12
                if holdsDevices, raw.type == DT_REG, let st = try? Syscall.fstatat(node.fd, raw.name), DeviceNode.mayBeRecord(st),
                   let device = deviceNode(in: node.fd, stored: raw.name, path: nil, context) {
                    type = device.type
                }
                entries.append(DirectoryEntry(name: name, inode: raw.inode, type: type, nextOffset: Int64(entries.count + 1)))
                stored.append(raw.name)
            case .internalEntry:
                continue
            case .damaged:
                damaged += 1
            }
        }
        if damaged > 0 {
            // Tampered or foreign names: audited, and the listing ends in EIO
            // after the intact entries, so tools see the damage instead of a
            // directory that silently looks smaller.
            integrityFailure(.integrityFailure(.name), object: dir?.directoryID, what: "\(damaged) name(s) in a directory",
                             key: dir?.keyID, path: nodes.path(of: id).description, principal: principal(context))
        }
        return open.withLock { s in
            let handle = s.next
            s.next += 1
            s.directories[handle] = Listing(entries: entries, stored: stored, damaged: damaged)
            return handle
        }
    }

    public func readdir(_ id: NodeID, handle: UInt64, offset: Int64, _ add: (DirectoryEntry) -> Bool) throws(Errno) {
        guard let listing = open.withLock({ $0.directories[handle] }) else { throw .badFileDescriptor }
        // Past the last intact entry, a directory with damaged names answers EIO.
        if Int(offset) >= listing.entries.count, listing.damaged > 0 { throw .ioError }
        var i = Int(offset)
        while i < listing.entries.count, add(listing.entries[i]) { i += 1 }
    }

    /// READDIRPLUS: each entry with its lookup, so that `ls -l`, `find`
    /// and `rm -rf` cost no LOOKUP and GETATTR round trip per name. An entry
    /// removed since opendir is listed without attributes (as readdir would
    /// list it); a lookup the full buffer leaves out is taken back.
    public func readdirplus(_ id: NodeID, handle: UInt64, offset: Int64, _ context: RequestContext,
                            _ add: (DirectoryEntry, EntryReply?) -> Bool) throws(Errno) {
        guard let listing = open.withLock({ $0.directories[handle] }) else { throw .badFileDescriptor }
        if Int(offset) >= listing.entries.count, listing.damaged > 0 { throw .ioError }
        let dir = try nodes.node(id)
        var i = Int(offset)
        while i < listing.entries.count {
            let entry = listing.entries[i]
            let reply = listing.stored[i].flatMap { try? lookup(stored: $0, name: entry.name, in: dir, id, context) }
            guard add(entry, reply) else {
                if let reply { nodes.forget(reply.node, 1) }
                return
            }
            i += 1
        }
    }

    /// An open directory: its decrypted entries, their stored names (nil for
    /// "." and ".."), and how many names did not authenticate.
    struct Listing {
        var entries: [DirectoryEntry]
        var stored: [FileName?]
        var damaged: Int
    }

    public func releasedir(_ id: NodeID, handle: UInt64) {
        open.withLock { _ = $0.directories.removeValue(forKey: handle) }
    }

    // MARK: Files

    public func create(_ parent: NodeID, _ name: FileName, mode: mode_t, flags: Int32, _ context: RequestContext) throws(Errno) -> (EntryReply, OpenReply) {
        let dir = try nodes.node(parent)
        let stored = try storedName(name, in: dir, context)
        let directory = nodes.path(of: parent)
        let key = try keys { () throws(KeyManagerError) in try keyManager.boundKey(forDirectory: directory.bindingPath) }
        let fileID = FileID.random()
        let who = principal(context)
        let path = directory.appending(name).description
        let dataKey = try keys { () throws(KeyManagerError) in
            try keyManager.generateDataKey(for: fileID.rawValue, kind: .file, key: key, principal: who, path: path)
        }
        var header = FileHeader(chunkSizeLog2: layout.chunkSizeLog2, fileID: fileID, keyID: dataKey.keyID,
                                keyVersion: dataKey.version, wrappedKey: dataKey.wrapped)
        let cipher: FileCipher
        let headerBytes: [UInt8]
        do throws(CipherError) {
            cipher = try FileCipher(key: dataKey.key, fileID: fileID, layout: layout)
            try cipher.seal(header: &header, plaintextSize: 0)
            headerBytes = try header.encoded()
        } catch {
            try? keyManager.forgetUsage(fileID.rawValue)
            throw .ioError
        }
        try writeSidecar(stored, plaintext: name, in: dir, context)
        let fd: Int32
        do throws(Errno) {
            fd = try Syscall.openat(dir.fd, stored, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, mode & 0o7777)
        } catch {
            try? keyManager.forgetUsage(fileID.rawValue)
            throw error
        }
        let file: OpenFile
        let st: stat
        do throws(Errno) {
            try Syscall.pwrite(fd, headerBytes, at: 0)
            adopt(dir, stored, context)
            st = try Syscall.fstat(fd)
            file = try OpenFile(fd: fd, writable: true, header: header, cipher: cipher, stat: st, sealedHere: 0,
                                onIntegrityFailure: failureHandler(fileID, key, path: path, opener: who))
        } catch {
            close(fd)
            Syscall.unlinkQuietly(dir.fd, stored)
            try? keyManager.forgetUsage(fileID.rawValue)
            throw error
        }
        let handle = open.withLock { s -> UInt64 in
            let shared = s.files[file.inode] ?? file
            s.files[file.inode] = shared
            shared.handles += 1
            let h = s.next
            s.next += 1
            s.handles[h] = shared
            return h
        }
        let node = try nodes.remember(parentFD: dir.fd, storedName: stored, st: st, parent: parent, name: name)
        nodes.noteFileID(fileID.rawValue, of: node)
        return (entry(node, st, context), OpenReply(handle: handle))
    }

    /// What an open file calls when a chunk fails authentication; `path` is
    /// the file's path when it was opened (nil when audit paths are off).
    /// The record names the reader when the failure came from a read, else whoever opened the file.
    func failureHandler(_ fileID: FileID, _ key: KeyID, path: String?, opener: Principal) -> @Sendable (CipherError, Principal?) -> Void {
        { [weak self] error, reader in
            self?.integrityFailure(error, object: fileID.rawValue, what: "file", key: key, path: path, principal: reader ?? opener)
        }
    }

    /// The shared open state of a regular file, opening and authenticating it
    /// if no handle holds it; checks policy and key state either way.
    func openFile(_ node: Node, flags: Int32, _ context: RequestContext) throws(Errno) -> OpenFile {
        guard node.isRegular else { throw node.isDirectory ? .isDirectory : .invalidArgument }
        let who = principal(context)
        return try openShared(node.key) { () throws(Errno) -> OpenFile? in
            if let shared = pinOpen(node.key) {
                do throws(Errno) {
                    try keys { () throws(KeyManagerError) in
                        try keyManager.checkUse(who, .decrypt, key: shared.keyID, version: shared.keyVersion, object: shared.fileID.rawValue) { self.nodes.filePath(of: node) }
                    }
                    if !shared.writable, flags & O_ACCMODE != O_RDONLY { throw Errno.permissionDenied }
                } catch {
                    releaseFile(shared)
                    throw error
                }
                return shared
            }
            return nil
        } make: { () throws(Errno) -> OpenFile in
            var writable = true
            var fd: Int32
            do throws(Errno) { fd = try Syscall.openat(AT_FDCWD, node.procPath, O_RDWR) } catch {
                guard error == .permissionDenied || error == .readOnlyFileSystem else { throw error }
                writable = false
                fd = try Syscall.openat(AT_FDCWD, node.procPath, O_RDONLY)
            }
            let path = keyManager.auditPathMode() == .off ? nil : nodes.filePath(of: node)
            let file = try makeOpenFile(fd: fd, writable: writable, principal: who, path: path)
            nodes.noteFileID(file.fileID.rawValue, of: node)
            if !writable, flags & O_ACCMODE != O_RDONLY { throw .permissionDenied }  // `file` closes fd
            return file
        }
    }

    /// The open state of inode `key`: the one in the table (`existing`, which
    /// pins it) or, if none, a new one from `make`, put in the table. Both
    /// run under the inode's creation lock, so a state built from the disk
    /// can never be put in the table after another state for the same inode
    /// was created, written through and dropped meanwhile (it would hold a
    /// stale size and tail: two states of one file, each overwriting the other's chunks).
    func openShared(_ key: InodeKey, existing: () throws(Errno) -> OpenFile?, make: () throws(Errno) -> OpenFile) throws(Errno) -> OpenFile {
        try creationLocks[Int(key.inode % UInt64(creationLocks.count))].writing { () throws(Errno) -> OpenFile in
            if let shared = try existing() { return shared }
            return share(try make())
        }
    }

    /// Puts `file` in the open-file table, or returns the one another thread
    /// put there first; either way with one more handle.
    func share(_ file: OpenFile) -> OpenFile {
        open.withLock { s in
            let shared = s.files[file.inode] ?? file
            s.files[file.inode] = shared
            shared.handles += 1
            return shared
        }
    }

    /// The open file held for the backing inode of `fd`, with one more handle, if any.
    func pinOpen(_ key: InodeKey) -> OpenFile? {
        open.withLock { s in
            guard let f = s.files[key] else { return nil }
            f.handles += 1
            return f
        }
    }

    /// Reads and authenticates the header of backing file `fd`, unwraps its
    /// data key for `principal` and makes its open state (which owns `fd`;
    /// on failure `fd` is closed).
    /// `rekeying`: opened by the rekey job, which may unwrap a cut-off version to move the file off it.
    func makeOpenFile(fd: Int32, writable: Bool, principal who: Principal, path: String? = nil, rekeying: Bool = false) throws(Errno) -> OpenFile {
        let header: FileHeader
        do throws(Errno) {
            let raw = try Syscall.pread(fd, count: ChunkLayout.headerSize, at: 0)
            do throws(CipherError) { header = try FileHeader(decoding: raw) } catch {
                integrityFailure(error, object: nil, what: "file header", path: path, principal: who)
                throw Errno.ioError
            }
        } catch {
            close(fd)
            throw error
        }
        do throws(Errno) {
            let dataKey = try keys { () throws(KeyManagerError) in
                try keyManager.decryptDataKey(header.wrappedKey, for: header.fileID.rawValue, key: header.keyID,
                                              version: header.keyVersion, principal: who, path: path, movingOffCutOff: rekeying)
            }
            let cipher: FileCipher
            do throws(CipherError) { cipher = try FileCipher(key: dataKey, fileID: header.fileID, layout: layout) } catch { throw Errno.ioError }
            return try OpenFile(fd: fd, writable: writable, header: header, cipher: cipher,
                                onIntegrityFailure: failureHandler(header.fileID, header.keyID, path: path, opener: who))
        } catch {
            close(fd)
            throw error
        }
    }

    /// Drops one handle's hold; the last one seals the length, closes the
    /// file and frees its key.
    func releaseFile(_ file: OpenFile) {
        do throws(Errno) { try file.sealLength() } catch {
            logger.error("could not seal a file's length at release", metadata: ["file": "\(file.fileID)", "error": "\(error)"])
        }
        open.withLock { s in
            file.handles -= 1
            if file.handles <= 0, s.files[file.inode] === file {
                s.files[file.inode] = nil
            }
        }
    }

    public func open(_ id: NodeID, flags: Int32, _ context: RequestContext) throws(Errno) -> OpenReply {
        let node = try nodes.node(id)
        let file = try openFile(node, flags: flags, context)
        if flags & O_TRUNC != 0 {
            do throws(Errno) { try file.truncate(to: 0) } catch {
                releaseFile(file)
                throw error
            }
        }
        let handle = open.withLock { s -> UInt64 in
            let h = s.next
            s.next += 1
            s.handles[h] = file
            return h
        }
        return OpenReply(handle: handle)
    }

    func file(_ handle: UInt64) throws(Errno) -> OpenFile {
        guard let file = open.withLock({ $0.handles[handle] }) else { throw .badFileDescriptor }
        return file
    }

    public func read(_ id: NodeID, handle: UInt64, size: Int, offset: Int64, _ context: RequestContext,
                     _ reply: (UnsafeRawBufferPointer) -> Void) throws(Errno) {
        let file = try file(handle)
        try file.read(offset: Int(offset), count: size, by: principal(context)) { bytes in
            bytesRead.add(bytes.count, ordering: .relaxed)
            reply(bytes)
        }
    }

    public func write(_ id: NodeID, handle: UInt64, data: UnsafeRawBufferPointer, offset: Int64, _ context: RequestContext) throws(Errno) -> Int {
        let file = try file(handle)
        let n = try file.write(data, at: Int(offset))
        bytesWritten.add(n, ordering: .relaxed)
        return n
    }

    public func flush(_ id: NodeID, handle: UInt64, _ context: RequestContext) throws(Errno) {
        try file(handle).sealLength()
    }

    public func fsync(_ id: NodeID, handle: UInt64, dataOnly: Bool) throws(Errno) {
        try file(handle).sync(dataOnly: dataOnly)
    }

    public func release(_ id: NodeID, handle: UInt64) {
        guard let file = open.withLock({ $0.handles.removeValue(forKey: handle) }) else { return }
        releaseFile(file)
    }

    public func fallocate(_ id: NodeID, handle: UInt64, mode: Int32, offset: Int64, length: Int64, _ context: RequestContext) throws(Errno) {
        guard mode == 0 else { throw .notSupported }
        let file = try file(handle)
        let end = Int(offset + length)
        if end > file.size { try file.truncate(to: end) }
    }

    // MARK: Extended attributes

    static let xattrPrefix = "user.kmsfs."

    /// Attributes whose encrypted name would pass the backing filesystem's
    /// 255 bytes (a plaintext name of more than ~170 bytes) are stored as
    /// this prefix and a hash of the encrypted name; the encrypted name
    /// itself leads the stored value (2-byte length, then the name), so
    /// listxattr can still return it. Never a prefix of "user.kmsfs." and
    /// base64url, which has no '.'.
    static let xattrHashedPrefix = "user.kmsfs.H."

    /// The backing name of attribute `name`, and for a hashed one the encrypted name its value must lead with.
    func backingXattrName(_ name: FileName, _ context: RequestContext) throws(Errno) -> (name: FileName, leading: [UInt8]?) {
        guard name.hasPrefix("user.") else { throw .notSupported }
        guard name.count <= 255 else { throw .outOfRange }
        if plaintextNames { return (name, nil) }
        let volume = try volumeKeys(context)
        let encoded: String
        do throws(CipherError) { encoded = try volume.xattrNames.encrypt(name.bytes) } catch { throw .invalidArgument }
        guard Self.xattrPrefix.utf8.count + encoded.utf8.count > 255 else { return (FileName(Self.xattrPrefix + encoded), nil) }
        let hashed = FileName(Self.xattrHashedPrefix + Base64URL.encode(KeyDerivation.sha256(Array(encoded.utf8))))
        return (hashed, [UInt8(encoded.utf8.count >> 8), UInt8(encoded.utf8.count & 0xFF)] + Array(encoded.utf8))
    }

    /// The raw value of backing attribute `backing`.
    func backingXattr(_ node: Node, _ backing: FileName) throws(Errno) -> [UInt8] {
        let size = try Syscall.call { backing.withCString { CLinux.getxattr(node.procPath, $0, nil, 0) } }
        var raw = [UInt8](repeating: 0, count: size)
        let n = try Syscall.call { backing.withCString { CLinux.getxattr(node.procPath, $0, &raw, raw.count) } }
        raw.removeLast(raw.count - n)
        return raw
    }

    /// A hashed attribute's stored value split into its encrypted name and the sealed value.
    static func splitHashedXattr(_ raw: [UInt8]) -> (encoded: String, sealed: [UInt8])? {
        guard raw.count >= 2 else { return nil }
        let count = Int(raw[0]) << 8 | Int(raw[1])
        guard raw.count >= 2 + count else { return nil }
        return (String(decoding: raw[2..<(2 + count)], as: UTF8.self), Array(raw[(2 + count)...]))
    }

    /// The sealer of `node`'s extended-attribute values and the object id
    /// they are bound to: derived from the object's own key — a file's data
    /// key, a directory's name key — so the policy and state of the key that
    /// governs the object govern its attributes too (decrypt to read or
    /// list; encrypt as well to change). Only files and directories carry
    /// `user.` attributes, as on ext4.
    func xattrSealer(_ node: Node, modifying: Bool, _ context: RequestContext) throws(Errno) -> (sealer: StringSealer, object: ID128) {
        let who = principal(context)
        if node.isDirectory {
            let dir = try directoryKeys(node, context)
            if modifying { try checkDirectoryKey(node, .encrypt, context) }
            return (dir.xattrValues, dir.directoryID)
        }
        guard node.isRegular else { throw .notPermitted }
        let fd = try Syscall.openat(AT_FDCWD, node.procPath, O_RDONLY)
        defer { close(fd) }
        let raw = try Syscall.pread(fd, count: ChunkLayout.headerSize, at: 0)
        let header: FileHeader
        do throws(CipherError) { header = try FileHeader(decoding: raw) } catch {
            integrityFailure(error, object: nil, what: "file header", path: nodes.filePath(of: node), principal: who)
            throw .ioError
        }
        let object = header.fileID.rawValue
        let path = nodes.filePath(of: node)
        let dek = try keys { () throws(KeyManagerError) in
            try keyManager.decryptDataKey(header.wrappedKey, for: object, key: header.keyID, version: header.keyVersion, principal: who, path: path)
        }
        if modifying {
            try keys { () throws(KeyManagerError) in try keyManager.checkUse(who, .encrypt, key: header.keyID, object: object) { path } }
        }
        do throws(CipherError) { return (try StringSealer(key: dek, info: "kmsfs/v1/file-xattr-value"), object) } catch { throw .ioError }
    }

    /// What an attribute value is bound to: its object and its name.
    static func xattrContext(_ object: ID128, _ name: FileName) -> [UInt8] { object.bytes + name.bytes }

    public func setxattr(_ id: NodeID, _ name: FileName, value: UnsafeRawBufferPointer, flags: Int32, _ context: RequestContext) throws(Errno) {
        let node = try nodes.node(id)
        let (backing, leading) = try backingXattrName(name, context)
        var sealed = Array(value)
        if !plaintextNames {
            let (sealer, object) = try xattrSealer(node, modifying: true, context)
            do throws(CipherError) { sealed = try sealer.seal(sealed, context: Self.xattrContext(object, name)) } catch { throw .ioError }
        }
        if let leading { sealed = leading + sealed }
        try Syscall.call { backing.withCString { CLinux.setxattr(node.procPath, $0, sealed, sealed.count, flags) } }
    }

    /// Only the `user.` namespace is kept (encrypted). Other namespaces are
    /// not supported, and say so (EOPNOTSUPP, as for setxattr) rather than
    /// "no such attribute": tools then stop asking — `ls -l` remembers per
    /// filesystem that there are no ACLs or security labels, instead of two
    /// requests per file — and the kernel's check for file capabilities on
    /// every write gets its answer at once.
    public func getxattr(_ id: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> [UInt8] {
        let node = try nodes.node(id)
        guard name.hasPrefix("user.") else { throw .notSupported }
        let (backing, leading) = try backingXattrName(name, context)
        var raw = try backingXattr(node, backing)
        if plaintextNames { return raw }
        if let leading {
            guard raw.starts(with: leading) else {
                integrityFailure(.integrityFailure(.name), object: nil, what: "extended attribute name", path: nodes.filePath(of: node), principal: principal(context))
                throw .ioError
            }
            raw.removeFirst(leading.count)
        }
        let (sealer, object) = try xattrSealer(node, modifying: false, context)
        if let value = try? sealer.open(raw, context: Self.xattrContext(object, name)) { return value }
        // A value written before values were sealed per object (policy was checked above).
        let volume = try volumeKeys(context)
        do throws(CipherError) { return try volume.xattrValues.open(raw, context: Array(name.bytes)) } catch {
            integrityFailure(error, object: nil, what: "extended attribute", path: nodes.filePath(of: node), principal: principal(context))
            throw .ioError
        }
    }

    public func listxattr(_ id: NodeID, _ context: RequestContext) throws(Errno) -> [FileName] {
        let node = try nodes.node(id)
        guard !node.isSymlink else { return [] }
        let size = try Syscall.call { CLinux.listxattr(node.procPath, nil, 0) }
        var raw = [CChar](repeating: 0, count: size)
        let n = try Syscall.call { CLinux.listxattr(node.procPath, &raw, raw.count) }
        let names = raw[0..<n].split(separator: 0).map { FileName(bytes: $0.map { UInt8(bitPattern: $0) }) }
        if plaintextNames { return names.filter { $0.hasPrefix("user.") } }
        guard names.contains(where: { $0.hasPrefix(Self.xattrPrefix) }) else { return [] }
        _ = try xattrSealer(node, modifying: false, context)
        let volume = try volumeKeys(context)
        return names.compactMap { backing in
            let encoded: String
            if backing.hasPrefix(Self.xattrHashedPrefix) {
                guard let raw = try? backingXattr(node, backing), let split = Self.splitHashedXattr(raw),
                      FileName(Self.xattrHashedPrefix + Base64URL.encode(KeyDerivation.sha256(Array(split.encoded.utf8)))) == backing else { return nil }
                encoded = split.encoded
            } else if backing.hasPrefix(Self.xattrPrefix) {
                encoded = String(decoding: backing.bytes.dropFirst(Self.xattrPrefix.utf8.count), as: UTF8.self)
            } else {
                return nil
            }
            return (try? volume.xattrNames.decrypt(encoded)).map { FileName(bytes: $0) }
        }
    }

    public func removexattr(_ id: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) {
        let node = try nodes.node(id)
        guard name.hasPrefix("user.") else { throw .notSupported }
        let backing = try backingXattrName(name, context).name
        if !plaintextNames { _ = try xattrSealer(node, modifying: true, context) }
        try Syscall.call { backing.withCString { CLinux.removexattr(node.procPath, $0) } }
    }

    public func destroy() {
        for file in open.withLock({ Array($0.files.values) }) { try? file.sealLength() }
        open.withLock { s in
            s.handles.removeAll()
            s.files.removeAll()
        }
    }
}

extension FileName {
    /// A stored name that stands for a name too long to store (not its sidecar).
    var isHashedLongName: Bool { hasPrefix(LongName.prefix) && !hasSuffix(LongName.sidecarSuffix) }
}
