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

/// Regular files: create, open, read, write, flush, sync, release; the open-file table.
extension EncryptedFileSystem {
    public func create(_ parent: NodeID, _ name: FileName, mode: mode_t, flags: Int32, _ context: RequestContext) throws(Errno) -> (EntryReply, OpenReply) {
        let dir = try nodes.node(parent)
        let stored = try storedName(name, in: dir, context)
        let directory = nodes.directoryPath(of: parent)
        let key = try keys { () throws(KeyManagerError) in try keyManager.boundKey(forDirectory: directory.binding) }
        let fileID = FileID.random()
        let who = principal(context)
        let path = directory.text(of: name)
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
        let file: OpenFile
        let st: stat
        let fd: SharedDescriptor
        do throws(Errno) {
            // One descriptor for the file, shared by its node and open file.
            fd = SharedDescriptor(try Syscall.open(dir.dirFD, stored, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK, mode & 0o7777))
            do throws(Errno) {
                try Syscall.pwrite(fd.raw, headerBytes, at: 0)
                adopt(dir, stored, context)
                st = try Syscall.fstat(fd.raw)
                file = try OpenFile(fd, writable: true, header: header, cipher: cipher, stat: st, sealedHere: 0,
                                    onIntegrityFailure: failureHandler(fileID, key, path: path, opener: who))
            } catch {
                Syscall.unlinkQuietly(dir.dirFD, stored)
                throw error
            }
        } catch {
            try? keyManager.forgetUsage(fileID.rawValue)
            throw error
        }
        let handle = openFiles.shareWithHandle(file)
        let node = try nodes.remember(parentFD: dir.dirFD, storedName: stored, st: st, parent: parent, name: name, opened: fd)
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
        return try openFiles.shared(node.key) { () throws(Errno) -> OpenFile? in
            if let shared = openFiles.pin(node.key) {
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
            // A node of a regular file holds a read-write descriptor, which
            // the open file shares; only one the backing file refused
            // writing is reopened (through /proc, with the modes it allows).
            var writable = true
            let descriptor: SharedDescriptor
            let held = try node.held()
            if held.readWrite {
                descriptor = held.descriptor
            } else {
                var raw: Int32
                let path = Node.procPath(held.descriptor.raw)
                do throws(Errno) { raw = try Syscall.openat(AT_FDCWD, path, O_RDWR) } catch {
                    guard error == .permissionDenied || error == .readOnlyFileSystem else { throw error }
                    writable = false
                    raw = try Syscall.openat(AT_FDCWD, path, O_RDONLY)
                }
                descriptor = SharedDescriptor(Descriptor(adopting: raw))
            }
            let path = keyManager.auditPathMode() == .off ? nil : nodes.filePath(of: node)
            let file = try makeOpenFile(descriptor, writable: writable, principal: who, path: path)
            nodes.noteFileID(file.fileID.rawValue, of: node)
            if !writable, flags & O_ACCMODE != O_RDONLY { throw .permissionDenied }
            return file
        }
    }

    /// Reads and authenticates the header of backing file `fd`, unwraps its
    /// data key for `principal` and makes its open state, which owns `fd`.
    /// `rekeying`: opened by the rekey job, which may unwrap a cut-off version to move the file off it.
    func makeOpenFile(_ fd: SharedDescriptor, writable: Bool, principal who: Principal, path: String? = nil, rekeying: Bool = false) throws(Errno) -> OpenFile {
        let header: FileHeader
        let raw = try Syscall.pread(fd.raw, count: ChunkLayout.headerSize, at: 0)
        do throws(CipherError) { header = try FileHeader(decoding: raw) } catch {
            integrityFailure(error, object: nil, what: "file header", path: path, principal: who)
            throw Errno.ioError
        }
        let dataKey = try keys { () throws(KeyManagerError) in
            try keyManager.decryptDataKey(header.wrappedKey, for: header.fileID.rawValue, key: header.keyID,
                                          version: header.keyVersion, principal: who, path: path, movingOffCutOff: rekeying)
        }
        let cipher: FileCipher
        do throws(CipherError) { cipher = try FileCipher(key: dataKey, fileID: header.fileID, layout: layout) } catch { throw Errno.ioError }
        return try OpenFile(fd, writable: writable, header: header, cipher: cipher,
                            onIntegrityFailure: failureHandler(header.fileID, header.keyID, path: path, opener: who))
    }

    /// Drops one handle's hold; the last one seals the length, closes the
    /// file and frees its key.
    func releaseFile(_ file: OpenFile) {
        do throws(Errno) { try file.sealLength() } catch {
            logger.error("could not seal a file's length at release", metadata: ["file": "\(file.fileID)", "error": "\(error)"])
        }
        openFiles.unpin(file)
    }

    public func open(_ id: NodeID, flags: Int32, _ context: RequestContext) throws(Errno) -> OpenReply {
        let node = try nodes.node(id)
        let file = try openFile(node, flags: flags, context)
        if flags & O_TRUNC != 0 {
            do throws(Errno) {
                if context.clearsSetID, try clearSetID(node, context) { attributesChanged?(id) }
                try file.truncate(to: 0)
            } catch {
                releaseFile(file)
                throw error
            }
        }
        // Closing a read-only handle has no length to seal (a writer's own
        // close seals what it wrote), so the kernel need not send FLUSH.
        return OpenReply(handle: openFiles.handle(for: file), noFlush: flags & O_ACCMODE == O_RDONLY)
    }

    func file(_ handle: HandleID) throws(Errno) -> OpenFile {
        guard let file = openFiles.file(handle) else { throw .badFileDescriptor }
        return file
    }

    public func read(_ id: NodeID, handle: HandleID, size: Int, offset: Int64, _ context: RequestContext,
                     _ reply: (UnsafeRawBufferPointer) -> Void) throws(Errno) {
        let file = try file(handle)
        try file.read(offset: Int(offset), count: size, by: principal(context)) { bytes in
            bytesRead.add(bytes.count, ordering: .relaxed)
            reply(bytes)
        }
    }

    public func write(_ id: NodeID, handle: HandleID, data: UnsafeRawBufferPointer, offset: Int64, _ context: RequestContext) throws(Errno) -> Int {
        let file = try file(handle)
        if context.clearsSetID, try clearSetID(try nodes.node(id), context) { attributesChanged?(id) }
        let n = try file.write(data, at: Int(offset))
        bytesWritten.add(n, ordering: .relaxed)
        return n
    }

    public func flush(_ id: NodeID, handle: HandleID, _ context: RequestContext) throws(Errno) {
        try file(handle).sealLength()
    }

    public func fsync(_ id: NodeID, handle: HandleID, dataOnly: Bool) throws(Errno) {
        try file(handle).sync(dataOnly: dataOnly)
    }

    public func release(_ id: NodeID, handle: HandleID) {
        guard let file = openFiles.removeHandle(handle) else { return }
        releaseFile(file)
    }

    /// Clears set-ID bits as ext4 does when a caller without CAP_FSETID
    /// writes or truncates a regular file, or anyone changes its owner: the
    /// set-user-ID bit always; the set-group-ID bit if the file is group
    /// executable or the caller is neither root nor in the file's group.
    /// The kernel leaves this to the filesystem (FUSE_HANDLE_KILLPRIV_V2, see
    /// CFUSEIO) and says when through `RequestContext.clearsSetID`. True if a
    /// bit was cleared: a write or open reply carries no attributes, so the
    /// kernel's cached mode must then be dropped (`attributesChanged`), or
    /// `stat` would still show the bit.
    @discardableResult
    func clearSetID(_ node: Node, _ context: RequestContext) throws(Errno) -> Bool {
        guard node.isRegular else { return false }
        let st = try Syscall.fstatat(node.fd, "", flags: KMSFS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
        let mode = st.st_mode & 0o7777
        guard mode & (S_ISUID | S_ISGID) != 0 else { return false }
        var cleared = mode & ~S_ISUID
        // Group membership matters only for a set-group-ID bit without group
        // execute; only then is the caller's group list read.
        if mode & S_ISGID != 0, mode & S_IXGRP != 0 || !(context.uid == 0 || Self.caller(context, isIn: st.st_gid)) {
            cleared &= ~S_ISGID
        }
        guard cleared != mode else { return false }
        try node.changeMode(cleared)
        return true
    }

    /// Whether the caller's primary or supplementary groups include `gid`
    /// (its supplementary groups from /proc, as libfuse's fuse_req_getgroups
    /// reads them; a caller gone meanwhile counts as not in the group).
    static func caller(_ context: RequestContext, isIn gid: gid_t) -> Bool {
        if context.gid == gid { return true }
        guard let status = try? String(contentsOfFile: "/proc/\(context.pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Groups:") }) else { return false }
        return line.dropFirst("Groups:".count).split(whereSeparator: { $0 == " " || $0 == "\t" }).contains { gid_t($0) == gid }
    }

    public func fallocate(_ id: NodeID, handle: HandleID, mode: Int32, offset: Int64, length: Int64, _ context: RequestContext) throws(Errno) {
        guard mode == 0 else { throw .notSupported }
        let file = try file(handle)
        let end = Int(offset + length)
        if end > file.size { try file.truncate(to: end) }
    }
}
