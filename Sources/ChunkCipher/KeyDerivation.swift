import COpenSSL
import Synchronization

/// HKDF-SHA256 and HMAC-SHA256 through OpenSSL, for subkeys with readable
/// info strings (as gocryptfs's cryptocore does).
public enum KeyDerivation {
    /// Fetched once (see `kmsfs_hkdf_sha256`).
    nonisolated(unsafe) private static let hkdf: OpaquePointer? = EVP_KDF_fetch(nil, "HKDF", nil)

    /// Derives `count` bytes from `key` with HKDF-SHA256 (no salt) and `info`
    /// (the EVP_PKEY route, which looked the KDF up by name on every call,
    /// was a fifth of loading a directory's keys).
    public static func hkdfSHA256(key: borrowing SecretKey, info: String, count: Int) throws(CipherError) -> SecretKey {
        guard let hkdf else { throw .openssl("HKDF is not available") }
        let infoBytes = Array(info.utf8)
        var failed = false
        let derived = SecretKey(count: count) { out in
            failed = KeyMemory.scope {
                key.withUnsafeBytes { raw in
                    infoBytes.withUnsafeBufferPointer { i in
                        kmsfs_hkdf_sha256(hkdf, bytes(raw), raw.count, i.baseAddress, i.count, mutableBytes(out), out.count) != 1
                    }
                }
            }
        }
        if failed { throw .openssl("EVP_KDF_derive(HKDF)") }
        return derived
    }

    nonisolated(unsafe) fileprivate static let hmacTemplate: OpaquePointer? = kmsfs_hmac_sha256_template()

    /// Idle one-shot HMAC contexts, scrubbed (keyed with zeros) before they
    /// come back: a copy of the template per call cost more than the MAC
    /// (secure-heap allocations under OpenSSL's global lock), and every file
    /// open and create computes one.
    private static let idleHMACs = Mutex(ContextStack())
    private static let scrubKey = [UInt8](repeating: 0, count: 32)

    /// HMAC-SHA256 of `message` under `key` (a prepared context: the
    /// one-shot HMAC() looks both algorithms up by name on every call).
    public static func hmacSHA256(key: borrowing SecretKey, message: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var length = 0
        let ctx: OpaquePointer
        if let idle = idleHMACs.withLock({ $0.pop() }) { ctx = idle } else {
            guard let copy = KeyMemory.scope({ EVP_MAC_CTX_dup(hmacTemplate) }) else { preconditionFailure("HMAC-SHA256 context") }
            ctx = copy
        }
        defer {
            // Re-keying overwrites the state derived from `key`; a context
            // that fails it is freed (which cleanses it) instead of kept.
            if EVP_MAC_init(ctx, scrubKey, scrubKey.count, nil) == 1 {
                idleHMACs.withLock { $0.push(ctx) }
            } else {
                EVP_MAC_CTX_free(ctx)
            }
        }
        let ok = KeyMemory.scope {
            key.withUnsafeBytes { raw in
                out.withUnsafeMutableBufferPointer { o in
                    EVP_MAC_init(ctx, raw.baseAddress?.assumingMemoryBound(to: UInt8.self), raw.count, nil) == 1
                        && EVP_MAC_update(ctx, message, message.count) == 1
                        && EVP_MAC_final(ctx, o.baseAddress, &length, 32) == 1
                }
            }
        }
        precondition(ok && length == 32, "HMAC-SHA256 failed")
        return out
    }

    /// HMAC-SHA256 under one long-lived key, keyed once: contexts are copied
    /// from the keyed one and then kept in a pool; each `mac` takes one and
    /// re-initialises it with the key it holds (no key pads hashed again, no
    /// allocation — the audit log hashes a path on every file open and create).
    /// The contexts hold key-derived state; they are freed with the object.
    public final class KeyedHMAC: @unchecked Sendable {
        private let contexts: ContextPool

        public init(key: borrowing SecretKey) {
            guard let ctx = KeyMemory.scope({ EVP_MAC_CTX_dup(KeyDerivation.hmacTemplate) }) else { preconditionFailure("HMAC-SHA256 context") }
            let ok = KeyMemory.scope {
                key.withUnsafeBytes { raw in
                    EVP_MAC_init(ctx, raw.baseAddress?.assumingMemoryBound(to: UInt8.self), raw.count, nil) == 1
                }
            }
            precondition(ok, "HMAC-SHA256 key setup failed")
            contexts = ContextPool(template: ctx, kind: .mac)
        }

        public func mac(_ message: [UInt8]) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: 32)
            var length = 0
            // A nil key restarts the MAC under the key the context already holds.
            let ok = try? contexts.with { (ctx) throws(CipherError) -> Bool in
                out.withUnsafeMutableBufferPointer { o in
                    EVP_MAC_init(ctx, nil, 0, nil) == 1
                        && EVP_MAC_update(ctx, message, message.count) == 1 && EVP_MAC_final(ctx, o.baseAddress, &length, 32) == 1
                }
            }
            precondition(ok == true && length == 32, "HMAC-SHA256 failed")
            return out
        }
    }

    /// SHA-256 of `message`.
    public static func sha256(_ message: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var length: UInt32 = 0
        precondition(EVP_Digest(message, message.count, &out, &length, sha256Type, nil) == 1, "SHA-256 failed")
        return out
    }

    /// Fetched once: EVP_sha256() makes OpenSSL 3 look the algorithm up on every digest.
    nonisolated(unsafe) private static let sha256Type: OpaquePointer? = EVP_MD_fetch(nil, "SHA256", nil)
}

/// The OpenSSL this process runs with.
public enum CryptoLibrary {
    /// "OpenSSL 3.0.x …" as the loaded libcrypto reports it.
    public static var version: String { String(cString: OpenSSL_version(OPENSSL_VERSION)) }
}
