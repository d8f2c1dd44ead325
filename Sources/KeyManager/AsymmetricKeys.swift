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
