/// Seals short strings and values (symlink targets, extended-attribute
/// values) with AES-256-GCM under a subkey, encoded as base64url of
/// `nonce ‖ ciphertext ‖ tag`. Randomised: equal inputs seal differently.
public final class StringSealer: Sendable {
    private let aead: AESGCM
    private let label: [UInt8]

    /// A sealer under HKDF(`key`, `info`); `info` also goes into the additional data.
    public init(key: borrowing SecretKey, info: String) throws(CipherError) {
        let subkey = try KeyDerivation.hkdfSHA256(key: key, info: info, count: 32)
        self.aead = try AESGCM(key: subkey)
        self.label = Array(info.utf8)
    }

    /// Seals bytes, binding `context` (e.g. an attribute name) as additional data.
    public func seal(_ plain: [UInt8], context: [UInt8] = []) throws(CipherError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: plain.count + AESGCM.boxOverhead)
        let ad = label + [0] + context
        try keepingCipherError {
            try out.withUnsafeMutableBytes { box in
                try plain.withUnsafeBytes { p in
                    try ad.withUnsafeBytes { a in try aead.sealBox(p, additionalData: a, into: box) }
                }
            }
        }
        return out
    }

    /// Opens what `seal` made; `integrityFailure(.name)` if changed or under another context.
    public func open(_ sealed: [UInt8], context: [UInt8] = []) throws(CipherError) -> [UInt8] {
        guard sealed.count >= AESGCM.boxOverhead else { throw .malformed("sealed value of \(sealed.count) bytes") }
        var plain = [UInt8](repeating: 0, count: sealed.count - AESGCM.boxOverhead)
        let ad = label + [0] + context
        let ok = try keepingCipherError {
            try sealed.withUnsafeBytes { box in
                try plain.withUnsafeMutableBytes { p in
                    try ad.withUnsafeBytes { a in try aead.openBox(box, additionalData: a, into: p) }
                }
            }
        }
        guard ok else { throw .integrityFailure(.name) }
        return plain
    }

    /// Seals bytes to base64url text.
    public func sealEncoded(_ plain: [UInt8], context: [UInt8] = []) throws(CipherError) -> String {
        Base64URL.encode(try seal(plain, context: context))
    }

    /// Opens base64url text made by `sealEncoded` (or `sealText`) to its bytes.
    public func openEncoded(_ encoded: String, context: [UInt8] = []) throws(CipherError) -> [UInt8] {
        guard let raw = Base64URL.decode(encoded) else { throw .malformed("not a sealed value") }
        return try open(raw, context: context)
    }

    /// Seals a string to base64url text.
    public func sealText(_ text: String, context: [UInt8] = []) throws(CipherError) -> String {
        Base64URL.encode(try seal(Array(text.utf8), context: context))
    }

    /// Opens base64url text made by `sealText`.
    public func openText(_ encoded: String, context: [UInt8] = []) throws(CipherError) -> String {
        guard let raw = Base64URL.decode(encoded) else { throw .malformed("not a sealed value") }
        return String(decoding: try open(raw, context: context), as: UTF8.self)
    }
}
