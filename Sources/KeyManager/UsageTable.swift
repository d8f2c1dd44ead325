import ChunkCipher
import GRDB

/// `usage`: which key version wraps each file's and directory's data key —
/// what lets a key's deletion be refused while anything still needs it.
/// Every statement on the table is here. The two the mount runs per create
/// and unlink (`record`, `forget`) are kept as SQL text run through cached
/// statements with plain arguments: the journal writes them thousands of
/// times a second, and encoding a record through Codable for each would
/// cost more than the statement.
struct UsageRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "usage"
    var objectID: String
    var kind: String
    var keyID: String
    var version: Int
    var updatedAt: Double

    enum CodingKeys: String, CodingKey { case objectID = "object_id", kind, keyID = "key_id", version, updatedAt = "updated_at" }
    enum Columns {
        static let objectID = Column(CodingKeys.objectID)
        static let keyID = Column(CodingKeys.keyID)
        static let version = Column(CodingKeys.version)
    }

    private static let upsertSQL = """
        INSERT INTO usage (object_id, kind, key_id, version, updated_at) VALUES (?, ?, ?, ?, ?)
        ON CONFLICT(object_id) DO UPDATE SET kind = excluded.kind, key_id = excluded.key_id,
            version = excluded.version, updated_at = excluded.updated_at
        """
    private static let deleteSQL = "DELETE FROM usage WHERE object_id = ?"

    /// Records that `object` is wrapped by `key` `version` (new or moved).
    static func record(_ object: ID128, _ kind: ObjectKind, key: KeyID, version: KeyVersion, at time: Double, _ db: Database) throws {
        try db.cachedStatement(sql: upsertSQL).execute(arguments: [object.hex, kind.rawValue, key.rawValue.hex, version.rawValue, time])
    }

    /// Forgets `object` (its file or directory is gone).
    static func forget(_ object: ID128, _ db: Database) throws {
        try db.cachedStatement(sql: deleteSQL).execute(arguments: [object.hex])
    }

    /// How many objects each version of `key` wraps.
    static func countsByVersion(of key: KeyID, _ db: Database) throws -> [KeyVersion: Int] {
        let request = filter(Columns.keyID == key.rawValue.hex)
            .select(Columns.version, GRDB.count(Columns.objectID).forKey("n")).group(Columns.version).asRequest(of: Row.self)
        var out = [KeyVersion: Int]()
        for row in try request.fetchAll(db) { out[KeyVersion(rawValue: UInt32(row["version"] as Int))] = row["n"] }
        return out
    }

    /// How many objects `key` wraps (only `version`'s, if given).
    static func count(of key: KeyID, version: KeyVersion? = nil, _ db: Database) throws -> Int {
        var request = filter(Columns.keyID == key.rawValue.hex)
        if let version { request = request.filter(Columns.version == Int(version.rawValue)) }
        return try request.fetchCount(db)
    }

    /// The objects `key` (only `version`, if given) wraps, by object id; rows kmsfs cannot read are left out.
    static func objects(of key: KeyID, version: KeyVersion?, _ db: Database) throws -> [(object: ID128, kind: ObjectKind, version: KeyVersion)] {
        var request = filter(Columns.keyID == key.rawValue.hex)
        if let version { request = request.filter(Columns.version == Int(version.rawValue)) }
        return try request.order(Columns.objectID).fetchAll(db).compactMap { row in
            guard let object = ID128(hex: row.objectID), let kind = ObjectKind(rawValue: row.kind) else { return nil }
            return (object, kind, KeyVersion(rawValue: UInt32(row.version)))
        }
    }
}
