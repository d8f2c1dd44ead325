import ChunkCipher
import GRDB
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Limits of AWS KMS that kmsfs keeps.
public enum KeyLimits {
    public static let rotationDays = 90...2560
    public static let defaultRotationDays = 365
    public static let deletionWindowDays = 7...30
    public static let defaultDeletionWindowDays = 30
    /// The shortest passphrase a keystore or backup is locked with (bytes).
    public static let minimumPassphraseLength = 8
    /// On-demand rotations a key may have in its life (AWS KMS allows 25).
    public static let onDemandRotations = 25

    /// Refuses a passphrase too short to resist guessing, even behind scrypt.
    static func checkPassphrase(_ passphrase: borrowing SecretKey, _ what: String) throws(KeyManagerError) {
        guard passphrase.count >= minimumPassphraseLength else {
            throw .invalidArgument("the \(what) is \(passphrase.count) character(s); use at least \(minimumPassphraseLength) (a generated one is best)")
        }
    }
}

/// What a periodic schedule check did.
public struct ScheduleReport: Sendable, Equatable {
    public var rotated: [KeyID] = []
    public var destroyed: [KeyID] = []
    /// Keys whose deletion window ended but which are still referenced, with the count.
    public var blocked: [KeyID: Int] = [:]
    /// Keys not destroyed because a mount died before flushing the usage index.
    public var unverified: [KeyID] = []
}

extension KeyManager {
    // MARK: Resolving

    /// The key named by a 32-hex-digit id or an alias (`alias/…`).
    public func resolve(_ reference: String) throws(KeyManagerError) -> KeyID {
        if let id = KeyID(hex: reference) {
            _ = try record(id)
            return id
        }
        let alias = reference.hasPrefix("alias/") ? reference : "alias/" + reference
        let hex = try verifiedRead { db in try AliasRow.target(of: alias, db) }
        guard let hex, let id = KeyID(hex: hex) else { throw .keyNotFound(reference) }
        return id
    }

    /// Refuses unless `action` is allowed in the key's state; returns the outcome.
    @discardableResult
    func check(_ action: LifecycleAction, _ record: KeyRecord) throws(KeyManagerError) -> LifecycleOutcome {
        let outcome = KeyLifecycle.outcome(of: action, in: record.state, key: record.displayName)
        if case .refused(let remedy) = outcome {
            throw .invalidState(key: record.displayName, state: record.state, operation: action.rawValue,
                                since: record.metadata.stateChangedAt, remedy: remedy)
        }
        if Self.dataKeyActions.contains(action) { try checkExternalState(record, action) }
        return outcome
    }

    // MARK: Creating and listing

    /// Creates a master key, Enabled, with version 1. AES keys rotate
    /// automatically every `rotationDays` (default 365; nil turns it off).
    @discardableResult
    public func createKey(spec: KeySpec = .aes256, description: String = "", aliases: [String] = [],
                          tags: [String: String] = [:], rotationDays: Int? = KeyLimits.defaultRotationDays,
                          by principal: Principal) throws(KeyManagerError) -> KeyMetadata {
        var request = ["keySpec": spec.rawValue]
        if !aliases.isEmpty { request["aliasNames"] = aliases.joined(separator: ",") }
        return try adminOperation(.createKey, principal, request: request) { () throws(KeyManagerError) in
            for alias in aliases { try Self.refuseReserved(alias) }
            return try makeKey(spec: spec, description: description, aliases: aliases, tags: tags, rotationDays: rotationDays, by: principal)
        }
    }

    /// Creates a key; kmsfs's own keys (reserved aliases) come through here directly.
    func makeKey(spec: KeySpec, description: String, aliases: [String], tags: [String: String] = [:],
                 rotationDays: Int? = KeyLimits.defaultRotationDays, by principal: Principal,
                 external: ExternalKeyConfig? = nil, provider: (any KeyProvider)? = nil) throws(KeyManagerError) -> KeyMetadata {
        for alias in aliases { try Self.validate(alias: alias) }
        for (name, value) in tags { try Self.validate(tag: name, value: value) }
        let rotation = spec == .aes256 ? rotationDays : nil
        if let days = rotation, !KeyLimits.rotationDays.contains(days) {
            throw .invalidArgument("rotation period \(days) days is outside \(KeyLimits.rotationDays.lowerBound)–\(KeyLimits.rotationDays.upperBound)")
        }
        let id = KeyID.random()
        let now = clock()
        let (material, publicKey) = try newMaterial(spec, id: id, version: KeyVersion(rawValue: 1), provider: provider ?? local)
        try sealedWrite { db in
            try KeyRow(id: id.rawValue.hex, spec: spec.rawValue, state: KeyState.enabled.rawValue, description: description, createdAt: now,
                       stateChangedAt: now, currentVersion: 1, rotationDays: rotation, lastRotatedAt: now).insert(db)
            try KeyVersionRow(key: id, version: KeyVersion(rawValue: 1), createdAt: now, material: Data(material),
                              publicKey: publicKey.map { Data($0) }).insert(db)
            if let external {
                let config = String(decoding: try JSONEncoder().encode(external), as: UTF8.self)
                try ExternalKeyRow(keyID: id.rawValue.hex, provider: external.provider, config: config).insert(db)
            }
            for alias in aliases {
                guard try AliasRow.target(of: alias, db) == nil else {
                    throw KeyManagerError.invalidArgument("alias \(alias) is already in use; pick another or move it with `kmsfs key alias`")
                }
                try AliasRow(alias: alias, key: id).insert(db)
            }
            for (name, value) in tags { try TagRow(key: id, name: name, value: value).insert(db) }
            var subjects: Set<PolicySubject> = [.uid(0), .uid(principal.uid)]
            if principal.uid == 0 { subjects = [.uid(0)] }
            for op in KeyOperation.allCases {
                for subject in subjects { try PolicyRow.add(op, on: id, to: subject, db) }
            }
            var request = ["keySpec": spec.rawValue]
            if !aliases.isEmpty { request["aliasNames"] = aliases.joined(separator: ",") }
            if !tags.isEmpty { request["tags"] = tags.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",") }
            try AuditTrail.append(db, chain: integrity.hmac, AuditEvent(.createKey, key: id, version: KeyVersion(rawValue: 1), principal: principal,
                                                                        request: request), at: now)
        }
        return try record(id).metadata
    }

    /// New material for a key version (and the public key of a key pair), from the provider.
    func newMaterial(_ spec: KeySpec, id: KeyID, version: KeyVersion, provider: (any KeyProvider)? = nil) throws(KeyManagerError) -> ([UInt8], [UInt8]?) {
        let chosen: any KeyProvider
        if let provider { chosen = provider } else { chosen = try self.provider(for: id) }
        let material = try chosen.createVersion(spec: spec, key: id, version: version)
        return (material.stored, material.publicKey)
    }

    /// All keys, optionally only those in `state` or carrying tag `name=value`.
    public func listKeys(state: KeyState? = nil, tag: (name: String, value: String)? = nil) throws(KeyManagerError) -> [KeyMetadata] {
        let all = try verifiedRead { db in try KeyRecord.fetchAll(db) }.map(\.metadata)
        return all.filter { key in
            if let state, key.state != state { return false }
            if let tag, key.tags[tag.name] != tag.value { return false }
            return true
        }
    }

    /// A key's metadata, versions with their usage, and policy.
    public func describe(_ reference: String) throws(KeyManagerError) -> (metadata: KeyMetadata, versions: [KeyVersionInfo], policy: [KeyOperation: [String]]) {
        let id = try resolve(reference)
        invalidate(id)
        try flushUsage()
        let rec = try record(id)
        let versions = try read { db in try KeyVersionRow.versions(of: id, db) }
        let policy = rec.policy.mapValues { $0.map(\.description).sorted() }
        return (rec.metadata, versions, policy)
    }

    /// Runs `body`, an admin operation; a refusal is audited as `event` with
    /// the request's parameters (a denial was already audited by the policy
    /// check, an outside keystore edit by the integrity check).
    func adminOperation<T>(_ event: AuditAction, _ principal: Principal, key: KeyID? = nil, request: [String: String],
                           _ body: () throws(KeyManagerError) -> T) throws(KeyManagerError) -> T {
        do { return try body() } catch {
            switch error {
            case .accessDenied, .keystoreTampered, .wrongPassphrase: break
            case .invalidArgument, .keyNotFound, .versionNotFound, .versionInUse, .deletionBlocked:
                audit(AuditEvent(event, outcome: .invalid, key: key, principal: principal, error: error.description, request: request))
            default:
                audit(AuditEvent(event, outcome: .refused, key: key, principal: principal, error: error.description, request: request))
            }
            throw error
        }
    }
}
