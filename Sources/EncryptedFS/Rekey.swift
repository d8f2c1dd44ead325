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
public final class Rekeyer: Sendable {
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
        /// for a `.kmsfs.dir` its directory (O_PATH). Nil when not kept;
        /// closed when the last copy of the candidate is gone.
        var opened: SharedDescriptor?
        var fd: Int32 { opened?.raw ?? -1 }
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
                    return try currentJob(id)
                }
                try keyManager.setRekeyTotals(id, files: count, bytes: bytes)
            }
            // Walk again, moving what the walk finds a batch at a time.
            var found = 0, failed = 0, stopped = false
            var batch: [Candidate] = []
            func flush() throws(KeyManagerError) -> Bool {
                defer { batch.removeAll() }
                job = try currentJob(id)
                guard job.state == .running, !stopRequested.load(ordering: .relaxed), !interrupted.load(ordering: .relaxed) else {
                    stopped = true
                    return false
                }
                failed += process(batch, job, selects: selects, started: started, moved: moved)
                progress(try currentJob(id))
                return true
            }
            var walkError: KeyManagerError?
            do throws(Errno) {
                try walk(job, selects: selects, keepOpen: true) { candidate in
                    guard pass > 1 || !done.contains(candidate.object) else { return true }
                    found += 1
                    batch.append(candidate)
                    guard batch.count >= Self.batchSize else { return true }
                    do throws(KeyManagerError) { return try flush() } catch { walkError = error; return false }
                }
            } catch {
                batch.removeAll()
                try keyManager.setRekeyState(id, .failed, error: "cannot walk the filesystem: \(error)", by: nil)
                return try currentJob(id)
            }
            if let walkError { throw walkError }
            if !stopped, !batch.isEmpty { _ = try flush() }
            if stopped { return try currentJob(id) }
            if found == 0 {
                // A walk can miss a file renamed from a directory not yet
                // walked into one already walked; the usage index cannot.
                // Walk again until both agree.
                if job.path == nil, pass < Self.maxPasses, try remainingInIndex(job, targetVersion: target) > 0 { continue }
                try keyManager.setRekeyState(id, .done, by: nil)
                job = try currentJob(id)
                progress(job)
                logger.debug("rekey job done", metadata: ["job": "\(id)", "files": "\(job.filesDone)"])
                return job
            }
            if failed > 0, failed == found {
                try keyManager.setRekeyState(id, .failed, error: Self.failureSummary(failed, cause: try keyManager.rekeyJob(id)?.lastError), by: nil)
                return try currentJob(id)
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
        return try currentJob(id)
    }

    /// What a failed job says: how many files, and the cause of the last failure.
    /// Job `id` as the keystore has it now; a job deleted under a running
    /// pass (the keystore was replaced) ends the run with an error instead of a crash.
    func currentJob(_ id: Int64) throws(KeyManagerError) -> RekeyJob {
        guard let job = try keyManager.rekeyJob(id) else { throw .invalidArgument("rekey job \(id) is no longer in the keystore") }
        return job
    }

    static func failureSummary(_ count: Int, cause: String?) -> String {
        "\(count) file(s) could not be moved" + (cause.map { "; last cause: \($0)" } ?? "") + " (`kmsfs fsck` checks the files)"
    }

    /// Moves one batch on `job.workers` threads; returns how many failed.
    private func process(_ batch: [Candidate], _ job: RekeyJob, selects: @escaping @Sendable (FileHeader) -> Bool,
                         started: Double, moved: borrowing Atomic<Int>) -> Int {
        let failures = Atomic<Int>(0)
        let workers = min(job.workers, batch.count)
        let control = StopCheck(self, job.id)
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            for i in stride(from: worker, to: batch.count, by: workers) {
                let candidate = batch[i]
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
    final class StopCheck: Sendable {
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
}
