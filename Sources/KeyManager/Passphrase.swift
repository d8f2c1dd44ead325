import ChunkCipher
import COpenSSL

/// scrypt parameters, stored in the keystore so a later kmsfs can re-derive.
public struct ScryptParameters: Sendable, Equatable, Codable {
    /// log2 of the CPU/memory cost N.
    public var logN: UInt8
    public var r: UInt32
    public var p: UInt32

    /// N = 2^16, r = 8, p = 1: 64 MiB and roughly 0.2 s here (gocryptfs's choice).
    public static let strong = ScryptParameters(logN: 16, r: 8, p: 1)

    public init(logN: UInt8, r: UInt32 = 8, p: UInt32 = 1) {
        self.logN = logN
        self.r = r
        self.p = p
    }

    /// Derives a 32-byte key-encryption key from `passphrase` and `salt`.
    func deriveKey(passphrase: borrowing SecretKey, salt: [UInt8]) throws(KeyManagerError) -> SecretKey {
        guard (10...22).contains(logN), r >= 1, p >= 1 else { throw .keystoreCorrupt("scrypt parameters out of range") }
        let n = UInt64(1) << UInt64(logN)
        // scrypt needs 128·r·N bytes; OpenSSL refuses unless maxmem allows it.
        let maxmem = UInt64(128) * UInt64(r) * n * UInt64(p) + (64 << 20)
        var failed = false
        let kek = passphrase.withUnsafeBytes { pass in
            SecretKey(count: 32) { out in
                failed = EVP_PBE_scrypt(pass.baseAddress?.assumingMemoryBound(to: CChar.self), pass.count,
                                        salt, salt.count, n, UInt64(r), UInt64(p), maxmem,
                                        out.baseAddress?.assumingMemoryBound(to: UInt8.self), 32) != 1
            }
        }
        if failed { throw .crypto("scrypt key derivation failed") }
        return kek
    }
}

/// Seals small secrets (master-key material, data keys) under a wrapping key:
/// `nonce(12) ‖ GCM(secret) ‖ tag(16)`, additional data naming what it is.
enum KeyWrap {
    static func seal(_ secret: UnsafeRawBufferPointer, under wrapping: AESGCM, context: [UInt8]) throws(KeyManagerError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: secret.count + AESGCM.boxOverhead)
        do {
            try out.withUnsafeMutableBytes { box in
                try context.withUnsafeBytes { ad in try wrapping.sealBox(secret, additionalData: ad, into: box) }
            }
        } catch { throw .crypto("key wrap failed") }
        return out
    }

    /// Opens a wrapped secret straight into locked memory; nil when the tag
    /// does not match (wrong wrapping key, other context, or altered bytes).
    static func open(_ wrapped: [UInt8], under wrapping: AESGCM, context: [UInt8]) throws(KeyManagerError) -> SecretKey? {
        guard wrapped.count > AESGCM.boxOverhead else { return nil }
        var authentic = false
        var failure = false
        let secret = SecretKey(count: wrapped.count - AESGCM.boxOverhead) { out in
            wrapped.withUnsafeBytes { box in
                context.withUnsafeBytes { ad in
                    do { authentic = try wrapping.openBox(box, additionalData: ad, into: out) } catch { failure = true }
                }
            }
        }
        if failure { throw .crypto("key unwrap failed") }
        guard authentic else { return nil }
        return secret
    }
}
