import ChunkCipher
import Testing

@Suite struct IdentifierTests {
    @Test("ids print as 32 lowercase hex digits, leading zeros kept, and parse back")
    func hexRoundTrip() {
        #expect(ID128(hex: "0f0e0d0c0b0a09080706050403020100")!.hex == "0f0e0d0c0b0a09080706050403020100")
        #expect(ID128(high: 0, low: 0).hex == String(repeating: "0", count: 32))
        #expect(ID128(high: .max, low: 0xABCDEF).hex == "ffffffffffffffff0000000000abcdef")
        for _ in 0..<1000 {
            let id = ID128.random()
            #expect(ID128(hex: id.hex) == id && id.hex.count == 32)
        }
    }
}

@Suite struct KeyedHMACTests {
    @Test("a key-once HMAC context gives the same MACs as keying per call")
    func sameAsOneShot() {
        let key = SecretKey.random()
        let keyed = KeyDerivation.KeyedHMAC(key: key)
        for n in [0, 1, 63, 64, 65, 1000] {
            let message = SecureRandom.bytes(n)
            #expect(keyed.mac(message) == KeyDerivation.hmacSHA256(key: key, message: message))
        }
        #expect(keyed.mac([1]) != KeyDerivation.KeyedHMAC(key: SecretKey.random()).mac([1]))
    }
}
