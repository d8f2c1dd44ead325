import ChunkCipher
import Foundation
import GRDB
#if canImport(Glibc)
import Glibc
#endif

// How records name paths, and the signed digests that seal the log.

// MARK: Paths in records

/// How audit records name the file of an open or create.
public enum AuditPathMode: String, Sendable, Codable, CaseIterable {
    /// `hmac:` and a keyed hash of the path (the default): events on one path
    /// correlate, and an investigator can test a path (`audit paths --hash`),
    /// but the log does not reveal names.
    case hashed
    /// The plaintext path (opt-in).
    case plain
    /// No path; the random object id only.
    case off
}

extension KeyManager {
    public func auditPathMode() -> AuditPathMode {
        let now = clock()
        if let cached = caches.withLock({ $0.pathMode }), abs(now - cached.fetchedAt) < Self.recordTTL * 10 { return cached.mode }
        let stored: String? = try? verifiedRead { db in try KeystoreMeta.value(.auditPaths, db, as: String.self) }
        let mode = stored.flatMap(AuditPathMode.init(rawValue:)) ?? .hashed
        caches.withLock { $0.pathMode = (mode, now) }
        return mode
    }

    /// Sets how paths are recorded (administrators of the default key; audited).
    public func setAuditPathMode(_ mode: AuditPathMode, by principal: Principal) throws(KeyManagerError) {
        _ = try authorizeAdmin(principal, try resolve("alias/default"))
        try sealedWrite { db in
            try KeystoreMeta.set(.auditPaths, to: mode.rawValue, db)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.putAuditSettings, principal: principal, error: "paths: \(mode.rawValue)"), at: clock())
        }
        caches.withLock { $0.pathMode = nil }
    }

    static let auditPathLabel = Array("kmsfs/v1/audit-path".utf8)

    /// The keyed hash an audit record holds for `path` in `hashed` mode.
    public func auditPathHash(_ path: String) -> String {
        let mac = pathMAC.mac(Self.auditPathLabel + Array(path.utf8))
        return "hmac:" + ID128(bytes: mac.prefix(16))!.hex
    }

    func storedAuditPath(_ path: String) -> String? {
        switch auditPathMode() {
        case .hashed: return auditPathHash(path)
        case .plain: return path
        case .off: return nil
        }
    }
}

// MARK: Signed digests

extension KeyManager {
    /// The alias of the SIGN_VERIFY key that signs audit digests (ECC P-256,
    /// made on first use, administered by root).
    public static let auditDigestAlias = "alias/kmsfs-audit-digest"
    static let digestLabel = Array("kmsfs/v1/audit-digest".utf8)

    func digestMessage(seq: Int64, hash: Data, time: Double) -> [UInt8] {
        var out = Self.digestLabel + filesystemID.bytes
        out += Array(String(seq).utf8) + [0] + [UInt8](hash) + Array(String(time).utf8)
        return out
    }

    /// Signs the newest record's seq and hash, if records were added since
    /// the last digest. The daemon calls this every minute and at unmount,
    /// offline commands when they end.
    @discardableResult
    public func sealAuditDigest() -> Bool {
        do {
            try flushUsage()
            let system = Principal(uid: 0, gid: 0, pid: getpid(), processName: "kmsfs-audit")
            guard let (seq, hash) = try read({ db in try AuditLogTable.tail(db) }) else { return false }
            let covered = try read { db in try AuditDigestRow.covered(db) }
            if let covered, covered >= seq { return false }
            let key: KeyID
            if let existing = try? resolve(Self.auditDigestAlias) { key = existing } else {
                key = try makeKey(spec: .eccP256, description: "signs the audit log's digests", aliases: [Self.auditDigestAlias], by: system).keyID
            }
            let time = clock()
            let (version, signature) = try sign(digestMessage(seq: seq, hash: hash, time: time), with: key.rawValue.hex, by: system)
            try write { db in
                try AuditDigestRow(time: time, lastSeq: seq, lastHash: hash, keyID: key.rawValue.hex, keyVersion: Int(version.rawValue),
                                   signature: Data(signature)).insert(db)
            }
            return true
        } catch {
            logger.error("could not sign an audit digest", metadata: ["error": .string("\(error)")])
            return false
        }
    }

    /// Checks every signed digest against the log: a bad signature, or a
    /// covered record that is gone or changed, names the digest and position.
    func verifyDigests(_ db: Database, records: Int) throws -> AuditVerification? {
        var count = 0
        let maxSeq = try AuditLogTable.lastSeq(db)
        for row in try AuditDigestRow.inOrder(db) {
            count += 1
            let seq = row.lastSeq, hash = row.lastHash, time = row.time
            let keyHex = row.keyID
            let version = KeyVersion(rawValue: UInt32(row.keyVersion))
            let publicKey = try KeyVersionRow.publicKey(of: keyHex, version, db)
            let spec = try KeyRow.fetch(keyHex, db).flatMap { KeySpec(rawValue: $0.spec) }
            guard let publicKey, let spec,
                  AsymmetricKeys.verify(digestMessage(seq: seq, hash: hash, time: time), signature: [UInt8](row.signature),
                                        publicKey: [UInt8](publicKey), spec: spec) else {
                return AuditVerification(records: records, firstBad: seq, problem: "signed digest \(count) (up to record \(seq)) has a bad signature")
            }
            guard seq <= maxSeq else {
                return AuditVerification(records: records, firstBad: maxSeq + 1,
                                         problem: "records \(maxSeq + 1)–\(seq) were cut off the end of the log (signed digest \(count) covers up to \(seq))")
            }
            let stored = try AuditLogTable.hash(of: seq, db)
            guard stored == hash else {
                return AuditVerification(records: records, firstBad: seq, problem: "record \(seq), signed by digest \(count), is missing or was rewritten")
            }
        }
        return nil
    }
}
