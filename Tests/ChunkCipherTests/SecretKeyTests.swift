import Testing
import ChunkCipher

@Suite struct SecretKeyTests {
    @Test("random keys differ; a duplicate is equal")
    func randomAndDuplicate() {
        let a = SecretKey.random()
        let b = SecretKey.random()
        let same = a.isEqual(to: b)
        #expect(!same)
        let c = a.duplicate()
        let copied = a.isEqual(to: c)
        #expect(copied)
        #expect(a.count == 32)
    }

    @Test("keys live in OpenSSL's secure heap; when it is full they get locked pages and still work")
    func secureHeap() {
        #expect(SecureHeap.prepare())
        let first = SecretKey.random().isInSecureHeap
        #expect(first)
        // Fill the heap (1 MiB of 32-byte keys) and go past it.
        var keys: [Box] = []
        while keys.count < SecureHeap.size / 32 + 10 { keys.append(Box(SecretKey.random())) }
        let outside = keys.filter { !$0.key.isInSecureHeap }.count
        #expect(outside >= 10)
        let copy = keys.last!.key.duplicate()
        let same = copy.isEqual(to: keys.last!.key)
        #expect(same)
        keys.removeAll()
        let again = SecretKey.random().isInSecureHeap
        #expect(again)  // freed keys return their room
    }

    @Test("HKDF is deterministic and separates info strings")
    func hkdf() throws {
        let k = key(pattern(32, seed: 1))
        let x = try KeyDerivation.hkdfSHA256(key: k, info: "a", count: 64)
        let y = try KeyDerivation.hkdfSHA256(key: k, info: "a", count: 64)
        let z = try KeyDerivation.hkdfSHA256(key: k, info: "b", count: 64)
        let xy = x.isEqual(to: y), xz = x.isEqual(to: z)
        #expect(xy)
        #expect(!xz)
    }

    @Test("HMAC-SHA256 matches RFC 4231 test case 2")
    func hmacVector() {
        let mac = KeyDerivation.hmacSHA256(key: key(Array("Jefe".utf8)), message: Array("what do ya want for nothing?".utf8))
        #expect(mac == hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"))
    }
}

/// A class holding a key, so non-copyable keys can go into an array.
private final class Box {
    let key: SecretKey
    init(_ key: consuming SecretKey) { self.key = key }
}
