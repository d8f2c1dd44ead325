import ChunkCipher
import CPKCS11
import Foundation
import Synchronization

/// A kmsfs master key held in a PKCS#11 token (an HSM; SoftHSM in the
/// tests): AES-256 (or a signing key pair) generated inside the token,
/// non-extractable and sensitive. Data keys are wrapped under intermediate
/// keys the token seals with AES-GCM (IntermediateKeyCache: one C_Encrypt
/// per 5 minutes or 100,000 files, not one per create — a network HSM's
/// round trip costs what KMS's does), or with `--strict` each inside the token:
///
///     "P1" ‖ 0x01 ‖ nonce (12) ‖ GCM(data key) ‖ tag (16)    (63 bytes)
///
/// with the data-key context (filesystem, object, key, version) as the
/// additional data. The PIN is read
/// from the key's PIN file at each login, never from the command line. The
/// session's state is checked at first use and every poll interval: a token
/// that is gone or logged out refuses like a Disabled key (EKEYREVOKED),
/// audited, until it can be opened again.
final class PKCS11Provider: ExternalProvider, @unchecked Sendable {
    let name = "pkcs11"
    let config: ExternalKeyConfig
    let pollInterval: Double
    let clock: @Sendable () -> Double
    /// A logged-in session (closed when dropped).
    final class Handle: @unchecked Sendable {
        let pointer: OpaquePointer
        init(_ pointer: OpaquePointer) { self.pointer = pointer }
        deinit { kmsfs_p11_close(pointer) }
    }
    private struct State {
        var handle: Handle?
        var external: (state: String, checkedAt: Double)?
    }
    private let state = Mutex(State())
    static let magic: [UInt8] = [UInt8(ascii: "P"), UInt8(ascii: "1"), 1]

    /// Intermediate keys (nil for `--strict` keys, and for a provider that only
    /// makes keys or seals an unlock record): the token then wraps every data key itself.
    let intermediates: IntermediateKeyCache?
    let filesystemID: ID128?

    init(config: ExternalKeyConfig, clock: @escaping @Sendable () -> Double, pollInterval: Double = 60,
         filesystemID: ID128? = nil, store: IntermediateStore? = nil, maxAge: Double = 300, maxFiles: Int = 100_000) {
        self.config = config
        self.clock = clock
        self.pollInterval = pollInterval
        self.filesystemID = filesystemID
        intermediates = config.strict == true ? nil : store.map { IntermediateKeyCache(store: $0, clock: clock, maxAge: maxAge, maxFiles: maxFiles) }
    }


    /// A C message buffer as text.
    static func text(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private var label: String { config.objectLabel ?? config.keyID }

    func error(_ code: String, _ message: String, remedy: String = "") -> KeyManagerError {
        .provider(provider: "pkcs11", code: code, message: message,
                  remedy: remedy.isEmpty ? "check --module, --token and the PIN file of \(config.location)" : remedy)
    }

    /// The logged-in session, opened on first use (and again after the token came back).
    /// Callers hold the handle for the length of an operation, so a refresh
    /// that drops it cannot close the session under them.
    private func session() throws(KeyManagerError) -> Handle {
        if let h = state.withLock({ $0.handle }) { return h }
        guard let module = config.module, let token = config.token, let pinFile = config.pinFile else {
            throw error("MissingConfig", "\(config.location) has no module, token or PIN file")
        }
        guard let pinData = FileManager.default.contents(atPath: pinFile) else {
            throw error("NoPIN", "cannot read the PIN file \(pinFile)", remedy: "give a readable --pin-file (mode 0600)")
        }
        var pin = [UInt8](pinData)
        while let last = pin.last, last == 10 || last == 13 { pin.removeLast() }
        defer { for i in pin.indices { pin[i] = 0 } }
        var message = [CChar](repeating: 0, count: 512)
        let opened = pin.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { kmsfs_p11_open(module, token, $0.baseAddress, $0.count, &message, message.count) }
        }
        guard let opened else { throw error("TokenUnavailable", Self.text(message)) }
        let fresh = Handle(opened)
        return state.withLock { s in
            if let existing = s.handle { return existing }
            s.handle = fresh
            return fresh
        }
    }


    /// Makes the token key — an AES-256 secret key, or for a SIGN_VERIFY spec
    /// a key pair — or checks an existing one given with --object-label.
    /// With `orCreate`, an existing key is used and a missing one generated.
    func prepare(create: Bool, orCreate: Bool = false, spec: KeySpec = .aes256) throws(KeyManagerError) {
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        var message = [CChar](repeating: 0, count: 512)
        let pair = spec != .aes256
        let found = pair ? kmsfs_p11_find_pair(h.pointer, label, &message, message.count) : kmsfs_p11_find_key(h.pointer, label, &message, message.count)
        guard found >= 0 else { throw error("TokenError", Self.text(message)) }
        if found == 1 {
            guard !create || orCreate else { throw error("KeyExists", "the token already holds a key labelled '\(label)'", remedy: "pick another label") }
            return
        }
        guard create || orCreate else {
            throw error("NotFoundException", "the token has no \(pair ? "private key" : "secret key") labelled '\(label)'", remedy: "check --object-label and --spec")
        }
        if pair {
            let bits: Int32 = switch spec { case .rsa2048: 2048; case .rsa3072: 3072; case .rsa4096: 4096; default: 0 }
            let curve = DER.curve(spec) ?? []
            guard kmsfs_p11_generate_pair(h.pointer, label, bits, curve, curve.count, &message, message.count) == 0 else {
                throw error("TokenError", Self.text(message))
            }
            return
        }
        guard kmsfs_p11_generate_aes(h.pointer, label, &message, message.count) == 0 else { throw error("TokenError", Self.text(message)) }
    }

    /// CKA_EXTRACTABLE and CKA_SENSITIVE of the key (of the private key for a SIGN_VERIFY spec), as the token reports them.
    func keyFlags(spec: KeySpec = .aes256) throws(KeyManagerError) -> (extractable: Bool, sensitive: Bool) {
        var extractable: Int32 = 1, sensitive: Int32 = 0
        var message = [CChar](repeating: 0, count: 512)
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        guard kmsfs_p11_key_flags(h.pointer, label, spec == .aes256 ? 0 : 1, &extractable, &sensitive, &message, message.count) == 0 else { throw error("TokenError", Self.text(message)) }
        return (extractable != 0, sensitive != 0)
    }

    /// The token key pair's public key as DER (SubjectPublicKeyInfo), checked against `spec`.
    func publicKey(spec: KeySpec) throws(KeyManagerError) -> [UInt8] {
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        var isRSA: Int32 = 0
        var first = [UInt8](repeating: 0, count: 1024), second = [UInt8](repeating: 0, count: 1024)
        var firstLength = first.count, secondLength = second.count
        var message = [CChar](repeating: 0, count: 512)
        guard kmsfs_p11_public_key(h.pointer, label, &isRSA, &first, &firstLength, &second, &secondLength, &message, message.count) == 0 else {
            throw error("TokenError", Self.text(message))
        }
        first = Array(first.prefix(firstLength))
        second = Array(second.prefix(secondLength))
        let der: [UInt8]
        if isRSA != 0 {
            let bits = first.drop { $0 == 0 }.count * 8
            let expected = switch spec { case .rsa2048: 2048; case .rsa3072: 3072; case .rsa4096: 4096; default: 0 }
            guard bits == expected else { throw error("KeySpecMismatch", "the token key '\(label)' is RSA with a \(bits)-bit modulus, not \(spec.rawValue)", remedy: "give the matching --spec") }
            der = DER.rsaPublicKey(modulus: first, exponent: second)
        } else {
            guard let curve = DER.curve(spec), first == curve else {
                throw error("KeySpecMismatch", "the token key '\(label)' is not on the curve of \(spec.rawValue)", remedy: "give the matching --spec")
            }
            der = DER.ecPublicKey(curve: curve, point: second)
        }
        // The public key must parse as what we built, or a signature could never verify.
        guard AsymmetricKeys.isPublicKey(der) else { throw error("TokenError", "the token's public key for '\(label)' does not decode") }
        return der
    }

    // MARK: ExternalProvider

    @discardableResult
    func refreshState() throws(KeyManagerError) -> String {
        var message = [CChar](repeating: 0, count: 512)
        var now = "Enabled"
        if let h = state.withLock({ $0.handle }) {
            if kmsfs_p11_check(h.pointer, label, &message, message.count) != 0 {
                state.withLock { $0.handle = nil }
                now = "Unavailable"
            }
        }
        if now == "Enabled" {
            do throws(KeyManagerError) { _ = try session() } catch { now = "Unavailable" }
        }
        state.withLock { $0.external = (now, clock()) }
        if now != "Enabled" { intermediates?.clear() }
        return now
    }

    func externalState() throws(KeyManagerError) -> String {
        if let known = state.withLock({ $0.external }), clock() - known.checkedAt < pollInterval { return known.state }
        return try refreshState()
    }

    var lastKnownState: String? { state.withLock { $0.external?.state } }

    // MARK: KeyProvider

    func createVersion(spec: KeySpec, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> ProviderMaterial {
        // The material stays in the token: a version keeps only the label (and a key pair's public key).
        ProviderMaterial(stored: Array(label.utf8), publicKey: spec == .aes256 ? nil : try publicKey(spec: spec))
    }

    /// AES-GCM inside the token under the key: nonce (12) ‖ ciphertext ‖ tag (16).
    func seal(_ plaintext: UnsafeRawBufferPointer, aad: [UInt8]) throws(KeyManagerError) -> [UInt8] {
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        let nonce = SecureRandom.bytes(12)
        var out = [UInt8](repeating: 0, count: plaintext.count + 32)
        var outLength = out.count
        var message = [CChar](repeating: 0, count: 512)
        let rc = kmsfs_p11_gcm_encrypt(h.pointer, label, nonce, aad, aad.count, plaintext.baseAddress?.assumingMemoryBound(to: UInt8.self), plaintext.count,
                                       &out, &outLength, &message, message.count)
        guard rc == 0, outLength == plaintext.count + 16 else { throw error("TokenError", Self.text(message)) }
        return nonce + Array(out[0..<outLength])
    }

    /// The reverse of `seal`, into locked memory; nil when it does not authenticate.
    func open(_ sealed: [UInt8], aad: [UInt8]) throws(KeyManagerError) -> SecretKey? {
        guard sealed.count >= 12 + 16 else { return nil }
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        let nonce = Array(sealed[0..<12]), body = Array(sealed[12...])
        let plainCount = body.count - 16
        var message = [CChar](repeating: 0, count: 512)
        var result: Int32 = 0
        let secret = SecretKey(count: plainCount) { out in
            var length = body.count
            var scratch = [UInt8](repeating: 0, count: length)
            result = kmsfs_p11_gcm_decrypt(h.pointer, label, nonce, aad, aad.count, body, body.count, &scratch, &length, &message, message.count)
            if result == 0, length == plainCount { scratch.withUnsafeBytes { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(plainCount))) } } else if result == 0 { result = -2 }
            for i in scratch.indices { scratch[i] = 0 }
        }
        if result == -2 { return nil }
        guard result == 0 else { throw error("TokenError", Self.text(message)) }
        return secret
    }

    /// The additional data of an intermediate key sealed in the token: filesystem, key, version and intermediate id.
    func intermediateContext(_ key: KeyID, _ version: KeyVersion, _ id: ID128) -> [UInt8] {
        var out = Array("kmsfs/v1/intermediate".utf8) + (filesystemID?.bytes ?? []) + key.rawValue.bytes
        withUnsafeBytes(of: version.rawValue.bigEndian) { out.append(contentsOf: $0) }
        return out + id.bytes
    }

    /// Under an intermediate key (32 random bytes sealed by the token, so a
    /// create costs the token nothing but one call per 5 minutes), or with
    /// `--strict` wrapped by the token itself ("P1").
    func wrapDataKey(_ dataKey: borrowing SecretKey, key: KeyID, version: KeyVersion, context: [UInt8],
                     stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> [UInt8] {
        if let intermediates {
            return try intermediates.wrap(dataKey, key: key, version: version, context: context) { (id) throws(KeyManagerError) in
                let secret = SecretKey.random()
                let blob = try secret.withUnsafeBytes { (raw) throws(KeyManagerError) in try seal(raw, aad: intermediateContext(key, version, id)) }
                return (try AESGCM.make(secret), blob)
            }
        }
        return Self.magic + (try dataKey.withUnsafeBytes { (raw) throws(KeyManagerError) in try seal(raw, aad: context) })
    }

    func unwrapDataKey(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                       stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> SecretKey? {
        if IntermediateKeyCache.isIntermediate(wrapped) {
            guard let intermediates else { return nil }
            return try intermediates.unwrap(wrapped, key: key, version: version, context: context) { (id, blob) throws(KeyManagerError) in
                try open(blob, aad: intermediateContext(key, version, id))
            }
        }
        guard wrapped.count == Self.magic.count + 12 + 48, wrapped.starts(with: Self.magic) else { return nil }
        return try open(Array(wrapped[Self.magic.count...]), aad: context)
    }

    /// Signs inside the token: RSA with CKM_SHA256_RSA_PKCS (RSASSA_PKCS1_V1_5_SHA_256),
    /// ECDSA with CKM_ECDSA over the spec's digest, its r ‖ s returned as DER.
    func sign(_ message: [UInt8], spec: KeySpec, key: KeyID, version: KeyVersion, stored: [UInt8]) throws(KeyManagerError) -> [UInt8] {
        let rsa = [.rsa2048, .rsa3072, .rsa4096].contains(spec)
        let input = rsa ? message : try AsymmetricKeys.hash(message, for: spec)
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        var out = [UInt8](repeating: 0, count: 1024)
        var length = out.count
        var text = [CChar](repeating: 0, count: 512)
        guard kmsfs_p11_sign(h.pointer, label, rsa ? 1 : 0, input, input.count, &out, &length, &text, text.count) == 0 else {
            throw error("TokenError", Self.text(text))
        }
        let raw = Array(out.prefix(length))
        return rsa ? raw : DER.ecdsaSignature(raw)
    }

    func forget(key: KeyID) { intermediates?.clear() }
}
