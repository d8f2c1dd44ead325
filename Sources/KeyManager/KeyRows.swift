import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// The key rows themselves — `keys`, their versions and rotations, and
// where a key held outside the keystore lives — as GRDB records with every
// statement on those tables (the satellites are in KeyTables.swift).

/// `keys`: one row per master key — its spec, lifecycle state and schedule.
struct KeyRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "keys"
    var id: String
    var spec: String
    var state: String
    var description: String
    var createdAt: Double
    var stateChangedAt: Double
    var currentVersion: Int
    var rotationDays: Int?
    var lastRotatedAt: Double
    var deletionDate: Double?
    var successor: String?

    enum CodingKeys: String, CodingKey {
        case id, spec, state, description, createdAt = "created_at", stateChangedAt = "state_changed_at",
             currentVersion = "current_version", rotationDays = "rotation_days", lastRotatedAt = "last_rotated_at",
             deletionDate = "deletion_date", successor
    }
    enum Columns {
        static let id = Column(CodingKeys.id)
        static let state = Column(CodingKeys.state)
        static let stateChangedAt = Column(CodingKeys.stateChangedAt)
        static let createdAt = Column(CodingKeys.createdAt)
        static let currentVersion = Column(CodingKeys.currentVersion)
        static let deletionDate = Column(CodingKeys.deletionDate)
        static let successor = Column(CodingKeys.successor)
    }

    static func fetch(_ key: String, _ db: Database) throws -> KeyRow? { try fetchOne(db, key: key) }

    /// Every key, oldest first.
    static func all(_ db: Database) throws -> [KeyRow] { try order(Columns.createdAt, Columns.id).fetchAll(db) }

    /// Moves `key` from state `from` to `to` (with `also`, one more column
    /// the action sets); false if the key was no longer in `from` — another
    /// process changed it meanwhile.
    static func move(_ key: KeyID, from: KeyState, to: KeyState, at time: Double, also: ColumnAssignment?, _ db: Database) throws -> Bool {
        var assignments = [Columns.state.set(to: to.rawValue), Columns.stateChangedAt.set(to: time)]
        if let also { assignments.append(also) }
        return try filter(Columns.id == key.rawValue.hex && Columns.state == from.rawValue).updateAll(db, assignments) == 1
    }

    /// Marks `key` destroyed (its versions' material is erased separately).
    static func destroy(_ key: KeyID, at time: Double, _ db: Database) throws {
        _ = try filter(Columns.id == key.rawValue.hex)
            .updateAll(db, Columns.state.set(to: KeyState.destroyed.rawValue), Columns.stateChangedAt.set(to: time))
    }
}

/// `key_versions`: each version of each key — its material sealed under the
/// passphrase's key (nil once retired or destroyed, or for a key held
/// outside), and for signing keys the public key.
struct KeyVersionRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "key_versions"
    var keyID: String
    var version: Int
    var createdAt: Double
    var material: Data?
    var publicKey: Data?
    var retired: Int

    enum CodingKeys: String, CodingKey { case keyID = "key_id", version, createdAt = "created_at", material, publicKey = "public_key", retired }
    enum Columns {
        static let keyID = Column(CodingKeys.keyID)
        static let version = Column(CodingKeys.version)
        static let material = Column(CodingKeys.material)
        static let publicKey = Column(CodingKeys.publicKey)
        static let retired = Column(CodingKeys.retired)
    }

    init(key: KeyID, version: KeyVersion, createdAt: Double, material: Data?, publicKey: Data? = nil, retired: Bool = false) {
        self.keyID = key.rawValue.hex
        self.version = Int(version.rawValue)
        self.createdAt = createdAt
        self.material = material
        self.publicKey = publicKey
        self.retired = retired ? 1 : 0
    }

    var isRetired: Bool { retired != 0 }
    var key: KeyID? { KeyID(hex: keyID) }
    var keyVersion: KeyVersion { KeyVersion(rawValue: UInt32(version)) }

    private static func one(_ key: String, _ version: KeyVersion) -> QueryInterfaceRequest<KeyVersionRow> {
        filter(Columns.keyID == key && Columns.version == Int(version.rawValue))
    }

    static func fetch(_ key: String, _ version: KeyVersion, _ db: Database) throws -> KeyVersionRow? {
        try one(key, version).fetchOne(db)
    }

    /// A signing key version's public key (DER), or nil.
    static func publicKey(of key: String, _ version: KeyVersion, _ db: Database) throws -> Data? {
        try fetch(key, version, db)?.publicKey
    }

    /// A version's sealed material, or nil — also nil, with `liveOnly`, once the version is retired.
    static func material(of key: KeyID, _ version: KeyVersion, liveOnly: Bool, _ db: Database) throws -> Data? {
        guard let row = try fetch(key.rawValue.hex, version, db), !(liveOnly && row.isRetired) else { return nil }
        return row.material
    }

    /// Every version still holding material (for rewrapping it under a new passphrase).
    static func withMaterial(_ db: Database) throws -> [KeyVersionRow] {
        try filter(Columns.material != nil).fetchAll(db)
    }

    static func replaceMaterial(of key: KeyID, _ version: KeyVersion, with material: Data, _ db: Database) throws {
        _ = try one(key.rawValue.hex, version).updateAll(db, Columns.material.set(to: material))
    }

    /// A key's versions, oldest first, each with how many objects it wraps (for `key describe`).
    static func versions(of key: KeyID, _ db: Database) throws -> [KeyVersionInfo] {
        let counts = try UsageRow.countsByVersion(of: key, db)
        return try filter(Columns.keyID == key.rawValue.hex).order(Columns.version).fetchAll(db).map { row in
            KeyVersionInfo(version: row.keyVersion, createdAt: row.createdAt, retired: row.isRetired, usageCount: counts[row.keyVersion] ?? 0)
        }
    }

    /// Retires `version` of `key` (or, with nil, every version): its material is erased.
    static func retire(_ key: KeyID, version: KeyVersion?, _ db: Database) throws {
        let rows = version.map { one(key.rawValue.hex, $0) } ?? filter(Columns.keyID == key.rawValue.hex)
        _ = try rows.updateAll(db, Columns.retired.set(to: 1), Columns.material.set(to: nil))
    }
}

/// `rotations`: how each version after the first came about (AUTOMATIC or ON_DEMAND).
struct RotationRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "rotations"
    var keyID: String
    var version: Int
    var time: Double
    var type: String

    enum CodingKeys: String, CodingKey { case keyID = "key_id", version, time, type }

    /// What older builds recorded an automatic rotation as, before this table kept the type.
    static let legacyAutomatic = "RotateKeyAutomatically"

    /// Every rotation of `key`, oldest first: each version after the first,
    /// with its type from this table or, for rotations made before it
    /// existed, from the audit record that made the version.
    static func history(of key: KeyID, _ db: Database) throws -> [KeyRotation] {
        let names = [AuditAction.rotateKey.rawValue, legacyAutomatic, AuditAction.rotateKeyOnDemand.rawValue]
        return try Row.fetchAll(db, sql: """
            SELECT v.version, v.created_at, r.type,
                (SELECT a.event FROM audit_log a WHERE a.key_id = v.key_id AND a.key_version = v.version
                    AND a.event IN (?, ?, ?) ORDER BY a.seq LIMIT 1) AS event
            FROM key_versions v LEFT JOIN rotations r ON r.key_id = v.key_id AND r.version = v.version
            WHERE v.key_id = ? AND v.version > 1 ORDER BY v.version
            """, arguments: StatementArguments(names + [key.rawValue.hex])).map { row in
            let recorded = (row["type"] as String?).flatMap(RotationType.init(rawValue:))
            let legacy: RotationType = (row["event"] as String?) == legacyAutomatic ? .automatic : .onDemand
            return KeyRotation(keyID: key, version: KeyVersion(rawValue: UInt32(row["version"] as Int)),
                               rotationDate: row["created_at"], rotationType: recorded ?? legacy)
        }
    }
}

/// `external_keys`: where a key held outside the keystore lives (AWS KMS,
/// a PKCS#11 token): its provider and configuration (JSON ExternalKeyConfig).
struct ExternalKeyRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "external_keys"
    var keyID: String
    var provider: String
    var config: String

    enum CodingKeys: String, CodingKey { case keyID = "key_id", provider, config }
    enum Columns { static let keyID = Column(CodingKeys.keyID) }

    static func fetch(_ key: KeyID, _ db: Database) throws -> ExternalKeyRow? { try fetchOne(db, key: key.rawValue.hex) }

    /// The ids (hex) of every external key.
    static func keys(_ db: Database) throws -> [String] { try select(Columns.keyID, as: String.self).fetchAll(db) }
}

/// `intermediate_keys`: keys an external provider encrypted, each wrapping
/// many data keys (one provider call per intermediate, not per file).
struct IntermediateKeyRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "intermediate_keys"
    var id: String
    var keyID: String
    var version: Int
    var blob: Data
    var createdAt: Double

    enum CodingKeys: String, CodingKey { case id, keyID = "key_id", version, blob, createdAt = "created_at" }
    enum Columns {
        static let id = Column(CodingKeys.id)
        static let keyID = Column(CodingKeys.keyID)
        static let version = Column(CodingKeys.version)
    }

    /// The blob of intermediate `id`, if it belongs to `key` `version`.
    static func blob(_ id: ID128, key: KeyID, version: KeyVersion, _ db: Database) throws -> Data? {
        try filter(Columns.id == id.hex && Columns.keyID == key.rawValue.hex && Columns.version == Int(version.rawValue)).fetchOne(db)?.blob
    }
}
