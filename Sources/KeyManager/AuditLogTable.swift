import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `audit_log` through GRDB's query interface: every read of the log is
/// here (filters, the chain's tail, the verifier's walk, last use). Records
/// are read as rows, not decoded, where the chain is checked: the hash
/// covers the values exactly as stored. The append, the one write, is
/// `AuditTrail.append` (a cached statement: the journal's hot path).
enum AuditLogTable: TableRecord {
    static let databaseTableName = "audit_log"
    enum Columns {
        static let seq = Column("seq")
        static let time = Column("time")
        static let event = Column("event")
        static let outcome = Column("outcome")
        static let keyID = Column("key_id")
        static let uid = Column("uid")
        static let gid = Column("gid")
        static let hash = Column("hash")
    }

    /// The newest `limit` records (nil: all) matching `filter`, oldest
    /// first; `key` is the filter's key already resolved to its id, and a
    /// viewer other than root sees only its own records and those of the
    /// keys it administers (`administered`, ids).
    static func records(_ filter: AuditFilter, key: KeyID?, administered: [String]?, limit: Int?, _ db: Database) throws -> [AuditRecord] {
        var request = all()
        if let since = filter.since { request = request.filter(Columns.time >= since) }
        if let until = filter.until { request = request.filter(Columns.time < until) }
        if let key { request = request.filter(Columns.keyID == key.rawValue.hex) }
        if let event = filter.event { request = request.filter(Columns.event == event) }
        if let uid = filter.uid { request = request.filter(Columns.uid == Int(uid)) }
        if let outcome = filter.outcome { request = request.filter(Columns.outcome == outcome) }
        if let viewer = filter.viewer, viewer.uid != 0, let administered {
            request = request.filter(Columns.uid == Int(viewer.uid) || administered.contains(Columns.keyID))
        }
        var newest = request.order(Columns.seq.desc)
        if let limit { newest = newest.limit(limit) }
        return try newest.asRequest(of: Row.self).fetchAll(db).map(AuditRecord.init(row:)).reversed()
    }

    /// The newest record's sequence number and hash (the chain's tail), or nil for an empty log.
    static func tail(_ db: Database) throws -> (seq: Int64, hash: Data)? {
        guard let row = try select(Columns.seq, Columns.hash).order(Columns.seq.desc).asRequest(of: Row.self).fetchOne(db) else { return nil }
        return (row["seq"], row["hash"])
    }

    /// The highest sequence number, 0 for an empty log.
    static func lastSeq(_ db: Database) throws -> Int64 {
        try select(max(Columns.seq), as: Int64.self).fetchOne(db) ?? 0
    }

    /// The hash of record `seq`, or nil if there is none.
    static func hash(of seq: Int64, _ db: Database) throws -> Data? {
        try filter(Columns.seq == seq).select(Columns.hash, as: Data.self).fetchOne(db)
    }

    /// Every record as stored, in order, for the chain's verifier.
    static func walk(_ db: Database) throws -> RowCursor {
        try order(Columns.seq).asRequest(of: Row.self).fetchCursor(db)
    }

    /// When `subject` last used `key` successfully (any uid, for `*`), or nil.
    static func lastSuccess(of key: KeyID, by subject: PolicySubject, _ db: Database) throws -> Double? {
        var request = filter(Columns.keyID == key.rawValue.hex && Columns.outcome == AuditOutcome.success.rawValue)
        switch subject {
        case .uid(let n): request = request.filter(Columns.uid == Int(n))
        case .gid(let n): request = request.filter(Columns.gid == Int(n))
        case .anyone: request = request.filter(Columns.uid != nil)
        }
        return try request.select(max(Columns.time), as: Double.self).fetchOne(db)
    }
}

/// `audit_digests`: signed checkpoints of the audit chain.
struct AuditDigestRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "audit_digests"
    /// Nil until inserted.
    var id: Int64?
    var time: Double
    var lastSeq: Int64
    var lastHash: Data
    var keyID: String
    var keyVersion: Int
    var signature: Data

    enum CodingKeys: String, CodingKey {
        case id, time, lastSeq = "last_seq", lastHash = "last_hash", keyID = "key_id", keyVersion = "key_version", signature
    }
    enum Columns {
        static let id = Column(CodingKeys.id)
        static let lastSeq = Column(CodingKeys.lastSeq)
    }

    /// The highest record any digest covers, or nil before the first digest.
    static func covered(_ db: Database) throws -> Int64? {
        try select(max(Columns.lastSeq), as: Int64.self).fetchOne(db)
    }

    static func inOrder(_ db: Database) throws -> [AuditDigestRow] { try order(Columns.id).fetchAll(db) }
}
