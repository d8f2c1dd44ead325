import ChunkCipher
import CLinux
import Dispatch
import Foundation
import FUSEBridge
import KeyManager
import Logging
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Moving one file or directory: rewrap or reencrypt under the write lock, with its intent and backup.
extension Rekeyer {
    /// Moves one file or directory key and checkpoints it; `selects` is the
    /// pass's test of a header (re-applied under the file's lock).
    func rekey(_ candidate: Candidate, _ job: RekeyJob, selects: (FileHeader) -> Bool) throws(RekeyFailure) -> Outcome {
        let result: Outcome
        switch candidate.kind {
        case .directory: result = try rewrapDirectoryKeys(candidate, job, selects: selects)
        case .file: result = try rekeyFile(candidate, job, selects: selects)
        }
        if case .moved(let bytes, let key, let version) = result {
            do throws(KeyManagerError) {
                try keyManager.commitRekeyed(job: job.id, object: candidate.object, kind: candidate.kind, key: key,
                                             version: version, bytes: bytes)
            } catch { throw RekeyFailure(error) }
            if job.mode == .reencrypt, candidate.kind == .file { unlink(backupPath(candidate.object)) }
        }
        return result
    }

    /// Whether a header is one `job` moves, `target` being its target key's current version.
    static func selection(_ job: RekeyJob, target: KeyVersion) -> @Sendable (FileHeader) -> Bool {
        { header in job.selects(key: header.keyID, version: header.keyVersion, currentTargetVersion: target) }
    }

    private func rekeyFile(_ candidate: Candidate, _ job: RekeyJob, selects: (FileHeader) -> Bool) throws(RekeyFailure) -> Outcome {
        let opened: Descriptor
        do throws(Errno) { opened = try Syscall.open(AT_FDCWD, "/proc/self/fd/\(candidate.fd)", O_RDWR) } catch {
            if error == .noSuchFileOrDirectory { return .skipped }
            throw RekeyFailure(error)
        }
        let fd = opened.raw  // open until this function returns
        let file: OpenFile
        do throws(Errno) {
            let key = InodeKey(try Syscall.fstat(fd))
            file = try fs.openFiles.shared(key) { fs.openFiles.pin(key) } make: { () throws(Errno) -> OpenFile in
                try fs.makeOpenFile(SharedDescriptor(Descriptor(adopting: try Syscall.call { dup(fd) })), writable: true, principal: job.principal, rekeying: true)
            }
        } catch { throw RekeyFailure(error) }
        defer { fs.releaseFile(file) }
        guard file.fileID.rawValue == candidate.object else { return .skipped }  // replaced by another file meanwhile
        let principal = job.principal
        do throws(Errno) {
            switch job.mode {
            case .rewrap:
                let moved = try file.rewrap(writeFD: fd, selects: selects, wrap: { (header) throws(Errno) in
                    try fs.keys { () throws(KeyManagerError) in
                        let r = try keyManager.reencryptDataKey(header.wrappedKey, for: candidate.object, kind: .file, from: header.keyID,
                                                                version: header.keyVersion, to: job.targetKey, principal: principal)
                        return (r.key, r.version, r.wrapped)
                    }
                }, intent: { (old, new) throws(Errno) in
                    try intent(candidate, job, old: old, new: new, backup: nil)
                })
                return moved.map { .moved(bytes: candidate.bytes, key: $0.key, version: $0.version) } ?? .skipped
            case .reencrypt:
                let bytes = try file.reencrypt(writeFD: fd, selects: selects, newKey: { (header) throws(Errno) in
                    let dataKey = try fs.keys { () throws(KeyManagerError) in
                        try keyManager.generateDataKey(for: candidate.object, kind: .file, key: job.targetKey, principal: principal)
                    }
                    do throws(CipherError) {
                        let cipher = try FileCipher(key: dataKey.key, fileID: header.fileID, layout: fs.layout)
                        return (cipher, dataKey.keyID, dataKey.version, dataKey.wrapped)
                    } catch { throw .ioError }
                }, backup: { (st) throws(Errno) in
                    try backUp(fd, st, candidate.object)
                }, intent: { (old, new, backup) throws(Errno) in
                    try intent(candidate, job, old: old, new: new, backup: backup)
                })
                return bytes.map { .moved(bytes: $0.bytes, key: $0.key, version: $0.version) } ?? .skipped
            }
        } catch { throw RekeyFailure(error) }
    }

    private func intent(_ c: Candidate, _ job: RekeyJob, old: [UInt8], new: [UInt8], backup: String?) throws(Errno) {
        guard let header = try? FileHeader(decoding: old) else { throw .ioError }
        try fs.keys { () throws(KeyManagerError) in
            try keyManager.recordRekeyIntent(RekeyIntent(object: c.object, job: job.id, mode: backup == nil ? .rewrap : .reencrypt, kind: c.kind,
                                                         path: c.path, oldHeader: old, newHeader: new, oldKey: header.keyID,
                                                         oldVersion: header.keyVersion, backup: backup))
        }
    }

    func backupPath(_ object: ID128) -> String {
        fs.cipherdir + "/" + Self.backupDirectory + "/" + object.hex + ".old"
    }

    /// Copies the whole backing file to the backup directory, synced, with its times.
    private func backUp(_ fd: Int32, _ st: stat, _ object: ID128) throws(Errno) -> String {
        mkdir(fs.cipherdir + "/" + Self.backupDirectory, 0o700)
        let path = backupPath(object)
        let out = try Syscall.open(AT_FDCWD, path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0o600)
        try copy(from: fd, to: out.raw, count: Int(st.st_size))
        var times = [st.st_atim, st.st_mtim]
        _ = futimens(out.raw, &times)
        try Syscall.call { fsync(out.raw) }
        return Self.backupDirectory + "/" + object.hex + ".old"
    }

    func copy(from source: Int32, to destination: Int32, count: Int) throws(Errno) {
        var offset = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buffer.deallocate() }
        while offset < count {
            let n = try Syscall.pread(source, UnsafeMutableRawBufferPointer(rebasing: buffer[0..<min(buffer.count, count - offset)]), at: offset)
            guard n > 0 else { throw .ioError }
            try Syscall.pwrite(destination, UnsafeRawBufferPointer(rebasing: buffer[0..<n]), at: offset)
            offset += n
        }
    }

    /// A directory's `.kmsfs.dir` is rewrapped in both modes (its name key
    /// stays: re-encrypting names would rename every entry), by writing the
    /// new header to a temporary file and renaming it over the old one.
    private func rewrapDirectoryKeys(_ candidate: Candidate, _ job: RekeyJob, selects: (FileHeader) -> Bool) throws(RekeyFailure) -> Outcome {
        let dirFD = candidate.fd
        let temporary = DirectoryKeys.fileName.description + ".rekey"
        do throws(Errno) {
            let fd = try Syscall.open(dirFD, DirectoryKeys.fileName, O_RDONLY | O_NOFOLLOW)
            guard var header = EncryptedFileSystem.header(of: fd.raw) else { throw Errno.ioError }
            guard header.fileID.rawValue == candidate.object, selects(header) else { return .skipped }
            let dataKey = try fs.keys { () throws(KeyManagerError) in
                try keyManager.decryptDataKey(header.wrappedKey, for: candidate.object, key: header.keyID, version: header.keyVersion,
                                              principal: job.principal, movingOffCutOff: true)
            }
            let wrapped = try fs.keys { () throws(KeyManagerError) in
                try keyManager.wrapDataKey(dataKey, for: candidate.object, key: job.targetKey, principal: job.principal)
            }
            header.keyID = wrapped.key
            header.keyVersion = wrapped.version
            header.wrappedKey = wrapped.wrapped
            let bytes: [UInt8]
            do throws(CipherError) {
                let cipher = try FileCipher(key: dataKey, fileID: header.fileID, layout: fs.layout)
                try cipher.seal(header: &header, plaintextSize: 0)
                bytes = try header.encoded()
            } catch { throw Errno.ioError }
            let out = try Syscall.open(dirFD, temporary, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0o400)
            try Syscall.pwrite(out.raw, bytes, at: 0)
            try Syscall.call { fsync(out.raw) }
            try Syscall.call { renameat(dirFD, temporary, dirFD, DirectoryKeys.fileName.description) }
            fs.nodes.dropKeys(ofDirectory: candidate.object)
            return .moved(bytes: 0, key: wrapped.key, version: wrapped.version)
        } catch {
            unlinkat(dirFD, temporary, 0)
            throw RekeyFailure(error)
        }
    }
}
