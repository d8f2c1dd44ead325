import ChunkCipher
import GRDB

/// One row of `keys` with its aliases, tags and policy: what the lifecycle
/// and policy checks need.
struct KeyRecord: Sendable {
    var metadata: KeyMetadata
    var policy: [KeyOperation: Set<PolicySubject>]

    var id: KeyID { metadata.keyID }
    var state: KeyState { metadata.state }

    static func fetch(_ db: Database, _ key: KeyID) throws -> KeyRecord {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM keys WHERE id = ?", arguments: [key.rawValue.hex]) else {
            throw KeyManagerError.keyNotFound(key.rawValue.hex)
        }
        return try decode(db, row)
    }

    static func fetchAll(_ db: Database) throws -> [KeyRecord] {
        try Row.fetchAll(db, sql: "SELECT * FROM keys ORDER BY created_at, id").map { try decode(db, $0) }
    }

    static func decode(_ db: Database, _ row: Row) throws -> KeyRecord {
        let hex: String = row["id"]
        guard let id = KeyID(hex: hex), let spec = KeySpec(rawValue: row["spec"]), let state = KeyState(rawValue: row["state"]) else {
            throw KeyManagerError.keystoreCorrupt("key row \(hex) is unreadable")
        }
        let aliases = try String.fetchAll(db, sql: "SELECT alias FROM aliases WHERE key_id = ? ORDER BY alias", arguments: [hex])
        var tags = [String: String]()
        for t in try Row.fetchAll(db, sql: "SELECT name, value FROM tags WHERE key_id = ?", arguments: [hex]) { tags[t["name"]] = t["value"] }
        var policy = [KeyOperation: Set<PolicySubject>]()
        for p in try Row.fetchAll(db, sql: "SELECT operation, subject FROM policies WHERE key_id = ?", arguments: [hex]) {
            if let op = KeyOperation(rawValue: p["operation"]), let subject = PolicySubject(argument: p["subject"]) {
                policy[op, default: []].insert(subject)
            }
        }
        let successor: String? = row["successor"]
        let metadata = KeyMetadata(
            keyID: id, spec: spec, state: state, description: row["description"], aliases: aliases, tags: tags,
            createdAt: row["created_at"], stateChangedAt: row["state_changed_at"],
            currentVersion: KeyVersion(rawValue: UInt32(row["current_version"] as Int)),
            rotationPeriodDays: row["rotation_days"], lastRotatedAt: row["last_rotated_at"],
            deletionDate: row["deletion_date"], successor: successor.flatMap { KeyID(hex: $0) })
        return KeyRecord(metadata: metadata, policy: policy)
    }

    /// The name users know the key by: its first alias, or its id.
    var displayName: String { metadata.aliases.first ?? id.rawValue.hex }
}
