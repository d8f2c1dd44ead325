import ChunkCipher
import GRDB
#if canImport(Glibc)
import Glibc
#endif

/// How a key operation ended, as audit records store it (the `outcome`
/// column; exports map it to CloudTrail's error codes and OCSF's status).
public enum AuditOutcome: String, Sendable, Codable, CaseIterable {
    case success
    /// A key policy or grant did not allow the caller.
    case denied
    /// The key's state, a limit or a guard refused the operation.
    case refused
    /// The request itself was invalid (an unknown key, a bad value).
    case invalid
    /// Something failed underneath (a provider, a database, a file).
    case failure
    /// Stored data did not authenticate.
    case integrityFailure = "integrity-failure"
    /// Worth a record but not a failure (a mount without open auditing).
    case warning
}

/// One audit event. Records are hash-chained: each stores the previous
/// record's hash, so an edit, a deletion or a reordering breaks the chain.
public struct AuditEvent: Sendable {
    public var event: AuditAction
    public var outcome: AuditOutcome
    public var key: KeyID?
    public var version: KeyVersion?
    public var principal: Principal?
    public var object: ID128?
    public var error: String?
    /// The file's plaintext path; the key manager stores it as the audit
    /// path setting says (a keyed hash by default).
    public var path: String?
    /// What an admin request asked for, as JSON (CloudTrail's
    /// requestParameters): which alias, subject, path or successor. Never secrets.
    public var request: String?

    public init(_ event: AuditAction, outcome: AuditOutcome = .success, key: KeyID? = nil, version: KeyVersion? = nil,
                principal: Principal? = nil, object: ID128? = nil, error: String? = nil, path: String? = nil,
                request: [String: String]? = nil) {
        self.path = path
        self.request = request.flatMap(AuditEvent.encodeRequest)
        self.event = event
        self.outcome = outcome
        self.key = key
        self.version = version
        self.principal = principal
        self.object = object
        self.error = error
    }
}

extension AuditEvent {
    /// `parameters` as one JSON object with sorted keys.
    static func encodeRequest(_ parameters: [String: String]) -> String? {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? encoder.encode(parameters)).map { String(decoding: $0, as: UTF8.self) }
    }
}

enum AuditTrail {
    /// The fields after the fixed ones: the path if any, then the request
    /// parameters if any, marked so the two can never be confused.
    static func optionalFields(path: String?, request: String?) -> [String] {
        (path.map { [$0] } ?? []) + (request.map { ["request:" + $0] } ?? [])
    }

    /// SHA-256(previous hash ‖ fields joined by U+001F): the link of the chain.
    /// (Built in one buffer: this runs for every record a mount writes.)
    ///
    /// Records a sealed keystore writes (from `meta.audit_keyed_from` on) use
    /// HMAC-SHA256 under the keystore's integrity key instead, so no one
    /// without the passphrase can append or rewrite records, not even after
    /// the newest signed digest.
    static func chainHash(previous: Data, key: KeyDerivation.KeyedHMAC? = nil, fields: [String]) -> [UInt8] {
        var message = [UInt8]()
        message.reserveCapacity(previous.count + fields.reduce(fields.count) { $0 + $1.utf8.count })
        message.append(contentsOf: previous)
        for (i, field) in fields.enumerated() {
            if i > 0 { message.append(0x1F) }
            message.append(contentsOf: field.utf8)
        }
        return key.map { $0.mac(message) } ?? KeyDerivation.sha256(message)
    }

    /// Appends `event` inside the caller's transaction.
    static func append(_ db: Database, chain key: KeyDerivation.KeyedHMAC, _ e: AuditEvent, at time: Double) throws {
        var previous: Data?
        try append(db, chain: key, e, at: time, previous: &previous)
    }

    /// Appends `event`, chaining to `previous` (read from the log when nil)
    /// and leaving the new record's hash there for the next append of a batch.
    static func append(_ db: Database, chain key: KeyDerivation.KeyedHMAC, _ e: AuditEvent, at time: Double,
                       previous chained: inout Data?) throws {
        let previous = try chained ?? AuditLogTable.tail(db)?.hash ?? Data(count: 32)
        let hash = chainHash(previous: previous, key: key, fields: [
            String(time), e.event.rawValue, e.outcome.rawValue, e.key?.rawValue.hex ?? "", e.version.map { String($0.rawValue) } ?? "",
            e.principal.map { String($0.uid) } ?? "", e.principal.map { String($0.gid) } ?? "",
            e.principal.map { String($0.pid) } ?? "", e.principal?.processName ?? "", e.object?.hex ?? "", e.error ?? "",
        ] + optionalFields(path: e.path, request: e.request))
        try db.cachedStatement(sql: """
            INSERT INTO audit_log (time, event, outcome, key_id, key_version, uid, gid, pid, process, object_id, error, path, request, prev_hash, hash)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """).execute(arguments: [time, e.event.rawValue, e.outcome.rawValue, e.key?.rawValue.hex, e.version.map { Int($0.rawValue) },
                             e.principal.map { Int($0.uid) }, e.principal.map { Int($0.gid) }, e.principal.map { Int($0.pid) },
                             e.principal?.processName, e.object?.hex, e.error, e.path, e.request, previous, Data(hash)])
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
        var event = event
        if let path = event.path { event.path = storedAuditPath(path) }
        observeForAlerts(event)
        if let key = event.key, countsKeyUse.load(ordering: .relaxed) {
            keyUse.withLock { $0[KeyUse(event: event.event, outcome: event.outcome, key: key), default: 0] += 1 }
        }
        if !auditsRoutineUse.load(ordering: .relaxed), event.outcome == .success,
           event.event == .decrypt || event.event == .generateDataKey { return }
        if let journal {
            do throws(KeyManagerError) {
                try journal.append(.audit(event, clock()))
                // Denials, refusals and integrity failures are written at once;
                // only routine successes wait for the batch.
                if event.outcome != .success { try journal.flush() }
            } catch {
                logger.error("audit record could not be written", metadata: ["event": .string(event.event.rawValue), "error": .string("\(error)")])
            }
            return
        }
        do {
            try db.write { db in try AuditTrail.append(db, chain: integrity.hmac, event, at: clock()) }
        } catch {
            logger.error("audit record could not be written", metadata: ["event": .string(event.event.rawValue), "error": .string("\(error)")])
        }
    }

    /// The newest audit records, oldest first.
    public func recentAudit(limit: Int = 20) throws(KeyManagerError) -> [AuditRecord] {
        try auditRecords(AuditFilter(), limit: limit)
    }

    /// The newest `limit` records matching `filter` (nil: all), oldest first.
    public func auditRecords(_ filter: AuditFilter, limit: Int?) throws(KeyManagerError) -> [AuditRecord] {
        try flushUsage()
        let key = try filter.key.map { (reference) throws(KeyManagerError) in try resolve(reference) }
        var administered: [String]?
        if let viewer = filter.viewer, viewer.uid != 0 {
            administered = try verifiedRead({ db in try KeyRecord.fetchAll(db) })
                .filter { rec in rec.policy[.administer, default: []].contains { $0.matches(viewer) } }
                .map { $0.id.rawValue.hex }
        }
        return try read { db in try AuditLogTable.records(filter, key: key, administered: administered, limit: limit, db) }
    }
}

/// The outcome of checking the audit chain.
public struct AuditVerification: Sendable, Codable, Equatable {
    public var records: Int
    /// Signed digests checked.
    public var digests = 0
    /// The first record whose link or content does not verify.
    public var firstBad: Int64?
    public var problem: String?
}

extension KeyManager {
    /// Recomputes the hash chain: an edited record fails its own hash; a
    /// removed or reordered one breaks the next record's link; records cut
    /// off the end (or a rewritten chain) are caught by the signed digests.
    public func verifyAudit() throws(KeyManagerError) -> AuditVerification {
        try flushUsage()
        return try read { db in
            // The digest key's public half and spec are protected rows: an
            // edited keystore fails here, before any signature is trusted.
            let (findings, _) = try integrity.verify(db)
            if !findings.isEmpty {
                return AuditVerification(records: 0, firstBad: nil,
                                         problem: "the keystore was edited outside kmsfs: " + findings.joined(separator: "; "))
            }
            let keyedFrom = try KeystoreMeta.value(.auditKeyedFrom, db, as: Int64.self) ?? 1
            var previous = Data(count: 32)
            var count = 0
            let rows = try AuditLogTable.walk(db)
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
                let hash = AuditTrail.chainHash(previous: previous, key: seq >= keyedFrom ? integrity.hmac : nil, fields: [
                    String(time), text("event"), text("outcome"), text("key_id"), text("key_version"), text("uid"),
                    text("gid"), text("pid"), text("process"), text("object_id"), text("error"),
                ] + AuditTrail.optionalFields(path: row["path"], request: row["request"]))
                let recorded: Data = row["hash"]
                guard Data(hash) == recorded else {
                    return AuditVerification(records: count, firstBad: seq, problem: "record \(seq) was altered")
                }
                previous = recorded
            }
            if let bad = try verifyDigests(db, records: count) { return bad }
            let digests = try AuditDigestRow.fetchCount(db)
            return AuditVerification(records: count, digests: digests, firstBad: nil, problem: nil)
        }
    }
}

/// Which audit records to list or export (every field optional).
public struct AuditFilter: Sendable, Codable, Equatable {
    public var since: Double?
    public var until: Double?
    /// A key id or alias.
    public var key: String?
    public var event: String?
    public var uid: UInt32?
    public var outcome: String?
    /// When set (a non-root peer of a live mount), only records of keys it
    /// administers and its own records: one team does not read another's trail.
    public var viewer: Principal?
    public init(since: Double? = nil, until: Double? = nil, key: String? = nil, event: String? = nil, uid: UInt32? = nil, outcome: String? = nil) {
        self.since = since
        self.until = until
        self.key = key
        self.event = event
        self.uid = uid
        self.outcome = outcome
    }
}

/// A stored audit record as listed.
/// One kind of key use this process has audited (counted even when routine
/// successes are not written): for the daemon's metrics.
public struct KeyUse: Hashable, Sendable {
    public var event: AuditAction
    public var outcome: AuditOutcome
    public var key: KeyID
}

public struct AuditRecord: Sendable, Codable {
    public var seq: Int64
    public var time: Double
    public var event: String
    public var outcome: String
    public var keyID: String?
    public var keyVersion: Int?
    public var uid: Int?
    public var gid: Int?
    public var pid: Int?
    public var process: String?
    public var objectID: String?
    public var error: String?
    public var path: String?
    /// The request's parameters (JSON object text), for admin operations.
    public var request: String?

    init(row: Row) {
        path = row["path"]
        request = row["request"]
        seq = row["seq"]; time = row["time"]; event = row["event"]; outcome = row["outcome"]
        keyID = row["key_id"]; keyVersion = row["key_version"]; uid = row["uid"]; gid = row["gid"]; pid = row["pid"]
        process = row["process"]; objectID = row["object_id"]; error = row["error"]
    }
}
