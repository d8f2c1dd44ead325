import ChunkCipher
import Synchronization

/// What a provider keeps for one master-key version: an opaque blob the
/// keystore stores (for the local provider, the material wrapped under the
/// passphrase key; for an HSM or external KMS, a handle), and the public key
/// of a SIGN_VERIFY version.
public struct ProviderMaterial: Sendable {
    public var stored: [UInt8]
    public var publicKey: [UInt8]?
    public init(stored: [UInt8], publicKey: [UInt8]?) {
        self.stored = stored
        self.publicKey = publicKey
    }
}

/// Where master-key material lives and where data keys are wrapped. The key
/// manager owns states, policies, versions and audit; the provider only does
/// cryptography with material it holds. The file format sees nothing but the
/// wrapped bytes, so a PKCS#11 HSM or the AWS KMS API (GenerateDataKey,
/// Decrypt, ReEncrypt) can stand behind this protocol with files unchanged.
public protocol KeyProvider: AnyObject, Sendable {
    /// "local" today; "pkcs11" or "aws-kms" later.
    var name: String { get }
    /// Makes the material of a new version.
    func createVersion(spec: KeySpec, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> ProviderMaterial
    /// Wraps a data key under a version; `stored` loads that version's blob when the provider needs it.
    func wrapDataKey(_ dataKey: borrowing SecretKey, key: KeyID, version: KeyVersion, context: [UInt8],
                     stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> [UInt8]
    /// Unwraps a data key; nil when the wrap does not authenticate under this version and context.
    func unwrapDataKey(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                       stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> SecretKey?
    /// Signs with a SIGN_VERIFY version.
    func sign(_ message: [UInt8], spec: KeySpec, key: KeyID, version: KeyVersion, stored: [UInt8]) throws(KeyManagerError) -> [UInt8]
    /// Drops anything cached for a key (after retiring or destroying versions).
    func forget(key: KeyID)
    /// Verifies a signature at the provider, so its log records the call and
    /// its key state decides; nil: kmsfs verifies with the stored public key.
    func verify(_ message: [UInt8], signature: [UInt8], spec: KeySpec, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> Bool?
    /// Moves a wrapped data key from `key` `version` to `targetKey`
    /// `targetVersion` of `target` without its plaintext leaving the provider
    /// (AWS KMS ReEncrypt); nil when this provider cannot for that target.
    func reencrypt(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                   to target: any KeyProvider, key targetKey: KeyID, version targetVersion: KeyVersion, context targetContext: [UInt8]) throws(KeyManagerError) -> [UInt8]?
}

extension KeyProvider {
    public func verify(_ message: [UInt8], signature: [UInt8], spec: KeySpec, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> Bool? { nil }
    public func reencrypt(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                          to target: any KeyProvider, key targetKey: KeyID, version targetVersion: KeyVersion,
                          context targetContext: [UInt8]) throws(KeyManagerError) -> [UInt8]? { nil }
}

/// The local provider: material in the keystore, wrapped with AES-256-GCM
/// under the key-encryption key that scrypt derives from the passphrase.
/// Unwrapped versions are cached as ready AES-GCM key schedules.
public final class LocalKeyProvider: KeyProvider, @unchecked Sendable {
    public let name = "local"
    private struct State: ~Copyable {
        var kek: AESGCM
        var wrappers: [KeyID: [KeyVersion: AESGCM]] = [:]
    }
    private let state: Mutex<State>

    init(kek: AESGCM) { state = Mutex(State(kek: kek)) }

    /// The key-encryption key (for the keystore's own check value and metadata key).
    var kek: AESGCM { state.withLock { $0.kek } }

    /// Switches to a new key-encryption key after `kmsfs passwd` rewrapped everything.
    func replaceKEK(_ kek: AESGCM) { state.withLock { $0.kek = kek } }

    static func materialContext(_ key: KeyID, _ version: KeyVersion) -> [UInt8] {
        var out = Array("kmsfs/v1/cmk".utf8) + key.rawValue.bytes
        withUnsafeBytes(of: version.rawValue.bigEndian) { out.append(contentsOf: $0) }
        return out
    }

    public func createVersion(spec: KeySpec, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> ProviderMaterial {
        let context = Self.materialContext(key, version)
        let kek = self.kek
        if spec == .aes256 {
            let secret = SecretKey.random()
            let stored = try secret.withUnsafeBytes { (raw) throws(KeyManagerError) in try KeyWrap.seal(raw, under: kek, context: context) }
            return ProviderMaterial(stored: stored, publicKey: nil)
        }
        let pair = try AsymmetricKeys.generate(spec)
        let stored = try pair.privateKey.withUnsafeBytes { (raw) throws(KeyManagerError) in try KeyWrap.seal(raw, under: kek, context: context) }
        return ProviderMaterial(stored: stored, publicKey: pair.publicKey)
    }

    /// The material of a version, unwrapped from its stored blob.
    func material(_ stored: [UInt8], key: KeyID, version: KeyVersion) throws(KeyManagerError) -> SecretKey {
        guard let secret = try KeyWrap.open(stored, under: kek, context: Self.materialContext(key, version)) else {
            throw .keystoreCorrupt("the material of key \(key) version \(version) does not open")
        }
        return secret
    }

    private func wrapper(_ key: KeyID, _ version: KeyVersion, stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> AESGCM {
        if let cached = state.withLock({ $0.wrappers[key]?[version] }) { return cached }
        let aead = try AESGCM.make(try material(try stored(), key: key, version: version))
        state.withLock { $0.wrappers[key, default: [:]][version] = aead }
        return aead
    }

    public func wrapDataKey(_ dataKey: borrowing SecretKey, key: KeyID, version: KeyVersion, context: [UInt8],
                            stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> [UInt8] {
        let wrapping = try wrapper(key, version, stored: stored)
        return try dataKey.withUnsafeBytes { (raw) throws(KeyManagerError) in try KeyWrap.seal(raw, under: wrapping, context: context) }
    }

    public func unwrapDataKey(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                              stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> SecretKey? {
        try KeyWrap.open(wrapped, under: try wrapper(key, version, stored: stored), context: context)
    }

    public func sign(_ message: [UInt8], spec: KeySpec, key: KeyID, version: KeyVersion, stored: [UInt8]) throws(KeyManagerError) -> [UInt8] {
        try AsymmetricKeys.sign(message, privateKey: try material(stored, key: key, version: version), spec: spec)
    }

    public func forget(key: KeyID) {
        state.withLock { _ = $0.wrappers.removeValue(forKey: key) }
    }
}
