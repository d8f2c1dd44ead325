import ChunkCipher
import Foundation
import Synchronization

/// Intermediate keys, the S3 Bucket Keys idea shared by the external
/// providers: for each (master key, version) the provider makes a short-lived
/// AES-256 key its custodian wraps (AWS KMS `GenerateDataKey`; a PKCS#11
/// token's `C_Encrypt` of 32 random bytes), keeps the schedule in locked
/// memory and the wrapped blob in the keystore, and each file's data key is
/// wrapped under it locally:
///
///     "KI" ‖ 0x01 ‖ intermediate id (16) ‖ nonce (12) ‖ GCM(data key) ‖ tag (16)   (79 bytes)
///
/// with the data-key context and the intermediate id as additional data. One
/// wraps new data keys for at most `maxAge` seconds or `maxFiles` files; an
/// unwrapped one is cached `maxAge` seconds. So the custodian sees one call
/// per `maxAge` of writing and one per intermediate key per `maxAge` of
/// reading — not one per file.
final class IntermediateKeyCache: @unchecked Sendable {
    static let magic: [UInt8] = [UInt8(ascii: "K"), UInt8(ascii: "I"), 1]

    struct Current {
        var id: ID128
        var aead: AESGCM
        var createdAt: Double
        var files: Int
    }
    struct State: ~Copyable {
        /// The intermediate key new data keys of each version are wrapped under.
        var current: [KeyVersion: Current] = [:]
        /// Unwrapped intermediate keys: id → schedule and when it expires.
        var opened: [ID128: (aead: AESGCM, expires: Double)] = [:]
    }
    private let state = Mutex(State())
    /// Held while a new intermediate key is made, so creates that all find none make one, not one each.
    /// Held while a new intermediate key is made, so concurrent creates make one.
    private let making = Mutex(())
    let store: IntermediateStore
    let clock: @Sendable () -> Double
    let maxAge: Double
    let maxFiles: Int

    init(store: IntermediateStore, clock: @escaping @Sendable () -> Double, maxAge: Double, maxFiles: Int) {
        self.store = store
        self.clock = clock
        self.maxAge = maxAge
        self.maxFiles = maxFiles
    }

    /// Drops every cached key (the external key is no longer usable, or its versions changed).
    func clear() {
        state.withLock { s in
            s.current.removeAll()
            s.opened.removeAll()
        }
    }

    /// Wraps `dataKey` under the current intermediate key of `version`,
    /// asking `make` (id → the new key's schedule and its custodian-wrapped blob) for a new one when needed.
    func wrap(_ dataKey: borrowing SecretKey, key: KeyID, version: KeyVersion, context: [UInt8],
              make: (ID128) throws(KeyManagerError) -> (AESGCM, [UInt8])) throws(KeyManagerError) -> [UInt8] {
        let (id, aead) = try current(key, version, make)
        let sealed = try dataKey.withUnsafeBytes { (raw) throws(KeyManagerError) in try KeyWrap.seal(raw, under: aead, context: context + id.bytes) }
        return Self.magic + id.bytes + sealed
    }

    /// Whether `wrapped` was wrapped under an intermediate key.
    static func isIntermediate(_ wrapped: [UInt8]) -> Bool { wrapped.count > magic.count + 16 && wrapped.starts(with: magic) }

    /// Unwraps a data key wrapped by `wrap`, asking `open` (id, blob → plaintext) for an intermediate key not cached; nil when it does not authenticate.
    func unwrap(_ wrapped: [UInt8], key: KeyID, version: KeyVersion, context: [UInt8],
                open: (ID128, [UInt8]) throws(KeyManagerError) -> SecretKey?) throws(KeyManagerError) -> SecretKey? {
        guard Self.isIntermediate(wrapped), let id = ID128(bytes: wrapped[Self.magic.count..<(Self.magic.count + 16)]) else { return nil }
        guard let aead = try opened(id, key, version, open) else { return nil }
        return try KeyWrap.open(Array(wrapped[(Self.magic.count + 16)...]), under: aead, context: context + id.bytes)
    }

    private func current(_ key: KeyID, _ version: KeyVersion,
                         _ make: (ID128) throws(KeyManagerError) -> (AESGCM, [UInt8])) throws(KeyManagerError) -> (ID128, AESGCM) {
        func live() -> (ID128, AESGCM)? {
            let now = clock()
            return state.withLock { s -> (ID128, AESGCM)? in
                guard var i = s.current[version], now - i.createdAt < maxAge, i.files < maxFiles else { return nil }
                i.files += 1
                s.current[version] = i
                return (i.id, i.aead)
            }
        }
        if let found = live() { return found }
        return try making.withLock { _ throws(KeyManagerError) -> (ID128, AESGCM) in
            if let found = live() { return found }
            let now = clock()
            let id = ID128.random()
            let (aead, blob) = try make(id)
            try store.saveIntermediate(id, key: key, version: version, blob: blob)
            state.withLock { s in
                s.current[version] = Current(id: id, aead: aead, createdAt: now, files: 1)
                s.opened[id] = (aead, now + maxAge)
            }
            return (id, aead)
        }
    }

    private func opened(_ id: ID128, _ key: KeyID, _ version: KeyVersion,
                        _ open: (ID128, [UInt8]) throws(KeyManagerError) -> SecretKey?) throws(KeyManagerError) -> AESGCM? {
        let now = clock()
        if let cached = state.withLock({ s -> AESGCM? in
            guard let o = s.opened[id] else { return nil }
            if o.expires <= now { s.opened[id] = nil; return nil }
            return o.aead
        }) { return cached }
        guard let blob = try store.loadIntermediate(id, key: key, version: version), let secret = try open(id, blob) else { return nil }
        let aead = try AESGCM.make(secret)
        state.withLock { s in
            // Bounded: the expired go first when many versions and files were read at once.
            if s.opened.count >= 4096 { s.opened = s.opened.filter { $0.value.expires > now } }
            s.opened[id] = (aead, now + maxAge)
        }
        return aead
    }
}
