import ChunkCipher
import GRDB

/// One audit event. Records are hash-chained: each stores the previous
/// record's hash, so an edit, a deletion or a reordering breaks the chain.
public struct AuditEvent: Sendable {
    public var event: String
    public var outcome: String
    public var key: KeyID?
    public var version: KeyVersion?
    public var principal: Principal?
    public var object: ID128?
    public var error: String?

    public init(_ event: String, outcome: String = "success", key: KeyID? = nil, version: KeyVersion? = nil,
                principal: Principal? = nil, object: ID128? = nil, error: String? = nil) {
        self.event = event
        self.outcome = outcome
        self.key = key
        self.version = version
        self.principal = principal
        self.object = object
        self.error = error
    }
}

enum AuditTrail {
    /// SHA-256(previous hash ‖ fields joined by U+001F): the link of the chain.
    static func chainHash(previous: Data, fields: [String]) -> [UInt8] {
        KeyDerivation.sha256([UInt8](previous) + Array(fields.joined(separator: "\u{1F}").utf8))
    }

    /// Appends `event` inside the caller's transaction.
    static func append(_ db: Database, _ e: AuditEvent, at time: Double) throws {
        var previous: Data?
        try append(db, e, at: time, previous: &previous)
    }

    /// Appends `event`, chaining to `previous` (read from the log when nil)
    /// and leaving the new record's hash there for the next append of a batch.
    static func append(_ db: Database, _ e: AuditEvent, at time: Double, previous chained: inout Data?) throws {
        let previous = try chained ?? Data.fetchOne(db, sql: "SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1") ?? Data(count: 32)
        let hash = chainHash(previous: previous, fields: [
            String(time), e.event, e.outcome, e.key?.rawValue.hex ?? "", e.version.map { String($0.rawValue) } ?? "",
            e.principal.map { String($0.uid) } ?? "", e.principal.map { String($0.gid) } ?? "",
            e.principal.map { String($0.pid) } ?? "", e.principal?.processName ?? "", e.object?.hex ?? "", e.error ?? "",
        ])
        try db.cachedStatement(sql: """
            INSERT INTO audit_log (time, event, outcome, key_id, key_version, uid, gid, pid, process, object_id, error, prev_hash, hash)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """).execute(arguments: [time, e.event, e.outcome, e.key?.rawValue.hex, e.version.map { Int($0.rawValue) },
                             e.principal.map { Int($0.uid) }, e.principal.map { Int($0.gid) }, e.principal.map { Int($0.pid) },
                             e.principal?.processName, e.object?.hex, e.error, previous, Data(hash)])
        chained = Data(hash)
    }
}

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension KeyManager {
    /// Records an event: while mounted, successes are batched with the usage
    /// journal (written within 100 ms) and anything else is flushed at once;
    /// unmounted, each event is its own transaction.
    public func audit(_ event: AuditEvent) {
        if let journal {
            do throws(KeyManagerError) {
                try journal.append(.audit(event, clock()))
                // Denials, refusals and integrity failures are written at once;
                // only routine successes wait for the batch.
                if event.outcome != "success" { try journal.flush() }
            } catch {
                logger.error("audit record could not be written", metadata: ["event": .string(event.event), "error": .string("\(error)")])
            }
            return
        }
        do {
            try db.write { db in try AuditTrail.append(db, event, at: clock()) }
        } catch {
            logger.error("audit record could not be written", metadata: ["event": .string(event.event), "error": .string("\(error)")])
        }
    }

    /// The newest audit records, oldest first.
    public func recentAudit(limit: Int = 20) throws(KeyManagerError) -> [AuditRecord] {
        try flushUsage()
        return try read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM (SELECT * FROM audit_log ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                             arguments: [limit]).map(AuditRecord.init(row:))
        }
    }
}

/// The outcome of checking the audit chain.
public struct AuditVerification: Sendable, Codable, Equatable {
    public var records: Int
    /// The first record whose link or content does not verify.
    public var firstBad: Int64?
    public var problem: String?
}

extension KeyManager {
    /// Recomputes the hash chain: an edited record fails its own hash; a
    /// removed or reordered one breaks the next record's link. (Cutting
    /// records off the end needs the signed digests, not built yet.)
    public func verifyAudit() throws(KeyManagerError) -> AuditVerification {
        try flushUsage()
        return try read { db in
            var previous = Data(count: 32)
            var count = 0
            let rows = try Row.fetchCursor(db, sql: "SELECT * FROM audit_log ORDER BY seq")
            while let row = try rows.next() {
                count += 1
                let seq: Int64 = row["seq"]
                let stored: Data = row["prev_hash"]
                guard stored == previous else {
                    return AuditVerification(records: count, firstBad: seq, problem: "record \(seq) does not follow the record before it (one was removed or reordered)")
                }
                func text(_ column: String) -> String {
                    let value: DatabaseValue = row[column]
                    switch value.storage {
                    case .null: return ""
                    case .int64(let n): return String(n)
                    case .double(let d): return String(d)
                    case .string(let t): return t
                    case .blob(let b): return b.map { String(format: "%02x", $0) }.joined()
                    }
                }
                let time: Double = row["time"]
                let hash = AuditTrail.chainHash(previous: previous, fields: [
                    String(time), text("event"), text("outcome"), text("key_id"), text("key_version"), text("uid"),
                    text("gid"), text("pid"), text("process"), text("object_id"), text("error"),
                ])
                let recorded: Data = row["hash"]
                guard Data(hash) == recorded else {
                    return AuditVerification(records: count, firstBad: seq, problem: "record \(seq) was altered")
                }
                previous = recorded
            }
            return AuditVerification(records: count, firstBad: nil, problem: nil)
        }
    }
}

/// A stored audit record as listed.
public struct AuditRecord: Sendable, Codable {
    public var seq: Int64
    public var time: Double
    public var event: String
    public var outcome: String
    public var keyID: String?
    public var keyVersion: Int?
    public var uid: Int?
    public var objectID: String?
    public var error: String?

    init(row: Row) {
        seq = row["seq"]; time = row["time"]; event = row["event"]; outcome = row["outcome"]
        keyID = row["key_id"]; keyVersion = row["key_version"]; uid = row["uid"]; objectID = row["object_id"]; error = row["error"]
    }
}
