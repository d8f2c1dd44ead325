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
        migrator.registerMigration("v2-rekey") { db in
            try db.execute(sql: """
                CREATE TABLE rekey_jobs (
                    id INTEGER PRIMARY KEY,
                    state TEXT NOT NULL,          -- queued, running, paused, done, failed, cancelled
                    mode TEXT NOT NULL,           -- rewrap, reencrypt
                    source_key TEXT NOT NULL, source_version INTEGER,
                    target_key TEXT NOT NULL,
                    path TEXT, rate REAL, workers INTEGER NOT NULL,
                    uid INTEGER NOT NULL, gid INTEGER NOT NULL,
                    created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL,
                    files_total INTEGER NOT NULL DEFAULT 0, bytes_total INTEGER NOT NULL DEFAULT 0,
                    files_done INTEGER NOT NULL DEFAULT 0, bytes_done INTEGER NOT NULL DEFAULT 0,
                    rewrites INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
                    last_error TEXT);
                -- Objects a job has finished: a resumed job never redoes them.
                CREATE TABLE rekey_done (
                    job_id INTEGER NOT NULL REFERENCES rekey_jobs(id), object_id TEXT NOT NULL,
                    PRIMARY KEY (job_id, object_id));
                -- Write-ahead intents: the header before and after (and for a
                -- reencrypt, the backup of the old ciphertext) of each file
                -- being rewritten, so a crash mid-write is repaired on restart.
                CREATE TABLE rekey_intents (
                    object_id TEXT PRIMARY KEY, job_id INTEGER NOT NULL, mode TEXT NOT NULL,
                    kind TEXT NOT NULL, path TEXT NOT NULL,
                    old_header BLOB NOT NULL, new_header BLOB NOT NULL,
                    old_key TEXT NOT NULL, old_version INTEGER NOT NULL, backup TEXT);
                """)
        }
        migrator.registerMigration("v3-audit-digests") { db in
            try db.execute(sql: """
                -- Signed checkpoints of the audit chain: each signs the seq and
                -- hash of the newest record, so cutting records off the end
                -- (or rewriting the chain) below a digest is detected.
                CREATE TABLE audit_digests (
                    id INTEGER PRIMARY KEY, time REAL NOT NULL,
                    last_seq INTEGER NOT NULL, last_hash BLOB NOT NULL,
                    key_id TEXT NOT NULL, key_version INTEGER NOT NULL, signature BLOB NOT NULL);
                """)
        }
        migrator.registerMigration("v4-audit-path") { db in
            // The file's path: a keyed hash by default, plaintext if opted in, or nothing.
            try db.execute(sql: "ALTER TABLE audit_log ADD COLUMN path TEXT")
        }
        migrator.registerMigration("v5-integrity") { db in
            try db.execute(sql: """
                -- The MAC of every protected row (KeystoreIntegrity.swift); the
                -- set is sealed in meta.integrity_seal.
                CREATE TABLE row_macs (tbl TEXT NOT NULL, row TEXT NOT NULL, mac BLOB NOT NULL, PRIMARY KEY (tbl, row));
                -- Intents are written per file: each carries its own MAC.
                ALTER TABLE rekey_intents ADD COLUMN mac BLOB;
                """)
        }
        migrator.registerMigration("v6-admin") { db in
            try db.execute(sql: """
                -- What an admin request asked for (JSON, never secrets): CloudTrail's requestParameters.
                ALTER TABLE audit_log ADD COLUMN request TEXT;
                -- Each rotation and its type (AUTOMATIC or ON_DEMAND).
                CREATE TABLE rotations (
                    key_id TEXT NOT NULL REFERENCES keys(id), version INTEGER NOT NULL,
                    time REAL NOT NULL, type TEXT NOT NULL, PRIMARY KEY (key_id, version));
                -- Scoped, optionally expiring permissions (AWS CreateGrant).
                CREATE TABLE grants (
                    id TEXT PRIMARY KEY, key_id TEXT NOT NULL REFERENCES keys(id),
                    grantee TEXT NOT NULL, operations TEXT NOT NULL,
                    created_at REAL NOT NULL, expires_at REAL, created_by INTEGER NOT NULL);
                -- Versions below min_version refuse to decrypt (reversible; Vault's min_decryption_version).
                CREATE TABLE key_floors (key_id TEXT PRIMARY KEY REFERENCES keys(id), min_version INTEGER NOT NULL);
                """)
        }
        migrator.registerMigration("v7-external-keys") { db in
            try db.execute(sql: """
                -- Master keys held outside the keystore (AWS KMS): where they are (JSON ExternalKeyConfig).
                CREATE TABLE external_keys (key_id TEXT PRIMARY KEY REFERENCES keys(id), provider TEXT NOT NULL, config TEXT NOT NULL);
                -- Intermediate keys, as the external provider encrypted them (AWSKMS.swift).
                CREATE TABLE intermediate_keys (
                    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, version INTEGER NOT NULL, blob BLOB NOT NULL, created_at REAL NOT NULL);
                """)
        }
        return migrator
    }
}
