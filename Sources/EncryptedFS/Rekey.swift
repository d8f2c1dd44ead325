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

/// Runs rekey jobs (DESIGN.md §7) over a CIPHERDIR: inside the mount daemon
/// next to applications, or offline. The mechanism, with its crash rules, is
/// in docs/FILESYSTEM.md ("Re-keying").
///
/// A pass walks the backing tree in a fixed order (sorted names, depth
/// first), reading only headers and keeping each selected file open from the
/// moment it is seen; every 64 of them go to `workers` threads. Each file is
/// rewritten while holding its open-file state exclusively — the same state
/// applications' handles share — so the check that it is still there and
/// still on the old key, and the write, happen with nobody else reading or
/// writing it. Every finished file is checkpointed in the keystore; passes
/// repeat until a walk finds nothing and the usage index agrees.
public final class Rekeyer: @unchecked Sendable {
    let fs: EncryptedFileSystem
    var keyManager: KeyManager { fs.keyManager }
    let logger = Logger(label: "kmsfs.rekey")
    /// Set to stop before the next file (unmount, SIGINT); the job stays resumable.
    public let stopRequested = Atomic<Bool>(false)
    /// Set by a pause or cancel in the daemon: the run returns before its next file.
    let interrupted = Atomic<Bool>(false)
    static let batchSize = 64
    static let maxPasses = 8
    /// Where a reencrypt keeps the old ciphertext of the file it rewrites.
    static let backupDirectory = ".kmsfs/rekey"

    public init(filesystem: EncryptedFileSystem) {
        self.fs = filesystem
    }

    struct Candidate {
        var directory: String  // relative to CIPHERDIR, "" for the root
        var name: String
        var kind: ObjectKind
        var object: ID128
        var bytes: Int
        /// Opened as the walk found it, so a rename afterwards cannot hide
        /// it: the file (read-only; reopened read-write through /proc), or
        /// for a `.kmsfs.dir` its directory (O_PATH). -1 when not kept.
        var fd: Int32 = -1
        var path: String { directory.isEmpty ? name : directory + "/" + name }
    }

    enum Outcome {
        /// Rewritten under `key` `version` (what the header now says).
        case moved(bytes: Int, key: KeyID, version: KeyVersion)
        case skipped
    }

    // MARK: Running a job

    /// Runs job `id` until it is done, fails, or is paused, cancelled or
    /// stopped; `progress` sees the job after every batch.
    @discardableResult
    public func run(_ id: Int64, progress: (RekeyJob) -> Void = { _ in }) throws(KeyManagerError) -> RekeyJob {
        try recover()
        guard var job = try keyManager.rekeyJob(id) else { throw .invalidArgument("no rekey job \(id)") }
        guard job.state == .queued || job.state == .running else { return job }
        try keyManager.setRekeyState(id, .running, by: nil)
        let done = try keyManager.rekeyDone(id)
        let started = KeyManager.systemClock()
        let moved = Atomic<Int>(0)
        for pass in 1...Self.maxPasses {
            let target = try keyManager.currentVersion(of: job.targetKey)
            let selects = Self.selection(job, target: target)
            if pass == 1 {
                var count = 0, bytes = 0
                do throws(Errno) {
                    try walk(job, selects: selects) { candidate in
                        if !done.contains(candidate.object) { count += 1; bytes += candidate.bytes }
                        return true
                    }
                } catch {
                    try keyManager.setRekeyState(id, .failed, error: "cannot walk the filesystem: \(error)", by: nil)
                    return try keyManager.rekeyJob(id)!
                }
                try keyManager.setRekeyTotals(id, files: count, bytes: bytes)
            }
            // Walk again, moving what the walk finds a batch at a time.
            var found = 0, failed = 0, stopped = false
            var batch: [Candidate] = []
            func flush() throws(KeyManagerError) -> Bool {
                defer { batch.removeAll() }
                job = try keyManager.rekeyJob(id)!
                guard job.state == .running, !stopRequested.load(ordering: .relaxed), !interrupted.load(ordering: .relaxed) else {
                    batch.forEach { close($0.fd) }
                    stopped = true
                    return false
                }
                failed += process(batch, job, selects: selects, started: started, moved: moved)
                progress(try keyManager.rekeyJob(id)!)
                return true
            }
            var walkError: KeyManagerError?
            do throws(Errno) {
                try walk(job, selects: selects, keepOpen: true) { candidate in
                    guard pass > 1 || !done.contains(candidate.object) else { close(candidate.fd); return true }
                    found += 1
                    batch.append(candidate)
                    guard batch.count >= Self.batchSize else { return true }
                    do throws(KeyManagerError) { return try flush() } catch { walkError = error; return false }
                }
            } catch {
                batch.forEach { close($0.fd) }
                try keyManager.setRekeyState(id, .failed, error: "cannot walk the filesystem: \(error)", by: nil)
                return try keyManager.rekeyJob(id)!
            }
            if let walkError { throw walkError }
            if !stopped, !batch.isEmpty { _ = try flush() }
            if stopped { return try keyManager.rekeyJob(id)! }
            if found == 0 {
                // A walk can miss a file renamed from a directory not yet
                // walked into one already walked; the usage index cannot.
                // Walk again until both agree.
                if job.path == nil, pass < Self.maxPasses, try remainingInIndex(job, targetVersion: target) > 0 { continue }
                try keyManager.setRekeyState(id, .done, by: nil)
                job = try keyManager.rekeyJob(id)!
                progress(job)
                logger.debug("rekey job done", metadata: ["job": "\(id)", "files": "\(job.filesDone)"])
                return job
            }
            if failed > 0, failed == found {
                try keyManager.setRekeyState(id, .failed, error: Self.failureSummary(failed, cause: try keyManager.rekeyJob(id)?.lastError), by: nil)
                return try keyManager.rekeyJob(id)!
            }
        }
        var remaining = 0
        let target = try keyManager.currentVersion(of: job.targetKey)
        try? walk(job, selects: Self.selection(job, target: target)) { _ in remaining += 1; return true }
        if remaining > 0 {
            try keyManager.setRekeyState(id, .failed, error: Self.failureSummary(remaining, cause: try keyManager.rekeyJob(id)?.lastError), by: nil)
        } else {
            try keyManager.setRekeyState(id, .done, by: nil)
        }
        return try keyManager.rekeyJob(id)!
    }

    /// What a failed job says: how many files, and the cause of the last failure.
    static func failureSummary(_ count: Int, cause: String?) -> String {
        "\(count) file(s) could not be moved" + (cause.map { "; last cause: \($0)" } ?? "") + " (`kmsfs fsck` checks the files)"
    }

    /// Moves one batch on `job.workers` threads; returns how many failed.
    /// Closes every candidate's descriptor.
    private func process(_ batch: [Candidate], _ job: RekeyJob, selects: @escaping @Sendable (FileHeader) -> Bool,
                         started: Double, moved: borrowing Atomic<Int>) -> Int {
        let failures = Atomic<Int>(0)
        let workers = min(job.workers, batch.count)
        let control = StopCheck(self, job.id)
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            for i in stride(from: worker, to: batch.count, by: workers) {
                let candidate = batch[i]
                defer { close(candidate.fd) }
                guard !control.shouldStop() else { continue }
                do throws(RekeyFailure) {
                    if case .moved(let bytes, _, _) = try rekey(candidate, job, selects: selects) {
                        let total = moved.add(bytes, ordering: .relaxed).newValue
                        throttle(job.rate, bytes: total, since: started, control: control)
                    }
                } catch {
                    failures.add(1, ordering: .relaxed)
                    logger.error("rekey could not move a file", metadata: ["object": .string(candidate.object.hex), "error": .string(error.message)])
                    try? keyManager.recordRekeyFailure(job.id, "\(candidate.object.hex): \(error.message)")
                }
            }
        }
        return failures.load(ordering: .relaxed)
    }

    /// Whether workers should stop before their next file: an unmount or
    /// SIGINT (at once), or a pause or cancel in the keystore (read at most
    /// every 200 ms), so a throttled batch does not delay either.
    final class StopCheck: @unchecked Sendable {
        let rekeyer: Rekeyer
        let id: Int64
        let lock = Mutex<(checkedAt: Double, stop: Bool)>((0, false))
        init(_ rekeyer: Rekeyer, _ id: Int64) {
            self.rekeyer = rekeyer
            self.id = id
        }
        func shouldStop() -> Bool {
            if rekeyer.stopRequested.load(ordering: .relaxed) || rekeyer.interrupted.load(ordering: .relaxed) { return true }
            let now = KeyManager.systemClock()
            return lock.withLock { state in
                if !state.stop, now - state.checkedAt > 0.2 {
                    state.checkedAt = now
                    state.stop = (try? rekeyer.keyManager.rekeyJob(id))??.state != .running
                }
                return state.stop
            }
        }
    }

    /// Objects the usage index still lists under what the job moves.
    func remainingInIndex(_ job: RekeyJob, targetVersion: KeyVersion) throws(KeyManagerError) -> Int {
        try keyManager.objects(using: job.sourceKey.rawValue.hex, version: job.sourceVersion)
            .filter { job.selects(key: job.sourceKey, version: $0.version, currentTargetVersion: targetVersion) }.count
    }

    /// Sleeps so that `bytes` moved since `since` stay under `rate` MB/s,
    /// in short slices so a pause, cancel or unmount is not held up.
    private func throttle(_ rate: Double?, bytes: Int, since: Double, control: StopCheck) {
        guard let rate else { return }
        let due = since + Double(bytes) / (rate * 1_000_000)
        while !control.shouldStop() {
            let wait = due - KeyManager.systemClock()
            if wait <= 0 { return }
            usleep(UInt32(min(wait, 0.05) * 1_000_000))
        }
    }

    struct RekeyFailure: Error {
        var message: String
        init(_ message: String) { self.message = message }
        init(_ errno: Errno) { self.message = "\(errno)" }
        init(_ error: KeyManagerError) { self.message = error.description }
    }

    // MARK: Finding what to move

    /// Visits the files and directories under the job's path whose headers
    /// `selects` picks, in walk order, until `visit` returns false.
    func walk(_ job: RekeyJob, selects: (FileHeader) -> Bool, keepOpen: Bool = false,
              visit: (Candidate) -> Bool) throws(Errno) {
        let start = try startDirectory(job.path)
        let fd = try Syscall.openat(fs.nodes.rootFD, start.isEmpty ? "." : start, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
        defer { close(fd) }
        var seen = Set<InodeKey>()
        _ = walk(start.description, fd: fd, seen: &seen, keepOpen: keepOpen, selects: selects, visit: visit)
    }

    /// Visits every backing file and `.kmsfs.dir` under `directory` (sorted,
    /// depth first) that `selects` picks; false once `visit` said stop.
    func walk(_ directory: String, fd: Int32, seen: inout Set<InodeKey>, keepOpen: Bool,
              selects: (FileHeader) -> Bool, visit: (Candidate) -> Bool) -> Bool {
        guard let entries = try? Syscall.listDirectory(fd).sorted(by: { $0.name < $1.name }) else { return true }
        for entry in entries {
            if directory.isEmpty, entry.name == EncryptedFileSystem.reservedPrefix { continue }
            let isKeys = entry.name == DirectoryKeys.fileName
            if !isKeys, entry.name.hasPrefix(EncryptedFileSystem.reservedPrefix),
               !entry.name.isHashedLongName { continue }
            // Stored names are base64url (or, with plaintext names, what the
            // user gave: the path is then only a hint, and recovery finds a
            // file by its object id when the hint does not lead to it).
            let path = directory.isEmpty ? entry.name.description : directory + "/" + entry.name.description
            if entry.type == DT_DIR {
                guard let child = try? Syscall.openat(fd, entry.name, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) else { continue }
                let more = walk(path, fd: child, seen: &seen, keepOpen: keepOpen, selects: selects, visit: visit)
                close(child)
                if !more { return false }
                continue
            }
            guard entry.type == DT_REG || entry.type == DT_UNKNOWN else { continue }
            guard let file = try? Syscall.openat(fd, entry.name, O_RDONLY | O_NOFOLLOW) else { continue }
            guard let st = try? Syscall.fstat(file), st.st_mode & S_IFMT == S_IFREG, seen.insert(InodeKey(st)).inserted,
                  let header = EncryptedFileSystem.header(of: file), selects(header) else { close(file); continue }
            var kept: Int32 = -1
            if keepOpen {
                if isKeys { kept = dup(fd); close(file) } else { kept = file }
            } else {
                close(file)
            }
            let candidate = Candidate(directory: directory, name: entry.name.description, kind: isKeys ? .directory : .file,
                                      object: header.fileID.rawValue, bytes: isKeys ? 0 : Int(st.st_size), fd: kept)
            if !visit(candidate) { return false }
        }
        return true
    }

    /// The backing directory (relative to CIPHERDIR) of plaintext directory `path`.
    func startDirectory(_ path: String?) throws(Errno) -> FileName {
        guard let path, path != "/" else { return FileName(bytes: []) }
        var stored: [FileName] = []
        var node = try fs.nodes.node(.root)
        let context = RequestContext(uid: 0, gid: 0, pid: getpid())
        for component in path.split(separator: "/").map(String.init) where !component.isEmpty {
            let name = try fs.storedName(FileName(component), in: node, context)
            let fd = try Syscall.openat(node.fd, name, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
            let st = try Syscall.fstat(fd)
            node = Node(id: NodeID(rawValue: 0), fd: fd, key: InodeKey(st), type: S_IFDIR, parent: nil, name: FileName(component))
            stored.append(name)
        }
        return FileName(bytes: Array(stored.map { Array($0.bytes) }.joined(separator: [UInt8(ascii: "/")])))
    }

    // MARK: Moving one file

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
        let fd: Int32
        do throws(Errno) { fd = try Syscall.openat(AT_FDCWD, "/proc/self/fd/\(candidate.fd)", O_RDWR) } catch {
            if error == .noSuchFileOrDirectory { return .skipped }
            throw RekeyFailure(error)
        }
        defer { close(fd) }
        let file: OpenFile
        do throws(Errno) {
            let key = InodeKey(try Syscall.fstat(fd))
            file = try fs.openShared(key) { fs.pinOpen(key) } make: { () throws(Errno) -> OpenFile in
                try fs.makeOpenFile(fd: try Syscall.call { dup(fd) }, writable: true, principal: job.principal, rekeying: true)
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
        let out = try Syscall.openat(AT_FDCWD, path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0o600)
        defer { close(out) }
        try copy(from: fd, to: out, count: Int(st.st_size))
        var times = [st.st_atim, st.st_mtim]
        _ = futimens(out, &times)
        try Syscall.call { fsync(out) }
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
            let fd = try Syscall.openat(dirFD, DirectoryKeys.fileName, O_RDONLY | O_NOFOLLOW)
            defer { close(fd) }
            guard var header = EncryptedFileSystem.header(of: fd) else { throw Errno.ioError }
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
            let out = try Syscall.openat(dirFD, temporary, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0o400)
            defer { close(out) }
            try Syscall.pwrite(out, bytes, at: 0)
            try Syscall.call { fsync(out) }
            try Syscall.call { renameat(dirFD, temporary, dirFD, DirectoryKeys.fileName.description) }
            fs.nodes.dropKeys(ofDirectory: candidate.object)
            return .moved(bytes: 0, key: wrapped.key, version: wrapped.version)
        } catch {
            unlinkat(dirFD, temporary, 0)
            throw RekeyFailure(error)
        }
    }

    // MARK: Crash recovery

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
            var fd: Int32 = -1
            do throws(Errno) { fd = try openConfined(intent.path, O_RDWR) } catch {
                // Only a file that is not there may be looked for elsewhere (renamed) or given up;
                // one that is there but cannot be opened (read-only, immutable) keeps its intent.
                guard error == .noSuchFileOrDirectory || error.rawValue == ENOTDIR else {
                    failures.append(recoveryFailed(intent, "open it", error))
                    continue
                }
                fd = locate(intent.object)
            }
            guard fd >= 0 else {
                logger.warning("rekey intent for a file that is gone", metadata: ["object": .string(intent.object.hex)])
                try keyManager.clearRekeyIntent(intent.object)
                continue
            }
            defer { close(fd) }
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
                        defer { close(copy) }
                        let saved = (try? Syscall.pread(copy, count: ChunkLayout.headerSize, at: 0)) ?? []
                        guard saved == intent.oldHeader else {
                            refuseRecovery(intent, "the backup does not start with the intent's old header")
                            try keyManager.clearRekeyIntent(intent.object)
                            continue
                        }
                        do throws(Errno) {
                            let st = try Syscall.fstat(copy)
                            try self.copy(from: copy, to: fd, count: Int(st.st_size))
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
            keyManager.audit(AuditEvent("RekeyRecovery", key: intent.oldKey, version: intent.oldVersion, object: intent.object,
                                        error: "job \(intent.job): \(intent.mode.rawValue) \(intent.mode == .rewrap && current != intent.oldHeader ? "completed" : "rolled back")"))
            logger.notice("repaired an interrupted rekey", metadata: ["object": .string(intent.object.hex), "mode": .string(intent.mode.rawValue)])
        }
        // Backups without an intent belong to files already committed.
        let kept = Set(failures.map { $0.object.hex + ".old" })
        if let dir = try? Syscall.openat(fs.nodes.rootFD, Self.backupDirectory, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) {
            defer { close(dir) }
            for entry in (try? Syscall.listDirectory(dir)) ?? [] where !kept.contains(entry.name.description) { Syscall.unlinkQuietly(dir, entry.name) }
        }
        return failures
    }

    private func recoveryFailed(_ intent: RekeyIntent, _ action: String, _ error: Errno) -> RecoveryFailure {
        let failure = RecoveryFailure(object: intent.object, path: intent.path, action: action, error: error)
        logger.error("an interrupted rekey could not be repaired", metadata: ["object": .string(intent.object.hex), "error": .string("\(error)")])
        keyManager.audit(AuditEvent("RekeyRecovery", outcome: "failed", key: intent.oldKey, version: intent.oldVersion, object: intent.object,
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
        keyManager.audit(AuditEvent("RekeyRecovery", outcome: "refused", object: intent.object, error: why))
    }

    /// Opens `relative` (a path inside CIPHERDIR) one component at a time from
    /// the CIPHERDIR descriptor, following no symlink and no `..`: whatever a
    /// stored path says, nothing outside CIPHERDIR is reached.
    func openConfined(_ relative: String, _ flags: Int32) throws(Errno) -> Int32 {
        let parts = relative.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard !parts.isEmpty, parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else { throw .invalidArgument }
        var dir = try Syscall.call { dup(fs.nodes.rootFD) }
        for part in parts.dropLast() {
            let next: Int32
            do throws(Errno) { next = try Syscall.openat(dir, part, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) } catch {
                close(dir)
                throw error
            }
            close(dir)
            dir = next
        }
        defer { close(dir) }
        return try Syscall.openat(dir, parts[parts.count - 1], flags | O_NOFOLLOW)
    }

    /// Unlinks `relative` inside CIPHERDIR, confined like `openConfined`.
    private func unlinkConfined(_ relative: String) {
        guard let slash = relative.lastIndex(of: "/"),
              let dir = try? openConfined(String(relative[..<slash]), O_DIRECTORY | O_RDONLY) else { return }
        defer { close(dir) }
        unlinkat(dir, String(relative[relative.index(after: slash)...]), 0)
    }

    /// Opens (read-write) the backing file whose header carries `object`, wherever it now is; -1 if none.
    func locate(_ object: ID128) -> Int32 {
        var found: Int32 = -1
        var seen = Set<InodeKey>()
        _ = walk("", fd: fs.nodes.rootFD, seen: &seen, keepOpen: true, selects: { $0.fileID.rawValue == object }) { candidate in
            if candidate.kind == .file { found = Glibc.open("/proc/self/fd/\(candidate.fd)", O_RDWR) }
            close(candidate.fd)
            return found < 0
        }
        return found
    }
}

/// The mount daemon's rekey worker: one background thread that runs the
/// keystore's queued or running job (resuming one a crash or an unmount
/// left), sleeps while none is runnable, and wakes when an admin command
/// starts or resumes one.
public final class RekeyService: @unchecked Sendable {
    public let rekeyer: Rekeyer
    private let wakeup = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    private let running = DispatchGroup()
    private let logger = Logger(label: "kmsfs.rekey")

    public init(filesystem: EncryptedFileSystem) {
        rekeyer = Rekeyer(filesystem: filesystem)
    }

    /// After a pause or cancel was recorded: stops the running job before
    /// its next file and returns once no file is being moved any more.
    public func interruptAndWait() {
        rekeyer.interrupted.store(true, ordering: .relaxed)
        _ = running.wait(timeout: .now() + 60)
        rekeyer.interrupted.store(false, ordering: .relaxed)
    }

    public func start() {
        let thread = Thread { [self] in
            loop()
            finished.signal()
        }
        thread.name = "kmsfs-rekey"
        thread.start()
    }

    /// Asks the worker to look for a runnable job now.
    public func wake() { wakeup.signal() }

    /// Stops before the next file (the job stays resumable) and waits for the worker.
    public func stop() {
        rekeyer.stopRequested.store(true, ordering: .relaxed)
        wakeup.signal()
        finished.wait()
    }

    private func loop() {
        while !rekeyer.stopRequested.load(ordering: .relaxed) {
            if let job = try? rekeyer.keyManager.activeRekeyJob(), job.state != .paused {
                running.enter()
                var after: RekeyJob?
                if !rekeyer.interrupted.load(ordering: .relaxed) {
                    do throws(KeyManagerError) { after = try rekeyer.run(job.id) } catch {
                        logger.error("rekey job stopped", metadata: ["job": "\(job.id)", "error": .string(error.description)])
                        try? rekeyer.keyManager.setRekeyState(job.id, .failed, error: error.description, by: nil)
                    }
                }
                running.leave()
                // Still running means it was stopped or interrupted: look again shortly, not in a spin.
                if after == nil || after?.state == .running { _ = wakeup.wait(timeout: .now() + 1) }
                continue
            }
            _ = wakeup.wait(timeout: .now() + 5)
        }
    }
}
