import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// The tables that hang off `keys` — aliases, tags, policies, grants,
// decryption floors and directory bindings — as GRDB records: one struct
// per row, its columns named once, and every statement on these tables
// here. Callers (key administration, policy, grants, the record cache)
// say what they want (`AliasRow.target(of:)`, `PolicyRow.add`) instead of
// writing SQL. The writes run inside the caller's `sealedWrite`, so the
// keystore's MACs and audit chain cover them as before.

/// `aliases`: a name users know a key by; one alias names one key.
struct AliasRow: Codable, FetchableRecord, PersistableRecord, Equatable {
    static let databaseTableName = "aliases"
    var alias: String
    var keyID: String

    enum CodingKeys: String, CodingKey { case alias, keyID = "key_id" }
    enum Columns {
        static let alias = Column(CodingKeys.alias)
        static let keyID = Column(CodingKeys.keyID)
    }

    init(alias: String, key: KeyID) {
        self.alias = alias
        self.keyID = key.rawValue.hex
    }

    /// The id (hex) of the key `alias` names, or nil.
    static func target(of alias: String, _ db: Database) throws -> String? {
        try fetchOne(db, key: alias)?.keyID
    }

    /// The aliases of a key, sorted.
    static func aliases(of key: String, _ db: Database) throws -> [String] {
        try filter(Columns.keyID == key).order(Columns.alias).fetchAll(db).map(\.alias)
    }

    /// A key's alias rows, as stored (a backup merge copies them verbatim).
    static func rows(of key: String, _ db: Database) throws -> [AliasRow] {
        try filter(Columns.keyID == key).fetchAll(db)
    }

    /// Removes every alias of `key` (a destroyed key keeps no names).
    static func removeAll(of key: KeyID, _ db: Database) throws {
        _ = try filter(Columns.keyID == key.rawValue.hex).deleteAll(db)
    }

    /// Points `alias` at `key`, whether new or moved.
    static func point(_ alias: String, at key: KeyID, _ db: Database) throws {
        try AliasRow(alias: alias, key: key).upsert(db)
    }
}

/// `tags`: name=value labels of a key (environment, team, …).
struct TagRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "tags"
    var keyID: String
    var name: String
    var value: String

    enum CodingKeys: String, CodingKey { case keyID = "key_id", name, value }
    enum Columns {
        static let keyID = Column(CodingKeys.keyID)
        static let name = Column(CodingKeys.name)
    }

    init(key: KeyID, name: String, value: String) {
        self.keyID = key.rawValue.hex
        self.name = name
        self.value = value
    }

    static func tags(of key: String, _ db: Database) throws -> [String: String] {
        Dictionary(try filter(Columns.keyID == key).fetchAll(db).map { ($0.name, $0.value) }, uniquingKeysWith: { $1 })
    }

    /// A key's tag rows, as stored.
    static func rows(of key: String, _ db: Database) throws -> [TagRow] {
        try filter(Columns.keyID == key).fetchAll(db)
    }

    /// Sets tag `name` of `key` to `value`, or removes it when `value` is nil.
    static func set(_ name: String, of key: KeyID, to value: String?, _ db: Database) throws {
        if let value {
            try TagRow(key: key, name: name, value: value).upsert(db)
        } else {
            _ = try deleteOne(db, key: ["key_id": key.rawValue.hex, "name": name])
        }
    }
}

/// `policies`: who may use or administer a key — one row per operation and subject.
struct PolicyRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "policies"
    var keyID: String
    var operation: String
    var subject: String

    enum CodingKeys: String, CodingKey { case keyID = "key_id", operation, subject }
    enum Columns {
        static let keyID = Column(CodingKeys.keyID)
        static let operation = Column(CodingKeys.operation)
        static let subject = Column(CodingKeys.subject)
    }

    init(key: KeyID, operation: KeyOperation, subject: PolicySubject) {
        self.keyID = key.rawValue.hex
        self.operation = operation.rawValue
        self.subject = subject.description
    }

    /// A key's policy; rows kmsfs cannot read (an unknown operation or subject) give nothing.
    static func policy(of key: String, _ db: Database) throws -> [KeyOperation: Set<PolicySubject>] {
        var policy = [KeyOperation: Set<PolicySubject>]()
        for row in try filter(Columns.keyID == key).fetchAll(db) {
            if let op = KeyOperation(rawValue: row.operation), let subject = PolicySubject(argument: row.subject) {
                policy[op, default: []].insert(subject)
            }
        }
        return policy
    }

    /// A key's policy rows, as stored (unknown operations or subjects included).
    static func rows(of key: String, _ db: Database) throws -> [PolicyRow] {
        try filter(Columns.keyID == key).fetchAll(db)
    }

    /// Gives `operation` on `key` to `subject` (already given: nothing changes).
    static func add(_ operation: KeyOperation, on key: KeyID, to subject: PolicySubject, _ db: Database) throws {
        try PolicyRow(key: key, operation: operation, subject: subject).insert(db, onConflict: .ignore)
    }

    static func remove(_ operation: KeyOperation, on key: KeyID, from subject: PolicySubject, _ db: Database) throws {
        _ = try PolicyRow(key: key, operation: operation, subject: subject).delete(db)
    }

    /// The subjects that administer some key, and those that may use one
    /// (by policy, or by a grant not expired at `now`): the control socket's
    /// admission list.
    static func subjects(_ db: Database, at now: Double) throws -> (administrators: [String], users: [String]) {
        let administer = KeyOperation.administer.rawValue
        let administrators = try filter(Columns.operation == administer).select(Columns.subject, as: String.self).distinct().fetchAll(db)
        let byPolicy = try filter(Columns.operation != administer).select(Columns.subject, as: String.self).fetchAll(db)
        let byGrant = try GrantRow.filter(GrantRow.Columns.expiresAt == nil || GrantRow.Columns.expiresAt > now)
            .select(GrantRow.Columns.grantee, as: String.self).fetchAll(db)
        return (administrators, Array(Set(byPolicy + byGrant)))
    }
}

/// `grants`: scoped, optionally expiring permissions (AWS CreateGrant).
struct GrantRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "grants"
    var id: String
    var keyID: String
    var grantee: String
    /// Comma-separated operation names.
    var operations: String
    var createdAt: Double
    var expiresAt: Double?
    var createdBy: Int

    enum CodingKeys: String, CodingKey {
        case id, keyID = "key_id", grantee, operations, createdAt = "created_at", expiresAt = "expires_at", createdBy = "created_by"
    }
    enum Columns {
        static let id = Column(CodingKeys.id)
        static let keyID = Column(CodingKeys.keyID)
        static let grantee = Column(CodingKeys.grantee)
        static let createdAt = Column(CodingKeys.createdAt)
        static let expiresAt = Column(CodingKeys.expiresAt)
    }

    /// A key's grants, oldest first; rows kmsfs cannot read are left out.
    static func grants(of key: KeyID, _ db: Database) throws -> [KeyGrant] {
        try filter(Columns.keyID == key.rawValue.hex).order(Columns.createdAt, Columns.id).fetchAll(db).compactMap { $0.grant }
    }

    /// Removes grant `id` of `key`; false if the key has no such grant.
    @discardableResult
    static func remove(_ id: String, of key: KeyID, _ db: Database) throws -> Bool {
        try filter(Columns.id == id && Columns.keyID == key.rawValue.hex).deleteAll(db) > 0
    }

    var grant: KeyGrant? {
        guard let subject = PolicySubject(argument: grantee), let key = KeyID(hex: keyID) else { return nil }
        return KeyGrant(grantID: id, keyID: key, grantee: subject.description,
                        operations: operations.split(separator: ",").compactMap { KeyOperation(rawValue: String($0)) },
                        createdAt: createdAt, expiresAt: expiresAt, createdBy: UInt32(truncatingIfNeeded: createdBy))
    }
}

/// `key_floors`: the lowest version a key may still decrypt with (Vault's min_decryption_version).
struct FloorRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "key_floors"
    var keyID: String
    var minVersion: Int

    enum CodingKeys: String, CodingKey { case keyID = "key_id", minVersion = "min_version" }

    static func floor(of key: String, _ db: Database) throws -> KeyVersion? {
        try fetchOne(db, key: key).map { KeyVersion(rawValue: UInt32($0.minVersion)) }
    }

    /// Sets the floor of `key`, or lifts it when `version` is nil.
    static func set(_ version: KeyVersion?, of key: KeyID, _ db: Database) throws {
        if let version {
            try FloorRow(keyID: key.rawValue.hex, minVersion: Int(version.rawValue)).upsert(db)
        } else {
            _ = try deleteOne(db, key: key.rawValue.hex)
        }
    }
}

/// `bindings`: which key governs a directory tree. The path is kept only as
/// an HMAC (to find it) and sealed (to list it): no plaintext names at rest.
struct BindingRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "bindings"
    var pathMAC: Data
    var pathSealed: Data
    var keyID: String

    enum CodingKeys: String, CodingKey { case pathMAC = "path_mac", pathSealed = "path_sealed", keyID = "key_id" }
    enum Columns { static let keyID = Column(CodingKeys.keyID) }

    /// The key (hex) bound at the path whose HMAC is `mac`, or nil.
    static func key(at mac: Data, _ db: Database) throws -> String? { try fetchOne(db, key: mac)?.keyID }

    /// How many paths `key` is bound to.
    static func count(of key: KeyID, _ db: Database) throws -> Int {
        try filter(Columns.keyID == key.rawValue.hex).fetchCount(db)
    }
}
