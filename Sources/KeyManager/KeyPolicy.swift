import ChunkCipher
import GRDB

extension KeyManager {
    /// Throws `accessDenied` (and audits the denial) unless the key's policy
    /// grants `operation` to the principal's uid or gid, or to anyone.
    public func authorize(_ principal: Principal, _ operation: KeyOperation, key: KeyID) throws(KeyManagerError) {
        try authorize(principal, operation, try record(key))
    }

    /// `object` and `path` (evaluated only for a denial) name what the caller
    /// wanted the key for, so the denial record says which file it was.
    func authorize(_ principal: Principal, _ operation: KeyOperation, _ rec: KeyRecord,
                   object: ID128? = nil, path: () -> String? = { nil }) throws(KeyManagerError) {
        if rec.policy[operation, default: []].contains(where: { $0.matches(principal) }) { return }
        let now = clock()
        if rec.grants.contains(where: { $0.allows(operation, to: principal, at: now) }) { return }
        let error = KeyManagerError.accessDenied(key: rec.displayName, principal: principal, operation: operation)
        audit(AuditEvent("Authorize", outcome: "denied", key: rec.id, principal: principal, object: object, error: error.description, path: path()))
        throw error
    }

    func authorizeAdmin(_ principal: Principal, _ key: KeyID) throws(KeyManagerError) -> KeyRecord {
        let rec = try record(key)
        try authorize(principal, .administer, rec)
        return rec
    }

    /// Grants `operation` on a key to a subject (`uid:N`, `gid:N` or `*`).
    public func grant(_ operation: KeyOperation, to subject: PolicySubject, on reference: String, by principal: Principal) throws(KeyManagerError) {
        let request = ["keyId": reference, "operation": operation.rawValue, "grant": subject.description]
        try adminOperation("PutKeyPolicy", principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            try sealedWrite { db in
                try db.execute(sql: "INSERT OR IGNORE INTO policies (key_id, operation, subject) VALUES (?, ?, ?)",
                               arguments: [id.rawValue.hex, operation.rawValue, subject.description])
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent("PutKeyPolicy", key: id, principal: principal,
                                                                            request: request.merging(["keyId": id.rawValue.hex]) { $1 }), at: clock())
            }
            invalidate(id)
        }
    }

    /// Revokes a grant. The last administrator cannot be removed.
    public func revoke(_ operation: KeyOperation, from subject: PolicySubject, on reference: String, by principal: Principal) throws(KeyManagerError) {
        let request = ["keyId": reference, "operation": operation.rawValue, "revoke": subject.description]
        try adminOperation("PutKeyPolicy", principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            if operation == .administer, rec.policy[.administer, default: []] == [subject] {
                throw .invalidArgument("\(subject) is the last administrator of key \(rec.displayName); grant another first")
            }
            try sealedWrite { db in
                try db.execute(sql: "DELETE FROM policies WHERE key_id = ? AND operation = ? AND subject = ?",
                               arguments: [id.rawValue.hex, operation.rawValue, subject.description])
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent("PutKeyPolicy", key: id, principal: principal,
                                                                            request: request.merging(["keyId": id.rawValue.hex]) { $1 }), at: clock())
            }
            invalidate(id)
        }
    }
}

extension KeyManager {
    /// Whether some key's policy lets `principal` administer it: the test a
    /// live mount applies before running an admin command for a peer (each
    /// key operation then checks its own key's policy). A refusal is audited.
    public func admitAdministrator(_ principal: Principal) -> Bool {
        let subjects = (try? verifiedRead { db in
            try String.fetchAll(db, sql: "SELECT DISTINCT subject FROM policies WHERE operation = ?",
                                arguments: [KeyOperation.administer.rawValue])
        }) ?? []
        if subjects.compactMap(PolicySubject.init(argument:)).contains(where: { $0.matches(principal) }) { return true }
        audit(AuditEvent("AdminAccess", outcome: "denied", principal: principal,
                         error: "uid \(principal.uid) administers no key; control socket request refused"))
        return false
    }
}
