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
        guard let row = try KeyRow.fetch(key.rawValue.hex, db) else { throw KeyManagerError.keyNotFound(key.rawValue.hex) }
        return try decode(db, row)
    }

    static func fetchAll(_ db: Database) throws -> [KeyRecord] {
        try KeyRow.all(db).map { try decode(db, $0) }
    }

    static func decode(_ db: Database, _ row: KeyRow) throws -> KeyRecord {
        let hex = row.id
        guard let id = KeyID(hex: hex), let spec = KeySpec(rawValue: row.spec), let state = KeyState(rawValue: row.state) else {
            throw KeyManagerError.keystoreCorrupt("key row \(hex) is unreadable")
        }
        let aliases = try AliasRow.aliases(of: hex, db)
        let tags = try TagRow.tags(of: hex, db)
        let policy = try PolicyRow.policy(of: hex, db)
        let metadata = KeyMetadata(
            keyID: id, spec: spec, state: state, description: row.description, aliases: aliases, tags: tags,
            createdAt: row.createdAt, stateChangedAt: row.stateChangedAt,
            currentVersion: KeyVersion(rawValue: UInt32(row.currentVersion)),
            rotationPeriodDays: row.rotationDays, lastRotatedAt: row.lastRotatedAt,
            deletionDate: row.deletionDate, successor: row.successor.flatMap { KeyID(hex: $0) })
        return KeyRecord(metadata: metadata, policy: policy, grants: try GrantRow.grants(of: id, db),
                         minDecryptionVersion: try FloorRow.floor(of: hex, db))
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

    /// Whether it still works at `now` (not yet expired).
    func isLive(at now: Double) -> Bool { expiresAt.map { now < $0 } ?? true }

    /// Whether it gives `operation` to `principal` at `now`.
    func allows(_ operation: KeyOperation, to principal: Principal, at now: Double) -> Bool {
        guard operations.contains(operation), isLive(at: now),
              let subject = PolicySubject(argument: grantee) else { return false }
        return subject.matches(principal)
    }
}
