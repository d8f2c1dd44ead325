import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// The rekey tables as GRDB records, with every statement on them: jobs
// (`rekey_jobs`), the objects a job finished (`rekey_done`) and the
// write-ahead intents of files being rewritten (`rekey_intents`).

/// `rekey_jobs`: one row per job and its progress counters.
struct RekeyJobRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "rekey_jobs"
    /// Nil until inserted (SQLite assigns it).
    var id: Int64?
    var state: String
    var mode: String
    var sourceKey: String
    var sourceVersion: Int?
    var targetKey: String
    /// Sealed under the metadata key (base64), or a pre-sealing plaintext path.
    var path: String?
    var rate: Double?
    var workers: Int
    var uid: Int
    var gid: Int
    var createdAt: Double
    var updatedAt: Double
    var finishedAt: Double?
    var filesTotal = 0
    var bytesTotal = 0
    var filesDone = 0
    var bytesDone = 0
    var rewrites = 0
    var failures = 0
    var lastError: String?

    enum CodingKeys: String, CodingKey {
        case id, state, mode, sourceKey = "source_key", sourceVersion = "source_version", targetKey = "target_key", path, rate, workers,
             uid, gid, createdAt = "created_at", updatedAt = "updated_at", finishedAt = "finished_at", filesTotal = "files_total",
             bytesTotal = "bytes_total", filesDone = "files_done", bytesDone = "bytes_done", rewrites, failures, lastError = "last_error"
    }
    enum Columns {
        static let id = Column(CodingKeys.id)
        static let state = Column(CodingKeys.state)
        static let rate = Column(CodingKeys.rate)
        static let updatedAt = Column(CodingKeys.updatedAt)
        static let filesTotal = Column(CodingKeys.filesTotal)
        static let bytesTotal = Column(CodingKeys.bytesTotal)
        static let filesDone = Column(CodingKeys.filesDone)
        static let bytesDone = Column(CodingKeys.bytesDone)
        static let rewrites = Column(CodingKeys.rewrites)
        static let failures = Column(CodingKeys.failures)
        static let lastError = Column(CodingKeys.lastError)
    }

    private static let activeStates = [RekeyState.queued, .running, .paused].map(\.rawValue)

    static func fetch(_ id: Int64, _ db: Database) throws -> RekeyJobRow? { try fetchOne(db, key: id) }

    /// The queued, running or paused job (the oldest, should there be more).
    static func active(_ db: Database) throws -> RekeyJobRow? {
        try filter(activeStates.contains(Columns.state)).order(Columns.id).fetchOne(db)
    }

    static func latest(_ db: Database) throws -> RekeyJobRow? { try order(Columns.id.desc).fetchOne(db) }

    /// Adds the job; its id.
    func insertNew(_ db: Database) throws -> Int64 {
        try insert(db)
        return db.lastInsertedRowID
    }

    /// The totals a scan found: what is done plus what is still to move.
    static func setTotals(_ id: Int64, files: Int, bytes: Int, at time: Double, _ db: Database) throws {
        _ = try filter(key: id).updateAll(db, Columns.filesTotal.set(to: Columns.filesDone + files),
                                          Columns.bytesTotal.set(to: Columns.bytesDone + bytes), Columns.updatedAt.set(to: time))
    }

    static func setRate(_ id: Int64, _ rate: Double?, at time: Double, _ db: Database) throws {
        _ = try filter(key: id).updateAll(db, Columns.rate.set(to: rate), Columns.updatedAt.set(to: time))
    }

    static func countFailure(_ id: Int64, _ message: String, at time: Double, _ db: Database) throws {
        _ = try filter(key: id).updateAll(db, Columns.failures += 1, Columns.lastError.set(to: message), Columns.updatedAt.set(to: time))
    }

    /// Counts one committed rewrite; `fresh` (0 or 1) whether the object is new to the job's done set.
    static func countRewrite(_ id: Int64, fresh: Int, bytes: Int, at time: Double, _ db: Database) throws {
        _ = try filter(key: id).updateAll(db, Columns.filesDone += fresh, Columns.bytesDone += fresh * bytes, Columns.rewrites += 1,
                                          Columns.updatedAt.set(to: time))
    }

    /// The job as callers see it, its path still as stored; nil if its keys are unreadable.
    var job: RekeyJob? {
        guard let id, let source = KeyID(hex: sourceKey), let target = KeyID(hex: targetKey) else { return nil }
        return RekeyJob(id: id, state: RekeyState(rawValue: state) ?? .failed, mode: RekeyMode(rawValue: mode) ?? .rewrap, sourceKey: source,
                        sourceVersion: sourceVersion.map { KeyVersion(rawValue: UInt32($0)) }, targetKey: target, path: path, rate: rate,
                        workers: workers, uid: UInt32(truncatingIfNeeded: uid), gid: UInt32(truncatingIfNeeded: gid), createdAt: createdAt,
                        updatedAt: updatedAt, finishedAt: finishedAt, filesTotal: filesTotal, bytesTotal: bytesTotal, filesDone: filesDone,
                        bytesDone: bytesDone, rewrites: rewrites, failures: failures, lastError: lastError)
    }
}

/// `rekey_done`: the objects a job has finished (a resumed job skips them).
struct RekeyDoneRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "rekey_done"
    var jobID: Int64
    var objectID: String

    enum CodingKeys: String, CodingKey { case jobID = "job_id", objectID = "object_id" }
    enum Columns { static let jobID = Column(CodingKeys.jobID) }

    static func objects(of job: Int64, _ db: Database) throws -> Set<ID128> {
        Set(try filter(Columns.jobID == job).fetchAll(db).compactMap { ID128(hex: $0.objectID) })
    }

    /// Marks `object` done for `job`; 1 if it was not yet, else 0.
    static func mark(_ object: ID128, job: Int64, _ db: Database) throws -> Int {
        try RekeyDoneRow(jobID: job, objectID: object.hex).insert(db, onConflict: .ignore)
        return db.changesCount
    }
}

/// `rekey_intents`: the header before and after (and a reencrypt's backup)
/// of each file being rewritten, MACed by the keystore, so a crash
/// mid-write is repaired on restart.
struct RekeyIntentRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "rekey_intents"
    var objectID: String
    var jobID: Int64
    var mode: String
    var kind: String
    var path: String
    var oldHeader: Data
    var newHeader: Data
    var oldKey: String
    var oldVersion: Int
    var backup: String?
    var mac: Data?

    enum CodingKeys: String, CodingKey {
        case objectID = "object_id", jobID = "job_id", mode, kind, path, oldHeader = "old_header", newHeader = "new_header",
             oldKey = "old_key", oldVersion = "old_version", backup, mac
    }
    enum Columns { static let objectID = Column(CodingKeys.objectID) }

    init(_ intent: RekeyIntent, mac: Data) {
        objectID = intent.object.hex
        jobID = intent.job
        mode = intent.mode.rawValue
        kind = intent.kind.rawValue
        path = intent.path
        oldHeader = Data(intent.oldHeader)
        newHeader = Data(intent.newHeader)
        oldKey = intent.oldKey.rawValue.hex
        oldVersion = Int(intent.oldVersion.rawValue)
        backup = intent.backup
        self.mac = mac
    }

    /// The intent, not yet checked against its MAC; nil if a field is unreadable.
    var intent: RekeyIntent? {
        guard let object = ID128(hex: objectID), let key = KeyID(hex: oldKey),
              let mode = RekeyMode(rawValue: mode), let kind = ObjectKind(rawValue: kind) else { return nil }
        return RekeyIntent(object: object, job: jobID, mode: mode, kind: kind, path: path, oldHeader: [UInt8](oldHeader),
                           newHeader: [UInt8](newHeader), oldKey: key, oldVersion: KeyVersion(rawValue: UInt32(oldVersion)), backup: backup)
    }

    static func all(_ db: Database) throws -> [RekeyIntentRow] { try order(Columns.objectID).fetchAll(db) }

    static func clear(_ object: ID128, _ db: Database) throws { _ = try deleteOne(db, key: object.hex) }
}
