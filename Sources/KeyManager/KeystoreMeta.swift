import ChunkCipher
import GRDB

/// A name in the keystore's `meta` table: the settings and markers kept
/// beside the keys (format, KDF parameters, wrapped keystore keys, the
/// integrity seal, audit and alert settings). Named once here instead of
/// as string literals at each use.
struct MetaName: RawRepresentable, Hashable, Sendable {
    let rawValue: String
    init(rawValue: String) { self.rawValue = rawValue }

    static let format = MetaName(rawValue: "format")
    static let filesystemID = MetaName(rawValue: "fs_id")
    static let chunkSize = MetaName(rawValue: "chunk_size")
    static let plaintextNames = MetaName(rawValue: "plaintext_names")
    static let scryptLogN = MetaName(rawValue: "scrypt_logn")
    static let scryptR = MetaName(rawValue: "scrypt_r")
    static let scryptP = MetaName(rawValue: "scrypt_p")
    static let salt = MetaName(rawValue: "salt")
    /// The filesystem id sealed under the passphrase's key: proves the passphrase.
    static let kekCheck = MetaName(rawValue: "kek_check")
    /// The key that authenticates the keystore's rows, sealed under the passphrase's key.
    static let metadataKey = MetaName(rawValue: "metadata_key")
    static let createdAt = MetaName(rawValue: "created_at")
    /// The first audit record chained with a keyed MAC (older ones: SHA-256).
    static let auditKeyedFrom = MetaName(rawValue: "audit_keyed_from")
    static let auditPaths = MetaName(rawValue: "audit_paths")
    static let alertConfig = MetaName(rawValue: "alert_config")
    /// The generation and MAC over all row MACs (KeystoreIntegrity).
    static let integritySeal = MetaName(rawValue: "integrity_seal")
    /// Set while a mount batches usage changes: its process id.
    static let usageJournalPID = MetaName(rawValue: "usage_journal_pid")
    /// When the rotation-overdue alert last fired for a key.
    static func rotationAlerted(_ key: KeyID) -> MetaName { MetaName(rawValue: rotationAlertedPrefix + key.rawValue.hex) }
    static let rotationAlertedPrefix = "alerted_rotation_"
}

/// The `meta` table: one value per name.
enum KeystoreMeta {
    static func value<Value: DatabaseValueConvertible>(_ name: MetaName, _ db: Database, as type: Value.Type = Value.self) throws -> Value? {
        try Value.fetchOne(db, sql: "SELECT value FROM meta WHERE name = ?", arguments: [name.rawValue])
    }

    /// Every name and value (as stored), for reading the keystore's settings at open.
    static func all(_ db: Database) throws -> [MetaName: DatabaseValue] {
        var meta = [MetaName: DatabaseValue]()
        for row in try Row.fetchAll(db, sql: "SELECT name, value FROM meta") { meta[MetaName(rawValue: row["name"])] = row["value"] as DatabaseValue }
        return meta
    }

    /// Sets `name` to `value`, adding it if absent.
    static func set(_ name: MetaName, to value: some DatabaseValueConvertible, _ db: Database) throws {
        try db.execute(sql: "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                       arguments: [name.rawValue, value])
    }

    static func remove(_ name: MetaName, _ db: Database) throws {
        try db.execute(sql: "DELETE FROM meta WHERE name = ?", arguments: [name.rawValue])
    }
}
