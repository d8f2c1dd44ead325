import Testing
import ChunkCipher

/// Known-answer tests from the GCM specification (McGrew & Viega, test cases 13–16).
@Suite struct AESGCMKnownAnswerTests {
    struct Vector: Sendable {
        let key, iv, plaintext, ad, ciphertext, tag: String
    }

    static let vectors: [Vector] = [
        Vector(key: String(repeating: "0", count: 64), iv: String(repeating: "0", count: 24), plaintext: "", ad: "",
               ciphertext: "", tag: "530f8afbc74536b9a963b4f1c4cb738b"),
        Vector(key: String(repeating: "0", count: 64), iv: String(repeating: "0", count: 24),
               plaintext: String(repeating: "0", count: 32), ad: "",
               ciphertext: "cea7403d4d606b6e074ec5d3baf39d18", tag: "d0d1c8a799996bf0265b98b5d48ab919"),
        Vector(key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", iv: "cafebabefacedbaddecaf888",
               plaintext: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
               ad: "",
               ciphertext: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
               tag: "b094dac5d93471bdec1a502270e3cc6c"),
        Vector(key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", iv: "cafebabefacedbaddecaf888",
               plaintext: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
               ad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
               ciphertext: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
               tag: "76fc6ece0f4e1768cddf8853bb2d551b"),
    ]

    @Test("seal produces the specified ciphertext and tag", arguments: vectors)
    func sealMatchesVector(_ v: Vector) throws {
        let aead = try AESGCM(key: key(hex(v.key)))
        let plaintext = hex(v.plaintext)
        var ciphertext = [UInt8](repeating: 0, count: plaintext.count)
        var tag = [UInt8](repeating: 0, count: 16)
        try plaintext.withUnsafeBytes { p in
            try hex(v.iv).withUnsafeBytes { iv in
                try hex(v.ad).withUnsafeBytes { ad in
                    try ciphertext.withUnsafeMutableBytes { c in
                        try tag.withUnsafeMutableBytes { t in
                            try aead.seal(p, nonce: iv, additionalData: ad, ciphertext: c, tag: t)
                        }
                    }
                }
            }
        }
        #expect(ciphertext == hex(v.ciphertext))
        #expect(tag == hex(v.tag))
    }

    @Test("open accepts the vector and rejects a changed tag", arguments: vectors)
    func openMatchesVector(_ v: Vector) throws {
        let aead = try AESGCM(key: key(hex(v.key)))
        for flipTag in [false, true] {
            var tag = hex(v.tag)
            if flipTag { tag[5] ^= 0x10 }
            var plaintext = [UInt8](repeating: 0, count: hex(v.ciphertext).count)
            let ok = try hex(v.ciphertext).withUnsafeBytes { c in
                try tag.withUnsafeBytes { t in
                    try hex(v.iv).withUnsafeBytes { iv in
                        try hex(v.ad).withUnsafeBytes { ad in
                            try plaintext.withUnsafeMutableBytes { p in
                                try aead.open(c, tag: t, nonce: iv, additionalData: ad, plaintext: p)
                            }
                        }
                    }
                }
            }
            #expect(ok == !flipTag)
            if ok { #expect(plaintext == hex(v.plaintext)) } else { #expect(plaintext.allSatisfy { $0 == 0 }) }
        }
    }

    @Test("a 31-byte key is refused")
    func shortKeyRefused() {
        let error = cipherError { _ = try AESGCM(key: key([UInt8](repeating: 1, count: 31))) }
        #expect(error == .invalidArgument("AES-256-GCM needs a 32-byte key, got 31"))
    }
}
