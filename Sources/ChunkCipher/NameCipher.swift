import COpenSSL

/// Encrypts the entry names of one directory with AES-256-SIV (RFC 5297):
/// deterministic (the same name always maps to the same ciphertext, so
/// lookups need no directory scan), authenticated (a changed byte is
/// rejected), and misuse-resistant without a stored IV. The 64-byte SIV key
/// is derived with HKDF from the directory's name key (its first half keys
/// the S2V's AES-CMAC, its second the AES-CTR); the directory id is the one
/// associated-data string. Output is `SIV tag ‖ ciphertext`, base64url
/// without padding. Names longer than the backing filesystem allows are
/// hashed (see `LongName`).
///
/// S2V's composition (doubling, xor, padding; RFC 5297 §2.4) is written here
/// over OpenSSL's AES-CMAC and AES-CTR; the primitives are OpenSSL's. Its
/// own AES-256-SIV cannot be reused for a second name: each name needed a
/// copy of its whole context plus two CMAC context copies inside it, which
/// cost several times the cipher work (a third of an `ls -lR` or of a
/// directory's opening). Here each name costs one CMAC restart and one CTR
/// re-IV on contexts kept in pools, and the S2V state after the directory
/// id is computed once. The output is byte-for-byte OpenSSL's AES-256-SIV
/// (tested against it, and against RFC 5297's vector for the 128-bit variant).
public final class NameCipher: @unchecked Sendable {
    private let macs: ContextPool
    private let counters: ContextPool
    /// S2V's D after the directory id: dbl(CMAC(0¹²⁸)) ⊕ CMAC(directory id).
    private let afterDirectory: Block
    private static let tagSize = 16

    /// A name cipher for the directory `directoryID` under its 32-byte name key.
    public convenience init(nameKey: borrowing SecretKey, directoryID: ID128) throws(CipherError) {
        let sivKey = try KeyDerivation.hkdfSHA256(key: nameKey, info: "kmsfs/v1/names/aes-siv", count: 64)
        try self.init(sivKey: sivKey, associatedData: directoryID.bytes)
    }

    /// AES-SIV under a 64-byte (AES-256) or 32-byte (AES-128, RFC 5297's
    /// test vector) key with one associated-data string.
    init(sivKey: borrowing SecretKey, associatedData: [UInt8]) throws(CipherError) {
        let half = sivKey.count / 2
        guard half == 16 || half == 32 else { throw .invalidArgument("AES-SIV needs a 32- or 64-byte key") }
        let (macCipher, ctrCipher) = half == 32 ? ("AES-256-CBC", Self.ctr256) : ("AES-128-CBC", Self.ctr128)
        guard let ctrCipher else { throw .openssl("AES-CTR is not available") }
        let mac: OpaquePointer? = KeyMemory.scope {
            sivKey.withUnsafeBytes { raw in kmsfs_cmac_new(macCipher, bytes(raw), half) }
        }
        guard let mac else { throw .openssl("AES-CMAC") }
        macs = ContextPool(template: mac, kind: .mac)
        guard let ctr = KeyMemory.scope({ EVP_CIPHER_CTX_new() }) else { throw .openssl("EVP_CIPHER_CTX_new") }
        counters = ContextPool(template: ctr, kind: .cipher)
        let keyed = KeyMemory.scope {
            sivKey.withUnsafeBytes { raw in EVP_EncryptInit_ex(ctr, ctrCipher, nil, bytes(raw).map { $0 + half }, nil) == 1 }
        }
        guard keyed else { throw .openssl("EVP_EncryptInit_ex(AES-CTR)") }
        var d = try Self.cmac(macs, Block.zero.bytes[...])
        d.double()
        d.xor(try Self.cmac(macs, associatedData[...]))
        afterDirectory = d
    }

    /// The encrypted, encoded form of the name whose bytes are `name` (before
    /// long-name hashing). Names are bytes: any but `/` and NUL, UTF-8 or not.
    public func encrypt<Name: Collection<UInt8>>(_ name: Name) throws(CipherError) -> String {
        try encrypt(Array(name)[...])
    }

    /// `encrypt` for the bytes of a `FileName` (an array slice) without the
    /// copy through the generic path.
    public func encrypt(_ plain: ArraySlice<UInt8>) throws(CipherError) -> String {
        guard !plain.isEmpty, !plain.contains(0), !plain.contains(UInt8(ascii: "/")) else {
            throw .invalidArgument("a file name is 1 or more bytes without '/' or NUL")
        }
        let v = try s2v(plain)
        var out = v.bytes
        out += try ctr(v, plain)
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
        let tag = Block(raw[0..<Self.tagSize])
        let plain = try ctr(tag, raw[Self.tagSize...])
        let expected = try s2v(plain[...])
        guard expected.equals(tag), !plain.contains(0), !plain.contains(UInt8(ascii: "/")) else { throw .integrityFailure(.name) }
        return plain
    }

    /// S2V of the directory id (already absorbed) and `plain` (RFC 5297 §2.4).
    private func s2v(_ plain: ArraySlice<UInt8>) throws(CipherError) -> Block {
        var t: [UInt8]
        if plain.count >= 16 {
            t = Array(plain)
            let end = t.count - 16
            for i in 0..<16 { t[end + i] ^= afterDirectory.bytes[i] }
        } else {
            var d = afterDirectory
            d.double()
            t = Array(plain) + [0x80] + [UInt8](repeating: 0, count: 15 - plain.count)
            for i in 0..<16 { t[i] ^= d.bytes[i] }
        }
        return try Self.cmac(macs, t[...])
    }

    /// AES-CTR of `input` from the counter block `v` with bits 63 and 31 cleared.
    private func ctr(_ v: Block, _ input: ArraySlice<UInt8>) throws(CipherError) -> [UInt8] {
        var q = v.bytes
        q[8] &= 0x7F
        q[12] &= 0x7F
        var out = [UInt8](repeating: 0, count: input.count)
        let ok = try counters.with { (ctx) throws(CipherError) -> Bool in
            var length: Int32 = 0
            return input.withUnsafeBufferPointer { i in
                out.withUnsafeMutableBufferPointer { o in
                    EVP_EncryptInit_ex(ctx, nil, nil, nil, q) == 1
                        && EVP_EncryptUpdate(ctx, o.baseAddress, &length, i.baseAddress, Int32(i.count)) == 1
                        && Int(length) == i.count
                }
            }
        }
        guard ok else { throw .openssl("AES-CTR") }
        return out
    }

    private static func cmac(_ pool: ContextPool, _ message: ArraySlice<UInt8>) throws(CipherError) -> Block {
        var out = Block.zero
        let ok = try pool.with { (ctx) throws(CipherError) -> Bool in
            var length = 0
            return message.withUnsafeBufferPointer { m in
                out.withMutableBytes { o in
                    EVP_MAC_init(ctx, nil, 0, nil) == 1 && EVP_MAC_update(ctx, m.baseAddress, m.count) == 1
                        && EVP_MAC_final(ctx, o, &length, 16) == 1 && length == 16
                }
            }
        }
        guard ok else { throw .openssl("AES-CMAC") }
        return out
    }

    nonisolated(unsafe) private static let ctr256: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-CTR", nil)
    nonisolated(unsafe) private static let ctr128: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-128-CTR", nil)
}

/// One 128-bit block of S2V.
private struct Block {
    var bytes: [UInt8]
    static var zero: Block { Block([UInt8](repeating: 0, count: 16)[...]) }
    init(_ bytes: ArraySlice<UInt8>) { self.bytes = Array(bytes) }

    /// Multiplication by x in GF(2¹²⁸) (RFC 5297 §2.3).
    mutating func double() {
        let carry = bytes[0] >> 7
        for i in 0..<15 { bytes[i] = bytes[i] << 1 | bytes[i + 1] >> 7 }
        bytes[15] = bytes[15] << 1 ^ (carry * 0x87)
    }

    mutating func xor(_ other: Block) { for i in 0..<16 { bytes[i] ^= other.bytes[i] } }

    /// Constant-time comparison (a tag check).
    func equals(_ other: Block) -> Bool { CRYPTO_memcmp(bytes, other.bytes, 16) == 0 }

    mutating func withMutableBytes<R>(_ body: (UnsafeMutablePointer<UInt8>) -> R) -> R {
        bytes.withUnsafeMutableBufferPointer { body($0.baseAddress!) }
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
