import ChunkCipher
import Dispatch
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Group commit for the usage index and the audit log while a filesystem is
/// mounted: creates, unlinks and data-key events append here, and one
/// transaction writes a batch every 100 ms (or at 512 changes, or before
/// anything reads the index). A crash can lose what was waiting; the
/// journal marks the keystore while it runs, and a key is never destroyed
/// while a journal that died unflushed may have lost usage entries
/// (docs/KEYS.md).
final class UsageJournal: @unchecked Sendable {
    enum Change {
        case record(ID128, ObjectKind, KeyID, KeyVersion, Double)
        case forget(ID128)
        case audit(AuditEvent, Double)
    }

    private let pending = Mutex<[Change]>([])
    /// Held for a whole flush so batches commit in the order they were taken.
    private let flushing = Mutex<Void>(())
    private let db: DatabasePool
    /// Keys the audit chain (KeyManager.integrity).
    private let chainKey: KeyDerivation.KeyedHMAC
    private var timer: DispatchSourceTimer?
    private let queue = DispatchQueue(label: "kmsfs.usage-journal")
    /// Set while a flush for a full batch is queued, so one is queued at a time.
    private let flushQueued = Atomic<Bool>(false)
    static let batchSize = 512
    /// Pending changes at which an append waits for a flush itself (the
    /// background flushes cannot keep up).
    static let backlogLimit = 8 * batchSize

    init(db: DatabasePool, chainKey: KeyDerivation.KeyedHMAC, interval: Double) {
        self.chainKey = chainKey
        self.db = db
        let timer = DispatchSource.makeTimerSource(queue: queue)
        timer.schedule(deadline: .now() + interval, repeating: interval)
        timer.setEventHandler { [weak self] in try? self?.flush() }
        timer.resume()
        self.timer = timer
    }

    /// Adds a change. A full batch is written by the journal's own thread,
    /// so the request that filled it does not wait for the transaction;
    /// only a backlog far beyond a batch makes the appender write it.
    func append(_ change: Change) throws(KeyManagerError) {
        let count = pending.withLock { $0.append(change); return $0.count }
        if count >= Self.backlogLimit {
            try flush()
        } else if count >= Self.batchSize, !flushQueued.exchange(true, ordering: .acquiringAndReleasing) {
            queue.async { [self] in
                flushQueued.store(false, ordering: .releasing)
                try? flush()
            }
        }
    }

    /// Writes everything appended so far in one transaction.
    func flush() throws(KeyManagerError) {
        do {
            try flushing.withLock { _ in
                let batch = pending.withLock { batch -> [Change] in defer { batch.removeAll(keepingCapacity: true) }; return batch }
                guard !batch.isEmpty else { return }
                // A batch that cannot be written (a full disk) goes back in
                // front of what came since, to be written by the next flush.
                do {
                    try write(batch)
                } catch {
                    pending.withLock { $0.insert(contentsOf: batch, at: 0) }
                    throw error
                }
            }
        } catch { throw .database("usage index and audit batch: \(error)") }
    }

    private func write(_ batch: [Change]) throws {
        try db.write { db in
            var chain: Data?
            for change in batch {
                switch change {
                case .record(let object, let kind, let key, let version, let time):
                    try UsageRow.record(object, kind, key: key, version: version, at: time, db)
                case .forget(let object):
                    try UsageRow.forget(object, db)
                case .audit(let event, let time):
                    try AuditTrail.append(db, chain: chainKey, event, at: time, previous: &chain)
                }
            }
        }
    }

    func stop() {
        timer?.cancel()
        timer = nil
    }
}

extension KeyManager {
    /// Starts group-committing usage-index changes (the mount daemon calls
    /// this); marks the keystore with this process's id until `stopBatchingUsage`.
    public func startBatchingUsage(interval: Double = 0.1) throws(KeyManagerError) {
        try write { db in
            try KeystoreMeta.set(.usageJournalPID, to: Int(getpid()), db)
        }
        caches.withLock { $0.journal = UsageJournal(db: db, chainKey: integrity.hmac, interval: interval) }
    }

    /// Flushes and stops batching; the keystore's index is complete again.
    public func stopBatchingUsage() throws(KeyManagerError) {
        guard let journal = caches.withLock({ c -> UsageJournal? in defer { c.journal = nil }; return c.journal }) else { return }
        journal.stop()
        try journal.flush()
        try write { db in try KeystoreMeta.remove(.usageJournalPID, db) }
    }

    /// Writes pending usage changes now (before anything reads the index).
    public func flushUsage() throws(KeyManagerError) {
        try caches.withLock({ $0.journal })?.flush()
    }

    var journal: UsageJournal? { caches.withLock { $0.journal } }

    /// Whether a mount that batched usage changes died without flushing, so
    /// the index may miss entries and no key may be destroyed on its word.
    func usageIndexMayBeIncomplete() throws(KeyManagerError) -> Bool {
        let pid = try read { db in try KeystoreMeta.value(.usageJournalPID, db, as: Int.self) }
        guard let pid, pid != Int(getpid()) else { return false }
        return kill(pid_t(pid), 0) != 0 && errno == ESRCH
    }
}

/// What `replaceUsageIndex` changed.
public struct UsageRebuild: Sendable, Codable {
    public var entries: Int
    public var added: Int
    public var removed: Int
    public var changed: Int
}

extension KeyManager {
    /// Replaces the usage index with `entries` (read from every header by
    /// fsck) in one transaction, and clears a dead mount's journal marker:
    /// the index is complete again.
    public func replaceUsageIndex(_ entries: [(object: ID128, kind: ObjectKind, key: KeyID, version: KeyVersion)]) throws(KeyManagerError) -> UsageRebuild {
        try flushUsage()
        let now = clock()
        return try write { db in
            var old = [String: (String, String, Int)]()
            for row in try UsageRow.fetchAll(db) { old[row.objectID] = (row.kind, row.keyID, row.version) }
            var added = 0, changed = 0
            var fresh = Set<String>()
            try UsageRow.deleteAll(db)
            for e in entries {
                let id = e.object.hex
                guard fresh.insert(id).inserted else { continue }
                let value = (e.kind.rawValue, e.key.rawValue.hex, Int(e.version.rawValue))
                if let before = old[id] { if before != value { changed += 1 } } else { added += 1 }
                try UsageRow(objectID: id, kind: value.0, keyID: value.1, version: value.2, updatedAt: now).insert(db)
            }
            let removed = old.keys.filter { !fresh.contains($0) }.count
            try KeystoreMeta.remove(.usageJournalPID, db)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.rebuildUsageIndex, error: "\(fresh.count) entries: \(added) added, \(removed) removed, \(changed) changed"), at: now)
            return UsageRebuild(entries: fresh.count, added: added, removed: removed, changed: changed)
        }
    }
}
