import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// Aliases and tags, the keystore passphrase, and signing with a key version.
extension KeyManager {
    // MARK: Aliases and tags

    /// Points `alias` at a key, creating it or moving it. As in AWS KMS,
    /// moving an alias takes administer rights on the key it leaves as well
    /// as the key it joins, and both must have the same spec and usage.
    /// Names kmsfs uses itself (`alias/kmsfs-…`) are reserved.
    public func setAlias(_ alias: String, to reference: String, by principal: Principal) throws(KeyManagerError) {
        var event = AuditAction.createAlias
        try adminOperation(event, principal, request: ["aliasName": alias, "targetKeyId": reference]) { () throws(KeyManagerError) in
            try Self.validate(alias: alias)
            try Self.refuseReserved(alias)
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            let currentHex = try verifiedRead { db in try AliasRow.target(of: alias, db) }
            var previous: KeyID?
            if let currentHex, let current = KeyID(hex: currentHex) {
                event = .updateAlias
                guard current != id else { return }
                let old = try authorizeAdmin(principal, current)
                guard old.metadata.spec == rec.metadata.spec, old.metadata.usage == rec.metadata.usage else {
                    throw .invalidArgument("\(alias) names a \(old.metadata.spec.rawValue) key; it can move only to another \(old.metadata.spec.rawValue) key, not \(rec.metadata.spec.rawValue)")
                }
                previous = current
            }
            try sealedWrite { db in
                try AliasRow.point(alias, at: id, db)
                var request = ["aliasName": alias, "targetKeyId": id.rawValue.hex]
                if let previous { request["previousKeyId"] = previous.rawValue.hex }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal, request: request), at: clock())
            }
            invalidate(id)
            if let previous { invalidate(previous) }
        }
    }

    /// Removes an alias (`alias/NAME`, or NAME). A key id is not an alias and is refused.
    public func deleteAlias(_ name: String, by principal: Principal) throws(KeyManagerError) {
        let alias = name.hasPrefix("alias/") ? name : "alias/" + name
        try adminOperation(.deleteAlias, principal, request: ["aliasName": alias]) { () throws(KeyManagerError) in
            guard KeyID(hex: name) == nil else {
                throw .invalidArgument("\(name) is a key id, not an alias; `kmsfs key describe \(name)` lists its aliases")
            }
            try Self.refuseReserved(alias)
            let hex = try verifiedRead { db in try AliasRow.target(of: alias, db) }
            guard let hex, let id = KeyID(hex: hex) else { throw .invalidArgument("there is no alias \(alias); `kmsfs key list` shows the aliases") }
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            try sealedWrite { db in
                guard try AliasRow.deleteOne(db, key: alias) else { throw KeyManagerError.database("alias \(alias) changed meanwhile; try again") }
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.deleteAlias, key: id, principal: principal,
                                                                            request: ["aliasName": alias]), at: clock())
            }
            invalidate(id)
        }
    }

    /// Sets (or with nil removes) a tag such as `env=prod`.
    public func setTag(_ reference: String, name: String, value: String?, by principal: Principal) throws(KeyManagerError) {
        let event: AuditAction = value == nil ? .untagResource : .tagResource
        var request = ["keyId": reference, "tagKey": name]
        if let value { request["tagValue"] = value }
        try adminOperation(event, principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            if let value { try Self.validate(tag: name, value: value) }
            try sealedWrite { db in
                try TagRow.set(name, of: id, to: value, db)
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(event, key: id, principal: principal, request: request), at: clock())
            }
            invalidate(id)
        }
    }

    /// Aliases kmsfs makes and relies on itself: no command may create, move or delete them.
    public static let reservedAliasPrefixes = ["alias/kmsfs-", "alias/aws/"]

    static func refuseReserved(_ alias: String) throws(KeyManagerError) {
        if reservedAliasPrefixes.contains(where: { alias.hasPrefix($0) }) {
            throw .invalidArgument("\(alias) is reserved for kmsfs's own keys (names starting \(reservedAliasPrefixes.joined(separator: " or "))); pick another name")
        }
    }

    static func validate(alias: String) throws(KeyManagerError) {
        let body = alias.dropFirst("alias/".count)
        guard alias.hasPrefix("alias/"), !body.isEmpty, body.count <= 250,
              body.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "/_-".contains($0)) }) else {
            throw .invalidArgument("alias '\(alias)' must look like alias/NAME with letters, digits, '/', '_' or '-'")
        }
    }

    static func validate(tag name: String, value: String) throws(KeyManagerError) {
        guard !name.isEmpty, name.count <= 128, value.count <= 256, !name.contains("=") else {
            throw .invalidArgument("tag '\(name)=\(value)' must be NAME=VALUE with a 1–128 character name")
        }
    }

    // MARK: Passphrase

    /// Rewraps every master-key version (and the keystore's own keys) under a
    /// key derived from `newPassphrase`. Nothing else is rewritten. An old
    /// copy of the keystore still opens with the old passphrase.
    public func changePassphrase(to newPassphrase: borrowing SecretKey, scrypt: ScryptParameters? = nil,
                                 by principal: Principal) throws(KeyManagerError) {
        let stored: ScryptParameters = try read { db in
            let logN = try KeystoreMeta.value(.scryptLogN, db, as: Int.self) ?? 16
            let r = try KeystoreMeta.value(.scryptR, db, as: Int.self) ?? 8
            let p = try KeystoreMeta.value(.scryptP, db, as: Int.self) ?? 1
            return ScryptParameters(logN: UInt8(logN), r: UInt32(r), p: UInt32(p))
        }
        try KeyLimits.checkPassphrase(newPassphrase, "new passphrase")
        let params = scrypt ?? stored
        let salt = SecureRandom.bytes(32)
        let newKEK = try AESGCM.make(try params.deriveKey(passphrase: newPassphrase, salt: salt))
        try sealedWrite { db in
            try rewrapSecrets(db, from: kek, to: newKEK, salt: salt, scrypt: params)
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.changePassphrase, principal: principal), at: clock())
        }
        local.replaceKEK(newKEK)
        do { try db.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE)") } } catch {}
    }

    // MARK: Signing

    /// Signs `message` with the current version of a SIGN_VERIFY key.
    public func sign(_ message: [UInt8], with reference: String, by principal: Principal) throws(KeyManagerError) -> (version: KeyVersion, signature: [UInt8]) {
        let id = try resolve(reference)
        let rec = try record(id)
        guard rec.metadata.usage == .signVerify else { throw .invalidArgument("key \(rec.displayName) is not a SIGN_VERIFY key") }
        try authorize(principal, .encrypt, rec)
        try check(.generateDataKey, rec)
        let version = rec.metadata.currentVersion
        let wrapped = try read { db in try KeyVersionRow.material(of: id, version, liveOnly: false, db) }
        guard let wrapped else { throw .versionNotFound(key: rec.displayName, version: version) }
        return (version, try provider(for: id).sign(message, spec: rec.metadata.spec, key: id, version: version, stored: [UInt8](wrapped)))
    }

    /// Verifies a signature made by `sign` (public key only; any state but Destroyed).
    public func verify(_ message: [UInt8], signature: [UInt8], key reference: String, version: KeyVersion) throws(KeyManagerError) -> Bool {
        let id = try resolve(reference)
        let rec = try record(id)
        let publicKey = try verifiedRead { db in try KeyVersionRow.publicKey(of: id.rawValue.hex, version, db) }
        guard let publicKey else { throw .versionNotFound(key: rec.displayName, version: version) }
        if let answered = try provider(for: id).verify(message, signature: signature, spec: rec.metadata.spec, key: id, version: version) {
            return answered
        }
        return AsymmetricKeys.verify(message, signature: signature, publicKey: [UInt8](publicKey), spec: rec.metadata.spec)
    }
}
