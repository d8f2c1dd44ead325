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
        audit(AuditEvent(.authorize, outcome: .denied, key: rec.id, principal: principal, object: object, error: error.description, path: path()))
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
        try adminOperation(.putKeyPolicy, principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            try sealedWrite { db in
                try PolicyRow.add(operation, on: id, to: subject, db)
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.putKeyPolicy, key: id, principal: principal,
                                                                            request: request.merging(["keyId": id.rawValue.hex]) { $1 }), at: clock())
            }
            invalidate(id)
        }
    }

    /// Revokes a grant. The last administrator cannot be removed.
    public func revoke(_ operation: KeyOperation, from subject: PolicySubject, on reference: String, by principal: Principal) throws(KeyManagerError) {
        let request = ["keyId": reference, "operation": operation.rawValue, "revoke": subject.description]
        try adminOperation(.putKeyPolicy, principal, request: request) { () throws(KeyManagerError) in
            let id = try resolve(reference)
            let rec = try authorizeAdmin(principal, id)
            try check(.change, rec)
            if operation == .administer, rec.policy[.administer, default: []] == [subject] {
                throw .invalidArgument("\(subject) is the last administrator of key \(rec.displayName); grant another first")
            }
            try sealedWrite { db in
                try PolicyRow.remove(operation, on: id, from: subject, db)
                try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.putKeyPolicy, key: id, principal: principal,
                                                                            request: request.merging(["keyId": id.rawValue.hex]) { $1 }), at: clock())
            }
            invalidate(id)
        }
    }
}

/// How far a live mount's control socket lets a peer in (root and the
/// mounting user always fully).
public enum ControlAdmission: Sendable, Equatable {
    /// Administers some key: every admin command, each checked against its key's policy.
    case administrator
    /// Holds encrypt or decrypt on some key (by policy or an unexpired grant)
    /// but administers none: only the key-use commands (`key sign`, `key
    /// verify`, `key get-public-key`), each checked against its key.
    case keyUser
    case refused
}

extension KeyManager {
    /// Who may talk to a live mount's control socket at all, decided from the
    /// peer's credentials before any of its request is read (each operation
    /// then checks its own key's policy). A refusal is audited.
    public func controlAdmission(_ principal: Principal) -> ControlAdmission {
        let now = clock()
        let (administrators, users) = (try? verifiedRead { db in try PolicyRow.subjects(db, at: now) }) ?? ([], [])
        func matches(_ subjects: [String]) -> Bool {
            subjects.compactMap(PolicySubject.init(argument:)).contains { $0.matches(principal) }
        }
        if matches(administrators) { return .administrator }
        if matches(users) { return .keyUser }
        audit(AuditEvent(.adminAccess, outcome: .denied, principal: principal,
                         error: "uid \(principal.uid) may use no key; control socket request refused"))
        return .refused
    }
}
