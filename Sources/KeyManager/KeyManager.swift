import ChunkCipher
import GRDB
import Logging
import Synchronization
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Settings fixed when a filesystem is created.
public struct FilesystemOptions: Sendable {
    public var chunkSize: Int
    public var plaintextNames: Bool
    public var scrypt: ScryptParameters

    public init(chunkSize: Int = 16384, plaintextNames: Bool = false, scrypt: ScryptParameters = .strong) {
        self.chunkSize = chunkSize
        self.plaintextNames = plaintextNames
        self.scrypt = scrypt
    }
}

/// Whether a wrapped key protects a file's contents or a directory's names.
public enum ObjectKind: String, Sendable, Codable {
    case file
    case directory
}

/// A fresh data key and the header fields that carry it wrapped.
public struct DataKey: ~Copyable {
    public var key: SecretKey
    public var keyID: KeyID
    public var version: KeyVersion
    public var wrapped: [UInt8]
}

/// Master keys and everything about their life, in a SQLite keystore under
/// `CIPHERDIR/.kmsfs/`. The filesystem calls the envelope API
/// (`generateDataKey`, `decryptDataKey`, `reencryptDataKey`); the admin plane
/// calls the rest. Safe to use from many threads and from several processes
/// on one keystore (SQLite WAL, busy timeout).
public final class KeyManager: @unchecked Sendable {
    /// The filesystem this keystore belongs to; bound into every wrap.
    public let filesystemID: ID128
    /// Plaintext bytes per chunk, fixed at init.
    public let chunkSize: Int
    /// Whether names are stored in plaintext (debugging and benchmarks).
    public let plaintextNames: Bool
    /// The keystore directory (`CIPHERDIR/.kmsfs`).
    public let directory: String

    let db: DatabasePool
    let clock: @Sendable () -> Double
    let logger = Logger(label: "kmsfs.keymanager")
    /// Holds the master-key material (the passphrase-protected keystore).
    let local: LocalKeyProvider
    /// External providers, by key (nil: the key is local). Loaded once per key: where a key lives never changes.
    let externalProviders = Mutex<[KeyID: (any ExternalProvider)?]>([:])
    /// Key uses audited by this process, by event, outcome and key
    /// (`keyUseCounts`), counted only once something reads them
    /// (`countKeyUse()`): no lock and no hashing per create otherwise.
    let keyUse = Mutex<[KeyUse: Int]>([:])
    let countsKeyUse = Atomic<Bool>(false)
    /// Starts counting key uses (the mount's metrics writer calls it).
    public func countKeyUse() { countsKeyUse.store(true, ordering: .relaxed) }
    /// Key uses audited by this process so far: data keys generated and
    /// unwrapped, rewraps, denials and refusals, by key.
    public var keyUseCounts: [KeyUse: Int] { keyUse.withLock { $0 } }
    /// The key-encryption key derived from the passphrase (key schedule only).
    var kek: AESGCM { local.kek }
    /// Keys path MACs and sealed paths of bindings.
    let metadataKey: SecretKey
    /// HMAC under the metadata key, keyed once (audit path hashes).
    let pathMAC: KeyDerivation.KeyedHMAC
    /// Authenticates the security-relevant rows (KeystoreIntegrity.swift).
    let integrity: KeystoreIntegrity
    let caches = Mutex(Caches())
    let alertState = Mutex(AlertState())
    /// Whether successful unwraps and data-key generations are recorded (on;
    /// off only for `make bench-audit`'s comparison, and that is audited).
    public let auditsRoutineUse = Atomic<Bool>(true)
    /// How long a cached key record is trusted before re-reading it, so a
    /// change made by another process takes effect within this time.
    static let recordTTL = 0.5

    struct Caches: ~Copyable {
        var records: [KeyID: (record: KeyRecord, fetchedAt: Double)] = [:]
        /// Raised by every invalidation: a record read before one must not be cached after it.
        var recordEpoch: UInt64 = 0
        /// Binding path MAC → key, re-read after `recordTTL`.
        var bindings: (map: [Data: KeyID], fetchedAt: Double)?
        /// Directory path → governing key, valid as long as `bindings`.
        var boundKeys: [String: KeyID] = [:]
        var journal: UsageJournal?
        var pathMode: (mode: AuditPathMode, fetchedAt: Double)?
        /// The newest integrity-seal generation this process has seen or written.
        var integrityGeneration: UInt64 = 0
        /// The findings last audited, so a tampered keystore is reported once, not per request.
        var reportedTampering: [String] = []
    }

    /// The file name of the keystore inside its directory.
    public static let databaseName = "keystore.db"

    // MARK: Opening

    /// Creates a new keystore in `directory` with the default key
    /// `alias/default` bound to the root, administered by `creator` and root.
    public static func create(in directory: String, passphrase: borrowing SecretKey, options: FilesystemOptions,
                              creator: Principal, clock: @escaping @Sendable () -> Double = KeyManager.systemClock) throws(KeyManagerError) -> KeyManager {
        do throws(CipherError) { _ = try ChunkLayout(chunkSize: options.chunkSize) } catch { throw .invalidArgument(error.description) }
        try KeyLimits.checkPassphrase(passphrase, "passphrase")
        let path = directory + "/" + databaseName
        if FileManager.default.fileExists(atPath: path) { throw .keystoreExists(path) }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch { throw .database("cannot create \(directory): \(error.localizedDescription)") }
        let fsID = ID128.random()
        let salt = SecureRandom.bytes(32)
        let kekKey = try options.scrypt.deriveKey(passphrase: passphrase, salt: salt)
        let kek = try AESGCM.make(kekKey)
        let metadataKey = SecretKey.random()
        // Owner-only: SQLite gives the -wal and -shm files the same mode.
        guard FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600]) else {
            throw .database("cannot create \(path)")
        }
        let pool = try openPool(path, readonly: false)
        do {
            try KeystoreSchema.migrator.migrate(pool)
            try pool.write { db in
                let check = try fsID.bytes.withUnsafeBytes { try KeyWrap.seal($0, under: kek, context: kekCheckContext(fsID)) }
                let wrappedMeta = try metadataKey.withUnsafeBytes { try KeyWrap.seal($0, under: kek, context: metadataKeyContext(fsID)) }
                let meta: [(MetaName, any DatabaseValueConvertible)] = [
                    (.format, "kmsfs-keystore-1"), (.filesystemID, fsID.hex), (.chunkSize, options.chunkSize),
                    (.plaintextNames, options.plaintextNames ? 1 : 0), (.scryptLogN, Int(options.scrypt.logN)),
                    (.scryptR, Int(options.scrypt.r)), (.scryptP, Int(options.scrypt.p)), (.salt, Data(salt)),
                    (.kekCheck, Data(check)), (.metadataKey, Data(wrappedMeta)), (.createdAt, clock()),
                    (.auditKeyedFrom, 1),
                ]
                for (name, value) in meta { try KeystoreMeta.set(name, to: value, db) }
                try KeystoreIntegrity(metadataKey: metadataKey).reseal(db, generation: 1)
            }
        } catch let error as KeyManagerError { throw error } catch { throw .database("\(error)") }
        let manager = try KeyManager(directory: directory, db: pool, fsID: fsID, chunkSize: options.chunkSize,
                                     plaintextNames: options.plaintextNames, kek: kek, metadataKey: metadataKey, clock: clock)
        let key = try manager.createKey(spec: .aes256, description: "default key of this filesystem",
                                        aliases: ["alias/default"], by: creator)
        try manager.bind(path: "/", to: key.keyID.rawValue.hex, by: creator)
        return manager
    }

    /// Opens and unlocks an existing keystore. A wrong passphrase, a damaged
    /// file or one from a newer kmsfs is a clear error and changes nothing.
    ///
    /// The security-relevant rows are verified against their seal first: a
    /// keystore edited outside kmsfs is refused with what was edited, unless
    /// `verifyingIntegrity` is false (`audit verify` and `fsck` report it instead).
    /// A keystore from before the seal existed is sealed as it is, once.
    public static func open(in directory: String, passphrase: borrowing SecretKey, verifyingIntegrity: Bool = true,
                            clock: @escaping @Sendable () -> Double = KeyManager.systemClock) throws(KeyManagerError) -> KeyManager {
        let path = directory + "/" + databaseName
        guard FileManager.default.fileExists(atPath: path) else { throw .keystoreNotFound(directory) }
        // Every check runs on a read-only connection: a wrong passphrase, a
        // damaged file or a newer schema leave the keystore as it was.
        let meta: [MetaName: DatabaseValue]
        do {
            var readonly = Configuration()
            readonly.readonly = true
            readonly.busyMode = .timeout(30)
            let probe = try DatabaseQueue(path: path, configuration: readonly)
            defer { try? probe.close() }
            meta = try probe.read { db in
                guard try db.tableExists("grdb_migrations") else { throw KeyManagerError.keystoreCorrupt("no schema") }
                if try KeystoreSchema.migrator.hasBeenSuperseded(db) {
                    let applied = try KeystoreSchema.migrator.appliedIdentifiers(db).sorted().joined(separator: ", ")
                    throw KeyManagerError.keystoreFromNewerVersion("schema \(applied)")
                }
                let integrity = try String.fetchOne(db, sql: "PRAGMA quick_check") ?? "no answer"
                guard integrity == "ok" else { throw KeyManagerError.keystoreCorrupt(integrity) }
                return try KeystoreMeta.all(db)
            }
        } catch let error as KeyManagerError { throw error } catch let error as DatabaseError {
            throw .keystoreCorrupt(error.message ?? "\(error.resultCode)")
        } catch { throw .keystoreCorrupt("\(error)") }
        guard let fsHex = String.fromDatabaseValue(meta[.filesystemID] ?? .null), let fsID = ID128(hex: fsHex),
              let chunkSize = Int.fromDatabaseValue(meta[.chunkSize] ?? .null),
              let logN = Int.fromDatabaseValue(meta[.scryptLogN] ?? .null),
              let r = Int.fromDatabaseValue(meta[.scryptR] ?? .null), let p = Int.fromDatabaseValue(meta[.scryptP] ?? .null),
              let salt = Data.fromDatabaseValue(meta[.salt] ?? .null),
              let check = Data.fromDatabaseValue(meta[.kekCheck] ?? .null),
              let wrappedMeta = Data.fromDatabaseValue(meta[.metadataKey] ?? .null),
              let plainNames = Int.fromDatabaseValue(meta[.plaintextNames] ?? .null) else {
            throw .keystoreCorrupt("filesystem settings are missing")
        }
        let scrypt = ScryptParameters(logN: UInt8(clamping: logN), r: UInt32(clamping: r), p: UInt32(clamping: p))
        let kekKey = try scrypt.deriveKey(passphrase: passphrase, salt: [UInt8](salt))
        let kek = try AESGCM.make(kekKey)
        // The check value's context says whether the keystore is sealed
        // (kmsfs/v2) or predates the seal (v1): only a KEK holder writes either.
        let sealed: Bool
        if let checked = try KeyWrap.open([UInt8](check), under: kek, context: kekCheckContext(fsID)) {
            _ = consume checked
            sealed = true
        } else if let checked = try KeyWrap.open([UInt8](check), under: kek, context: legacyKEKCheckContext(fsID)) {
            _ = consume checked
            sealed = false
        } else {
            throw .wrongPassphrase
        }
        guard let metadataKey = try KeyWrap.open([UInt8](wrappedMeta), under: kek, context: metadataKeyContext(fsID)) else {
            throw .keystoreCorrupt("the metadata key does not open under this passphrase")
        }
        let pool = try openPool(path, readonly: false)
        do { try KeystoreSchema.migrator.migrate(pool) } catch { throw .database("\(error)") }
        let manager = try KeyManager(directory: directory, db: pool, fsID: fsID, chunkSize: chunkSize, plaintextNames: plainNames != 0,
                                     kek: kek, metadataKey: metadataKey, clock: clock)
        if !sealed {
            try manager.sealLegacyKeystore()
        } else if verifyingIntegrity {
            try manager.verifiedRead { _ in }
        }
        return manager
    }

    /// Seals a keystore written before rows were authenticated, as it is, and
    /// marks it sealed (a v2 check value), so a removed seal is an edit from now on.
    private func sealLegacyKeystore() throws(KeyManagerError) {
        let fs = filesystemID
        try write { db in
            let check = try fs.bytes.withUnsafeBytes { (raw) throws(KeyManagerError) in
                try KeyWrap.seal(raw, under: kek, context: Self.kekCheckContext(fs))
            }
            try KeystoreMeta.set(.kekCheck, to: Data(check), db)
            // Records from here on are chained with a keyed MAC; older ones keep SHA-256.
            let next = try AuditLogTable.lastSeq(db) + 1
            try KeystoreMeta.set(.auditKeyedFrom, to: next, db)
            try integrity.reseal(db, generation: 1)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.sealKeystore, error: "keystore rows authenticated for the first time"), at: clock())
        }
        noteGeneration(1)
    }

    private init(directory: String, db: DatabasePool, fsID: ID128, chunkSize: Int, plaintextNames: Bool,
                 kek: AESGCM, metadataKey: consuming SecretKey, clock: @escaping @Sendable () -> Double) throws(KeyManagerError) {
        self.directory = directory
        self.db = db
        self.filesystemID = fsID
        self.chunkSize = chunkSize
        self.plaintextNames = plaintextNames
        self.local = LocalKeyProvider(kek: kek)
        self.pathMAC = KeyDerivation.KeyedHMAC(key: metadataKey)
        self.integrity = try KeystoreIntegrity(metadataKey: metadataKey)
        self.metadataKey = metadataKey
        self.clock = clock
    }

    static func openPool(_ path: String, readonly: Bool) throws(KeyManagerError) -> DatabasePool {
        var config = Configuration()
        config.busyMode = .timeout(30)
        config.readonly = readonly
        config.label = "kmsfs-keystore"
        config.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
            // Freed pages (destroyed key material, old rows) are overwritten,
            // whatever the distribution's SQLite build defaults to.
            try db.execute(sql: "PRAGMA secure_delete = ON")
        }
        do {
            let pool = try DatabasePool(path: path, configuration: config)
            return pool
        } catch let error as DatabaseError {
            throw .keystoreCorrupt(error.message ?? "\(error.resultCode)")
        } catch { throw .keystoreCorrupt("\(error)") }
    }

    /// Seconds since 1970 from the system clock.
    public static let systemClock: @Sendable () -> Double = { Date().timeIntervalSince1970 }

    /// The check value of a sealed keystore (KeystoreIntegrity.swift).
    static func kekCheckContext(_ fs: ID128) -> [UInt8] { Array("kmsfs/v2/kek-check".utf8) + fs.bytes }
    /// The check value of a keystore from before rows were sealed.
    static func legacyKEKCheckContext(_ fs: ID128) -> [UInt8] { Array("kmsfs/v1/kek-check".utf8) + fs.bytes }
    static func metadataKeyContext(_ fs: ID128) -> [UInt8] { Array("kmsfs/v1/metadata-key".utf8) + fs.bytes }
    static func materialContext(_ key: KeyID, _ version: KeyVersion) -> [UInt8] {
        LocalKeyProvider.materialContext(key, version)
    }

    /// The encryption context of a wrapped data key: ids, never paths.
    func dataKeyContext(object: ID128, key: KeyID, version: KeyVersion) -> [UInt8] {
        var out = Array("kmsfs/v1/dek".utf8) + filesystemID.bytes + object.bytes + key.rawValue.bytes
        withUnsafeBytes(of: version.rawValue.bigEndian) { out.append(contentsOf: $0) }
        return out
    }

    // MARK: Database helpers

    func write<T>(_ body: (Database) throws -> T) throws(KeyManagerError) -> T {
        do { return try db.write(body) } catch let error as KeyManagerError { throw error } catch { throw .database("\(error)") }
    }

    func read<T>(_ body: (Database) throws -> T) throws(KeyManagerError) -> T {
        do { return try db.read(body) } catch let error as KeyManagerError { throw error } catch { throw .database("\(error)") }
    }

    func invalidate(_ key: KeyID) {
        caches.withLock {
            $0.records[key] = nil
            $0.recordEpoch &+= 1
        }
    }

    func forgetWrappers(_ key: KeyID) {
        invalidate(key)
        local.forget(key: key)
        externalProviders.withLock { $0[key]??.forget(key: key) }
    }

    /// The key's record, from a cache trusted for `recordTTL` seconds.
    func record(_ key: KeyID) throws(KeyManagerError) -> KeyRecord {
        let now = clock()
        let (cached, epoch) = caches.withLock { ($0.records[key], $0.recordEpoch) }
        if let cached, abs(now - cached.fetchedAt) < Self.recordTTL {
            return cached.record
        }
        let fresh = try verifiedRead { db in try KeyRecord.fetch(db, key) }
        // A change committed (and invalidated) while this read ran would
        // otherwise be hidden behind the older row for `recordTTL`.
        caches.withLock { if $0.recordEpoch == epoch { $0.records[key] = (fresh, now) } }
        return fresh
    }

    /// The stored blob of a live (not retired) version, for the provider.
    func storedMaterial(_ key: KeyID, _ version: KeyVersion) throws(KeyManagerError) -> [UInt8] {
        let material = try read { db in try KeyVersionRow.material(of: key, version, liveOnly: true, db) }
        guard let material else { throw .versionNotFound(key: key.rawValue.hex, version: version) }
        return [UInt8](material)
    }
}

/// Lifts a CipherError-throwing call into KeyManagerError.
@inline(__always) func cipherCall<T>(_ body: () throws(CipherError) -> T) throws(KeyManagerError) -> T {
    do throws(CipherError) { return try body() } catch { throw .crypto(error.description) }
}

extension AESGCM {
    static func make(_ key: borrowing SecretKey) throws(KeyManagerError) -> AESGCM {
        try cipherCall { () throws(CipherError) in try AESGCM(key: key) }
    }
}

/// Restores the KeyManagerError type through standard-library helpers that rethrow untyped.
@inline(__always) func keepingKeyManagerError<R>(_ body: () throws -> R) throws(KeyManagerError) -> R {
    do { return try body() } catch let error as KeyManagerError { throw error } catch { throw .crypto("\(error)") }
}
