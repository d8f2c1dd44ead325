import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A backup signer the restorer already trusts.
public enum BackupTrust: Sendable {
    /// The signer's public key, DER SubjectPublicKeyInfo.
    case publicKey([UInt8])
    /// `sha256:HEX` of that DER (as `backup create` prints it).
    case fingerprint(String)

    func accepts(_ signer: [UInt8]) -> Bool {
        switch self {
        case .publicKey(let der): return der == signer
        case .fingerprint(let text):
            let given = text.lowercased().hasPrefix("sha256:") ? text.lowercased() : "sha256:" + text.lowercased()
            return given == KeyManager.backupFingerprint(signer)
        }
    }
}

/// What a restore did.
public struct RestoreReport: Sendable, Codable {
    /// "new keystore" or "merged".
    public var mode: String
    public var keysAdded: [String]
    public var versionsAdded: Int
    public var signer: String
    public var createdAt: Double
}

/// Keystore backups (docs/KEYS.md, "Backups"). A backup is a consistent copy
/// of the whole keystore — master-key material, metadata, aliases, tags,
/// bindings, policies, the usage index and the audit log — whose material is
/// rewrapped under a key derived (scrypt) from a separate backup passphrase;
/// the copy is then sealed whole with AES-256-GCM under that key (so names,
/// tags and policies are not readable either) and signed with the
/// filesystem's ECC P-256 digest key:
///
///     "KMSFSBK1" ‖ logN(1) ‖ salt(32) ‖ fs id(16) ‖ created(8, f64 bits) ‖ box length(8) ‖
///     box = nonce ‖ GCM(keystore copy) ‖ tag   (additional data: every byte before the box)
///     ‖ signer key id(16) ‖ signer version(4) ‖ public key length(2) ‖ public key (DER)
///     ‖ signature length(2) ‖ ECDSA-SHA256 signature over every byte before the signer fields
///
/// All integers big-endian. Written by hand: no library format fits.
extension KeyManager {
    static let backupMagic = Array("KMSFSBK1".utf8)
    static func backupContext(_ fs: ID128) -> [UInt8] { Array("kmsfs/v1/backup".utf8) + fs.bytes }

    /// Writes a backup of this keystore, readable with `backupPassphrase`.
    /// Only administrators of the default key may take one (audited).
    public func createBackup(backupPassphrase: borrowing SecretKey, scrypt: ScryptParameters = .strong,
                             by principal: Principal) throws(KeyManagerError) -> [UInt8] {
        _ = try authorizeAdmin(principal, try resolve("alias/default"))
        try KeyLimits.checkPassphrase(backupPassphrase, "backup passphrase")
        try flushUsage()
        let signer = try digestKey()
        let salt = SecureRandom.bytes(32)
        let backupKEK = try AESGCM.make(try scrypt.deriveKey(passphrase: backupPassphrase, salt: salt))
        let scratch = directory + "/.backup-\(ID128.random().hex)"
        defer { for suffix in ["", "-journal", "-wal", "-shm"] { unlink(scratch + suffix) } }
        // A consistent copy, then every secret in it rewrapped under the backup key.
        do {
            // Owner-only from the first byte: VACUUM INTO accepts an existing empty file.
            guard FileManager.default.createFile(atPath: scratch, contents: nil, attributes: [.posixPermissions: 0o600]) else {
                throw KeyManagerError.database("cannot create \(scratch)")
            }
            try db.writeWithoutTransaction { db in try db.execute(sql: "VACUUM INTO ?", arguments: [scratch]) }
            let copy = try DatabaseQueue(path: scratch)
            try copy.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA secure_delete = ON") }
            try copy.write { db in
                let (findings, generation) = try integrity.verify(db)
                guard findings.isEmpty else { throw KeyManagerError.keystoreTampered(findings) }
                try rewrapSecrets(db, from: kek, to: backupKEK, salt: salt, scrypt: scrypt)
                try integrity.reseal(db, generation: generation + 1)
                // The copy is no mount's: a restored keystore must not look like one that died mid-batch.
                try KeystoreMeta.remove(.usageJournalPID, db)
            }
            try copy.writeWithoutTransaction { db in try db.execute(sql: "VACUUM") }
            try copy.close()
        } catch let error as KeyManagerError { throw error } catch { throw .database("cannot copy the keystore: \(error)") }
        guard let data = FileManager.default.contents(atPath: scratch) else { throw .database("cannot read the keystore copy") }
        var plain = [UInt8](data)
        defer { plain.withUnsafeMutableBytes { _ = $0.initializeMemory(as: UInt8.self, repeating: 0) } }
        var out = Self.backupMagic
        out.append(scrypt.logN)
        out += salt + filesystemID.bytes
        out.appendBigEndian(clock().bitPattern, width: 8)
        out.appendBigEndian(UInt64(plain.count + AESGCM.boxOverhead), width: 8)
        let ad = out
        var box = [UInt8](repeating: 0, count: plain.count + AESGCM.boxOverhead)
        try keepingKeyManagerError {
            try box.withUnsafeMutableBytes { boxBytes in
                try plain.withUnsafeBytes { p in try ad.withUnsafeBytes { a in try backupKEK.sealBox(p, additionalData: a, into: boxBytes) } }
            }
        }
        out += box
        let (version, signature) = try sign(out, with: signer.rawValue.hex, by: Principal(uid: 0, gid: 0, processName: "kmsfs-backup"))
        let publicKey: Data = try read { db in
            try KeyVersionRow.publicKey(of: signer.rawValue.hex, version, db) ?? Data()
        }
        out += signer.rawValue.bytes
        out.appendBigEndian(UInt64(version.rawValue), width: 4)
        out.appendBigEndian(UInt64(publicKey.count), width: 2)
        out += [UInt8](publicKey)
        out.appendBigEndian(UInt64(signature.count), width: 2)
        out += signature
        audit(AuditEvent(.createBackup, key: signer, version: version, principal: principal))
        return out
    }

    /// Rewraps every master-key version, the metadata key and the check value
    /// of the keystore in `db` from `old` to `new`, with `new`'s salt and
    /// scrypt settings (a passphrase change, a backup, a restore).
    func rewrapSecrets(_ db: Database, from old: AESGCM, to new: AESGCM, salt: [UInt8], scrypt: ScryptParameters) throws {
        let fs = filesystemID
        for row in try KeyVersionRow.withMaterial(db) {
            guard let id = row.key, let material = row.material else { continue }
            let version = row.keyVersion
            let context = Self.materialContext(id, version)
            guard let secret = try KeyWrap.open([UInt8](material), under: old, context: context) else {
                throw KeyManagerError.keystoreCorrupt("material of key \(id) version \(version) does not open")
            }
            let rewrapped = try secret.withUnsafeBytes { (raw) throws(KeyManagerError) in try KeyWrap.seal(raw, under: new, context: context) }
            try KeyVersionRow.replaceMaterial(of: id, version, with: Data(rewrapped), db)
        }
        let check = try fs.bytes.withUnsafeBytes { (raw) throws(KeyManagerError) in try KeyWrap.seal(raw, under: new, context: Self.kekCheckContext(fs)) }
        let meta = try metadataKey.withUnsafeBytes { (raw) throws(KeyManagerError) in try KeyWrap.seal(raw, under: new, context: Self.metadataKeyContext(fs)) }
        for (name, value) in [(.salt, Data(salt)), (.kekCheck, Data(check)), (.metadataKey, Data(meta))] as [(MetaName, Data)] {
            try KeystoreMeta.set(name, to: value, db)
        }
        for (name, value) in [(.scryptLogN, Int(scrypt.logN)), (.scryptR, Int(scrypt.r)), (.scryptP, Int(scrypt.p))] as [(MetaName, Int)] {
            try KeystoreMeta.set(name, to: value, db)
        }
    }

    /// The SIGN_VERIFY key that signs audit digests and backups (made on first use).
    func digestKey() throws(KeyManagerError) -> KeyID {
        if let existing = try? resolve(Self.auditDigestAlias) { return existing }
        let system = Principal(uid: 0, gid: 0, pid: getpid(), processName: "kmsfs-audit")
        return try makeKey(spec: .eccP256, description: "signs the audit log's digests and backups", aliases: [Self.auditDigestAlias], by: system).keyID
    }

    /// Verifies and restores a backup into keystore directory `directory`.
    /// With no keystore there, the backup becomes it, locked with
    /// `passphrase`. With one (of the same filesystem, unlocked with
    /// `passphrase`), keys and versions it lacks are added; a key or version
    /// that differs, or that it has destroyed, is a conflict and nothing is
    /// written — never a silent overwrite.
    ///
    /// The signature is checked against a key the restorer already trusts,
    /// never only the one the file carries: `trust` when given, else the
    /// existing keystore's digest key (a merge). Restoring into an empty
    /// directory needs `trust`.
    public static func restoreBackup(_ file: [UInt8], backupPassphrase: borrowing SecretKey, into directory: String,
                                     passphrase: borrowing SecretKey, trust: BackupTrust? = nil, by principal: Principal,
                                     clock: @escaping @Sendable () -> Double = KeyManager.systemClock) throws(KeyManagerError) -> RestoreReport {
        let parsed = try BackupFile(file)
        guard AsymmetricKeys.verify(Array(file[0..<parsed.signedLength]), signature: parsed.signature, publicKey: parsed.publicKey, spec: .eccP256) else {
            throw .invalidArgument("the backup's signature does not verify: the file was altered or damaged")
        }
        let target = directory + "/" + databaseName
        let existing = FileManager.default.fileExists(atPath: target)
            ? try KeyManager.open(in: directory, passphrase: passphrase, clock: clock) : nil
        let signerFingerprint = backupFingerprint(parsed.publicKey)
        let signerID = KeyID(rawValue: parsed.signer).rawValue.hex
        if let trust {
            guard trust.accepts(parsed.publicKey) else {
                throw .invalidArgument("the backup is signed by key \(signerID) (\(signerFingerprint)), not by the key you trust: refused")
            }
        } else if let existing {
            guard try existing.trustsBackupSigner(parsed) else {
                throw .invalidArgument("the backup is signed by key \(signerID) (\(signerFingerprint)), which is not this keystore's digest key: "
                                       + "refused. If you trust that signer, pass --trusted-fingerprint \(signerFingerprint)")
            }
        } else {
            throw .invalidArgument("restoring into an empty keystore needs the signer you trust: --trusted-fingerprint (printed by "
                                   + "`kmsfs backup create`) or --trusted-key FILE (from `kmsfs key get-public-key alias/kmsfs-audit-digest`); "
                                   + "this backup is signed by key \(signerID) (\(signerFingerprint))")
        }
        let scrypt = ScryptParameters(logN: parsed.logN, r: 8, p: 1)
        let backupKEK = try AESGCM.make(try scrypt.deriveKey(passphrase: backupPassphrase, salt: parsed.salt))
        var plain = [UInt8](repeating: 0, count: parsed.box.count - AESGCM.boxOverhead)
        defer { plain.withUnsafeMutableBytes { _ = $0.initializeMemory(as: UInt8.self, repeating: 0) } }
        let ad = Array(file[0..<parsed.boxOffset])
        let opened = try keepingKeyManagerError {
            try plain.withUnsafeMutableBytes { out in
                try parsed.box.withUnsafeBytes { box in try ad.withUnsafeBytes { a in try backupKEK.openBox(box, additionalData: a, into: out) } }
            }
        }
        guard opened else { throw .invalidArgument("the backup does not open: wrong backup passphrase, or the file is damaged") }

        // The copy is a keystore locked with the backup passphrase: open it as one.
        let staging = directory + "/.restore-\(ID128.random().hex)"
        defer { try? FileManager.default.removeItem(atPath: staging) }
        do {
            try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch { throw .database("cannot create \(staging): \(error)") }
        guard FileManager.default.createFile(atPath: staging + "/" + databaseName, contents: Data(plain), attributes: [.posixPermissions: 0o600]) else {
            throw .database("cannot write \(staging)")
        }
        let restored = try KeyManager.open(in: staging, passphrase: backupPassphrase, clock: clock)
        guard restored.filesystemID == parsed.filesystemID else { throw .invalidArgument("the backup's header and contents name different filesystems") }
        // The signer must be the digest key inside the copy: a trusted key cannot vouch for another keystore's contents.
        guard try restored.trustsBackupSigner(parsed) else {
            throw .invalidArgument("the backup's contents do not hold the key that signed it: refused")
        }
        let signer = signerID
        guard let current = existing else {
            // A new keystore: relock with the keystore passphrase, then move it in place.
            let salt = SecureRandom.bytes(32)
            let stored = ScryptParameters.strong
            let kek = try AESGCM.make(try stored.deriveKey(passphrase: passphrase, salt: salt))
            try restored.sealedWrite { db in
                try restored.rewrapSecrets(db, from: restored.kek, to: kek, salt: salt, scrypt: stored)
                try AuditTrail.append(db, chain: restored.integrity.hmac, AuditEvent(.restoreBackup, principal: principal, error: "new keystore from a backup signed by \(signer)"), at: clock())
            }
            do {
                try restored.db.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE)") }
                try restored.db.close()
            } catch { throw .database("cannot finish the restored keystore: \(error)") }
            guard rename(staging + "/" + databaseName, target) == 0 else { throw .database("cannot move the restored keystore into \(directory)") }
            let keys = try KeyManager.open(in: directory, passphrase: passphrase, clock: clock).listKeys().map(\.keyID.rawValue.hex)
            return RestoreReport(mode: "new keystore", keysAdded: keys, versionsAdded: 0, signer: signer, createdAt: parsed.createdAt)
        }
        guard current.filesystemID == restored.filesystemID else {
            throw .invalidArgument("the backup belongs to filesystem \(restored.filesystemID.hex), this keystore to \(current.filesystemID.hex); restore it into an empty keystore directory instead")
        }
        _ = try current.authorizeAdmin(principal, try current.resolve("alias/default"))
        return try current.merge(from: restored, signer: signer, createdAt: parsed.createdAt, by: principal)
    }

    /// Whether `backup` was signed by this keystore's digest key (the id and
    /// the public half both match).
    func trustsBackupSigner(_ backup: BackupFile) throws(KeyManagerError) -> Bool {
        guard let digest = try? resolve(Self.auditDigestAlias), digest.rawValue == backup.signer else { return false }
        let stored: Data? = try verifiedRead { db in
            try KeyVersionRow.publicKey(of: digest.rawValue.hex, KeyVersion(rawValue: backup.signerVersion), db)
        }
        return stored.map { [UInt8]($0) == backup.publicKey } ?? false
    }

    /// "sha256:" and the hex SHA-256 of a signer's public key (DER SubjectPublicKeyInfo).
    public static func backupFingerprint(_ publicKey: [UInt8]) -> String {
        "sha256:" + KeyDerivation.sha256(publicKey).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    /// The key id and fingerprint of a backup file's signer (not yet trusted).
    public static func backupSigner(_ file: [UInt8]) throws(KeyManagerError) -> (keyID: String, fingerprint: String) {
        let parsed = try BackupFile(file)
        return (KeyID(rawValue: parsed.signer).rawValue.hex, backupFingerprint(parsed.publicKey))
    }

    /// Adds to this keystore the keys and versions of `other` it lacks; refuses on any conflict.
    func merge(from other: KeyManager, signer: String, createdAt: Double, by principal: Principal) throws(KeyManagerError) -> RestoreReport {
        let theirs: [KeyVersionRow] = try other.read { db in try KeyVersionRow.fetchAll(db) }
        let theirKeys: [KeyRow] = try other.read { db in try KeyRow.fetchAll(db) }
        var conflicts: [String] = []
        var addedKeys: [String] = []
        var addedVersions = 0
        try sealedWrite { db in
            for var key in theirKeys {
                let id = key.id
                if try KeyRow.fetch(id, db) == nil {
                    key.successor = nil  // the successor link is not carried over (as before records)
                    try key.insert(db)
                    addedKeys.append(id)
                    for row in try other.read({ db in try PolicyRow.rows(of: id, db) }) { try row.insert(db, onConflict: .ignore) }
                    for row in try other.read({ db in try TagRow.rows(of: id, db) }) { try row.insert(db, onConflict: .ignore) }
                    for row in try other.read({ db in try AliasRow.rows(of: id, db) }) {
                        if let owner = try AliasRow.target(of: row.alias, db), owner != id {
                            conflicts.append("alias \(row.alias) names key \(owner) here and \(id) in the backup")
                        } else {
                            try row.insert(db, onConflict: .ignore)
                        }
                    }
                }
            }
            for v in theirs {
                guard let keyID = v.key else { continue }
                let version = v.keyVersion
                let context = Self.materialContext(keyID, version)
                let mine = try KeyVersionRow.fetch(v.keyID, version, db)
                let theirSecret: SecretKey?
                if let material = v.material { theirSecret = try KeyWrap.open([UInt8](material), under: other.kek, context: context) } else { theirSecret = nil }
                if let mine {
                    let myMaterial = mine.material
                    if myMaterial == nil, v.material != nil {
                        conflicts.append("key \(v.keyID) version \(v.version) was destroyed or retired here; restoring would bring it back")
                    } else if let m = myMaterial, v.material != nil {
                        guard let mySecret = try KeyWrap.open([UInt8](m), under: kek, context: context), let t = theirSecret else {
                            conflicts.append("key \(v.keyID) version \(v.version) does not open")
                            continue
                        }
                        let same = mySecret.withUnsafeBytes { a in t.withUnsafeBytes { b in a.count == b.count && zip(a, b).reduce(0) { $0 | ($1.0 ^ $1.1) } == 0 } }
                        if !same { conflicts.append("key \(v.keyID) version \(v.version) has different material here and in the backup") }
                    }
                    continue
                }
                var wrapped: Data?
                if let t = theirSecret {
                    wrapped = Data(try t.withUnsafeBytes { (raw) throws(KeyManagerError) in try KeyWrap.seal(raw, under: kek, context: context) })
                }
                var added = v
                added.material = wrapped
                try added.insert(db)
                addedVersions += 1
            }
            guard conflicts.isEmpty else {
                throw KeyManagerError.invalidArgument("the backup conflicts with this keystore, nothing restored:\n  " + conflicts.joined(separator: "\n  "))
            }
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.restoreBackup, principal: principal,
                                                 error: "merged \(addedKeys.count) key(s), \(addedVersions) version(s) from a backup signed by \(signer)"), at: clock())
        }
        caches.withLock {
            $0.records.removeAll()
            $0.recordEpoch &+= 1
        }
        return RestoreReport(mode: "merged", keysAdded: addedKeys, versionsAdded: addedVersions, signer: signer, createdAt: createdAt)
    }
}

/// The fields of a backup file (see `createBackup`).
struct BackupFile {
    var logN: UInt8
    var salt: [UInt8]
    var filesystemID: ID128
    var createdAt: Double
    var boxOffset: Int
    var box: [UInt8]
    var signer: ID128
    var signerVersion: UInt32
    var publicKey: [UInt8]
    var signature: [UInt8]
    /// Bytes covered by the signature.
    var signedLength: Int

    init(_ b: [UInt8]) throws(KeyManagerError) {
        func bad(_ why: String) -> KeyManagerError { .invalidArgument("not a usable kmsfs backup: \(why)") }
        guard b.count > 73, Array(b[0..<8]) == KeyManager.backupMagic else { throw bad("wrong magic") }
        var i = 8
        func take(_ n: Int) throws(KeyManagerError) -> [UInt8] {
            guard n >= 0, i + n <= b.count else { throw bad("truncated") }
            defer { i += n }
            return Array(b[i..<(i + n)])
        }
        func number(_ n: Int) throws(KeyManagerError) -> UInt64 { try take(n).reduce(0) { $0 << 8 | UInt64($1) } }
        logN = try take(1)[0]
        guard (10...22).contains(logN) else { throw bad("scrypt cost out of range") }
        salt = try take(32)
        filesystemID = ID128(bytes: try take(16))!
        createdAt = Double(bitPattern: try number(8))
        let boxLength = try number(8)
        guard boxLength <= UInt64(b.count), boxLength > UInt64(AESGCM.boxOverhead) else { throw bad("bad length") }
        boxOffset = i
        box = try take(Int(boxLength))
        signedLength = i
        signer = ID128(bytes: try take(16))!
        signerVersion = UInt32(try number(4))
        publicKey = try take(Int(try number(2)))
        signature = try take(Int(try number(2)))
        guard i == b.count else { throw bad("trailing bytes") }
    }
}

extension Array where Element == UInt8 {
    mutating func appendBigEndian(_ value: UInt64, width: Int) {
        for i in 0..<width { append(UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - i)))) }
    }
}
