import ChunkCipher
import Dispatch
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

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

    @Test("ids read from bytes: arrays, slices and non-contiguous collections agree; wrong lengths are refused")
    func fromBytes() {
        let bytes: [UInt8] = Array(0..<16).map { UInt8($0 * 17) }
        let id = ID128(bytes: bytes)!
        #expect(id.hex == "00112233445566778899aabbccddeeff")
        #expect(id.bytes == bytes)
        #expect(ID128(bytes: ([0xAA] + bytes)[1...]) == id)
        #expect(ID128(bytes: bytes.reversed().reversed()) == id)
        #expect(ID128(bytes: bytes.prefix(15)) == nil && ID128(bytes: bytes + [0]) == nil)
    }
}

@Suite struct SecureRandomTests {
    @Test("buffered random values are never handed out twice, across threads and buffer refills")
    func distinctAcrossThreads() {
        let perThread = 20_000
        let ids = Mutex<[ID128]>([])
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            var mine: [ID128] = []
            for i in 0..<perThread {
                mine.append(ID128.random())
                if i % 100 == 0 { _ = SecureRandom.bytes(i % 900) }  // uneven sizes cross refill boundaries
            }
            ids.withLock { $0 += mine }
        }
        let all = ids.withLock { $0 }
        #expect(all.count == 4 * perThread)
        #expect(Set(all).count == all.count)
    }

    @Test("a forked child draws other random bytes than its parent")
    func forkedChildDiffers() throws {
        _ = SecureRandom.bytes(16)  // the buffer holds unused bytes now
        var pipe: [Int32] = [0, 0]
        #expect(Glibc.pipe(&pipe) == 0)
        let child = fork()
        if child == 0 {
            var value = SecureRandom.bytes(16)
            _ = write(pipe[1], &value, 16)
            _exit(0)
        }
        #expect(child > 0)
        let mine = SecureRandom.bytes(16)
        var theirs = [UInt8](repeating: 0, count: 16)
        #expect(read(pipe[0], &theirs, 16) == 16)
        var status: Int32 = 0
        waitpid(child, &status, 0)
        close(pipe[0]); close(pipe[1])
        #expect(mine != theirs)
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
        // Pooled contexts restarted for each MAC: the same answers again, from several threads at once.
        let messages = (0..<64).map { SecureRandom.bytes($0 * 7) }
        let expected = messages.map { KeyDerivation.hmacSHA256(key: key, message: $0) }
        let wrong = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for (message, mac) in zip(messages, expected) where keyed.mac(message) != mac { wrong.add(1, ordering: .relaxed) }
        }
        #expect(wrong.load(ordering: .relaxed) == 0)
    }
}
