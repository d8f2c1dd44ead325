import GRDB
#if canImport(Glibc)
import Glibc
#endif

extension KeyManager {
    /// The SQLite library this process runs with ("3.40.1").
    public static var sqliteVersion: String {
        (try? DatabaseQueue().read { db in try String.fetchOne(db, sql: "SELECT sqlite_version()") } ?? nil) ?? "unknown"
    }

    /// The newest schema migration applied to the keystore in `directory`,
    /// read without the passphrase (nil if there is none or it does not open).
    public static func appliedSchema(in directory: String) -> String? {
        // Only a caller that may read the keystore asks SQLite (others would wait on nothing useful).
        guard access(directory + "/" + databaseName, R_OK) == 0 else { return nil }
        var readonly = Configuration()
        readonly.readonly = true
        guard let probe = try? DatabaseQueue(path: directory + "/" + databaseName, configuration: readonly) else { return nil }
        defer { try? probe.close() }
        return try? probe.read { db in
            let applied = try KeystoreSchema.migrator.appliedIdentifiers(db)
            return KeystoreSchema.migrator.migrations.last(where: applied.contains)
        }
    }

    /// The newest schema migration this build knows.
    public static var knownSchema: String { KeystoreSchema.migrator.migrations.last ?? "" }
}
