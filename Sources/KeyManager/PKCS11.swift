import ChunkCipher
import CPKCS11
import Foundation
import Synchronization

/// A kmsfs master key held in a PKCS#11 token (an HSM; SoftHSM in the
/// tests): AES-256 generated inside the token, non-extractable and
/// sensitive, and every data key wrapped *inside* the token with AES-GCM:
///
///     "P1" ‖ 0x01 ‖ nonce (12) ‖ GCM(data key) ‖ tag (16)    (63 bytes)
///
/// with the data-key context (filesystem, object, key, version) as the
/// additional data. The token is local (a library in the daemon's process),
/// so a create costs one C_Encrypt, not a network round trip. The PIN is read
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
        var calls: [String: Int] = [:]
    }
    private let state = Mutex(State())
    static let magic: [UInt8] = [UInt8(ascii: "P"), UInt8(ascii: "1"), 1]

    init(config: ExternalKeyConfig, clock: @escaping @Sendable () -> Double, pollInterval: Double = 60) {
        self.config = config
        self.clock = clock
        self.pollInterval = pollInterval
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
        guard let opened else { throw error("TokenUnavailable", String(cString: message)) }
        let fresh = Handle(opened)
        return state.withLock { s in
            if let existing = s.handle { return existing }
            s.handle = fresh
            return fresh
        }
    }

    private func count(_ operation: String) { state.withLock { $0.calls[operation, default: 0] += 1 } }

    /// Makes the token key (or checks an existing one given with --object-label).
    func prepare(create: Bool) throws(KeyManagerError) {
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        var message = [CChar](repeating: 0, count: 512)
        let found = kmsfs_p11_find_key(h.pointer, label, &message, message.count)
        guard found >= 0 else { throw error("TokenError", String(cString: message)) }
        if found == 1 {
            guard !create else { throw error("KeyExists", "the token already holds a key labelled '\(label)'", remedy: "pick another label") }
            return
        }
        guard create else { throw error("NotFoundException", "the token has no key labelled '\(label)'", remedy: "check --object-label") }
        count("C_GenerateKey")
        guard kmsfs_p11_generate_aes(h.pointer, label, &message, message.count) == 0 else { throw error("TokenError", String(cString: message)) }
    }

    /// CKA_EXTRACTABLE and CKA_SENSITIVE of the key, as the token reports them.
    func keyFlags() throws(KeyManagerError) -> (extractable: Bool, sensitive: Bool) {
        var extractable: Int32 = 1, sensitive: Int32 = 0
        var message = [CChar](repeating: 0, count: 512)
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        guard kmsfs_p11_key_flags(h.pointer, label, &extractable, &sensitive, &message, message.count) == 0 else {
            throw error("TokenError", String(cString: message))
        }
        return (extractable != 0, sensitive != 0)
    }

    // MARK: ExternalProvider

    @discardableResult
    func refreshState() throws(KeyManagerError) -> String {
        var message = [CChar](repeating: 0, count: 512)
        var now = "Enabled"
        count("C_GetSessionInfo")
        if let h = state.withLock({ $0.handle }) {
            if kmsfs_p11_check(h.pointer, &message, message.count) != 0 {
                state.withLock { $0.handle = nil }
                now = "Unavailable"
            }
        }
        if now == "Enabled" {
            do throws(KeyManagerError) { _ = try session() } catch { now = "Unavailable" }
        }
        state.withLock { $0.external = (now, clock()) }
        return now
    }

    func externalState() throws(KeyManagerError) -> String {
        if let known = state.withLock({ $0.external }), clock() - known.checkedAt < pollInterval { return known.state }
        return try refreshState()
    }

    var lastKnownState: String? { state.withLock { $0.external?.state } }
    var callCounts: [String: Int] { state.withLock { $0.calls } }

    // MARK: KeyProvider

    func createVersion(spec: KeySpec, key: KeyID, version: KeyVersion) throws(KeyManagerError) -> ProviderMaterial {
        guard spec == .aes256 else { throw .invalidArgument("a pkcs11 key is AES_256; token signing keys are not supported yet") }
        return ProviderMaterial(stored: Array(label.utf8), publicKey: nil)
    }

    func wrapDataKey(_ dataKey: borrowing SecretKey, key: KeyID, version: KeyVersion, context: [UInt8],
                     stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> [UInt8] {
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        let nonce = SecureRandom.bytes(12)
        var out = [UInt8](repeating: 0, count: 32 + 16 + 16)
        var outLength = out.count
        var message = [CChar](repeating: 0, count: 512)
        count("C_Encrypt")
        let rc = dataKey.withUnsafeBytes { raw in
            kmsfs_p11_gcm_encrypt(h.pointer, label, nonce, context, context.count, raw.baseAddress?.assumingMemoryBound(to: UInt8.self), raw.count,
                                  &out, &outLength, &message, message.count)
        }
        guard rc == 0, outLength == 48 else { throw error("TokenError", String(cString: message)) }
        return Self.magic + nonce + Array(out[0..<outLength])
    }

    func unwrapDataKey(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                       stored: () throws(KeyManagerError) -> [UInt8]) throws(KeyManagerError) -> SecretKey? {
        guard wrapped.count == Self.magic.count + 12 + 48, wrapped.starts(with: Self.magic) else { return nil }
        let h = try session()
        defer { withExtendedLifetime(h) {} }
        let nonce = Array(wrapped[3..<15]), sealed = Array(wrapped[15...])
        var message = [CChar](repeating: 0, count: 512)
        count("C_Decrypt")
        var result: Int32 = 0
        let secret = SecretKey(count: 32) { out in
            var length = 32 + 16
            var scratch = [UInt8](repeating: 0, count: length)
            result = kmsfs_p11_gcm_decrypt(h.pointer, label, nonce, context, context.count, sealed, sealed.count, &scratch, &length, &message, message.count)
            if result == 0, length == 32 { out.copyMemory(from: UnsafeRawBufferPointer(start: scratch, count: 32)) } else if result == 0 { result = -2 }
            for i in scratch.indices { scratch[i] = 0 }
        }
        if result == -2 { return nil }
        guard result == 0 else { throw error("TokenError", String(cString: message)) }
        return secret
    }

    func sign(_ message: [UInt8], spec: KeySpec, key: KeyID, version: KeyVersion, stored: [UInt8]) throws(KeyManagerError) -> [UInt8] {
        throw .invalidArgument("signing with a pkcs11 key is not supported yet")
    }

    func forget(key: KeyID) {}
}
