import ChunkCipher
import COpenSSL
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// SIGN_VERIFY key material through OpenSSL's EVP_PKEY: RSA (PKCS#1 v1.5
/// with SHA-256) and ECDSA on P-256 (SHA-256), P-384 (SHA-384) or P-521 (SHA-512),
/// the pairings of AWS KMS's ECDSA_SHA_256/384/512.
/// A private key (DER, locked memory) and its public key (DER).
struct KeyPair: ~Copyable {
    var privateKey: SecretKey
    var publicKey: [UInt8]
}

enum AsymmetricKeys {
    /// A new key pair: the private key as DER in locked memory, the public key as DER.
    static func generate(_ spec: KeySpec) throws(KeyManagerError) -> KeyPair {
        let id: Int32 = [.eccP256, .eccP384, .eccP521].contains(spec) ? EVP_PKEY_EC : EVP_PKEY_RSA
        guard let ctx = EVP_PKEY_CTX_new_id(id, nil) else { throw .crypto("EVP_PKEY_CTX_new_id") }
        defer { EVP_PKEY_CTX_free(ctx) }
        guard EVP_PKEY_keygen_init(ctx) == 1 else { throw .crypto("EVP_PKEY_keygen_init") }
        let configured: Int32 = switch spec {
        case .rsa2048: kmsfs_rsa_keygen_bits(ctx, 2048)
        case .rsa3072: kmsfs_rsa_keygen_bits(ctx, 3072)
        case .rsa4096: kmsfs_rsa_keygen_bits(ctx, 4096)
        case .eccP256: kmsfs_ec_paramgen_curve(ctx, NID_X9_62_prime256v1)
        case .eccP384: kmsfs_ec_paramgen_curve(ctx, NID_secp384r1)
        case .eccP521: kmsfs_ec_paramgen_curve(ctx, NID_secp521r1)
        case .aes256: 0
        }
        var pkey: OpaquePointer?
        guard configured == 1, EVP_PKEY_keygen(ctx, &pkey) == 1, let pkey else { throw .crypto("key pair generation for \(spec.rawValue)") }
        defer { EVP_PKEY_free(pkey) }
        let privateLength = i2d_PrivateKey(pkey, nil)
        let publicLength = i2d_PUBKEY(pkey, nil)
        guard privateLength > 0, publicLength > 0 else { throw .crypto("key pair encoding") }
        var encodeFailed = false
        let privateKey = SecretKey(count: Int(privateLength)) { out in
            var cursor = out.baseAddress?.assumingMemoryBound(to: UInt8.self)
            encodeFailed = i2d_PrivateKey(pkey, &cursor) != privateLength
        }
        var publicKey = [UInt8](repeating: 0, count: Int(publicLength))
        let publicOK = publicKey.withUnsafeMutableBufferPointer { buffer in
            var cursor = buffer.baseAddress
            return i2d_PUBKEY(pkey, &cursor) == publicLength
        }
        guard !encodeFailed, publicOK else { throw .crypto("key pair encoding") }
        return KeyPair(privateKey: privateKey, publicKey: publicKey)
    }

    static func digest(for spec: KeySpec) -> OpaquePointer? {
        switch spec {
        case .eccP384: EVP_sha384()
        case .eccP521: EVP_sha512()
        default: EVP_sha256()
        }
    }

    /// Signs `message` with a DER private key.
    static func sign(_ message: [UInt8], privateKey: borrowing SecretKey, spec: KeySpec) throws(KeyManagerError) -> [UInt8] {
        let pkey: OpaquePointer? = KeyMemory.scope {
            privateKey.withUnsafeBytes { raw in
                var cursor: UnsafePointer<UInt8>? = raw.baseAddress.map { UnsafePointer($0.assumingMemoryBound(to: UInt8.self)) }
                return d2i_AutoPrivateKey(nil, &cursor, raw.count)
            }
        }
        guard let pkey else { throw .crypto("private key decoding") }
        defer { EVP_PKEY_free(pkey) }
        guard let md = EVP_MD_CTX_new() else { throw .crypto("EVP_MD_CTX_new") }
        defer { EVP_MD_CTX_free(md) }
        var length = 0
        guard EVP_DigestSignInit(md, nil, digest(for: spec), nil, pkey) == 1,
              EVP_DigestSign(md, nil, &length, message, message.count) == 1 else { throw .crypto("signing") }
        var signature = [UInt8](repeating: 0, count: length)
        guard EVP_DigestSign(md, &signature, &length, message, message.count) == 1 else { throw .crypto("signing") }
        return Array(signature.prefix(length))
    }

    /// The digest a spec signs over (SHA-256, or SHA-384/512 for P-384/P-521).
    static func hash(_ message: [UInt8], for spec: KeySpec) throws(KeyManagerError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 64)
        var length: UInt32 = 0
        guard EVP_Digest(message, message.count, &out, &length, digest(for: spec), nil) == 1 else { throw .crypto("EVP_Digest") }
        return Array(out.prefix(Int(length)))
    }

    /// A DER public key (SubjectPublicKeyInfo) as PEM, as `openssl` reads it.
    static func pem(publicKey der: [UInt8]) -> String {
        var body = ""
        let encoded = Data(der).base64EncodedString()
        var index = encoded.startIndex
        while index < encoded.endIndex {
            let end = encoded.index(index, offsetBy: 64, limitedBy: encoded.endIndex) ?? encoded.endIndex
            body += encoded[index..<end] + "\n"
            index = end
        }
        return "-----BEGIN PUBLIC KEY-----\n" + body + "-----END PUBLIC KEY-----\n"
    }

    /// Whether `der` decodes as a SubjectPublicKeyInfo.
    static func isPublicKey(_ der: [UInt8]) -> Bool {
        der.withUnsafeBufferPointer { buffer in
            var cursor = buffer.baseAddress
            guard let pkey = d2i_PUBKEY(nil, &cursor, buffer.count) else { return false }
            EVP_PKEY_free(pkey)
            return true
        }
    }

    /// Whether `signature` is valid for `message` under a DER public key.
    static func verify(_ message: [UInt8], signature: [UInt8], publicKey: [UInt8], spec: KeySpec) -> Bool {
        let pkey: OpaquePointer? = publicKey.withUnsafeBufferPointer { buffer in
            var cursor = buffer.baseAddress
            return d2i_PUBKEY(nil, &cursor, buffer.count)
        }
        guard let pkey else { return false }
        defer { EVP_PKEY_free(pkey) }
        guard let md = EVP_MD_CTX_new() else { return false }
        defer { EVP_MD_CTX_free(md) }
        return EVP_DigestVerifyInit(md, nil, digest(for: spec), nil, pkey) == 1
            && EVP_DigestVerify(md, signature, signature.count, message, message.count) == 1
    }
}

/// The few DER structures a token hands out in pieces and OpenSSL and AWS
/// want whole: a SubjectPublicKeyInfo from an EC point or an RSA modulus and
/// exponent, and an ECDSA signature from r ‖ s. Written by hand because they
/// are three fixed shapes (building them through OpenSSL's OSSL_PARAM
/// would take more code than encoding them).
enum DER {
    static func length(_ n: Int) -> [UInt8] {
        if n < 0x80 { return [UInt8(n)] }
        var bytes: [UInt8] = []
        var rest = n
        while rest > 0 { bytes.insert(UInt8(rest & 0xff), at: 0); rest >>= 8 }
        return [0x80 | UInt8(bytes.count)] + bytes
    }
    static func tlv(_ tag: UInt8, _ content: [UInt8]) -> [UInt8] { [tag] + length(content.count) + content }
    static func sequence(_ parts: [UInt8]...) -> [UInt8] { tlv(0x30, parts.flatMap { $0 }) }
    /// A non-negative INTEGER from big-endian magnitude bytes.
    static func integer(_ magnitude: [UInt8]) -> [UInt8] {
        var bytes = Array(magnitude.drop { $0 == 0 })
        if bytes.isEmpty { bytes = [0] }
        if bytes[0] & 0x80 != 0 { bytes.insert(0, at: 0) }
        return tlv(0x02, bytes)
    }
    static func bitString(_ content: [UInt8]) -> [UInt8] { tlv(0x03, [0] + content) }

    /// The content of a DER OCTET STRING when `bytes` is exactly one, else nil.
    static func octetString(_ bytes: [UInt8]) -> [UInt8]? {
        guard bytes.count >= 2, bytes[0] == 0x04 else { return nil }
        var header = 2, count = Int(bytes[1])
        if bytes[1] & 0x80 != 0 {
            let n = Int(bytes[1] & 0x7f)
            guard n <= 3, bytes.count >= 2 + n else { return nil }
            count = bytes[2..<(2 + n)].reduce(0) { $0 << 8 | Int($1) }
            header = 2 + n
        }
        return header + count == bytes.count ? Array(bytes[header...]) : nil
    }

    static let ecPublicKey: [UInt8] = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]
    static let rsaEncryption: [UInt8] = [0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00]

    /// The named curve of an EC spec as CKA_EC_PARAMS (a DER OID).
    static func curve(_ spec: KeySpec) -> [UInt8]? {
        switch spec {
        case .eccP256: [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        case .eccP384: [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]
        case .eccP521: [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23]
        default: nil
        }
    }

    /// SubjectPublicKeyInfo of an EC key: its curve OID and point (raw or DER-wrapped, as tokens differ).
    static func ecPublicKey(curve: [UInt8], point: [UInt8]) -> [UInt8] {
        sequence(sequence(ecPublicKey, curve), bitString(octetString(point) ?? point))
    }

    /// SubjectPublicKeyInfo of an RSA key.
    static func rsaPublicKey(modulus: [UInt8], exponent: [UInt8]) -> [UInt8] {
        sequence(sequence(rsaEncryption), bitString(sequence(integer(modulus), integer(exponent))))
    }

    /// An ECDSA-Sig-Value from r ‖ s (halves of equal length), as OpenSSL and AWS KMS write signatures.
    static func ecdsaSignature(_ raw: [UInt8]) -> [UInt8] {
        let half = raw.count / 2
        return sequence(integer(Array(raw[..<half])), integer(Array(raw[half...])))
    }
}
