import ChunkCipher
import GRDB

/// One row of `keys` with its aliases, tags and policy: what the lifecycle
/// and policy checks need.
struct KeyRecord: Sendable {
    var metadata: KeyMetadata
    var policy: [KeyOperation: Set<PolicySubject>]
    /// Grants, expired ones included (authorization skips those).
    var grants: [KeyGrant] = []
    /// Versions below this refuse to decrypt (reversible); nil: no floor.
    var minDecryptionVersion: KeyVersion?

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
        let grants = try Row.fetchAll(db, sql: "SELECT * FROM grants WHERE key_id = ? ORDER BY created_at, id", arguments: [hex])
            .compactMap { KeyGrant(row: $0, key: id) }
        let floor = try Int.fetchOne(db, sql: "SELECT min_version FROM key_floors WHERE key_id = ?", arguments: [hex])
        return KeyRecord(metadata: metadata, policy: policy, grants: grants,
                         minDecryptionVersion: floor.map { KeyVersion(rawValue: UInt32($0)) })
    }

    /// The name users know the key by: its first alias, or its id.
    var displayName: String { metadata.aliases.first ?? id.rawValue.hex }
}

/// A scoped permission on one key for one subject (AWS CreateGrant): some
/// operations, optionally until a time. Expired grants stop working on
/// their own; `key grant revoke` removes one at once.
public struct KeyGrant: Sendable, Codable, Equatable {
    public var grantID: String
    public var keyID: KeyID
    public var grantee: String
    public var operations: [KeyOperation]
    public var createdAt: Double
    public var expiresAt: Double?
    /// The uid that created it.
    public var createdBy: UInt32

    /// The operations a grant may give: using the key, never administering it.
    public static let grantable: [KeyOperation] = [.encrypt, .decrypt]

    init?(row: Row, key: KeyID) {
        guard let subject = PolicySubject(argument: row["grantee"]) else { return nil }
        let operations = (row["operations"] as String).split(separator: ",").compactMap { KeyOperation(rawValue: String($0)) }
        grantID = row["id"]
        keyID = key
        grantee = subject.description
        self.operations = operations
        createdAt = row["created_at"]
        expiresAt = row["expires_at"]
        createdBy = UInt32(row["created_by"] as Int)
    }

    /// Whether it still works at `now` (not yet expired).
    func isLive(at now: Double) -> Bool { expiresAt.map { now < $0 } ?? true }

    /// Whether it gives `operation` to `principal` at `now`.
    func allows(_ operation: KeyOperation, to principal: Principal, at now: Double) -> Bool {
        guard operations.contains(operation), isLive(at: now),
              let subject = PolicySubject(argument: grantee) else { return false }
        return subject.matches(principal)
    }
}
