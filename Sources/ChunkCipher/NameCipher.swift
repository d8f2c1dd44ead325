import COpenSSL

/// Encrypts the entry names of one directory with AES-256-SIV (RFC 5297)
/// through OpenSSL 3: deterministic (the same name always maps to the same
/// ciphertext, so lookups need no directory scan), authenticated (a changed
/// byte is rejected), and misuse-resistant without a stored IV. The SIV key
/// is derived with HKDF from the directory's name key; the directory id is
/// the additional data. Output is `SIV tag ‖ ciphertext`, base64url without
/// padding. Names longer than the backing filesystem allows are hashed (see
/// `LongName`).
public final class NameCipher: @unchecked Sendable {
    private let template: OpaquePointer
    private let directoryID: [UInt8]
    private static let tagSize = 16
    nonisolated(unsafe) private static let siv: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-SIV", nil)

    /// A name cipher for the directory `directoryID` under its 32-byte name key.
    public init(nameKey: borrowing SecretKey, directoryID: ID128) throws(CipherError) {
        guard let siv = Self.siv else { throw .openssl("AES-256-SIV is not available in this OpenSSL") }
        let sivKey = try KeyDerivation.hkdfSHA256(key: nameKey, info: "kmsfs/v1/names/aes-siv", count: 64)
        guard let ctx = KeyMemory.scope({ EVP_CIPHER_CTX_new() }) else { throw .openssl("EVP_CIPHER_CTX_new") }
        let ok = KeyMemory.scope { sivKey.withUnsafeBytes { EVP_CipherInit_ex(ctx, siv, nil, bytes($0), nil, -1) == 1 } }
        guard ok else {
            EVP_CIPHER_CTX_free(ctx)
            throw .openssl("EVP_CipherInit_ex(AES-256-SIV)")
        }
        self.template = ctx
        self.directoryID = directoryID.bytes
    }

    deinit { EVP_CIPHER_CTX_free(template) }

    /// The encrypted, encoded form of the name whose bytes are `name` (before
    /// long-name hashing). Names are bytes: any but `/` and NUL, UTF-8 or not.
    public func encrypt<Name: Collection<UInt8>>(_ name: Name) throws(CipherError) -> String {
        try encrypt(Array(name)[...])
    }

    /// `encrypt` for the bytes of a `FileName` (an array slice) without the
    /// copy through the generic path, which cost as much as the AES-SIV
    /// update on every lookup of a new name.
    public func encrypt(_ plain: ArraySlice<UInt8>) throws(CipherError) -> String {
        guard !plain.isEmpty, !plain.contains(0), !plain.contains(UInt8(ascii: "/")) else {
            throw .invalidArgument("a file name is 1 or more bytes without '/' or NUL")
        }
        let ctx = try context(encrypt: 1)
        defer { EVP_CIPHER_CTX_free(ctx) }
        var out = [UInt8](repeating: 0, count: Self.tagSize + plain.count)
        var length: Int32 = 0
        let ok = out.withUnsafeMutableBufferPointer { o in plain.withUnsafeBufferPointer { p in
            EVP_EncryptUpdate(ctx, nil, &length, directoryID, Int32(directoryID.count)) == 1
                && EVP_EncryptUpdate(ctx, o.baseAddress! + Self.tagSize, &length, p.baseAddress, Int32(p.count)) == 1
                && EVP_EncryptFinal_ex(ctx, o.baseAddress! + Self.tagSize + Int(length), &length) == 1
                && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, Int32(Self.tagSize), o.baseAddress) == 1
        } }
        guard ok else { throw .openssl("AES-256-SIV encrypt") }
        return Base64URL.encode(out)
    }

    /// The encrypted, encoded form of a text name (its UTF-8 bytes).
    public func encrypt(_ name: String) throws(CipherError) -> String {
        try encrypt(Array(name.utf8)[...])
    }

    /// The plaintext name (its bytes) of an encoded entry; `integrityFailure(.name)`
    /// if it was changed or belongs to another directory, `malformed` if it is
    /// not an encoded name at all.
    public func decrypt(_ encoded: String) throws(CipherError) -> [UInt8] {
        guard let raw = Base64URL.decode(encoded), raw.count > Self.tagSize else {
            throw .malformed("'\(encoded.prefix(64))' is not an encrypted name")
        }
        let ctx = try context(encrypt: 0)
        defer { EVP_CIPHER_CTX_free(ctx) }
        var plain = [UInt8](repeating: 0, count: raw.count - Self.tagSize)
        var length: Int32 = 0
        var tag = Array(raw[0..<Self.tagSize])
        let body = Array(raw[Self.tagSize...])
        let ok = plain.withUnsafeMutableBufferPointer { p in
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, Int32(Self.tagSize), &tag) == 1
                && EVP_DecryptUpdate(ctx, nil, &length, directoryID, Int32(directoryID.count)) == 1
                && EVP_DecryptUpdate(ctx, p.baseAddress, &length, body, Int32(body.count)) == 1
                && EVP_DecryptFinal_ex(ctx, p.baseAddress! + Int(length), &length) == 1
        }
        guard ok, !plain.contains(0), !plain.contains(UInt8(ascii: "/")) else { throw .integrityFailure(.name) }
        return plain
    }

    private func context(encrypt: Int32) throws(CipherError) -> OpaquePointer {
        guard let ctx = KeyMemory.scope({ EVP_CIPHER_CTX_new() }) else { throw .openssl("EVP_CIPHER_CTX_new") }
        guard KeyMemory.scope({ EVP_CIPHER_CTX_copy(ctx, template) == 1 && EVP_CipherInit_ex(ctx, nil, nil, nil, nil, encrypt) == 1 }) else {
            EVP_CIPHER_CTX_free(ctx)
            throw .openssl("AES-256-SIV context")
        }
        return ctx
    }
}

/// Names too long for the backing filesystem (NAME_MAX 255) are stored as
/// `.kmsfs.L.<base64url(SHA-256(encoded))>`, with the full encoded name in a
/// sidecar file of the same name plus `.name`.
public enum LongName {
    /// Longest encoded name stored as it is.
    public static let maxStoredNameBytes = 255
    /// Prefix of hashed long names; a leading dot never starts base64url output.
    public static let prefix = ".kmsfs.L."
    /// Suffix of the sidecar that holds the full encoded name.
    public static let sidecarSuffix = ".name"

    /// The name to store on disk for `encoded`: itself, or its hash if too long.
    public static func storedName(for encoded: String) -> String {
        guard encoded.utf8.count > maxStoredNameBytes else { return encoded }
        return prefix + Base64URL.encode(KeyDerivation.sha256(Array(encoded.utf8)))
    }

    /// Whether a stored name is a hashed long name (not its sidecar).
    public static func isHashed(_ stored: String) -> Bool {
        stored.hasPrefix(prefix) && !stored.hasSuffix(sidecarSuffix)
    }
}

/// URL-safe base64 without padding (RFC 4648 §5).
///
/// Written by hand: Foundation's codec speaks standard base64 with padding,
/// and remapping its output character by character cost more than the
/// AES-SIV it encodes (a third of the daemon's time in `ls -lR`).
public enum Base64URL {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
    private static let values: [UInt8] = {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (i, c) in alphabet.enumerated() { table[Int(c)] = UInt8(i) }
        return table
    }()

    /// Encodes bytes.
    public static func encode(_ bytes: [UInt8]) -> String {
        let count = (bytes.count * 8 + 5) / 6
        return String(unsafeUninitializedCapacity: count) { out in
            var o = 0, i = 0
            while i + 3 <= bytes.count {
                let n = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2])
                out[o] = alphabet[Int(n >> 18)]; out[o + 1] = alphabet[Int(n >> 12 & 63)]
                out[o + 2] = alphabet[Int(n >> 6 & 63)]; out[o + 3] = alphabet[Int(n & 63)]
                o += 4; i += 3
            }
            let rest = bytes.count - i
            if rest == 1 {
                let n = UInt32(bytes[i]) << 16
                out[o] = alphabet[Int(n >> 18)]; out[o + 1] = alphabet[Int(n >> 12 & 63)]
                o += 2
            } else if rest == 2 {
                let n = UInt32(bytes[i]) << 16 | UInt32(bytes[i + 1]) << 8
                out[o] = alphabet[Int(n >> 18)]; out[o + 1] = alphabet[Int(n >> 12 & 63)]
                out[o + 2] = alphabet[Int(n >> 6 & 63)]
                o += 3
            }
            return o
        }
    }

    /// Decodes, or nil if `text` is not canonical unpadded base64url (each
    /// byte string has exactly one encoding: unused trailing bits must be zero).
    public static func decode(_ text: String) -> [UInt8]? {
        var text = text
        return text.withUTF8 { chars -> [UInt8]? in
            guard chars.count % 4 != 1 else { return nil }
            var out = [UInt8]()
            out.reserveCapacity(chars.count * 3 / 4)
            var acc: UInt32 = 0, bits = 0
            for c in chars {
                let v = values[Int(c)]
                guard v != 0xFF else { return nil }
                acc = acc << 6 | UInt32(v)
                bits += 6
                if bits >= 8 {
                    bits -= 8
                    out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits)))
                    acc &= (1 << UInt32(bits)) - 1
                }
            }
            guard acc == 0 else { return nil }
            return out
        }
    }
}
