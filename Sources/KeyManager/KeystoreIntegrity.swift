import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Authenticates every keystore row whose edit would grant something: key
/// states and versions, aliases, tags, policies, bindings, the filesystem's
/// settings and rekey jobs. Someone who can write CIPHERDIR but holds no
/// passphrase can still edit the SQLite file; without this, flipping a
/// Disabled key back to Enabled or inserting a policy row would be obeyed.
///
/// Each protected row has an HMAC-SHA256 (under a key derived from the
/// KEK-wrapped metadata key) in `row_macs`, and the whole set of row MACs is
/// sealed with a generation number in `meta.integrity_seal`. A changed or
/// added row fails its own MAC, which names it; a removed row, or a row put
/// back from an older copy with its old MAC, fails the seal. Every admin
/// write verifies first and reseals after, in one transaction
/// (`KeyManager.sealedWrite`); every load of a key record, binding map or
/// setting verifies the whole set (it is small: rows per key, not per file).
///
/// Not covered, by design: the usage index and audit log (rebuilt by fsck,
/// and hash-chained and signed, respectively), rekey progress counters, and
/// a rollback of the whole keystore file to an older copy while unmounted
/// (docs/THREAT-MODEL.md).
struct KeystoreIntegrity {
    /// One protected table: its primary key and the columns that are authenticated.
    struct Table {
        var name: String
        var primaryKey: [String]
        var columns: [String]
        /// Rows of the table left out (volatile bookkeeping).
        var exclude: String?
    }

    /// Meta entries written on busy paths that grant nothing (names from
    /// `MetaName`, so a renamed entry cannot silently become protected).
    static let volatileMeta = "name IN ('\(MetaName.usageJournalPID.rawValue)', '\(MetaName.integritySeal.rawValue)') "
        + "OR name LIKE '\(MetaName.rotationAlertedPrefix)%'"

    static let tables: [Table] = [
        Table(name: "meta", primaryKey: ["name"], columns: ["name", "value"], exclude: volatileMeta),
        Table(name: "keys", primaryKey: ["id"], columns: [
            "id", "spec", "state", "description", "created_at", "state_changed_at", "current_version", "rotation_days",
            "last_rotated_at", "deletion_date", "successor"]),
        Table(name: "key_versions", primaryKey: ["key_id", "version"],
              columns: ["key_id", "version", "created_at", "material", "public_key", "retired"]),
        Table(name: "aliases", primaryKey: ["alias"], columns: ["alias", "key_id"]),
        Table(name: "tags", primaryKey: ["key_id", "name"], columns: ["key_id", "name", "value"]),
        Table(name: "bindings", primaryKey: ["path_mac"], columns: ["path_mac", "path_sealed", "key_id"]),
        Table(name: "policies", primaryKey: ["key_id", "operation", "subject"], columns: ["key_id", "operation", "subject"]),
        Table(name: "rotations", primaryKey: ["key_id", "version"], columns: ["key_id", "version", "time", "type"]),
        Table(name: "grants", primaryKey: ["id"], columns: ["id", "key_id", "grantee", "operations", "created_at", "expires_at", "created_by"]),
        Table(name: "key_floors", primaryKey: ["key_id"], columns: ["key_id", "min_version"]),
        // Which external key a kmsfs key is: redirecting it would hand files to another KMS key.
        Table(name: "external_keys", primaryKey: ["key_id"], columns: ["key_id", "provider", "config"]),
        // A job's identity and state, not its progress counters (written per file).
        Table(name: "rekey_jobs", primaryKey: ["id"], columns: [
            "id", "state", "mode", "source_key", "source_version", "target_key", "path", "rate", "workers", "uid", "gid", "created_at"]),
    ]

    let hmac: KeyDerivation.KeyedHMAC

    init(metadataKey: borrowing SecretKey) throws(KeyManagerError) {
        do throws(CipherError) {
            let key = try KeyDerivation.hkdfSHA256(key: metadataKey, info: "kmsfs/v1/keystore-integrity", count: 32)
            hmac = KeyDerivation.KeyedHMAC(key: key)
        } catch { throw .crypto(error.description) }
    }

    /// A row's identity for `row_macs` and for messages: its primary key values.
    static func rowName(_ row: Row, _ table: Table) -> String {
        table.primaryKey.map { column -> String in
            switch (row[column] as DatabaseValue).storage {
            case .null: return "NULL"
            case .int64(let v): return String(v)
            case .double(let v): return String(v)
            case .string(let s): return s
            case .blob(let d): return d.map { String(format: "%02x", $0) }.joined()
            }
        }.joined(separator: "/")
    }

    /// A length-prefixed, type-tagged encoding of the authenticated columns.
    static func encode(_ row: Row, _ table: Table, into out: inout [UInt8]) {
        func put(_ bytes: some Collection<UInt8>) {
            withUnsafeBytes(of: UInt32(bytes.count).bigEndian) { out.append(contentsOf: $0) }
            out.append(contentsOf: bytes)
        }
        put(Array(table.name.utf8))
        for column in table.columns {
            put(Array(column.utf8))
            switch (row[column] as DatabaseValue).storage {
            case .null: out.append(0)
            case .int64(let v): out.append(1); withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) }
            case .double(let v): out.append(2); withUnsafeBytes(of: v.bitPattern.bigEndian) { out.append(contentsOf: $0) }
            case .string(let s): out.append(3); put(Array(s.utf8))
            case .blob(let d): out.append(4); put(d)
            }
        }
    }

    /// The MAC of every protected row, keyed by (table, row name).
    func computeRowMACs(_ db: Database) throws -> [RowRef: Data] {
        var macs = [RowRef: Data]()
        for table in Self.tables {
            let filter = table.exclude.map { " WHERE NOT (\($0))" } ?? ""
            for row in try Row.fetchAll(db, sql: "SELECT \(table.columns.joined(separator: ", ")) FROM \(table.name)\(filter)") {
                var message = Array("kmsfs/v1/row".utf8)
                Self.encode(row, table, into: &message)
                macs[RowRef(table: table.name, row: Self.rowName(row, table))] = Data(hmac.mac(message))
            }
        }
        return macs
    }

    /// The seal over all stored row MACs and the generation.
    func seal(_ stored: [RowRef: Data], generation: UInt64) -> Data {
        var message = Array("kmsfs/v1/keystore-seal".utf8)
        withUnsafeBytes(of: generation.bigEndian) { message.append(contentsOf: $0) }
        for ref in stored.keys.sorted() {
            for part in [Array(ref.table.utf8), Array(ref.row.utf8), [UInt8](stored[ref] ?? Data())] {
                withUnsafeBytes(of: UInt32(part.count).bigEndian) { message.append(contentsOf: $0) }
                message.append(contentsOf: part)
            }
        }
        var out = Data()
        withUnsafeBytes(of: generation.bigEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: hmac.mac(message))
        return out
    }

    struct RowRef: Hashable, Comparable {
        var table: String
        var row: String
        static func < (a: RowRef, b: RowRef) -> Bool { (a.table, a.row) < (b.table, b.row) }
    }

    /// What an outside edit changed, one line per row (empty: nothing), and the sealed generation.
    func verify(_ db: Database) throws -> (findings: [String], generation: UInt64) {
        var stored = [RowRef: Data]()
        for row in try Row.fetchAll(db, sql: "SELECT tbl, row, mac FROM row_macs") {
            stored[RowRef(table: row["tbl"], row: row["row"])] = row["mac"]
        }
        guard let sealBlob = try KeystoreMeta.value(.integritySeal, db, as: Data.self), sealBlob.count == 40 else {
            return (["the keystore's integrity seal was removed"], 0)
        }
        let generation = sealBlob.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        var findings = [String]()
        let actual = try computeRowMACs(db)
        for ref in actual.keys.sorted() {
            guard let mac = stored[ref] else { findings.append("\(ref.table) row \(ref.row) was added"); continue }
            if mac != actual[ref] { findings.append("\(ref.table) row \(ref.row) was changed") }
        }
        for ref in stored.keys.sorted() where actual[ref] == nil {
            findings.append("\(ref.table) row \(ref.row) was removed")
        }
        if findings.isEmpty, seal(stored, generation: generation) != sealBlob {
            findings.append("the set of protected rows was replaced by another copy (rows restored from an older keystore or their records edited)")
        }
        return (findings, generation)
    }

    /// Records the current rows as authentic, under the next generation.
    func reseal(_ db: Database, generation: UInt64) throws {
        let macs = try computeRowMACs(db)
        try db.execute(sql: "DELETE FROM row_macs")
        for (ref, mac) in macs {
            try db.execute(sql: "INSERT INTO row_macs (tbl, row, mac) VALUES (?, ?, ?)", arguments: [ref.table, ref.row, mac])
        }
        try KeystoreMeta.set(.integritySeal, to: seal(macs, generation: generation), db)
    }

    /// A MAC binding a record that is not a protected row (a rekey intent) to this keystore.
    func mac(_ label: String, _ parts: [[UInt8]]) -> Data {
        var message = Array(label.utf8)
        for part in parts {
            withUnsafeBytes(of: UInt32(part.count).bigEndian) { message.append(contentsOf: $0) }
            message.append(contentsOf: part)
        }
        return Data(hmac.mac(message))
    }
}

extension KeyManager {
    /// A write to protected rows: verifies them first (an outside edit is
    /// refused, audited and named), runs `body`, and reseals — one transaction.
    func sealedWrite<T>(_ body: (Database) throws -> T) throws(KeyManagerError) -> T {
        let result: Result<(T, UInt64), KeyManagerError> = try write { db in
            let (findings, generation) = try integrity.verify(db)
            guard findings.isEmpty else { return .failure(.keystoreTampered(findings)) }
            let value = try body(db)
            try integrity.reseal(db, generation: generation + 1)
            return .success((value, generation + 1))
        }
        switch result {
        case .success(let (value, generation)):
            // Noted once committed: a reader must never be held to a generation it cannot see yet.
            noteGeneration(generation)
            return value
        case .failure(let error):
            reportTampering(error)
            throw error
        }
    }

    /// Verifies the protected rows as seen by `db` (inside the caller's read).
    /// `seen` is the newest generation this process had seen committed
    /// before the read began: its snapshot must be at least that new.
    func verifyIntegrity(_ db: Database, seen: UInt64) throws {
        let (findings, generation) = try integrity.verify(db)
        if !findings.isEmpty { throw KeyManagerError.keystoreTampered(findings) }
        // A generation older than one this process saw committed before this read
        // started is a rollback. (Compared with the value now, a snapshot taken
        // just before another thread's commit would look rolled back: it failed
        // a live rekey about once in six runs.)
        if generation < seen {
            throw KeyManagerError.keystoreTampered(["the protected rows were rolled back to an older copy (generation \(generation) after \(seen))"])
        }
        noteGeneration(generation)
    }

    /// A read whose rows are first checked against the seal.
    func verifiedRead<T>(_ body: (Database) throws -> T) throws(KeyManagerError) -> T {
        let seen = caches.withLock { $0.integrityGeneration }
        do {
            return try read { db in
                try verifyIntegrity(db, seen: seen)
                return try body(db)
            }
        } catch {
            reportTampering(error)
            throw error
        }
    }

    func noteGeneration(_ generation: UInt64) {
        caches.withLock { $0.integrityGeneration = max($0.integrityGeneration, generation) }
    }

    /// Audits (once per distinct finding set) and alerts on an outside edit.
    func reportTampering(_ error: KeyManagerError) {
        guard case .keystoreTampered(let findings) = error else { return }
        let fresh = caches.withLock { caches -> Bool in
            guard caches.reportedTampering != findings else { return false }
            caches.reportedTampering = findings
            return true
        }
        guard fresh else { return }
        logger.critical("keystore edited outside kmsfs", metadata: ["findings": .string(findings.joined(separator: "; "))])
        audit(AuditEvent(.keystoreIntegrityFailure, outcome: .failure, error: findings.joined(separator: "; ")))
        raise(Alert(time: clock(), rule: "integrity", severity: "critical",
                    message: "the keystore was edited outside kmsfs: " + findings.joined(separator: "; ")))
    }

    /// Accepts the protected rows as they are now (an administrator who
    /// knows the passphrase vouches for them), audited with what differed.
    public func acceptKeystoreEdits(by principal: Principal) throws(KeyManagerError) -> [String] {
        try write { db in
            let (findings, generation) = try integrity.verify(db)
            try integrity.reseal(db, generation: generation + 1)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.acceptKeystoreEdits, principal: principal,
                                                 error: findings.isEmpty ? "no edits" : findings.joined(separator: "; ")), at: clock())
            caches.withLock { $0.reportedTampering = []; $0.integrityGeneration = generation + 1 }
            return findings
        }
    }

    /// The protected rows' state: empty when nothing was edited outside kmsfs.
    public func integrityFindings() throws(KeyManagerError) -> [String] {
        try read { db in try integrity.verify(db).findings }
    }
}
