import ChunkCipher
import FUSEBridge
import Synchronization
import SystemPackage

/// The mount's open files and directory listings: one `OpenFile` per
/// backing inode, shared by every handle on it (so two handles of one file
/// never hold two states of it), the handles the kernel was given, and the
/// listings opendir made. Handle ids are never reused within a mount.
final class OpenFileTable: Sendable {
    private struct State: ~Copyable {
        var files: [InodeKey: OpenFile] = [:]
        var handles: [HandleID: OpenFile] = [:]
        var directories: [HandleID: EncryptedFileSystem.Listing] = [:]
        var next: UInt64 = 1

        mutating func issue() -> HandleID {
            defer { next += 1 }
            return HandleID(rawValue: next)
        }
    }
    private let state = Mutex(State())
    /// Striped by inode: serialises making an inode's open state (see `shared`).
    private let creationLocks = (0..<64).map { _ in ReadWriteLock() }

    /// The open state of inode `key`: the one in the table (`existing`, which
    /// pins it) or, if none, a new one from `make`, put in the table. Both
    /// run under the inode's creation lock, so a state built from the disk
    /// can never be put in the table after another state for the same inode
    /// was created, written through and dropped meanwhile (it would hold a
    /// stale size and tail: two states of one file, each overwriting the other's chunks).
    func shared(_ key: InodeKey, existing: () throws(Errno) -> OpenFile?, make: () throws(Errno) -> OpenFile) throws(Errno) -> OpenFile {
        try creationLocks[Int(key.inode % UInt64(creationLocks.count))].writing { () throws(Errno) -> OpenFile in
            if let shared = try existing() { return shared }
            return share(try make())
        }
    }

    /// Puts `file` in the table, or returns the one another thread put there
    /// first; either way with one more hold.
    func share(_ file: OpenFile) -> OpenFile {
        state.withLock { s in
            let shared = s.files[file.inode] ?? file
            s.files[file.inode] = shared
            shared.handles += 1
            return shared
        }
    }

    /// The open file of inode `key` with one more hold, if there is one.
    func pin(_ key: InodeKey) -> OpenFile? {
        state.withLock { s in
            guard let f = s.files[key] else { return nil }
            f.handles += 1
            return f
        }
    }

    /// The open file of inode `key`, if there is one (no hold taken).
    func current(_ key: InodeKey) -> OpenFile? { state.withLock { $0.files[key] } }

    /// Drops one hold of `file`; after the last it leaves the table. True if that was the last.
    @discardableResult
    func unpin(_ file: OpenFile) -> Bool {
        state.withLock { s in
            file.handles -= 1
            guard file.handles <= 0 else { return false }
            if s.files[file.inode] === file { s.files[file.inode] = nil }
            return true
        }
    }

    /// A new handle for `file` (already held by the caller's pin or share).
    func handle(for file: OpenFile) -> HandleID {
        state.withLock { s in
            let h = s.issue()
            s.handles[h] = file
            return h
        }
    }

    /// Shares `file` and gives the shared state a handle (a create).
    func shareWithHandle(_ file: OpenFile) -> HandleID { handle(for: share(file)) }

    func file(_ handle: HandleID) -> OpenFile? { state.withLock { $0.handles[handle] } }

    /// Forgets `handle`; its file, for the caller to release.
    func removeHandle(_ handle: HandleID) -> OpenFile? { state.withLock { $0.handles.removeValue(forKey: handle) } }

    func addListing(_ listing: EncryptedFileSystem.Listing) -> HandleID {
        state.withLock { s in
            let h = s.issue()
            s.directories[h] = listing
            return h
        }
    }

    func listing(_ handle: HandleID) -> EncryptedFileSystem.Listing? { state.withLock { $0.directories[handle] } }

    func removeListing(_ handle: HandleID) { state.withLock { _ = $0.directories.removeValue(forKey: handle) } }

    /// How many inodes are open.
    var count: Int { state.withLock { $0.files.count } }

    /// The backing inodes of the files open now.
    var openInodes: Set<InodeKey> { state.withLock { Set($0.files.keys) } }

    /// The master keys whose data keys the open files hold.
    var keys: [KeyID] { state.withLock { $0.files.values.map(\.keyID) } }

    /// Every open file (to seal their lengths at unmount).
    var all: [OpenFile] { state.withLock { Array($0.files.values) } }

    /// Empties the table (unmount).
    func removeAll() {
        state.withLock { s in
            s.handles.removeAll()
            s.files.removeAll()
            s.directories.removeAll()
        }
    }
}
