import GRDB

/// The keystore's SQLite schema, versioned with GRDB migrations. A keystore
/// with a migration this build does not know was written by a newer kmsfs and
/// is refused before anything is touched.
enum KeystoreSchema {
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
                CREATE TABLE keys (
                    id TEXT PRIMARY KEY,
                    spec TEXT NOT NULL,
                    state TEXT NOT NULL,
                    description TEXT NOT NULL DEFAULT '',
                    created_at REAL NOT NULL,
                    state_changed_at REAL NOT NULL,
                    current_version INTEGER NOT NULL,
                    rotation_days INTEGER,
                    last_rotated_at REAL NOT NULL,
                    deletion_date REAL,
                    successor TEXT REFERENCES keys(id));
                CREATE TABLE key_versions (
                    key_id TEXT NOT NULL REFERENCES keys(id),
                    version INTEGER NOT NULL,
                    created_at REAL NOT NULL,
                    material BLOB,            -- wrapped under the passphrase key; NULL once destroyed
                    public_key BLOB,          -- SIGN_VERIFY keys only
                    retired INTEGER NOT NULL DEFAULT 0,
                    PRIMARY KEY (key_id, version));
                CREATE TABLE aliases (alias TEXT PRIMARY KEY, key_id TEXT NOT NULL REFERENCES keys(id));
                CREATE TABLE tags (
                    key_id TEXT NOT NULL REFERENCES keys(id), name TEXT NOT NULL, value TEXT NOT NULL,
                    PRIMARY KEY (key_id, name));
                CREATE TABLE bindings (
                    path_mac BLOB PRIMARY KEY,  -- HMAC of the plaintext path: no names at rest
                    path_sealed BLOB NOT NULL,  -- the path, sealed, for listing
                    key_id TEXT NOT NULL REFERENCES keys(id));
                CREATE TABLE policies (
                    key_id TEXT NOT NULL REFERENCES keys(id), operation TEXT NOT NULL, subject TEXT NOT NULL,
                    PRIMARY KEY (key_id, operation, subject));
                CREATE TABLE usage (
                    object_id TEXT PRIMARY KEY, kind TEXT NOT NULL,
                    key_id TEXT NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL);
                CREATE INDEX usage_by_key ON usage (key_id, version);
                CREATE TABLE audit_log (
                    seq INTEGER PRIMARY KEY,
                    time REAL NOT NULL, event TEXT NOT NULL, outcome TEXT NOT NULL,
                    key_id TEXT, key_version INTEGER,
                    uid INTEGER, gid INTEGER, pid INTEGER, process TEXT,
                    object_id TEXT, error TEXT,
                    prev_hash BLOB NOT NULL, hash BLOB NOT NULL);
                """)
        }
        return migrator
    }
}
