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

/// Looking names up, attributes, and making and removing entries (files,
/// directories, links, device nodes) and renaming them.
extension EncryptedFileSystem {
    public func lookup(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> EntryReply {
        let dir = try nodes.node(parent)
        return try lookup(stored: try storedName(name, in: dir, context), name: name, in: dir, parent, context)
    }

    /// Looks up the entry stored as `stored` in directory node `dir` (`parent`), whose plaintext name is `name`.
    func lookup(stored: FileName, name: FileName, in dir: Node, _ parent: NodeID, _ context: RequestContext) throws(Errno) -> EntryReply {
        var st = try Syscall.fstatat(dir.dirFD, stored)
        var device: dev_t = 0
        if DeviceNode.mayBeRecord(st),
           let node = deviceNode(in: dir.dirFD, stored: stored, path: self.nodes.directoryPath(of: parent).text(of: name), context) {
            st.st_mode = node.type | (st.st_mode & 0o7777)
            device = node.device
        }
        let node = try nodes.remember(parentFD: dir.dirFD, storedName: stored, st: st, parent: parent, name: name, device: device)
        return entry(node, st, context)
    }

    public func forget(_ node: NodeID, _ count: UInt64) {
        nodes.forget(node, count)
    }

    public func getattr(_ id: NodeID, _ context: RequestContext) throws(Errno) -> (stat, Double) {
        let node = try nodes.node(id)
        let st = try Syscall.fstatat(node.fd, "", flags: KMSFS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
        return (attributes(node, st, context), timeout)
    }

    public func setattr(_ id: NodeID, _ changes: AttributeChanges, handle: HandleID?, _ context: RequestContext) throws(Errno) -> (stat, Double) {
        let node = try nodes.node(id)
        settleWrites(node)
        if let mode = changes.mode, !node.isSymlink { try node.changeMode(mode & 0o7777) }
        if changes.uid != nil || changes.gid != nil {
            let uid = changes.uid ?? uid_t.max, gid = changes.gid ?? gid_t.max
            let fd = try node.fd
            try Syscall.call { fchownat(fd, "", uid, gid, KMSFS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) }
        }
        if let size = changes.size {
            guard node.isRegular else { throw node.isDirectory ? .isDirectory : .invalidArgument }
            guard size >= 0 else { throw .invalidArgument }
            if let handle, let file = openFiles.file(handle) {
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
            try node.setTimes([spec(changes.accessTime), spec(changes.modificationTime)])
        }
        if context.clearsSetID { try clearSetID(node, context) }
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
        let path = try node.procPath
        try Syscall.call { faccessat(AT_FDCWD, path, mask, 0) }
    }

    public func statfs(_ id: NodeID) throws(Errno) -> statvfs {
        let root = try nodes.node(.root)
        var info = statvfs()
        try Syscall.call { fstatvfs(root.dirFD, &info) }
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
            try Syscall.call { stored.withCString { mknodat(dir.dirFD, $0, mode, 0) } }
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
        let path = nodes.directoryPath(of: parent).child(name)
        let key = try keys { () throws(KeyManagerError) in try keyManager.boundKey(forDirectory: path.binding) }
        try writeSidecar(stored, plaintext: name, in: dir, context)
        // The daemon needs to write .kmsfs.dir; the mode is set after.
        try Syscall.call { stored.withCString { mkdirat(dir.dirFD, $0, 0o700) } }
        let created: DirectoryKeys, made: InodeKey
        do throws(Errno) {
            let fd = try Syscall.open(dir.dirFD, stored, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
            created = try DirectoryKeys.create(in: fd.raw, key: key, keyManager: keyManager, principal: principal(context),
                                               layout: layout, isRoot: false)
            // mkdir(2) never passes S_ISGID: a directory made in a setgid
            // directory inherits it, as the backing one just did.
            let st = try Syscall.fstat(fd.raw)
            made = InodeKey(st)
            try Syscall.call { stored.withCString { fchmodat(dir.dirFD, $0, (mode & 0o7777) | st.st_mode & S_ISGID, 0) } }
        } catch {
            Syscall.unlinkQuietly(dir.dirFD, FileName(bytes: stored.bytes + [UInt8(ascii: "/")] + DirectoryKeys.fileName.bytes))
            Syscall.unlinkQuietly(dir.dirFD, stored, AT_REMOVEDIR)
            removeSidecar(stored, in: dir)
            throw error
        }
        adopt(dir, stored, context)
        let entry = try lookup(parent, name, context)
        // The new directory's node starts with the keys just made, so the
        // first lookup or create in it does not read and unwrap them again
        // (unless the name already leads elsewhere: then it loads its own).
        if let node = try? nodes.node(entry.node), node.key == made {
            _ = try? nodes.keys(of: node) { () throws(Errno) in created }
        }
        return entry
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
            try Syscall.call { stored.withCString { s in sealed.withUnsafeBufferPointer { t in t.withMemoryRebound(to: CChar.self) { symlinkat($0.baseAddress!, dir.dirFD, s) } } } }
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
        if node.isDevice { try markHoldsDeviceNodes(dir.dirFD) }
        try writeSidecar(stored, plaintext: newName, in: dir, context)
        let fd = try node.fd
        if node.isSymlink {
            try Syscall.call { stored.withCString { linkat(fd, "", dir.dirFD, $0, KMSFS_AT_EMPTY_PATH) } }
        } else {
            try Syscall.call { stored.withCString { linkat(AT_FDCWD, Node.procPath(fd), dir.dirFD, $0, AT_SYMLINK_FOLLOW) } }
        }
        return try lookup(newParent, newName, context)
    }

    public func unlink(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) {
        let dir = try nodes.node(parent)
        let stored = try storedName(name, in: dir, context)
        let st = try Syscall.fstatat(dir.dirFD, stored)
        guard st.st_mode & S_IFMT != S_IFDIR else { throw .isDirectory }
        let lastLink = st.st_mode & S_IFMT == S_IFREG && st.st_nlink == 1 && !DeviceNode.mayBeRecord(st)
        let object = lastLink ? nodes.fileID(of: InodeKey(st)) ?? fileID(in: dir.dirFD, stored: stored) : nil
        let longTarget = lastLongTarget(in: dir.dirFD, stored: stored, st)
        try Syscall.unlinkat(dir.dirFD, stored)
        removeSidecar(stored, in: dir)
        removeLongTarget(longTarget)
        if let object { try? keyManager.forgetUsage(object) }
    }

    public func rmdir(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) {
        let dir = try nodes.node(parent)
        let stored = try storedName(name, in: dir, context)
        let object = try removingDirectoryKeys(dir, stored) { () throws(Errno) in
            try Syscall.unlinkat(dir.dirFD, stored, AT_REMOVEDIR)
        }
        removeSidecar(stored, in: dir)
        if let object { try? keyManager.forgetUsage(object) }
    }

    /// Where a directory's keys wait, in its parent, while the directory is removed.
    static let setAsidePrefix = NameMapping.reservedPrefix + ".rmdir-"

    /// Removes an empty backing directory with `remove` (rmdir, or a rename
    /// over it) and returns its directory id; ENOTEMPTY if it holds more than
    /// its `.kmsfs.dir`. The keys file is first hard-linked into the parent
    /// under a reserved name and only then unlinked from the directory, so
    /// if `remove` fails the directory gets its very keys back and stays
    /// readable; a crash in between leaves at most a hidden set-aside file,
    /// which the parent's own removal clears.
    private func removingDirectoryKeys(_ parent: Node, _ stored: FileName, _ remove: () throws(Errno) -> Void) throws(Errno) -> ID128? {
        let fd = try Syscall.open(parent.dirFD, stored, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
        let entries = try Syscall.listDirectory(fd.raw)
        guard entries.allSatisfy({ $0.name == DirectoryKeys.fileName || $0.name == DeviceNode.marker || $0.name.hasPrefix(Self.setAsidePrefix) })
        else { throw .directoryNotEmpty }
        for stale in entries where stale.name.hasPrefix(Self.setAsidePrefix) || stale.name == DeviceNode.marker { Syscall.unlinkQuietly(fd.raw, stale.name) }
        guard entries.contains(where: { $0.name == DirectoryKeys.fileName }) else {
            try remove()
            return nil
        }
        let object = fileID(in: fd.raw, stored: DirectoryKeys.fileName)
        let aside = Self.setAsidePrefix + ID128.random().hex
        try Syscall.call { DirectoryKeys.fileName.withCString { linkat(fd.raw, $0, parent.dirFD, aside, 0) } }
        do throws(Errno) {
            try Syscall.unlinkat(fd.raw, DirectoryKeys.fileName)
            try remove()
        } catch {
            // Put the keys back (the link in the directory is gone only if the unlink ran).
            if DirectoryKeys.fileName.withCString({ linkat(parent.dirFD, aside, fd.raw, $0, 0) }) != 0, errno != EEXIST {
                logger.error("a failed rmdir could not restore the directory's keys", metadata: ["kept as": "\(aside)", "errno": "\(errno)"])
                throw error
            }
            unlinkat(parent.dirFD, aside, 0)
            throw error
        }
        unlinkat(parent.dirFD, aside, 0)
        return object
    }

    public func rename(_ parent: NodeID, _ name: FileName, _ newParent: NodeID, _ newName: FileName, flags: UInt32,
                       _ context: RequestContext) throws(Errno) {
        let from = try nodes.node(parent)
        let to = try nodes.node(newParent)
        let oldStored = try storedName(name, in: from, context)
        let newStored = try storedName(newName, in: to, context)
        let moving = try Syscall.fstatat(from.dirFD, oldStored)
        let exchanged = flags & (KMSFS_RENAME_EXCHANGE) != 0 ? try Syscall.fstatat(to.dirFD, newStored) : nil
        var replacedObject: ID128?
        var replacedTarget: ID128?
        var replacingDirectory = false
        if flags & (KMSFS_RENAME_EXCHANGE) == 0, let target = try? Syscall.fstatat(to.dirFD, newStored) {
            if flags & (KMSFS_RENAME_NOREPLACE) != 0 { throw .fileExists }
            switch target.st_mode & S_IFMT {
            case S_IFDIR:
                guard moving.st_mode & S_IFMT == S_IFDIR else { throw .isDirectory }
                replacingDirectory = true
            case S_IFREG where target.st_nlink == 1 && InodeKey(target) != InodeKey(moving) && !DeviceNode.mayBeRecord(target):
                replacedObject = nodes.fileID(of: InodeKey(target)) ?? fileID(in: to.dirFD, stored: newStored)
            case S_IFLNK where InodeKey(target) != InodeKey(moving):
                replacedTarget = lastLongTarget(in: to.dirFD, stored: newStored, target)
            default: break
            }
        }
        if from.id != to.id {
            if DeviceNode.mayBeRecord(moving) { try markHoldsDeviceNodes(to.dirFD) }
            if let exchanged, DeviceNode.mayBeRecord(exchanged) { try markHoldsDeviceNodes(from.dirFD) }
        }
        try writeSidecar(newStored, plaintext: newName, in: to, context)
        if replacingDirectory {
            // The replaced directory's keys go only if the rename succeeds.
            replacedObject = try removingDirectoryKeys(to, newStored) { () throws(Errno) in
                try Syscall.withNames(oldStored, newStored) { (a, b) throws(Errno) in _ = try Syscall.call { kmsfs_renameat2(from.dirFD, a, to.dirFD, b, flags) } }
            }
        } else {
            try Syscall.withNames(oldStored, newStored) { (a, b) throws(Errno) in _ = try Syscall.call { kmsfs_renameat2(from.dirFD, a, to.dirFD, b, flags) } }
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
}
