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

/// Crash recovery: finishing or rolling back what an interrupted move left.
extension Rekeyer {
    /// Finishes or rolls back what a killed run left: a rewrap's header that
    /// is neither old nor new is written new (both were recorded before the
    /// write); a reencrypt is rolled back from its backup to the wholly old
    /// file, to be redone. Runs before a mount serves and before any run.
    ///
    /// A file whose repair fails (its disk read-only or full, an I/O error)
    /// keeps its intent, to be retried next time, is audited, and is
    /// returned with its cause; the other intents are still handled.
    public func recover() throws(KeyManagerError) -> [RecoveryFailure] {
        var failures: [RecoveryFailure] = []
        for intent in try keyManager.rekeyIntents() {
            // The keystore file is writable by whoever can write CIPHERDIR:
            // an intent is acted on only if kmsfs wrote it (its MAC), only
            // inside CIPHERDIR, and only with headers of the very file.
            guard intent.authentic else {
                refuseRecovery(intent, "the intent does not carry this keystore's MAC (inserted or edited outside kmsfs)")
                try keyManager.clearRekeyIntent(intent.object)
                continue
            }
            guard let newHeader = try? FileHeader(decoding: intent.newHeader), newHeader.fileID.rawValue == intent.object,
                  let oldHeader = try? FileHeader(decoding: intent.oldHeader), oldHeader.fileID.rawValue == intent.object else {
                refuseRecovery(intent, "the intent's headers are not headers of object \(intent.object.hex)")
                try keyManager.clearRekeyIntent(intent.object)
                continue
            }
            let found: Descriptor?
            do throws(Errno) { found = try openConfined(intent.path, O_RDWR) } catch {
                // Only a file that is not there may be looked for elsewhere (renamed) or given up;
                // one that is there but cannot be opened (read-only, immutable) keeps its intent.
                guard error == .noSuchFileOrDirectory || error.rawValue == ENOTDIR else {
                    failures.append(recoveryFailed(intent, "open it", error))
                    continue
                }
                found = locate(intent.object)
            }
            guard let opened = found else {
                logger.warning("rekey intent for a file that is gone", metadata: ["object": .string(intent.object.hex)])
                try keyManager.clearRekeyIntent(intent.object)
                continue
            }
            let fd = opened.raw  // open until this intent is done with
            let current = (try? Syscall.pread(fd, count: ChunkLayout.headerSize, at: 0)) ?? []
            if let header = try? FileHeader(decoding: current), header.fileID.rawValue != intent.object {
                refuseRecovery(intent, "the file at the intent's path is another object")
                try keyManager.clearRekeyIntent(intent.object)
                continue
            }
            switch intent.mode {
            case .rewrap:
                if current == intent.oldHeader {
                    try keyManager.clearRekeyIntent(intent.object)
                } else {
                    if current != intent.newHeader {
                        do throws(Errno) {
                            try Syscall.pwrite(fd, intent.newHeader, at: 0)
                            try Syscall.call { fsync(fd) }
                        } catch {
                            failures.append(recoveryFailed(intent, "write its new header", error))
                            continue
                        }
                    }
                    try keyManager.commitRekeyed(job: intent.job, object: intent.object, kind: intent.kind, key: newHeader.keyID,
                                                 version: newHeader.keyVersion, bytes: 0)
                }
            case .reencrypt:
                if intent.backup != nil {
                    guard intent.backup == Self.backupDirectory + "/" + intent.object.hex + ".old" else {
                        refuseRecovery(intent, "the intent's backup is not the object's own backup file")
                        try keyManager.clearRekeyIntent(intent.object)
                        continue
                    }
                    if let copy = try? openConfined(Self.backupDirectory + "/" + intent.object.hex + ".old", O_RDONLY) {
                        let saved = (try? Syscall.pread(copy.raw, count: ChunkLayout.headerSize, at: 0)) ?? []
                        guard saved == intent.oldHeader else {
                            refuseRecovery(intent, "the backup does not start with the intent's old header")
                            try keyManager.clearRekeyIntent(intent.object)
                            continue
                        }
                        do throws(Errno) {
                            let st = try Syscall.fstat(copy.raw)
                            try self.copy(from: copy.raw, to: fd, count: Int(st.st_size))
                            try Syscall.call { ftruncate(fd, st.st_size) }
                            var times = [st.st_atim, st.st_mtim]
                            _ = futimens(fd, &times)
                            try Syscall.call { fsync(fd) }
                        } catch {
                            failures.append(recoveryFailed(intent, "roll it back from its backup", error))
                            continue
                        }
                    }
                }
                try keyManager.recordUsage(intent.object, kind: intent.kind, key: intent.oldKey, version: intent.oldVersion)
                try keyManager.clearRekeyIntent(intent.object)
                if intent.backup != nil { unlinkConfined(Self.backupDirectory + "/" + intent.object.hex + ".old") }
            }
            keyManager.audit(AuditEvent(.rekeyRecovery, key: intent.oldKey, version: intent.oldVersion, object: intent.object,
                                        error: "job \(intent.job): \(intent.mode.rawValue) \(intent.mode == .rewrap && current != intent.oldHeader ? "completed" : "rolled back")"))
            logger.notice("repaired an interrupted rekey", metadata: ["object": .string(intent.object.hex), "mode": .string(intent.mode.rawValue)])
        }
        // Backups without an intent belong to files already committed.
        let kept = Set(failures.map { $0.object.hex + ".old" })
        if let dir = try? Syscall.open(fs.nodes.rootFD, Self.backupDirectory, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) {
            for entry in (try? Syscall.listDirectory(dir.raw)) ?? [] where !kept.contains(entry.name.description) { Syscall.unlinkQuietly(dir.raw, entry.name) }
        }
        return failures
    }

    private func recoveryFailed(_ intent: RekeyIntent, _ action: String, _ error: Errno) -> RecoveryFailure {
        let failure = RecoveryFailure(object: intent.object, path: intent.path, action: action, error: error)
        logger.error("an interrupted rekey could not be repaired", metadata: ["object": .string(intent.object.hex), "error": .string("\(error)")])
        keyManager.audit(AuditEvent(.rekeyRecovery, outcome: .failure, key: intent.oldKey, version: intent.oldVersion, object: intent.object,
                                    error: failure.description))
        return failure
    }

    /// An intent that recovery will not act on: audited as refused and dropped.
    /// An interrupted rekey whose file could not be repaired (its intent is kept).
    public struct RecoveryFailure: Error, Sendable, CustomStringConvertible {
        public var object: ID128
        /// The file's backing path, relative to CIPHERDIR.
        public var path: String
        public var action: String
        public var error: Errno
        public var description: String {
            "interrupted rekey of \(path) (object \(object.hex)): could not \(action): \(error); "
                + "the intent is kept and the repair is retried at the next mount or fsck once the cause is fixed"
        }
    }

    private func refuseRecovery(_ intent: RekeyIntent, _ why: String) {
        logger.error("rekey intent refused", metadata: ["object": .string(intent.object.hex), "why": .string(why)])
        keyManager.audit(AuditEvent(.rekeyRecovery, outcome: .refused, object: intent.object, error: why))
    }

    /// Opens `relative` (a path inside CIPHERDIR) one component at a time from
    /// the CIPHERDIR descriptor, following no symlink and no `..`: whatever a
    /// stored path says, nothing outside CIPHERDIR is reached.
    func openConfined(_ relative: String, _ flags: Int32) throws(Errno) -> Descriptor {
        let parts = relative.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard !parts.isEmpty, parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else { throw .invalidArgument }
        var dir = Descriptor(adopting: try Syscall.call { dup(fs.nodes.rootFD) })
        for part in parts.dropLast() {
            dir = try Syscall.open(dir.raw, part, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
        }
        return try Syscall.open(dir.raw, parts[parts.count - 1], flags | O_NOFOLLOW)
    }

    /// Unlinks `relative` inside CIPHERDIR, confined like `openConfined`.
    private func unlinkConfined(_ relative: String) {
        guard let slash = relative.lastIndex(of: "/"),
              let dir = try? openConfined(String(relative[..<slash]), O_DIRECTORY | O_RDONLY) else { return }
        unlinkat(dir.raw, String(relative[relative.index(after: slash)...]), 0)
    }

    /// Opens (read-write) the backing file whose header carries `object`, wherever it now is; nil if none.
    func locate(_ object: ID128) -> Descriptor? {
        var found: Int32 = -1
        var seen = Set<InodeKey>()
        _ = walk("", fd: fs.nodes.rootFD, seen: &seen, keepOpen: true, selects: { $0.fileID.rawValue == object }) { candidate in
            if candidate.kind == .file { found = Glibc.open("/proc/self/fd/\(candidate.fd)", O_RDWR) }
            return found < 0
        }
        return found >= 0 ? Descriptor(adopting: found) : nil
    }
}
