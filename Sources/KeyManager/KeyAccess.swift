import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// Grants, the reversible cut-off of old versions, signing for users, and the
// access review: the parts of AWS KMS (CreateGrant, Sign/Verify/GetPublicKey)
// and Vault transit (min_decryption_version) an administrator reaches for
// after the policy itself.

// MARK: Grants

extension KeyManager {
    /// Gives `grantee` some of a key's operations (encrypt, decrypt), until
    /// `expiresAt` if given. Needs administer on the key; the key must not
    /// be Destroyed.
    @discardableResult
    public func createGrant(on reference: String, grantee: PolicySubject, operations: [KeyOperation], expiresAt: Double?,
                            by principal: Principal) throws(KeyManagerError) -> KeyGrant {
        var request = ["keyId": reference, "granteePrincipal": grantee.description,
                       "operations": operations.map(\.rawValue).joined(separator: ",")]
        if let expiresAt { request["expiresAt"] = Date(timeIntervalSince1970: expiresAt).formatted(.iso8601) }
        return try adminOperation(.createGrant, principal, request: request) { () throws(KeyManagerError) -> KeyGrant in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            let ops = Array(Set(operations)).sorted { $0.rawValue < $1.rawValue }
            guard !ops.isEmpty, ops.allSatisfy(KeyGrant.grantable.contains) else {
                throw .invalidArgument("a grant gives some of: \(KeyGrant.grantable.map(\.rawValue).joined(separator: ", ")); "
                                       + "administer is given only by the key policy (`kmsfs key policy`)")
            }
            let now = clock()
            if let expiresAt, expiresAt <= now { throw .invalidArgument("the grant would expire before it starts") }
            let grantID = ID128.random().hex
            try sealedWrite { db in
                try GrantRow(id: grantID, keyID: id.rawValue.hex, grantee: grantee.description, operations: ops.map(\.rawValue).joined(separator: ","),
                             createdAt: now, expiresAt: expiresAt, createdBy: Int(principal.uid)).insert(db)
                var recorded = request
                recorded["keyId"] = id.rawValue.hex
                recorded["grantId"] = grantID
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.createGrant, key: id, principal: principal, request: recorded), at: now)
            }
            invalidate(id)
            guard let grant = try record(id).grants.first(where: { $0.grantID == grantID }) else {
                throw .database("the new grant \(grantID) was not found")
            }
            return grant
        }
    }

    /// A key's grants, expired ones included (marked by their expiry).
    public func listGrants(_ reference: String, by principal: Principal) throws(KeyManagerError) -> [KeyGrant] {
        try adminOperation(.listGrants, principal, request: ["keyId": reference]) { () throws(KeyManagerError) in
            try authorizeAdmin(principal, try resolve(reference)).grants
        }
    }

    /// Removes a grant: by an administrator of the key (RevokeGrant), or by
    /// its own grantee uid giving it up (RetireGrant).
    public func revokeGrant(_ reference: String, grantID: String, by principal: Principal) throws(KeyManagerError) {
        try adminOperation(.revokeGrant, principal, request: ["keyId": reference, "grantId": grantID]) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try record(id)
            guard let grant = rec.grants.first(where: { $0.grantID == grantID }) else {
                throw .invalidArgument("key \(rec.displayName) has no grant \(grantID); `kmsfs key grant list \(reference)` shows its grants")
            }
            let retiring = grant.grantee == PolicySubject.uid(principal.uid).description
            if !retiring { _ = try authorizeAdmin(principal, id) }
            let event: AuditAction = retiring ? .retireGrant : .revokeGrant
            try sealedWrite { db in
                try GrantRow.remove(grantID, of: id, db)
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal,
                                                                            request: ["keyId": id.rawValue.hex, "grantId": grantID,
                                                                                      "granteePrincipal": grant.grantee]), at: clock())
            }
            invalidate(id)
        }
    }
}

// MARK: Cut-off of old versions

extension KeyManager {
    /// Makes versions below `version` refuse to decrypt at once (nil lifts
    /// the floor). Reversible, unlike `retireVersion`: the material stays.
    /// Files under cut-off versions read as EKEYREVOKED until the floor is
    /// lifted or they are re-keyed (a rekey may still move them: it is the
    /// way out, and it runs as the administrator's job).
    public func setMinDecryptionVersion(_ reference: String, version: KeyVersion?, by principal: Principal) throws(KeyManagerError) {
        let request = ["keyId": reference, "minDecryptionVersion": version.map { String($0.rawValue) } ?? "none"]
        try adminOperation(.setMinDecryptionVersion, principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            guard rec.metadata.usage == .encryptDecrypt else { throw .invalidArgument("only AES_256 keys have versions to cut off") }
            if let version, version.rawValue < 1 || version > rec.metadata.currentVersion {
                throw .invalidArgument("key \(rec.displayName) has versions 1-\(rec.metadata.currentVersion); the minimum must be one of them")
            }
            try sealedWrite { db in
                try FloorRow.set(version, of: id, db)
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.setMinDecryptionVersion, key: id, version: version,
                                                                            principal: principal, request: request), at: clock())
            }
            invalidate(id)
        }
    }

    /// Throws (and audits) if `version` of the key is below its floor.
    func checkFloor(_ rec: KeyRecord, _ version: KeyVersion, principal: Principal, object: ID128?, path: () -> String?) throws(KeyManagerError) {
        guard let floor = rec.minDecryptionVersion, version < floor else { return }
        let error = KeyManagerError.versionCutOff(key: rec.displayName, version: version, minimum: floor)
        audit(AuditEvent(.decrypt, outcome: .refused, key: rec.id, version: version, principal: principal, object: object,
                         error: error.description, path: path()))
        throw error
    }

    /// The key's minimum decryption version, if one is set.
    public func minDecryptionVersion(_ reference: String) throws(KeyManagerError) -> KeyVersion? {
        try record(try resolve(reference)).minDecryptionVersion
    }
}

// MARK: Signing for users

extension KeyManager {
    /// Signs `message` with a SIGN_VERIFY key (policy: encrypt), audited as Sign.
    public func signMessage(_ message: [UInt8], with reference: String, by principal: Principal) throws(KeyManagerError) -> [UInt8] {
        try adminOperation(.sign, principal, request: ["keyId": reference, "messageBytes": String(message.count)]) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try record(id)
            try check(.change, rec)
            let (version, signature) = try sign(message, with: id.rawValue.hex, by: principal)
            audit(AuditEvent(.sign, key: id, version: version, principal: principal,
                             request: ["keyId": id.rawValue.hex, "signingAlgorithm": rec.metadata.spec.signingAlgorithm]))
            return signature
        }
    }

    /// Whether `signature` is `message`'s under a SIGN_VERIFY key (policy: decrypt), audited as Verify.
    public func verifyMessage(_ message: [UInt8], signature: [UInt8], with reference: String, by principal: Principal) throws(KeyManagerError) -> Bool {
        try adminOperation(.verify, principal, request: ["keyId": reference]) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try record(id)
            guard rec.metadata.usage == .signVerify else { throw .invalidArgument("key \(rec.displayName) is not a SIGN_VERIFY key") }
            try authorize(principal, .decrypt, rec)
            // Like decrypting: a Disabled or PendingDeletion key does not verify.
            try check(.unwrapDataKey, rec)
            let valid = try verify(message, signature: signature, key: id.rawValue.hex, version: rec.metadata.currentVersion)
            audit(AuditEvent(.verify, outcome: valid ? .success : .invalid, key: id, version: rec.metadata.currentVersion, principal: principal,
                             error: valid ? nil : "the signature does not verify",
                             request: ["keyId": id.rawValue.hex, "signingAlgorithm": rec.metadata.spec.signingAlgorithm]))
            return valid
        }
    }

    /// The public key of a SIGN_VERIFY key as PEM (policy: decrypt), audited as GetPublicKey.
    public func publicKeyPEM(_ reference: String, by principal: Principal) throws(KeyManagerError) -> String {
        try adminOperation(.getPublicKey, principal, request: ["keyId": reference]) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try record(id)
            try check(.change, rec)
            guard rec.metadata.usage == .signVerify else { throw .invalidArgument("key \(rec.displayName) is not a SIGN_VERIFY key; it has no public key") }
            try authorize(principal, .decrypt, rec)
            let der: Data? = try verifiedRead { db in
                try KeyVersionRow.publicKey(of: id.rawValue.hex, rec.metadata.currentVersion, db)
            }
            guard let der else { throw .versionNotFound(key: rec.displayName, version: rec.metadata.currentVersion) }
            audit(AuditEvent(.getPublicKey, key: id, version: rec.metadata.currentVersion, principal: principal, request: ["keyId": id.rawValue.hex]))
            return AsymmetricKeys.pem(publicKey: [UInt8](der))
        }
    }
}

extension KeySpec {
    /// The AWS name of the algorithm kmsfs signs with for this spec.
    public var signingAlgorithm: String {
        switch self {
        case .rsa2048, .rsa3072, .rsa4096: "RSASSA_PKCS1_V1_5_SHA_256"
        case .eccP256: "ECDSA_SHA_256"
        case .eccP384: "ECDSA_SHA_384"
        case .eccP521: "ECDSA_SHA_512"
        case .aes256: "none"
        }
    }
}

// MARK: Access review

/// One subject's access to one key, and when it last used it.
public struct AccessFinding: Sendable, Codable, Equatable {
    public var keyID: KeyID
    public var aliases: [String]
    public var state: KeyState
    public var subject: String
    /// The operations the subject may perform, each with where it comes from
    /// ("policy", or "grant GRANTID until …").
    public var operations: [String]
    public var sources: [String]
    /// The newest successful audit record of this subject on this key.
    public var lastUsedAt: Double?
    /// No use within the review window, on a key older than the window.
    public var unused: Bool
}

extension KeyManager {
    /// For every key the caller administers (every key, for root): who may do
    /// what through the policy and unexpired grants, when each subject last
    /// used the key (from the audit log), and which have not used it for
    /// `unusedDays` — IAM Access Analyzer's unused-access finding, for keys.
    public func accessReport(unusedDays: Int, by principal: Principal) throws(KeyManagerError) -> [AccessFinding] {
        try flushUsage()
        let now = clock()
        let window = Double(unusedDays) * 86_400
        var findings = [AccessFinding]()
        for rec in try verifiedRead({ db in try KeyRecord.fetchAll(db) }) where rec.state != .destroyed {
            guard principal.uid == 0 || rec.policy[.administer, default: []].contains(where: { $0.matches(principal) }) else { continue }
            var operations = [String: Set<String>]()
            var sources = [String: Set<String>]()
            for (op, subjects) in rec.policy {
                for subject in subjects {
                    operations[subject.description, default: []].insert(op.rawValue)
                    sources[subject.description, default: []].insert("policy")
                }
            }
            for grant in rec.grants where grant.isLive(at: now) {
                for op in grant.operations { operations[grant.grantee, default: []].insert(op.rawValue) }
                sources[grant.grantee, default: []].insert("grant " + grant.grantID
                    + (grant.expiresAt.map { " until " + Date(timeIntervalSince1970: $0).formatted(.iso8601) } ?? ""))
            }
            for subject in operations.keys.sorted() {
                guard let parsed = PolicySubject(argument: subject) else { continue }
                let last = try read { db in try AuditLogTable.lastSuccess(of: rec.id, by: parsed, db) }
                let oldEnough = now - rec.metadata.createdAt >= window
                findings.append(AccessFinding(keyID: rec.id, aliases: rec.metadata.aliases, state: rec.state, subject: subject,
                                              operations: operations[subject, default: []].sorted(), sources: sources[subject, default: []].sorted(),
                                              lastUsedAt: last, unused: oldEnough && (last.map { now - $0 > window } ?? true)))
            }
        }
        return findings
    }
}
