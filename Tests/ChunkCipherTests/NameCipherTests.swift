import Foundation
import Testing
import Synchronization
import COpenSSL
@testable import ChunkCipher

@Suite struct NameCipherTests {
    let dirID = ID128(high: 1, low: 2)

    func cipher(_ k: [UInt8] = pattern(32, seed: 11), dir: ID128? = nil) throws -> NameCipher {
        try NameCipher(nameKey: key(k), directoryID: dir ?? dirID)
    }

    @Test("names round-trip, including unicode, dots and spaces", arguments: [
        "a", "README.md", ".hidden", "..x", "with space", "名前.txt", "emoji 🎉", String(repeating: "n", count: 255),
    ])
    func roundTrip(_ name: String) throws {
        let c = try cipher()
        let encoded = try c.encrypt(name)
        #expect(!encoded.contains(name) || name.count < 3)
        #expect(encoded.allSatisfy { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" })
        #expect(try c.decrypt(encoded) == Array(name.utf8))
    }

    @Test("names are bytes: every byte but '/' and NUL round-trips, UTF-8 or not, and one differing byte is another name")
    func bytes() throws {
        let c = try cipher()
        for byte in UInt8(1)...UInt8(255) where byte != UInt8(ascii: "/") {
            #expect(try c.decrypt(c.encrypt([byte])) == [byte])
        }
        let latin1 = try c.encrypt([0x63, 0x61, 0x66, 0xE9]), other = try c.encrypt([0x63, 0x61, 0x66, 0xE8])
        #expect(latin1 != other)
        #expect(try c.decrypt(latin1) == [0x63, 0x61, 0x66, 0xE9])
        let long = [UInt8](repeating: 0x80, count: 255)
        #expect(try c.decrypt(c.encrypt(long)) == long)
        #expect(cipherError { _ = try c.encrypt([0x61, 0x2F]) } != nil)
        #expect(cipherError { _ = try c.encrypt([0x61, 0x00]) } != nil)
    }

    @Test("encryption is deterministic within a directory and differs across directories")
    func determinism() throws {
        let a = try cipher()
        #expect(try a.encrypt("notes.txt") == a.encrypt("notes.txt"))
        let sameKeyOtherDir = try cipher(dir: ID128(high: 1, low: 3))
        #expect(try a.encrypt("notes.txt") != sameKeyOtherDir.encrypt("notes.txt"))
        let otherKey = try cipher(pattern(32, seed: 12))
        #expect(try a.encrypt("notes.txt") != otherKey.encrypt("notes.txt"))
    }

    @Test("a flipped bit anywhere in an encrypted name is rejected")
    func flippedBit() throws {
        let c = try cipher()
        let raw = Base64URL.decode(try c.encrypt("secret-plan.pdf"))!
        for i in 0..<(raw.count * 8) {
            var damaged = raw
            damaged[i / 8] ^= UInt8(1 << (i % 8))
            #expect(cipherError { _ = try c.decrypt(Base64URL.encode(damaged)) } == .integrityFailure(.name))
        }
    }

    @Test("a name moved from another directory is rejected")
    func movedName() throws {
        let other = try cipher(dir: ID128(high: 9, low: 9))
        #expect(cipherError { _ = try cipher().decrypt(try! other.encrypt("x")) } == .integrityFailure(.name))
    }

    @Test("strings that are not encoded names are malformed")
    func notEncoded() throws {
        let c = try cipher()
        for bad in ["", "abc", "has=pad", "plus+sign", "a/b"] {
            guard case .malformed = cipherError({ _ = try c.decrypt(bad) }) else {
                Issue.record("'\(bad)' should be malformed"); continue
            }
        }
    }

    @Test("names with '/' or NUL or empty are refused")
    func invalidNames() throws {
        let c = try cipher()
        for bad in ["", "a/b", "nul\u{0}"] {
            guard case .invalidArgument = cipherError({ _ = try c.encrypt(bad) }) else {
                Issue.record("'\(bad)' should be refused"); continue
            }
        }
    }

    @Test("long names are hashed to a short stored name; short ones are kept")
    func longNames() throws {
        let c = try cipher()
        let short = try c.encrypt("short")
        #expect(LongName.storedName(for: short) == short)
        let long = try c.encrypt(String(repeating: "x", count: 200))
        #expect(long.utf8.count > 255)
        let stored = LongName.storedName(for: long)
        #expect(stored.hasPrefix(LongName.prefix))
        #expect(stored.utf8.count <= 255)
        #expect(LongName.isHashed(stored))
        #expect(!LongName.isHashed(stored + LongName.sidecarSuffix))
        #expect(LongName.storedName(for: long) == stored)
    }

    @Test("base64url rejects non-canonical forms")
    func base64Canonical() {
        #expect(Base64URL.decode(Base64URL.encode([0xFF, 0xEE])) == [0xFF, 0xEE])
        // "_-8" decodes to the same bytes as "_-4" would not: trailing bits must be zero.
        #expect(Base64URL.decode("__9") == nil)
    }
}

@Suite struct Base64URLTests {
    @Test("matches RFC 4648 §10 test vectors in the URL-safe alphabet, unpadded")
    func vectors() {
        let cases = ["": "", "f": "Zg", "fo": "Zm8", "foo": "Zm9v", "foob": "Zm9vYg", "fooba": "Zm9vYmE", "foobar": "Zm9vYmFy"]
        for (plain, encoded) in cases {
            #expect(Base64URL.encode(Array(plain.utf8)) == encoded)
            #expect(Base64URL.decode(encoded) == Array(plain.utf8))
        }
        #expect(Base64URL.encode([0xFB, 0xFF, 0xBF]) == "-_-_")
    }

    @Test("random bytes round-trip; invalid characters and lengths are refused")
    func roundTrip() {
        for n in 0..<70 {
            let bytes = pattern(n, seed: UInt64(n + 1))
            #expect(Base64URL.decode(Base64URL.encode(bytes)) == bytes)
        }
        // Wrong length, padding, the standard alphabet's +/, and non-zero trailing bits ("Zm9", "Zh").
        for bad in ["A", "Zm9v=", "Zm+v", "Zm/v", "Zm9", "Zh"] {
            #expect(Base64URL.decode(bad) == nil, "\(bad)")
        }
    }
}

/// The S2V composition over OpenSSL's CMAC and CTR against independent answers:
/// RFC 5297's vector, and OpenSSL's own AES-256-SIV for the names kmsfs stores.
@Suite struct SIVConformanceTests {
    @Test("RFC 5297 appendix A.1 (AES-SIV with a 256-bit key): the tag and ciphertext, and the way back")
    func rfc5297() throws {
        let siv = try NameCipher(sivKey: key(hex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")),
                                 associatedData: hex("101112131415161718191a1b1c1d1e1f2021222324252627"))
        let plain = hex("112233445566778899aabbccddee")
        let encoded = try siv.encrypt(plain)
        #expect(Base64URL.decode(encoded) == hex("85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c"))
        #expect(try siv.decrypt(encoded) == plain)
    }

    /// OpenSSL's AES-256-SIV of `plain` with one associated-data string, as `tag ‖ ciphertext`.
    func opensslSIV(key sivKey: [UInt8], ad: [UInt8], _ plain: [UInt8]) -> [UInt8] {
        let ctx = EVP_CIPHER_CTX_new()
        defer { EVP_CIPHER_CTX_free(ctx) }
        let cipher = EVP_CIPHER_fetch(nil, "AES-256-SIV", nil)
        defer { EVP_CIPHER_free(cipher) }
        var out = [UInt8](repeating: 0, count: 16 + plain.count)
        var length: Int32 = 0
        let ok = out.withUnsafeMutableBufferPointer { o in
            EVP_EncryptInit_ex(ctx, cipher, nil, sivKey, nil) == 1
                && EVP_EncryptUpdate(ctx, nil, &length, ad, Int32(ad.count)) == 1
                && EVP_EncryptUpdate(ctx, o.baseAddress! + 16, &length, plain, Int32(plain.count)) == 1
                && EVP_EncryptFinal_ex(ctx, o.baseAddress! + 16 + Int(length), &length) == 1
                && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, o.baseAddress) == 1
        }
        precondition(ok)
        return out
    }

    @Test("names of every length from 1 to 255 bytes encrypt exactly as OpenSSL's AES-256-SIV does, from eight threads, and decrypt back")
    func matchesOpenSSL() throws {
        let nameKey = SecretKey.random()
        let directory = ID128.random()
        let sivKey = try KeyDerivation.hkdfSHA256(key: nameKey, info: "kmsfs/v1/names/aes-siv", count: 64).withUnsafeBytes { Array($0) }
        let cipher = try NameCipher(nameKey: nameKey, directoryID: directory)
        var made: [[UInt8]] = []
        for n in 1...255 {
            var name = [UInt8](repeating: 0, count: n)
            for i in 0..<n {
                let byte = UInt8(1 + (n * 31 + i * 7) % 254)
                name[i] = byte == UInt8(ascii: "/") ? 0x30 : byte
            }
            made.append(name)
        }
        let names = made
        let expected = names.map { opensslSIV(key: sivKey, ad: directory.bytes, $0) }
        let wrong = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            for (i, name) in names.enumerated() where i % 8 == t || i < 20 {
                guard let encoded = try? cipher.encrypt(name), Base64URL.decode(encoded) == expected[i],
                      (try? cipher.decrypt(encoded)) == name else { wrong.add(1, ordering: .relaxed); continue }
            }
        }
        #expect(wrong.load(ordering: .relaxed) == 0)
        // And OpenSSL's output decrypts here: names written before this code are still read.
        #expect(try cipher.decrypt(Base64URL.encode(opensslSIV(key: sivKey, ad: directory.bytes, Array("old-name.txt".utf8)))) == Array("old-name.txt".utf8))
    }
}
