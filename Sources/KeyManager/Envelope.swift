import ChunkCipher
import GRDB

/// The envelope API the filesystem calls: data keys are generated here,
/// wrapped by the current version of a master key with the encryption
/// context (filesystem id, object id, key id, version) as additional data,
/// and recorded in the usage index so deletion and rekeying know who needs
/// which version.
extension KeyManager {
    /// A fresh 256-bit data key for a new file or directory, wrapped by the
    /// current version of `key`, after checking policy (encrypt) and state.
    public func generateDataKey(for object: ID128, kind: ObjectKind, key: KeyID, principal: Principal, path: String? = nil) throws(KeyManagerError) -> DataKey {
        let rec = try record(key)
        guard rec.metadata.usage == .encryptDecrypt else {
            throw .invalidArgument("key \(rec.displayName) is a \(rec.metadata.spec.rawValue) SIGN_VERIFY key; data keys need an AES_256 key")
        }
        try authorize(principal, .encrypt, rec, object: object, path: { path })
        do { try check(.generateDataKey, rec) } catch {
            audit(AuditEvent(.generateDataKey, outcome: .refused, key: key, principal: principal, object: object, error: error.description, path: path))
            throw error
        }
        let version = rec.metadata.currentVersion
        let dek = SecretKey.random()
        let wrapped = try provider(for: key).wrapDataKey(dek, key: key, version: version, context: dataKeyContext(object: object, key: key, version: version)) {
            () throws(KeyManagerError) in try storedMaterial(key, version)
        }
        try recordUsage(object, kind: kind, key: key, version: version)
        audit(AuditEvent(.generateDataKey, key: key, version: version, principal: principal, object: object, path: path))
        return DataKey(key: dek, keyID: key, version: version, wrapped: wrapped)
    }

    /// Unwraps a data key for `object` after checking policy (decrypt) and
    /// state. A wrong context or altered bytes give `unwrapFailed`. The
    /// rekey job passes `movingOffCutOff` to unwrap a version below the
    /// key's floor (`min-decryption-version`) so it can move the file onto
    /// the current version; every other caller honours the floor.
    public func decryptDataKey(_ wrapped: [UInt8], for object: ID128, key: KeyID, version: KeyVersion,
                               principal: Principal, path: String? = nil, movingOffCutOff: Bool = false) throws(KeyManagerError) -> SecretKey {
        // A header naming a key or version this keystore never had was altered (or comes from elsewhere).
        func altered(_ why: String) -> KeyManagerError {
            audit(AuditEvent(.decrypt, outcome: .integrityFailure, key: key, version: version, principal: principal, object: object,
                             error: why, path: path))
            return .unwrapFailed(key: key.rawValue.hex, version: version)
        }
        let rec: KeyRecord
        do { rec = try record(key) } catch {
            if case .keyNotFound = error { throw altered("the header names key \(key.rawValue.hex), which this keystore does not have") }
            throw error
        }
        guard version.rawValue >= 1, version <= rec.metadata.currentVersion else {
            throw altered("the header names version \(version) of key \(rec.displayName), which has only \(rec.metadata.currentVersion)")
        }
        try authorize(principal, .decrypt, rec, object: object, path: { path })
        do { try check(.unwrapDataKey, rec) } catch {
            audit(AuditEvent(.decrypt, outcome: .refused, key: key, version: version, principal: principal, object: object, error: error.description, path: path))
            throw error
        }
        if !movingOffCutOff { try checkFloor(rec, version, principal: principal, object: object, path: { path }) }
        guard let dek = try provider(for: key).unwrapDataKey(wrapped, key: key, version: version, context: dataKeyContext(object: object, key: key, version: version),
                                                   stored: { () throws(KeyManagerError) in try storedMaterial(key, version) }) else {
            let error = KeyManagerError.unwrapFailed(key: rec.displayName, version: version)
            audit(AuditEvent(.decrypt, outcome: .integrityFailure, key: key, version: version, principal: principal, object: object, error: error.description, path: path))
            throw error
        }
        audit(AuditEvent(.decrypt, key: key, version: version, principal: principal, object: object, path: path))
        return dek
    }

    /// Rewraps a data key from its key version onto the current version of
    /// `target` (the same key after a rotation, or a successor), updating the
    /// usage index. The data key itself does not change.
    public func reencryptDataKey(_ wrapped: [UInt8], for object: ID128, kind: ObjectKind, from key: KeyID, version: KeyVersion,
                                 to target: KeyID, principal: Principal) throws(KeyManagerError) -> (key: KeyID, version: KeyVersion, wrapped: [UInt8]) {
        let source = try record(key)
        let destination = try record(target)
        try authorize(principal, .decrypt, source)
        try authorize(principal, .encrypt, destination)
        try check(.rewrapFrom, source)
        try check(.rewrapTo, destination)
        let newVersion = destination.metadata.currentVersion
        let sourceProvider = try provider(for: key), targetProvider = try provider(for: target)
        let sourceContext = dataKeyContext(object: object, key: key, version: version)
        let targetContext = dataKeyContext(object: object, key: target, version: newVersion)
        var request: [String: String] = [:]
        let rewrapped: [UInt8]
        if let moved = try sourceProvider.reencrypt(wrapped, key: key, version: version, context: sourceContext,
                                                    to: targetProvider, key: target, version: newVersion, context: targetContext) {
            // Moved inside the provider (AWS KMS ReEncrypt): the data key never left it.
            rewrapped = moved
            request["via"] = "\(sourceProvider.name):ReEncrypt"
        } else {
            guard let dek = try sourceProvider.unwrapDataKey(wrapped, key: key, version: version, context: sourceContext,
                                                             stored: { () throws(KeyManagerError) in try storedMaterial(key, version) }) else {
                throw .unwrapFailed(key: source.displayName, version: version)
            }
            rewrapped = try targetProvider.wrapDataKey(dek, key: target, version: newVersion, context: targetContext) {
                () throws(KeyManagerError) in try storedMaterial(target, newVersion)
            }
        }
        try recordUsage(object, kind: kind, key: target, version: newVersion)
        audit(AuditEvent(.reEncrypt, key: target, version: newVersion, principal: principal, object: object,
                         error: "from \(key.rawValue.hex) v\(version)", request: request.isEmpty ? nil : request))
        return (target, newVersion, rewrapped)
    }

    /// Records that `object`'s data key is wrapped by `key` `version`.
    public func recordUsage(_ object: ID128, kind: ObjectKind, key: KeyID, version: KeyVersion) throws(KeyManagerError) {
        if let journal { return try journal.append(.record(object, kind, key, version, clock())) }
        try write { db in
            try UsageRow.record(object, kind, key: key, version: version, at: clock(), db)
        }
    }

    /// Forgets `object` (its file or directory is gone).
    public func forgetUsage(_ object: ID128) throws(KeyManagerError) {
        if let journal { return try journal.append(.forget(object)) }
        try write { db in try UsageRow.forget(object, db) }
    }

    /// How many files and directories each version of a key wraps.
    public func usage(of reference: String) throws(KeyManagerError) -> [KeyVersion: Int] {
        try flushUsage()
        let id = try resolve(reference)
        return try read { db in try UsageRow.countsByVersion(of: id, db) }
    }

    /// The objects whose data keys a key (optionally one version) wraps.
    public func objects(using reference: String, version: KeyVersion? = nil) throws(KeyManagerError) -> [(object: ID128, kind: ObjectKind, version: KeyVersion)] {
        try flushUsage()
        let id = try resolve(reference)
        return try read { db in try UsageRow.objects(of: id, version: version, db) }
    }
}

extension KeyManager {
    /// Checks, without unwrapping anything, that `principal` may still use a
    /// key whose data key is already in memory: policy, then state. The mount
    /// calls this on every request that uses a cached key, so a disabled key
    /// or a revoked grant takes effect at once.
    /// Why `key`'s state refuses to unwrap data keys ("key alias/x is
    /// Disabled since …"), or nil when it does not (or the key is unknown).
    public func unwrapRefusal(_ key: KeyID) -> String? {
        invalidate(key)
        guard let rec = try? record(key) else { return nil }
        guard case .refused = KeyLifecycle.outcome(of: .unwrapDataKey, in: rec.state, key: rec.displayName) else { return nil }
        return "key \(rec.displayName) is \(rec.state.rawValue)"
    }

    /// `version`, when given, is the version that wrapped the data key in
    /// memory: a version cut off since (`key min-decryption-version`) is refused.
    public func checkUse(_ principal: Principal, _ operation: KeyOperation, key: KeyID, version: KeyVersion? = nil, object: ID128? = nil,
                         path: () -> String? = { nil }) throws(KeyManagerError) {
        let rec = try record(key)
        try authorize(principal, operation, rec, object: object, path: path)
        let action: LifecycleAction = operation == .encrypt ? .generateDataKey : .unwrapDataKey
        do { try check(action, rec) } catch {
            audit(AuditEvent(operation == .encrypt ? .generateDataKey : .decrypt, outcome: .refused, key: key,
                             principal: principal, object: object, error: error.description, path: path()))
            throw error
        }
        if let version, operation == .decrypt { try checkFloor(rec, version, principal: principal, object: object, path: path) }
    }
}
