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
    /// FUSE requests answered since the mount (all daemons of this process).
    public var requests: Int = 0
    /// Backing descriptors the nodes hold now; descriptors parked (closed,
    /// the entry's file handle kept) and reopened from a handle since the mount.
    public var descriptors: Int = 0
    public var parkedDescriptors: Int = 0
    public var reopenedDescriptors: Int = 0
    /// Streaming appends answered before they reached the backing file
    /// (WriteBehind; all mounts of this process).
    public var writesBehind: Int = 0
    /// Requests found by polling after the last one instead of by a wake-up (`kmsfs mount --poll-us`).
    public var polledRequests: Int = 0
}

/// The encrypted filesystem: maps the plaintext tree onto CIPHERDIR, one
/// ciphertext file per plaintext file, names encrypted per directory, data
/// keys from the key manager, policy checked with each request's uid/gid.
/// Testable without a mount: call the `FileSystem` operations directly.
public final class EncryptedFileSystem: FileSystem, @unchecked Sendable {
    public let cipherdir: String
    public let keyManager: KeyManager
    let layout: ChunkLayout
    /// How names map to CIPHERDIR's: encrypted, long-name sidecars, reserved names.
    let names: NameMapping
    var plaintextNames: Bool { names.plaintextNames }
    let nodes: NodeTable
    /// Set by the mount: keeps the nodes' descriptors under the limit (for statistics).
    nonisolated(unsafe) public var relief: DescriptorRelief?
    /// Set by the mount: tells the kernel to drop its cached attributes of a
    /// node whose mode the filesystem changed on its own (see `clearSetID`).
    nonisolated(unsafe) public var attributesChanged: (@Sendable (NodeID) -> Void)?
    let logger = Logger(label: "kmsfs.fs")
    /// Seconds the kernel may cache names and attributes. The daemon is the
    /// only writer of CIPHERDIR while it is mounted, and the kernel itself
    /// drops or refreshes what a request through the mount changes (as
    /// libfuse's passthrough_ll with `cache=always` relies on); what the
    /// daemon changes on its own (clearing set-ID bits) it invalidates. A
    /// cached entry grants nothing: names are no policy gate (opens, reads
    /// of link targets and listings are), and a looked-up name is in its
    /// directory's name cache anyway. With 1 s, a `stat` of each of 100,000
    /// files created a minute before was a LOOKUP round trip every time.
    let timeout: Double = 3600
    let runningAsRoot = geteuid() == 0

    /// Open files, their handles and directory listings.
    let openFiles = OpenFileTable()
    let bytesRead = Atomic<Int>(0)
    let bytesWritten = Atomic<Int>(0)
    let integrityFailures = Atomic<Int>(0)
    let denied = Atomic<Int>(0)


    /// Opens the filesystem rooted at `cipherdir` (already initialised).
    /// `parkDescriptors`: let the descriptor relief close cached inodes'
    /// descriptors and reopen them by file handle, where this process may
    /// (root) and the backing filesystem gives handles.
    public init(cipherdir: String, keyManager: KeyManager, parkDescriptors: Bool = false) throws {
        self.cipherdir = cipherdir
        self.keyManager = keyManager
        self.layout = try ChunkLayout(chunkSize: keyManager.chunkSize)
        self.names = NameMapping(plaintextNames: keyManager.plaintextNames)
        let root = try Syscall.open(AT_FDCWD, cipherdir, KMSFS_O_PATH | O_DIRECTORY)
        let st = try Syscall.fstat(root.raw)
        nodes = NodeTable(root: Node(id: .root, descriptor: root, key: InodeKey(st), type: S_IFDIR, parent: nil, name: ""),
                          handles: parkDescriptors && geteuid() == 0 ? BackingHandles.probe(cipherdir: cipherdir) : nil)
    }

    /// Writes the root directory's keys; `kmsfs init` calls this once.
    public static func initializeRoot(cipherdir: String, keyManager: KeyManager, principal: Principal) throws {
        let fd = try Syscall.open(AT_FDCWD, cipherdir, KMSFS_O_PATH | O_DIRECTORY)
        let layout = try ChunkLayout(chunkSize: keyManager.chunkSize)
        _ = try DirectoryKeys.create(in: fd.raw, key: try keyManager.boundKey(forDirectory: "/"), keyManager: keyManager,
                                     principal: principal, layout: layout, isRoot: true)
    }


    public func entryReplied() { relief?.throttle() }

    public var statistics: FilesystemStatistics {
        FilesystemStatistics(openFiles: openFiles.count, nodes: nodes.count,
                             bytesRead: bytesRead.load(ordering: .relaxed), bytesWritten: bytesWritten.load(ordering: .relaxed),
                             integrityFailures: integrityFailures.load(ordering: .relaxed), deniedRequests: denied.load(ordering: .relaxed),
                             forgottenOnRequest: relief?.evictions.load(ordering: .relaxed) ?? 0,
                             requests: RequestCounters.shared.requests.load(ordering: .relaxed),
                             descriptors: nodes.ledger.held.load(ordering: .relaxed),
                             parkedDescriptors: nodes.ledger.parked.load(ordering: .relaxed),
                             reopenedDescriptors: nodes.ledger.reopened.load(ordering: .relaxed),
                             writesBehind: WriteBehind.shared.handedOver.load(ordering: .relaxed),
                             polledRequests: RequestCounters.shared.polled)
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
            try keyManager.checkUse(who, .decrypt, key: loaded.keyID, version: loaded.version, object: loaded.directoryID) { self.nodes.directoryPath(of: node.id).description }
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
                try DirectoryKeys.load(from: root.dirFD, keyManager: keyManager, principal: daemon, layout: layout, isRoot: true, logger: logger)
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
                try keyManager.checkUse(principal(context), .encrypt, key: keys.keyID, object: keys.directoryID) { self.nodes.directoryPath(of: dir.id).description }
            }
        }
    }

    /// The name stored in CIPHERDIR for plaintext `name` in directory `node`
    /// (its keys loaded for, and checked against, the caller).
    func storedName(_ name: FileName, in node: Node, _ context: RequestContext) throws(Errno) -> FileName {
        try names.stored(for: name, cache: node.names) { () throws(Errno) in try directoryKeys(node, context) }
    }

    /// For a hashed long name, writes the sidecar holding the full encoded name.
    func writeSidecar(_ stored: FileName, plaintext name: FileName, in node: Node, _ context: RequestContext) throws(Errno) {
        guard !plaintextNames, stored.isHashedLongName else { return }
        try names.writeSidecar(stored, plaintext: name, keys: try directoryKeys(node, context), inDirectory: node.dirFD)
    }

    func removeSidecar(_ stored: FileName, in node: Node) {
        names.removeSidecar(stored, inDirectory: node.dirFD)
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

    /// What the mount shows of `node`, whose backing entry's stat is `st`.
    func attributes(_ node: Node, _ st: stat, _ context: RequestContext) -> stat {
        var st = st
        // A file with appends still on their way to the backing file
        // (WriteBehind) is stat'ed again once they landed: its size and times.
        if let file = settleWrites(node) { st = (try? file.store.attributes()) ?? st }
        var attributes = plaintextAttributes(st) { node.isSymlink ? try? self.decryptedTarget(of: node, context) : nil }
        if node.isDevice {
            // Its record is a regular file in CIPHERDIR (DeviceNode).
            attributes.st_mode = node.type | (st.st_mode & 0o7777)
            attributes.st_rdev = node.device
            attributes.st_size = 0
            attributes.st_blocks = 0
        }
        return attributes
    }

    /// Lets the appends of `node`'s open file that are still on their way to
    /// the backing file (WriteBehind) land, before its attributes are read
    /// or its times changed. Returns the file if it had any.
    @discardableResult
    func settleWrites(_ node: Node) -> OpenFile? {
        guard WriteBehind.shared.active, node.isRegular, let file = openFiles.current(node.key), file.writesInFlight else { return nil }
        file.waitForWrites()
        return file
    }

    func entry(_ node: Node, _ st: stat, _ context: RequestContext) -> EntryReply {
        EntryReply(node: node.id, attributes: attributes(node, st, context), attributeTimeout: timeout, entryTimeout: timeout)
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
        keyManager.audit(AuditEvent(.integrityFailure, outcome: .failure, key: key, principal: principal, object: object,
                                    error: "\(what): \(error)", path: path))
    }

    /// Gives a new entry to the requesting user when the daemon runs as root.
    /// In a setgid directory the entry keeps the directory's group, which
    /// the backing entry inherited (as on ext4).
    func adopt(_ parent: Node, _ stored: FileName, _ context: RequestContext) {
        guard runningAsRoot, context.uid != 0 || context.gid != 0 else { return }
        let setgid = ((try? Syscall.fstat(parent.dirFD).st_mode) ?? 0) & S_ISGID != 0
        _ = stored.withCString { fchownat(parent.dirFD, $0, context.uid, setgid ? gid_t.max : context.gid, AT_SYMLINK_NOFOLLOW) }
    }

    /// The object id in the header of a backing file (a regular file, or a
    /// directory's `.kmsfs.dir`), if readable.
    func fileID(in directoryFD: Int32, stored: FileName) -> ID128? {
        guard let fd = try? Syscall.open(directoryFD, stored, O_RDONLY | O_NOFOLLOW) else { return nil }
        return Self.header(of: fd.raw)?.fileID.rawValue
    }

    /// The header of open backing file `fd` if it parses (shape only: not authenticated).
    static func header(of fd: Int32) -> FileHeader? {
        guard let raw = try? Syscall.pread(fd, count: ChunkLayout.headerSize, at: 0) else { return nil }
        return try? FileHeader(decoding: raw)
    }

    public func destroy() {
        for file in openFiles.all { try? file.sealLength() }
        openFiles.removeAll()
    }
}

extension FileName {
    /// A stored name that stands for a name too long to store (not its sidecar).
    var isHashedLongName: Bool { hasPrefix(LongName.prefix) && !hasSuffix(LongName.sidecarSuffix) }
}
