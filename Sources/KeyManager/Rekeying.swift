import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// How a rekey job moves a file to its new key (DESIGN.md §7).
public enum RekeyMode: String, Sendable, Codable, CaseIterable {
    /// The new key wraps the same data key: only the 384-byte header changes.
    case rewrap
    /// A new data key, every chunk re-sealed: for a compromised key.
    case reencrypt
}

public enum RekeyState: String, Sendable, Codable, CaseIterable {
    case queued, running, paused, done, failed, cancelled

    /// States a job can still move on from.
    public var isActive: Bool { self == .queued || self == .running || self == .paused }
}

/// One rekey job and its progress, as `kmsfs rekey status --json` shows it.
public struct RekeyJob: Sendable, Codable {
    public var id: Int64
    public var state: RekeyState
    public var mode: RekeyMode
    public var sourceKey: KeyID
    /// Only files on this version of the source key; nil: every version
    /// (when source and target are one key: every version but the current).
    public var sourceVersion: KeyVersion?
    public var targetKey: KeyID
    /// Only files under this directory of the filesystem.
    public var path: String?
    /// Throttle in MB/s of file data (reencrypt) or header bytes (rewrap).
    public var rate: Double?
    public var workers: Int
    public var uid: UInt32
    public var gid: UInt32
    public var createdAt: Double
    public var updatedAt: Double
    public var finishedAt: Double?
    public var filesTotal: Int
    public var bytesTotal: Int
    public var filesDone: Int
    public var bytesDone: Int
    /// Commits made, counting a file redone after a crash rolled it back.
    public var rewrites: Int
    public var failures: Int
    public var lastError: String?

    /// The principal the job acts as: whoever started it.
    public var principal: Principal { Principal(uid: uid, gid: gid, processName: "kmsfs-rekey") }

    /// Whether a file header on `key` `version` is one this job moves.
    public func selects(key: KeyID, version: KeyVersion, currentTargetVersion: KeyVersion) -> Bool {
        guard key == sourceKey else { return false }
        if let sourceVersion { return version == sourceVersion }
        if sourceKey == targetKey { return version != currentTargetVersion }
        return true
    }
}

/// A write-ahead record of one file being rewritten by a rekey.
public struct RekeyIntent: Sendable {
    public var object: ID128
    public var job: Int64
    public var mode: RekeyMode
    public var kind: ObjectKind
    /// The backing path relative to CIPHERDIR (ciphertext names).
    public var path: String
    public var oldHeader: [UInt8]
    public var newHeader: [UInt8]
    public var oldKey: KeyID
    public var oldVersion: KeyVersion
    /// For a reencrypt: the copy of the old ciphertext, relative to CIPHERDIR.
    public var backup: String?
    /// Whether the intent carries a valid MAC of this keystore: one written by
    /// kmsfs, not inserted by someone who can only edit the file.
    public var authentic = true

    public init(object: ID128, job: Int64, mode: RekeyMode, kind: ObjectKind, path: String, oldHeader: [UInt8], newHeader: [UInt8],
                oldKey: KeyID, oldVersion: KeyVersion, backup: String?) {
        self.object = object
        self.job = job
        self.mode = mode
        self.kind = kind
        self.path = path
        self.oldHeader = oldHeader
        self.newHeader = newHeader
        self.oldKey = oldKey
        self.oldVersion = oldVersion
        self.backup = backup
    }
}

/// Rekey jobs, their checkpoints and intents, kept in the keystore so a job
/// survives a crash, a remount, or moving between the daemon and offline.
extension KeyManager {
    /// Queues a job moving files from `source` (`KEY` or `KEY:VERSION`) to
    /// `target` — by default the source's successor when it is deprecated,
    /// else its own current version. Needs administer on both keys; one
    /// active job at a time.
    public func createRekeyJob(source: String, target: String? = nil, mode: RekeyMode = .rewrap, path: String? = nil,
                               rate: Double? = nil, workers: Int = 2, by principal: Principal) throws(KeyManagerError) -> RekeyJob {
        var reference = source
        var version: KeyVersion?
        if let colon = source.lastIndex(of: ":"), let n = UInt32(source[source.index(after: colon)...]) {
            reference = String(source[..<colon])
            version = KeyVersion(rawValue: n)
        }
        var request = ["keyId": source, "mode": mode.rawValue]
        if let target { request["targetKeyId"] = target }
        return try adminOperation(.startRekey, principal, request: request) { () throws(KeyManagerError) in
        let sourceID = try resolve(reference)
        let sourceRecord = try authorizeAdmin(principal, sourceID)
        guard sourceRecord.metadata.usage == .encryptDecrypt else { throw .invalidArgument("\(reference) is a SIGN_VERIFY key; it wraps no files") }
        // Its files must be readable to be moved: say so now, not as N failures later.
        try check(.rewrapFrom, sourceRecord)
        let targetID = try target.map { (t) throws(KeyManagerError) in try resolve(t) } ?? sourceRecord.metadata.successor ?? sourceID
        let targetRecord = try authorizeAdmin(principal, targetID)
        try check(.rewrapTo, targetRecord)
        if let version {
            guard version.rawValue >= 1, version.rawValue <= sourceRecord.metadata.currentVersion.rawValue else {
                throw .versionNotFound(key: sourceRecord.displayName, version: version)
            }
            if sourceID == targetID, version == targetRecord.metadata.currentVersion {
                throw .invalidArgument("version \(version) is the current version of \(sourceRecord.displayName): its files are where a rekey would move them")
            }
        }
        guard workers >= 1, workers <= 64 else { throw .invalidArgument("--workers must be 1–64") }
        if let rate, !(rate > 0) { throw .invalidArgument("--rate must be a positive number of MB/s") }
        let now = clock()
        let storedPath = try path.map { (p) throws(KeyManagerError) in try sealJobPath(p) }
        let id: Int64 = try sealedWrite { db in
            if let active = try RekeyJobRow.active(db) {
                throw KeyManagerError.invalidArgument("rekey job \(active.id ?? 0) is \(active.state); cancel or finish it first")
            }
            let id = try RekeyJobRow(state: RekeyState.queued.rawValue, mode: mode.rawValue, sourceKey: sourceID.rawValue.hex,
                                     sourceVersion: version.map { Int($0.rawValue) }, targetKey: targetID.rawValue.hex, path: storedPath, rate: rate,
                                     workers: workers, uid: Int(principal.uid), gid: Int(principal.gid), createdAt: now, updatedAt: now).insertNew(db)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.startRekey, key: sourceID, version: version, principal: principal,
                                                 error: "job \(id): \(mode.rawValue) to \(targetID.rawValue.hex)",
                                                 request: request.merging(["jobId": String(id)]) { $1 }), at: now)
            return id
        }
        guard let job = try rekeyJob(id) else { throw .database("rekey job \(id) vanished") }
        return job
        }
    }

    /// A job row, its path unsealed (paths are stored sealed under the metadata key: no names at rest).
    func job(from row: RekeyJobRow) throws -> RekeyJob {
        guard var job = row.job else { throw KeyManagerError.keystoreCorrupt("rekey job \(row.id ?? 0) names a key that is not a key id") }
        // A sealed path is standard base64, which may itself begin with "/"
        // (one job in 64 did, and was then taken for a plaintext path that
        // does not exist): try to open it first. Jobs from before paths were
        // sealed keep their plaintext path, which never opens (authenticated
        // like the rest of the row).
        if let stored = job.path {
            if let sealed = Data(base64Encoded: stored),
               let secret = try KeyWrap.open([UInt8](sealed), under: try AESGCM.make(metadataKey), context: Array("kmsfs/v1/rekey-path".utf8)) {
                job.path = secret.withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
            } else if !stored.hasPrefix("/") {
                throw KeyManagerError.keystoreCorrupt("the path of rekey job \(job.id) does not open")
            }
        }
        return job
    }

    func sealJobPath(_ path: String) throws(KeyManagerError) -> String {
        let sealer = try AESGCM.make(metadataKey)
        let sealed = try keepingKeyManagerError {
            try Array(path.utf8).withUnsafeBytes { raw in try KeyWrap.seal(raw, under: sealer, context: Array("kmsfs/v1/rekey-path".utf8)) }
        }
        return Data(sealed).base64EncodedString()
    }

    public func rekeyJob(_ id: Int64) throws(KeyManagerError) -> RekeyJob? {
        try verifiedRead { db in try RekeyJobRow.fetch(id, db).map(job(from:)) }
    }

    /// The queued, running or paused job, if any.
    public func activeRekeyJob() throws(KeyManagerError) -> RekeyJob? {
        try verifiedRead { db in try RekeyJobRow.active(db).map(job(from:)) }
    }

    /// The newest job, finished or not.
    public func latestRekeyJob() throws(KeyManagerError) -> RekeyJob? {
        try verifiedRead { db in try RekeyJobRow.latest(db).map(job(from:)) }
    }

    /// Moves a job to `state` (pause, resume, cancel, or the runner's own
    /// transitions), checking the move makes sense; audited.
    public func setRekeyState(_ id: Int64, _ state: RekeyState, error: String? = nil, by principal: Principal?) throws(KeyManagerError) {
        guard let job = try rekeyJob(id) else { throw .invalidArgument("no rekey job \(id)") }
        if let principal {
            _ = try authorizeAdmin(principal, job.sourceKey)
        }
        guard job.state.isActive else { throw .invalidArgument("rekey job \(id) is \(job.state.rawValue); nothing to change") }
        let now = clock()
        try sealedWrite { db in
            guard var row = try RekeyJobRow.fetch(id, db) else { throw KeyManagerError.invalidArgument("no rekey job \(id)") }
            row.state = state.rawValue
            row.updatedAt = now
            if let error { row.lastError = error }
            row.finishedAt = state.isActive ? nil : now
            try row.update(db)
            if principal != nil || !state.isActive {
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.rekey(state),
                                                     outcome: state == .failed ? .failure : .success, key: job.sourceKey,
                                                     principal: principal, error: "job \(id)" + (error.map { ": \($0)" } ?? "")), at: now)
            }
        }
    }

    /// Records the totals a scan found (files and bytes still to move).
    public func setRekeyTotals(_ id: Int64, files: Int, bytes: Int) throws(KeyManagerError) {
        try write { db in
            try RekeyJobRow.setTotals(id, files: files, bytes: bytes, at: clock(), db)
        }
    }

    /// Changes a job's throttle (MB/s; nil for none).
    public func setRekeyRate(_ id: Int64, _ rate: Double?, by principal: Principal) throws(KeyManagerError) {
        guard let job = try rekeyJob(id) else { throw .invalidArgument("no rekey job \(id)") }
        _ = try authorizeAdmin(principal, job.sourceKey)
        if let rate, !(rate > 0) { throw .invalidArgument("--rate must be a positive number of MB/s") }
        try sealedWrite { db in try RekeyJobRow.setRate(id, rate, at: clock(), db) }
    }

    public func recordRekeyFailure(_ id: Int64, _ message: String) throws(KeyManagerError) {
        try write { db in
            try RekeyJobRow.countFailure(id, message, at: clock(), db)
        }
    }

    /// Whether the job already finished `object`.
    public func rekeyDone(_ id: Int64) throws(KeyManagerError) -> Set<ID128> {
        try read { db in try RekeyDoneRow.objects(of: id, db) }
    }

    /// Writes an intent before a file is rewritten.
    public func recordRekeyIntent(_ intent: RekeyIntent) throws(KeyManagerError) {
        let mac = intentMAC(intent)
        try write { db in
            try RekeyIntentRow(intent, mac: mac).insert(db, onConflict: .replace)
        }
    }

    /// The MAC of every field recovery acts on.
    func intentMAC(_ i: RekeyIntent) -> Data {
        var job = [UInt8](); job.appendBigEndian(UInt64(bitPattern: i.job), width: 8)
        var version = [UInt8](); version.appendBigEndian(UInt64(i.oldVersion.rawValue), width: 4)
        return integrity.mac("kmsfs/v1/rekey-intent", [
            i.object.bytes, job, Array(i.mode.rawValue.utf8), Array(i.kind.rawValue.utf8), Array(i.path.utf8), i.oldHeader, i.newHeader,
            i.oldKey.rawValue.bytes, version, i.backup.map { Array($0.utf8) } ?? [0xff],
        ])
    }

    /// Intents left by a run that stopped mid-write.
    public func rekeyIntents() throws(KeyManagerError) -> [RekeyIntent] {
        try read { db in
            try RekeyIntentRow.all(db).compactMap { row -> RekeyIntent? in
                guard var intent = row.intent else { return nil }
                intent.authentic = row.mac == intentMAC(intent)
                return intent
            }
        }
    }

    public func clearRekeyIntent(_ object: ID128) throws(KeyManagerError) {
        try write { db in try RekeyIntentRow.clear(object, db) }
    }

    /// Checkpoints a finished file: done, counted, its intent cleared, its
    /// usage moved — one transaction.
    public func commitRekeyed(job: Int64, object: ID128, kind: ObjectKind, key: KeyID, version: KeyVersion, bytes: Int) throws(KeyManagerError) {
        try flushUsage()
        let now = clock()
        try write { db in
            let fresh = try RekeyDoneRow.mark(object, job: job, db)
            try RekeyJobRow.countRewrite(job, fresh: fresh, bytes: bytes, at: now, db)
            try RekeyIntentRow.clear(object, db)
            try UsageRow.record(object, kind, key: key, version: version, at: now, db)
        }
    }

    /// Wraps an existing data key under the current version of `target`
    /// (a reencrypt's new key, or a rewrap): checks encrypt policy and state.
    public func wrapDataKey(_ dek: borrowing SecretKey, for object: ID128, key target: KeyID,
                            principal: Principal) throws(KeyManagerError) -> (key: KeyID, version: KeyVersion, wrapped: [UInt8]) {
        let rec = try record(target)
        try authorize(principal, .encrypt, rec)
        try check(.rewrapTo, rec)
        let version = rec.metadata.currentVersion
        let wrapped = try provider(for: target).wrapDataKey(dek, key: target, version: version, context: dataKeyContext(object: object, key: target, version: version)) {
            () throws(KeyManagerError) in try storedMaterial(target, version)
        }
        return (target, version, wrapped)
    }

    /// The current version of a key (cached record).
    public func currentVersion(of key: KeyID) throws(KeyManagerError) -> KeyVersion {
        try record(key).metadata.currentVersion
    }
}
