import Foundation
import Testing
@testable import ChunkCipher
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

@Suite(.serialized) struct SecretKeyTests {
    @Test("key schedules of AES-GCM, AES-SIV and HMAC contexts live in the secure heap: the key's bytes appear nowhere else in writable memory")
    func keySchedulesStayInTheSecureHeap() throws {
        #expect(KeyMemory.installed, "the OpenSSL allocator must be in place before OpenSSL's first allocation")
        let key = SecretKey.random()
        let keyBase = key.withUnsafeBytes { UInt(bitPattern: $0.baseAddress) }
        // The patterns to look for live in a read-only mapping (never scanned), not in the ordinary heap.
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let patterns = try #require(mmap(nil, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(patterns, page) }
        key.withUnsafeBytes { raw in
            for i in 0..<32 {
                patterns.storeBytes(of: raw[i], toByteOffset: i, as: UInt8.self)
                patterns.storeBytes(of: raw[(i & ~3) + 3 - (i & 3)], toByteOffset: 32 + i, as: UInt8.self)  // as big-endian words
            }
        }
        mprotect(patterns, page, PROT_READ)
        // Keyed on a thread whose stack we own and wipe, so no stack residue is mistaken for a leak.
        let stackSize = 1 << 20
        let stack = try #require(mmap(nil, stackSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(stack, stackSize) }
        final class Work: @unchecked Sendable {
            var key: SecretKey
            var gcm: AESGCM?
            var hmac: KeyDerivation.KeyedHMAC?
            var names: NameCipher?
            init(_ key: consuming SecretKey) { self.key = key }
        }
        let work = Work(key.duplicate())
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstack(&attr, stack, stackSize)
        var thread = pthread_t()
        let box = Unmanaged.passRetained(work).toOpaque()
        #expect(pthread_create(&thread, &attr, { raw in
            let work = Unmanaged<Work>.fromOpaque(raw!).takeRetainedValue()
            work.gcm = try? AESGCM(key: work.key)
            work.hmac = KeyDerivation.KeyedHMAC(key: work.key)
            work.names = try? NameCipher(nameKey: work.key, directoryID: ID128(high: 1, low: 2))
            // Use each once, so per-thread contexts are made too.
            let plain: [UInt8] = [1, 2, 3]
            var out = [UInt8](repeating: 0, count: plain.count + AESGCM.boxOverhead)
            plain.withUnsafeBytes { p in
                out.withUnsafeMutableBytes { o in try? work.gcm?.sealBox(p, additionalData: UnsafeRawBufferPointer(start: nil, count: 0), into: o) }
            }
            _ = work.hmac?.mac([1, 2, 3])
            _ = try? work.names?.encrypt("name")
            return nil
        }, box) == 0)
        pthread_join(thread, nil)
        pthread_attr_destroy(&attr)
        memset(stack, 0, stackSize)
        #expect(work.gcm != nil && work.hmac != nil && work.names != nil)
        // (No check of the secure heap's byte count: tests in other suites
        // of this process allocate and free secure memory meanwhile. The scan below
        // is the real check: the key's bytes must be nowhere but the secure heap.)
        // Scan every writable mapping but the secure heap's, a MiB at a time through a buffer that is itself skipped.
        let chunk = 1 << 20
        let scratch = try #require(mmap(nil, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(scratch, chunk) }
        let scratchStart = UInt(bitPattern: scratch)
        let maps = try String(contentsOfFile: "/proc/self/maps", encoding: .utf8)
        let mem = open("/proc/self/mem", O_RDONLY)
        defer { close(mem) }
        var hits: [String] = []
        for line in maps.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 2, fields[1].hasPrefix("rw") else { continue }
            let range = fields[0].split(separator: "-").compactMap { UInt(String($0), radix: 16) }
            guard range.count == 2, !(range[0]..<range[1]).contains(keyBase) else { continue }
            if fields.count >= 6, fields[5].hasPrefix("[v") { continue }  // [vvar], [vsyscall]
            var address = range[0]
            while address < range[1] {
                defer { address += UInt(chunk) - 64 }
                if address + UInt(chunk) > scratchStart, address < scratchStart + UInt(chunk) { continue }
                let n = pread(mem, scratch, min(chunk, Int(range[1] - address)), off_t(Int64(bitPattern: UInt64(address))))
                guard n >= 32 else { continue }
                for p in 0..<2 where contains(scratch, n, patterns + 32 * p) { hits.append(String(line)) }
            }
        }
        #expect(hits.isEmpty, "key bytes outside the secure heap: \(hits)")

        func contains(_ haystack: UnsafeMutableRawPointer, _ count: Int, _ needle: UnsafeRawPointer) -> Bool {
            let first = needle.load(as: UInt8.self)
            var i = 0
            while i + 32 <= count {
                guard let hit = memchr(haystack + i, Int32(first), count - 32 - i + 1) else { return false }
                let at = UnsafeRawPointer(hit) - UnsafeRawPointer(haystack)
                if memcmp(hit, needle, 32) == 0 { return true }
                i = at + 1
            }
            return false
        }
        withExtendedLifetime(work) {}
    }

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

    @Test("keys live in OpenSSL's secure heap; when it is full (but for OpenSSL's reserve) they get locked pages and still work, past the DRBG's reseed interval")
    func secureHeap() {
        #expect(SecureHeap.prepare())
        let first = SecretKey.random().isInSecureHeap
        #expect(first)
        // Fill the heap (8 MiB of 32-byte keys, more than the private DRBG's 2^16 generations between reseeds) and go past it.
        var keys: [Box] = []
        while keys.count < SecureHeap.size / 32 + 10 { keys.append(Box(SecretKey.random())) }
        #expect(keys.count > 1 << 16)
        let outside = keys.filter { !$0.key.isInSecureHeap }.count
        #expect(outside >= 10)
        let copy = keys.last!.key.duplicate()
        let same = copy.isEqual(to: keys.last!.key)
        #expect(same)
        keys.removeAll()
        let again = SecretKey.random().isInSecureHeap
        #expect(again)  // freed keys return their room
    }

    @Test("keys outside the secure heap take pages carved from large locked mappings: 5,000 such pages add ~20 mappings, not 5,000 (the kernel allows 65,530); given back, they are reused and come out zeroed")
    func keyPagesShareMappings() throws {
        func mappings() throws -> Int { try String(contentsOfFile: "/proc/self/maps", encoding: .utf8).split(separator: "\n").count }
        let before = try mappings()
        var pages: [UnsafeMutableRawPointer] = []
        for _ in 0..<5000 {
            let (page, size) = KeyPages.take()
            #expect(size == KeyPages.pageSize)
            memset(page, 0xA5, 64)
            pages.append(page)
        }
        let grown = try mappings() - before
        #expect(grown <= 5000 / KeyPages.perMapping + 8, "\(grown) new mappings")
        #expect(Set(pages).count == 5000)
        for page in pages { KeyPages.give(page) }
        var again: [UnsafeMutableRawPointer] = []
        for _ in 0..<5000 { again.append(KeyPages.take().0) }
        #expect(try mappings() - before <= grown + 2, "pages are reused")
        #expect(again.allSatisfy { UnsafeRawBufferPointer(start: $0, count: KeyPages.pageSize).allSatisfy { $0 == 0 } })
        for page in again { KeyPages.give(page) }
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

    @Test("HKDF-SHA256 matches RFC 5869 test case 3 (no salt, no info), and a case with info, from eight threads at once")
    func hkdfVectors() throws {
        let ikm = [UInt8](repeating: 0x0b, count: 22)
        let expected = hex("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")
        // The same IKM with info "kmsfs" and no salt, computed with Python's hmac module (RFC 5869's steps).
        let withInfo = hex("9c7d4e873157daf1a67bec10595034e5c86e6fa05b14587f700ebb512e8e5842")
        #expect(try KeyDerivation.hkdfSHA256(key: key(ikm), info: "kmsfs", count: 32).withUnsafeBytes { Array($0) } == withInfo)
        let wrong = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            for _ in 0..<50 {
                guard let okm = try? KeyDerivation.hkdfSHA256(key: key(ikm), info: "", count: 42) else { wrong.add(1, ordering: .relaxed); continue }
                if okm.withUnsafeBytes({ Array($0) }) != expected { wrong.add(1, ordering: .relaxed) }
            }
        }
        #expect(wrong.load(ordering: .relaxed) == 0)
    }

    @Test("HMAC-SHA256 matches RFC 4231 test case 2")
    func hmacVector() {
        let mac = KeyDerivation.hmacSHA256(key: key(Array("Jefe".utf8)), message: Array("what do ya want for nothing?".utf8))
        #expect(mac == hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"))
    }

    @Test("one-shot HMAC-SHA256 reuses its contexts: alternating keys on eight threads give RFC 4231 answers every time")
    func hmacPooledContexts() {
        let jefe = Array("Jefe".utf8), jefeMessage = Array("what do ya want for nothing?".utf8)
        let jefeMAC = hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        // RFC 4231 test case 1: a 20-byte key of 0x0b.
        let elevens = [UInt8](repeating: 0x0b, count: 20), hiThere = Array("Hi There".utf8)
        let hiMAC = hex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        let wrong = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            for round in 0..<200 {
                let first = (i + round) % 2 == 0
                let mac = first ? KeyDerivation.hmacSHA256(key: key(jefe), message: jefeMessage)
                                : KeyDerivation.hmacSHA256(key: key(elevens), message: hiThere)
                if mac != (first ? jefeMAC : hiMAC) { wrong.add(1, ordering: .relaxed) }
            }
        }
        #expect(wrong.load(ordering: .relaxed) == 0)
    }
}

/// A class holding a key, so non-copyable keys can go into an array.
private final class Box {
    let key: SecretKey
    init(_ key: consuming SecretKey) { self.key = key }
}
