import ChunkCipher
import Foundation
import GRDB

/// kmsfs keys whose material lives in an external KMS (AWS KMS today).
/// States, policies, aliases, bindings, audit and rekey stay kmsfs's; the
/// provider does the cryptography and KMS's own key state is enforced on top
/// of kmsfs's (a key disabled in KMS refuses like a Disabled kmsfs key).
extension KeyManager {
    static let dataKeyActions: Set<LifecycleAction> = [.generateDataKey, .unwrapDataKey, .rewrapFrom, .rewrapTo]

    /// How often a mounted filesystem re-reads an external key's state (KMSFS_EXTERNAL_POLL_SECONDS for tests).
    static var externalPollInterval: Double {
        ProcessInfo.processInfo.environment["KMSFS_EXTERNAL_POLL_SECONDS"].flatMap(Double.init) ?? 60
    }

    /// How long an intermediate key wraps new data keys and stays cached (KMSFS_INTERMEDIATE_SECONDS for tests).
    static var intermediateMaxAge: Double {
        ProcessInfo.processInfo.environment["KMSFS_INTERMEDIATE_SECONDS"].flatMap(Double.init) ?? 300
    }

    /// The provider that holds `key`'s material.
    func provider(for key: KeyID) throws(KeyManagerError) -> any KeyProvider {
        if let external = try externalProvider(key) { return external }
        return local
    }

    /// The external provider of `key`, or nil for a local key.
    func externalProvider(_ key: KeyID) throws(KeyManagerError) -> (any ExternalProvider)? {
        if let known = externalProviders.withLock({ $0[key] }) { return known }
        let row = try verifiedRead { db in try ExternalKeyRow.fetch(key, db) }
        var made: (any ExternalProvider)?
        if let row {
            let text = row.config
            guard let config = try? JSONDecoder().decode(ExternalKeyConfig.self, from: Data(text.utf8)) else {
                throw .keystoreCorrupt("the external key of \(key.rawValue.hex) is unreadable")
            }
            switch config.provider {
            case "aws-kms":
                made = AWSKMSProvider(config: config, filesystemID: filesystemID, store: IntermediateKeys(self), clock: clock,
                                      maxAge: Self.intermediateMaxAge, pollInterval: Self.externalPollInterval)
            case "pkcs11":
                made = PKCS11Provider(config: config, clock: clock, pollInterval: Self.externalPollInterval, filesystemID: filesystemID,
                                      store: IntermediateKeys(self), maxAge: Self.intermediateMaxAge)
            default:
                throw .keystoreCorrupt("the external key of \(key.rawValue.hex) names an unknown provider \(config.provider)")
            }
        }
        return externalProviders.withLock { providers in
            if let raced = providers[key] { return raced }
            providers[key] = made
            return made
        }
    }

    /// Where `reference`'s material lives: nil for the local keystore.
    public func externalKey(_ reference: String) throws(KeyManagerError) -> ExternalKeyConfig? {
        try externalProvider(try resolve(reference))?.config
    }


    /// Refuses a data-key action when the key is not Enabled in its external KMS.
    func checkExternalState(_ record: KeyRecord, _ action: LifecycleAction) throws(KeyManagerError) {
        guard let external = try externalProvider(record.id) else { return }
        let state = try external.externalState()
        guard state != "Enabled" else { return }
        let mapped: KeyState = state.hasPrefix("PendingDeletion") || state == "PendingReplicaDeletion" ? .pendingDeletion : .disabled
        let remedy: String
        if external.config.provider == "pkcs11" {
            remedy = "the \(external.config.location) is \(state): insert the token and check its PIN file; access returns within a minute"
        } else {
            remedy = "it is \(state) in AWS KMS (\(external.config.arn ?? external.config.keyID)); "
                + (mapped == .pendingDeletion ? "cancel the deletion there (aws kms cancel-key-deletion)" : "enable it there (aws kms enable-key)")
        }
        throw .invalidState(key: record.displayName, state: mapped, operation: action.rawValue, since: clock(), remedy: remedy)
    }

    /// Re-reads the state of every external key and audits each change
    /// (`ExternalKeyStateChange`); a failed read is audited too. The daemon's
    /// schedule thread calls this every `externalPollInterval` seconds.
    public func refreshExternalKeyStates() {
        guard let keys = try? read({ db in try ExternalKeyRow.keys(db) }) else { return }
        for hex in keys {
            guard let id = KeyID(hex: hex), let external = try? externalProvider(id) else { continue }
            let before = external.lastKnownState
            do throws(KeyManagerError) {
                let now = try external.refreshState()
                if now != before {
                    audit(AuditEvent(.externalKeyStateChange, outcome: now == "Enabled" ? .success : .refused, key: id,
                                     error: "\(external.config.location) is \(now)" + (before.map { " (was \($0))" } ?? "")))
                    invalidate(id)
                }
            } catch {
                audit(AuditEvent(.describeKey, outcome: .failure, key: id, error: error.description))
            }
        }
    }

    /// Creates a kmsfs key whose material is the AWS KMS key `config.keyID`
    /// (an Enabled symmetric ENCRYPT_DECRYPT key there, or a SIGN_VERIFY key
    /// of a spec kmsfs signs with; the spec is KMS's) or a key in a PKCS#11
    /// token (`spec`: an AES-256 key or a key pair). For pkcs11,
    /// `createInToken` generates the token key (else `objectLabel` must name an existing one).
    @discardableResult
    public func createExternalKey(_ config: ExternalKeyConfig, spec requested: KeySpec? = nil, createInToken: Bool = false, description: String = "",
                                  aliases: [String] = [], tags: [String: String] = [:], by principal: Principal) throws(KeyManagerError) -> KeyMetadata {
        var request = ["keySpec": (requested ?? .aes256).rawValue, "origin": "EXTERNAL_KMS", "externalKey": config.keyID, "region": config.region]
        if !aliases.isEmpty { request["aliasNames"] = aliases.joined(separator: ",") }
        return try adminOperation(.createKey, principal, request: request) { () throws(KeyManagerError) in
            for alias in aliases { try Self.refuseReserved(alias) }
            if config.provider == "pkcs11" {
                let spec = requested ?? .aes256
                let provider = PKCS11Provider(config: config, clock: clock)
                try provider.prepare(create: createInToken, spec: spec)
                let flags = try provider.keyFlags(spec: spec)
                guard !flags.extractable, flags.sensitive else {
                    throw .invalidArgument("the token key '\(config.objectLabel ?? config.keyID)' is extractable or not sensitive; kmsfs uses only non-extractable, sensitive keys")
                }
                return try makeKey(spec: spec, description: description, aliases: aliases, tags: tags, rotationDays: nil, by: principal,
                                   external: config, provider: provider)
            }
            guard config.provider == "aws-kms" else { throw .invalidArgument("unknown provider \(config.provider); kmsfs knows local, aws-kms and pkcs11") }
            guard config.strict != true || requested ?? .aes256 == .aes256 else { throw .invalidArgument("--strict is for AES_256 (ENCRYPT_DECRYPT) keys") }
            let client = AWSKMSClient(config: config)
            let reply = try client.call("DescribeKey", ["KeyId": config.keyID])
            let metadata = reply["KeyMetadata"] as? [String: Any] ?? [:]
            let usage = metadata["KeyUsage"] as? String ?? "ENCRYPT_DECRYPT"
            let awsSpec = metadata["KeySpec"] as? String ?? metadata["CustomerMasterKeySpec"] as? String ?? "SYMMETRIC_DEFAULT"
            let spec: KeySpec
            switch (usage, awsSpec) {
            case ("ENCRYPT_DECRYPT", "SYMMETRIC_DEFAULT"): spec = .aes256
            case ("SIGN_VERIFY", let name) where KeySpec(rawValue: name).map({ $0 != .aes256 }) == true: spec = KeySpec(rawValue: name)!
            default:
                throw .invalidArgument("AWS KMS key \(config.keyID) is a \(awsSpec) \(usage) key; kmsfs uses symmetric ENCRYPT_DECRYPT keys and RSA or ECC_NIST SIGN_VERIFY keys")
            }
            if let requested, requested != spec {
                throw .invalidArgument("AWS KMS key \(config.keyID) is \(spec.rawValue) (\(usage)), not \(requested.rawValue); leave out --spec to take KMS's")
            }
            let state = metadata["KeyState"] as? String ?? "Enabled"
            guard state == "Enabled" else { throw .invalidArgument("AWS KMS key \(config.keyID) is \(state); enable it there first") }
            var resolved = config
            resolved.arn = metadata["Arn"] as? String
            let provider = AWSKMSProvider(config: resolved, filesystemID: filesystemID, store: IntermediateKeys(self), clock: clock)
            return try makeKey(spec: spec, description: description, aliases: aliases, tags: tags, rotationDays: nil, by: principal,
                               external: resolved, provider: provider)
        }
    }

    /// Whether AWS KMS rotates `reference`'s key material itself
    /// (GetKeyRotationStatus); nil for local and pkcs11 keys and for keys KMS cannot rotate.
    public func externalRotation(_ reference: String) throws(KeyManagerError) -> (enabled: Bool, periodDays: Int?)? {
        guard let aws = try externalProvider(try resolve(reference)) as? AWSKMSProvider else { return nil }
        return try aws.rotationStatus()
    }
}

/// The keystore side of intermediate keys (held weakly: the manager owns the providers).
final class IntermediateKeys: IntermediateStore, @unchecked Sendable {
    weak var manager: KeyManager?
    init(_ manager: KeyManager) { self.manager = manager }

    func saveIntermediate(_ id: ID128, key: KeyID, version: KeyVersion, blob: [UInt8]) throws(KeyManagerError) {
        guard let manager else { throw .database("the keystore is closed") }
        try manager.write { db in
            try IntermediateKeyRow(id: id.hex, keyID: key.rawValue.hex, version: Int(version.rawValue), blob: Data(blob), createdAt: manager.clock()).insert(db)
        }
    }

    func loadIntermediate(_ id: ID128, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> [UInt8]? {
        guard let manager else { throw .database("the keystore is closed") }
        let blob = try manager.read { db in try IntermediateKeyRow.blob(id, key: key, version: version, db) }
        return blob.map { [UInt8]($0) }
    }
}
