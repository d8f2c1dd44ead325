import ChunkCipher
import FUSEBridge
import CLinux
import SystemPackage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Identity of a backing inode.
struct InodeKey: Hashable {
    var device: UInt64
    var inode: UInt64
    init(_ st: stat) {
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
    }
}

/// One inode the kernel knows about: a descriptor of its backing entry (so
/// renames elsewhere never invalidate it, as in libfuse's passthrough_ll) —
/// for a regular file opened read-write, which its open files then share
/// (one descriptor per file, none reopened through /proc), for anything else
/// (or a file the daemon may not write) `O_PATH` —, its lookup count, the
/// plaintext name and parent it was last looked up or moved by (a
/// directory's decide its key binding; a file's are the path its audit
/// records name), and for directories the directory's keys once loaded.
///
/// A node that is not a directory may have its descriptor *parked* by the
/// descriptor relief: closed (after a `RequestGrace` period, so no request
/// still uses it), with the entry's kernel file handle kept instead, and
/// reopened from the handle by the next request that needs it. So the
/// kernel may cache far more inodes than the daemon may hold descriptors.
final class Node: @unchecked Sendable {
    let id: NodeID
    private struct Backing {
        var descriptor: SharedDescriptor?
        /// Whether `descriptor` is (or, parked, was) open read-write.
        var readWrite: Bool
        var handle: ParkedHandle?
        /// The entry gives no handle on CIPHERDIR's mount: never parked.
        var unparkable = false
    }
    private let backing: Mutex<Backing>
    /// The descriptor's number, -1 while parked (read without the lock).
    private let raw: Atomic<Int32>
    /// Counts the descriptor; nil for a node outside the table (never parked).
    let ledger: DescriptorLedger?
    let key: InodeKey
    let type: mode_t
    // Guarded by the table's lock.
    var lookups: UInt64 = 0
    var parent: NodeID?
    var name: FileName
    var keys: DirectoryKeys?
    /// A regular file's object id once a create or open has read it (it
    /// never changes for an inode), so an unlink need not read the header.
    var fileID: ID128?
    /// A block or character device's number (from its record; it never changes).
    let device: dev_t
    /// When the kernel last looked it up (the table's tick), and when the
    /// daemon last asked the kernel to forget it: the oldest go first when
    /// descriptors run short.
    var lastUsed: UInt64 = 0
    var evictedAt: UInt64 = 0
    /// A directory's plaintext path as last worked out (guarded by the
    /// table's lock; valid while the table's path generation is unchanged).
    var cachedPath: DirectoryPath?
    /// A directory's names seen before, both ways (nil for other nodes:
    /// a lookup that makes a file's node allocates no cache).
    let names: NameCache?

    convenience init(id: NodeID, descriptor: consuming Descriptor, key: InodeKey, type: mode_t, parent: NodeID?, name: FileName) {
        self.init(id: id, descriptor: SharedDescriptor(descriptor), readWrite: false, key: key, type: type, parent: parent, name: name)
    }

    init(id: NodeID, descriptor: SharedDescriptor, readWrite: Bool, key: InodeKey, type: mode_t, parent: NodeID?, name: FileName,
         device: dev_t = 0, ledger: DescriptorLedger? = nil) {
        self.id = id
        self.device = device
        self.backing = Mutex(Backing(descriptor: descriptor, readWrite: readWrite))
        self.raw = Atomic(descriptor.raw)
        self.ledger = ledger
        self.key = key
        self.type = type
        self.parent = parent
        self.name = name
        self.names = type == S_IFDIR ? NameCache() : nil
    }

    /// Whether the ledger counts this node's descriptor (set once it is in the table).
    private let counted = Atomic<Bool>(false)

    /// Enters the node's descriptor in the ledger (once it is in the table).
    func countDescriptor() {
        guard let ledger else { return }
        backing.withLock { b in
            counted.store(true, ordering: .relaxed)
            if b.descriptor != nil { ledger.took(id) }
        }
    }

    deinit {
        if let ledger, counted.load(ordering: .relaxed), backing.withLock({ $0.descriptor != nil }) { ledger.gave() }
    }

    var isDirectory: Bool { type == S_IFDIR }
    var isRegular: Bool { type == S_IFREG }
    var isSymlink: Bool { type == S_IFLNK }
    var isDevice: Bool { type == S_IFBLK || type == S_IFCHR }

    /// The backing descriptor, reopened if parked. Valid until the calling
    /// request ends (a parked descriptor closes only after its grace period).
    var fd: Int32 {
        get throws(Errno) {
            let r = raw.load(ordering: .acquiring)
            return r >= 0 ? r : try held().descriptor.raw
        }
    }

    /// A directory's descriptor (directories are never parked, so this
    /// needs no reopening; on a parked node of another type it is -1 and
    /// the system call using it fails with EBADF, never reaching another file).
    var dirFD: Int32 { raw.load(ordering: .acquiring) }

    /// A path through /proc that reopens the backing entry with real access modes.
    var procPath: String {
        get throws(Errno) { Self.procPath(try fd) }
    }

    /// The /proc path of descriptor `fd` (reopens with real access modes; works for `O_PATH`).
    static func procPath(_ fd: Int32) -> String { "/proc/self/fd/\(fd)" }

    /// The descriptor object (an open file shares it) and whether it is read-write, reopened if parked.
    func held() throws(Errno) -> (descriptor: SharedDescriptor, readWrite: Bool) {
        try backing.withLock { (b) throws(Errno) -> (SharedDescriptor, Bool) in
            if let d = b.descriptor { return (d, b.readWrite) }
            guard let handle = b.handle, let handles = ledger?.handles else { throw .staleNFSFileHandle }
            var made: SharedDescriptor? = nil
            if b.readWrite {
                do throws(Errno) { made = SharedDescriptor(try handles.open(handle, O_RDWR | O_NONBLOCK | O_NOCTTY)) } catch where NodeTable.refusesWriting(error) {
                    b.readWrite = false  // as `openBacking` falls back
                }
            }
            let d: SharedDescriptor
            if let made { d = made } else { d = SharedDescriptor(try handles.open(handle, KMSFS_O_PATH | O_NOFOLLOW)) }
            b.descriptor = d
            raw.store(d.raw, ordering: .releasing)
            ledger?.reopened.add(1, ordering: .relaxed)
            if counted.load(ordering: .relaxed) { ledger?.took(id) }
            return (d, b.readWrite)
        }
    }

    /// Whether the descriptor is open read-write (as of now).
    var readWrite: Bool { backing.withLock { $0.readWrite } }

    var holdsDescriptor: Bool { raw.load(ordering: .relaxed) >= 0 }

    /// Takes the descriptor away, keeping the entry's file handle, and
    /// returns it for the relief to release after a grace period; nil if
    /// the node is a directory, holds none, or its entry gives no handle.
    func park() -> SharedDescriptor? {
        guard !isDirectory, let ledger, let handles = ledger.handles else { return nil }
        return backing.withLock { b -> SharedDescriptor? in
            guard let d = b.descriptor, !b.unparkable, counted.load(ordering: .relaxed) else { return nil }
            if b.handle == nil {
                guard let handle = handles.handle(of: d.raw) else { b.unparkable = true; return nil }
                b.handle = handle
            }
            b.descriptor = nil
            raw.store(-1, ordering: .releasing)
            ledger.gave()
            ledger.parked.add(1, ordering: .relaxed)
            return d
        }
    }

    // Attribute changes go through the read-write descriptor a regular
    // file's node holds; an O_PATH descriptor needs /proc (fchmod and
    // futimens refuse it), which costs a path walk — half of an untar's
    // SETATTR time before files had read-write descriptors.

    /// Sets the backing entry's permission bits.
    func changeMode(_ mode: mode_t) throws(Errno) {
        let (d, readWrite) = try held()
        if readWrite {
            try Syscall.call { fchmod(d.raw, mode) }
        } else {
            try Syscall.call { chmod(Self.procPath(d.raw), mode) }
        }
    }

    /// Sets the backing entry's access and modification times (a symlink's
    /// own, not its target's).
    func setTimes(_ times: [timespec]) throws(Errno) {
        var times = times
        let (d, readWrite) = try held()
        if isSymlink {
            try Syscall.call { utimensat(d.raw, "", &times, KMSFS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) }
        } else if readWrite {
            try Syscall.call { futimens(d.raw, &times) }
        } else {
            try Syscall.call { utimensat(AT_FDCWD, Self.procPath(d.raw), &times, 0) }
        }
    }
}

/// A directory's plaintext ↔ stored names, both ways. Name encryption is
/// deterministic under the directory's key, so entries never go stale: the
/// cache spares the create, unlink or rename after a lookup an encryption,
/// and a listing read again (`rm -rf` reads each directory twice) or the
/// unlinks after it the AES-SIV operations a name costs (a context copy
/// each, ~4 µs). Only names that authenticated get in, after the policy
/// check the listing or lookup made. Bounded per directory (cleared when
/// full) and across all directories (~40 MB of names at most).
final class NameCache: Sendable {
    static let perDirectory = 4096
    static let allDirectories = 262_144
    private static let held = Atomic<Int>(0)
    private struct Maps: ~Copyable {
        var stored: [FileName: FileName] = [:]
        var plaintext: [FileName: FileName] = [:]
    }
    private let maps = Mutex(Maps())

    func stored(for name: FileName) -> FileName? { maps.withLock { $0.stored[name] } }
    func plaintext(for stored: FileName) -> FileName? { maps.withLock { $0.plaintext[stored] } }

    func remember(_ name: FileName, stored: FileName) {
        maps.withLock { m in
            guard m.stored[name] == nil else { return }
            if m.stored.count >= Self.perDirectory {
                Self.held.subtract(m.stored.count, ordering: .relaxed)
                m.stored.removeAll(keepingCapacity: true)
                m.plaintext.removeAll(keepingCapacity: true)
            }
            guard Self.held.load(ordering: .relaxed) < Self.allDirectories else { return }
            Self.held.add(1, ordering: .relaxed)
            m.stored[name] = stored
            m.plaintext[stored] = name
        }
    }

    deinit { Self.held.subtract(maps.withLock { $0.stored.count }, ordering: .relaxed) }
}

/// NodeID → Node, with lookup counting and inode de-duplication (hard links
/// share one node).
final class NodeTable: Sendable {
    private struct State: ~Copyable {
        var nodes: [NodeID: Node] = [:]
        var byInode: [InodeKey: NodeID] = [:]
        var tick: UInt64 = 0
        /// Raised whenever a directory's parent or name changes: every
        /// directory's cached path is then worked out again.
        var pathGeneration: UInt64 = 0
        /// Directories whose keys are loaded (the root's aside), oldest
        /// first; ids of nodes since forgotten or dropped are skipped.
        var keyed = NodeQueue()
        var keyedCount = 0
    }
    private let state = Mutex(State())
    /// At most this many directories keep their keys loaded (the least
    /// recently loaded give them up; a later use loads them again, ~70 µs).
    /// A directory's keys take ~5 KiB of the 8 MiB secure heap (name key,
    /// the kept AES-CMAC and AES-CTR contexts, the attribute sealer): a deep
    /// tree's 11,000 directories filled it, and keys then got a locked page
    /// each until the process ran out of memory mappings.
    let keyedDirectoryLimit: Int
    /// The next node id (1 is the root). Taken before the table's lock, so
    /// a lookup that loses a race to the same inode leaves a gap: ids are
    /// never reused, which is all the kernel needs.
    private let nextID = Atomic<UInt64>(2)
    /// The number of nodes, kept beside the table so that statistics take
    /// no lock (written under the table's lock).
    private let population = Atomic<Int>(1)
    /// The descriptors the nodes hold, and where parked ones reopen.
    let ledger: DescriptorLedger

    /// The backing root directory (an O_PATH descriptor, open for the table's life).
    let rootFD: Int32

    init(root: Node, handles: BackingHandles? = nil, keyedDirectoryLimit: Int = 1024) {
        self.keyedDirectoryLimit = keyedDirectoryLimit
        rootFD = (try? root.fd) ?? -1
        ledger = DescriptorLedger(handles: handles)
        root.lookups = UInt64.max / 2
        state.withLock { s in
            s.nodes[root.id] = root
            s.byInode[root.key] = root.id
        }
    }

    func node(_ id: NodeID) throws(Errno) -> Node {
        guard let node = state.withLock({ $0.nodes[id] }) else { throw Errno(rawValue: ESTALE) }
        return node
    }

    /// The node of `name` in `parent` (already `fstatat`-ed as `st`, its type
    /// as the mount shows it), its lookup count raised by one. A new node
    /// takes `opened` (a create's read-write descriptor of the file) or opens
    /// one: read-write for a regular file, else (or if refused) `O_PATH`.
    func remember(parentFD: Int32, storedName: FileName, st: stat, parent: NodeID, name: FileName, device: dev_t = 0,
                  opened given: SharedDescriptor? = nil) throws(Errno) -> Node {
        let key = InodeKey(st)
        if let existing = state.withLock({ s -> Node? in
            guard let id = s.byInode[key], let node = s.nodes[id] else { return nil }
            node.lookups += 1
            Self.place(node, in: parent, as: name, &s)
            s.tick += 1
            node.lastUsed = s.tick
            return node
        }) { return existing }
        let descriptor: SharedDescriptor
        let readWrite: Bool
        if let given {
            (descriptor, readWrite) = (given, true)
        } else {
            (descriptor, readWrite) = try openBacking(parentFD, storedName, regular: st.st_mode & S_IFMT == S_IFREG)
            guard InodeKey(try Syscall.fstat(descriptor.raw)) == key else {
                throw .noSuchFileOrDirectory // replaced between stat and open
            }
        }
        // Made before the lock; if another lookup of the inode won the race
        // it is dropped below, and its descriptor with it.
        let made = Node(id: NodeID(rawValue: nextID.add(1, ordering: .relaxed).oldValue), descriptor: descriptor, readWrite: readWrite,
                        key: key, type: st.st_mode & S_IFMT, parent: parent, name: name, device: device, ledger: ledger)
        let (node, new) = state.withLock { s -> (Node, Bool) in
            s.tick += 1
            if let id = s.byInode[key], let node = s.nodes[id] {
                node.lookups += 1
                node.lastUsed = s.tick
                return (node, false)
            }
            let node = made
            node.lookups = 1
            node.lastUsed = s.tick
            s.nodes[node.id] = node
            s.byInode[key] = node.id
            population.store(s.nodes.count, ordering: .relaxed)
            return (node, true)
        }
        // Counted once in the table (a node that lost the race is dropped
        // uncounted, with its descriptor).
        if new { node.countDescriptor() }
        return node
    }

    /// Opens a backing entry for its node: a regular file read-write
    /// (`O_NONBLOCK` so that another process's lease on it cannot stall the
    /// daemon; it changes nothing else for a regular file), falling back to
    /// `O_PATH` where the file refuses writing (a read-only or immutable
    /// backing file, a lease); anything else `O_PATH`. Out of descriptors it
    /// waits for the FORGETs the relief asks for (at most 0.5 s).
    private func openBacking(_ parentFD: Int32, _ storedName: FileName, regular: Bool) throws(Errno) -> (SharedDescriptor, readWrite: Bool) {
        var lastError = Errno.tooManyOpenFiles
        for attempt in 0..<101 {
            if attempt > 0 {
                ledger.pressure?()
                usleep(5_000)
            }
            do throws(Errno) {
                if regular {
                    do throws(Errno) {
                        return (SharedDescriptor(try Syscall.open(parentFD, storedName, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY)), true)
                    } catch where Self.refusesWriting(error) {}
                }
                return (SharedDescriptor(try Syscall.open(parentFD, storedName, KMSFS_O_PATH | O_NOFOLLOW)), false)
            } catch where error == .tooManyOpenFiles || error == .tooManyOpenFilesInSystem {
                lastError = error
            }
        }
        throw lastError
    }

    /// Errors of a read-write open that an `O_PATH` one would not meet.
    static func refusesWriting(_ error: Errno) -> Bool {
        [.permissionDenied, .notPermitted, .readOnlyFileSystem, .textFileBusy, .resourceTemporarilyUnavailable].contains(error)  // EAGAIN is EWOULDBLOCK
    }

    /// Up to `n` nodes to ask the kernel to forget, least recently looked up
    /// first: files, symlinks and devices before directories (forgetting a
    /// directory's entry drops its cached children too), none asked in the
    /// last `since` ticks. Each is marked as asked.
    func evictionCandidates(_ n: Int, notAskedSince since: UInt64) -> [(parent: NodeID, name: FileName)] {
        // Copied under the lock, sorted outside it: on a host that allows a
        // million descriptors the sort must not stall every request.
        let (now, eligible) = state.withLock { s in
            let now = s.tick
            return (now, s.nodes.values.filter { node in
                node.id != .root && node.parent != nil && node.holdsDescriptor && (node.evictedAt == 0 || now - node.evictedAt > since)
            }.map { (node: $0, directory: $0.isDirectory, used: $0.lastUsed) })
        }
        let chosen = eligible.sorted { a, b in a.directory != b.directory ? !a.directory : a.used < b.used }.prefix(n)
        return state.withLock { _ in
            chosen.compactMap { entry in
                entry.node.evictedAt = now
                return entry.node.parent.map { ($0, entry.node.name) }
            }
        }
    }

    /// Lowers a node's lookup count; at zero the node is dropped.
    func forget(_ id: NodeID, _ count: UInt64) {
        // The forgotten node is released after the lock: its last reference
        // closes the backing descriptor, and for an unlinked file that close
        // frees the file's pages — in `rm -rf`, under the table's lock, it
        // made the next UNLINK wait (29% of its samples were the lock's slow path).
        let removed: Node? = state.withLock { s in
            guard let node = s.nodes[id], id != .root else { return nil }
            node.lookups = node.lookups > count ? node.lookups - count : 0
            guard node.lookups == 0 else { return nil }
            s.nodes[id] = nil
            if s.byInode[node.key] == id { s.byInode[node.key] = nil }
            if node.keys != nil { s.keyedCount -= 1 }
            population.store(s.nodes.count, ordering: .relaxed)
            return node
        }
        _ = removed
    }

    /// Records that an entry moved (a directory's path decides its key
    /// binding; a file's is what its audit records name).
    func moved(_ key: InodeKey, to parent: NodeID, name: FileName) {
        state.withLock { s in
            guard let id = s.byInode[key], let node = s.nodes[id] else { return }
            Self.place(node, in: parent, as: name, &s)
        }
    }

    private static func place(_ node: Node, in parent: NodeID, as name: FileName, _ s: inout State) {
        if node.isDirectory, node.parent != parent || node.name != name { s.pathGeneration &+= 1 }
        node.parent = parent
        node.name = name
    }

    /// A directory's plaintext path, from its cached copy or its parent's
    /// (so a file's path for an audit record costs one concatenation, not a
    /// walk to the root).
    func directoryPath(of id: NodeID) -> DirectoryPath {
        state.withLock { s in Self.directoryPath(id, &s) }
    }

    private static func directoryPath(_ id: NodeID, _ s: inout State) -> DirectoryPath {
        guard id != .root, let node = s.nodes[id], let parent = node.parent else { return DirectoryPath() }
        if let cached = node.cachedPath, cached.generation == s.pathGeneration { return cached }
        var path = directoryPath(parent, &s).child(node.name)
        path.generation = s.pathGeneration
        node.cachedPath = path
        return path
    }

    /// The plaintext path a file node was last looked up by (for the audit log).
    /// The directory `node` was last seen in.
    func parent(of node: Node) -> NodeID? {
        state.withLock { _ in node.parent }
    }

    func filePath(of node: Node) -> String? {
        state.withLock { s in
            guard let parent = node.parent else { return nil }
            return Self.directoryPath(parent, &s).text(of: node.name)
        }
    }

    /// Remembers the object id of a regular file's node.
    func noteFileID(_ id: ID128, of node: Node) {
        state.withLock { _ in node.fileID = id }
    }

    /// The object id of the file with backing inode `key`, if a node for it is known and has read it.
    func fileID(of key: InodeKey) -> ID128? {
        state.withLock { s in s.byInode[key].flatMap { s.nodes[$0]?.fileID } }
    }

    /// The directory keys cached on a node, or those `load` returns (cached then).
    func keys(of node: Node, load: () throws(Errno) -> DirectoryKeys) throws(Errno) -> DirectoryKeys {
        if let keys = state.withLock({ _ in node.keys }) { return keys }
        let loaded = try load()
        // Keys another directory gives up are released after the lock (their deinit wipes them).
        let (keys, released) = state.withLock { s -> (DirectoryKeys, [DirectoryKeys]) in
            if let keys = node.keys { return (keys, []) }
            node.keys = loaded
            guard node.id != .root, s.nodes[node.id] === node else { return (loaded, []) }
            s.keyed.append(node.id)
            s.keyedCount += 1
            return (loaded, Self.trimKeys(&s, limit: keyedDirectoryLimit))
        }
        _ = released
        return keys
    }

    private static func trimKeys(_ s: inout State, limit: Int) -> [DirectoryKeys] {
        var released: [DirectoryKeys] = []
        while s.keyedCount > limit, let id = s.keyed.removeFirst() {
            guard let node = s.nodes[id], let keys = node.keys else { continue }
            node.keys = nil
            s.keyedCount -= 1
            released.append(keys)
        }
        // Compacted once skipped ids dominate (forgotten directories, reloads).
        if s.keyed.count > 4 * limit + 1024 {
            let nodes = s.nodes
            s.keyed.compact { nodes[$0]?.keys != nil }
        }
        return released
    }

    /// Directories whose keys are loaded now (the root's aside).
    var keyedDirectories: Int { state.withLock { $0.keyedCount } }

    /// Drops the cached keys of the directory `directoryID` (its `.kmsfs.dir`
    /// was rewrapped under another key), so the next use reloads them.
    func dropKeys(ofDirectory directoryID: ID128) {
        state.withLock { s in
            for node in s.nodes.values where node.keys?.directoryID == directoryID {
                node.keys = nil
                if node.id != .root { s.keyedCount -= 1 }
            }
        }
    }

    var count: Int { population.load(ordering: .relaxed) }

    /// The node `id` if the table has it.
    func existing(_ id: NodeID) -> Node? { state.withLock { $0.nodes[id] } }
}

/// A path in the mount as its components' bytes. Audit records show it as
/// text (`description`, lossy for names that are not UTF-8); key bindings,
/// which are made from text, are resolved with `bindingPath`.
/// A directory's plaintext path in the two forms the filesystem uses: as
/// text for people (audit records) and as the path its key binding is
/// looked up by. Empty for the root.
struct DirectoryPath {
    /// "/a/b"; empty for the root. U+FFFD where a name is not UTF-8.
    private(set) var text = ""
    /// The path whose binding governs this one: all of it if every name is
    /// UTF-8, else the part before the first name that is not. A binding is
    /// made from a text path, so none can lie at or below such a name, and
    /// the nearest text ancestor's binding is the one inherited. (Decoding
    /// lossily instead could match a binding on a directory whose name
    /// really contains U+FFFD.)
    private(set) var binding = ""
    /// Whether every name so far was UTF-8 (so a child's name extends `binding`).
    private var bindingWhole = true
    var generation: UInt64 = 0

    var description: String { text.isEmpty ? "/" : text }
    func text(of name: FileName) -> String { text + "/" + name.description }

    func child(_ name: FileName) -> DirectoryPath {
        var path = self
        path.text = text(of: name)
        if bindingWhole, let t = name.text { path.binding = binding + "/" + t } else { path.bindingWhole = false }
        return path
    }
}

