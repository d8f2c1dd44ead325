import Testing
import Dispatch
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
@testable import ChunkCipher

@Suite struct RoundTripTests {
    static let chunkSizes = [4096, 16384, 65536, 1 << 20]

    @Test("boundary sizes round-trip at every chunk size", arguments: chunkSizes)
    func boundarySizes(chunkSize: Int) throws {
        let file = try TestFile(chunkSize: chunkSize)
        for size in [0, 1, chunkSize - 1, chunkSize, chunkSize + 1, 3 * chunkSize, 3 * chunkSize + 17] {
            let plaintext = pattern(size, seed: UInt64(size + chunkSize))
            let sealed = try file.seal(plaintext)
            #expect(sealed.count == file.cipher.layout.ciphertextSize(plaintextSize: size))
            #expect(try file.open(sealed) == plaintext, "size \(size)")
        }
    }

    @Test("random sizes up to 6 MiB round-trip, serial and parallel", arguments: chunkSizes)
    func randomSizes(chunkSize: Int) throws {
        var rng = SystemRandomNumberGenerator()
        let file = try TestFile(chunkSize: chunkSize)
        for _ in 0..<4 {
            let size = Int.random(in: 0...(6 << 20), using: &rng)
            let plaintext = pattern(size, seed: UInt64(size))
            var body = [UInt8](repeating: 0, count: ChunkPipeline.ciphertextBytes(file.cipher.layout, plaintextSize: size))
            for workers in [1, 2, 4] {
                try plaintext.withUnsafeBytes { p in
                    try body.withUnsafeMutableBytes { c in
                        _ = try ChunkPipeline.seal(file.cipher, first: ChunkIndex(0), plaintext: p, into: c, workers: workers)
                    }
                }
                var back = [UInt8](repeating: 0, count: size)
                let n = try body.withUnsafeBytes { c in
                    try back.withUnsafeMutableBytes { p in
                        try ChunkPipeline.open(file.cipher, first: ChunkIndex(0), sealed: c, into: p, workers: workers)
                    }
                }
                #expect(n == size)
                #expect(back == plaintext, "size \(size) workers \(workers)")
            }
        }
    }

    @Test("sealing in order hands out consecutive pieces covering the whole run exactly once, in order, and the bytes open back", arguments: chunkSizes)
    func sealInOrder(chunkSize: Int) throws {
        let file = try TestFile(chunkSize: chunkSize)
        for size in [1000, 64 * 1024, 128 * 1024 + 5, 3 << 20] {
            let plaintext = pattern(size, seed: UInt64(size ^ chunkSize))
            let total = ChunkPipeline.ciphertextBytes(file.cipher.layout, plaintextSize: size)
            for workers in [1, 2, 4] {
                var body = [UInt8](repeating: 0, count: total)
                var emitted: [Range<Int>] = []
                try plaintext.withUnsafeBytes { p in
                    try body.withUnsafeMutableBytes { c in
                        try ChunkPipeline.sealInOrder(file.cipher, first: ChunkIndex(3), plaintext: p, into: c, workers: workers) { range in
                            emitted.append(range)
                            return true
                        }
                    }
                }
                #expect(emitted.first?.lowerBound == 0 && emitted.last?.upperBound == total, "size \(size) workers \(workers)")
                #expect(zip(emitted, emitted.dropFirst()).allSatisfy { $0.upperBound == $1.lowerBound }, "pieces in order, no gap or overlap")
                if workers > 1, size >= ChunkPipeline.parallelThreshold, size > chunkSize { #expect(emitted.count > 1, "a large run is handed out in pieces") }
                var back = [UInt8](repeating: 0, count: size)
                try body.withUnsafeBytes { c in try back.withUnsafeMutableBytes { p in
                    _ = try ChunkPipeline.open(file.cipher, first: ChunkIndex(3), sealed: c, into: p, workers: 1) } }
                #expect(back == plaintext, "size \(size) workers \(workers)")
            }
        }
    }

    @Test("emit refusing a piece stops the run: nothing after it is handed out")
    func sealInOrderStops() throws {
        let file = try TestFile(chunkSize: 4096)
        let plaintext = pattern(1 << 20, seed: 9)
        var body = [UInt8](repeating: 0, count: ChunkPipeline.ciphertextBytes(file.cipher.layout, plaintextSize: plaintext.count))
        var emitted: [Range<Int>] = []
        try plaintext.withUnsafeBytes { p in
            try body.withUnsafeMutableBytes { c in
                try ChunkPipeline.sealInOrder(file.cipher, first: ChunkIndex(0), plaintext: p, into: c, workers: 2) { range in
                    emitted.append(range)
                    return emitted.count < 5
                }
            }
        }
        #expect(emitted.count == 5)
        #expect(emitted.first?.lowerBound == 0)
    }

    @Test("two-lane runs from eight threads at once, back to back and after pauses: the one kept sealing thread serves one at a time, the rest fall back, every run seals and emits all of its own bytes, and none waits forever on a job the thread finished before a later one",
          .timeLimit(.minutes(1)))
    func sealInOrderConcurrently() throws {
        let file = try TestFile(chunkSize: 16384)
        let wrong = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            for round in 0..<24 {
                let size = (round % 2 == 0 ? 64 * 1024 : 128 * 1024) + t * 4096 + round
                let plaintext = pattern(size, seed: UInt64(t * 100 + round))
                var body = [UInt8](repeating: 0, count: ChunkPipeline.ciphertextBytes(file.cipher.layout, plaintextSize: size))
                var next = 0
                let ok: Bool = (try? plaintext.withUnsafeBytes { p in
                    try body.withUnsafeMutableBytes { c in
                        try ChunkPipeline.sealInOrder(file.cipher, first: ChunkIndex(round), plaintext: p, into: c, workers: 2) { range in
                            guard range.lowerBound == next else { return false }
                            next = range.upperBound
                            return true
                        }
                    }
                }) != nil
                var back = [UInt8](repeating: 0, count: size)
                let opened = (try? body.withUnsafeBytes { c in try back.withUnsafeMutableBytes { out in
                    try ChunkPipeline.open(file.cipher, first: ChunkIndex(round), sealed: c, into: out, workers: 1) } }) != nil
                if !ok || !opened || next != body.count || back != plaintext { wrong.add(1, ordering: .relaxed) }
                // A pause longer than the thread's spin window now and then, so it sleeps and is woken again.
                if round % 8 == 7 { usleep(1000) }
            }
        }
        #expect(wrong.load(ordering: .relaxed) == 0)
    }

    @Test("the kept sealing thread: a caller whose job finished before a later caller's job started and finished still returns",
          .timeLimit(.minutes(1)))
    func hotLaneLaterJobFinishedFirst() {
        let firstJobDone = DispatchSemaphore(value: 0), secondRunDone = DispatchSemaphore(value: 0)
        let secondStarted = Atomic<Bool>(false)
        let ran = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 2) { caller in
            if caller == 0 {
                // A: its job finishes at once; its own lane waits until B's whole run is over.
                let took = HotLane.shared.run({ ran.add(1, ordering: .relaxed); firstJobDone.signal() }) {
                    secondRunDone.wait()
                }
                #expect(took)
            } else {
                firstJobDone.wait()
                // B: its lane waits until the thread has started B's job, so B cannot take it back.
                var took = false
                while !took {
                    took = HotLane.shared.run({ ran.add(1, ordering: .relaxed); secondStarted.store(true, ordering: .releasing) }) {
                        while !secondStarted.load(ordering: .acquiring) { sched_yield() }
                    }
                }
                secondRunDone.signal()
            }
        }
        #expect(ran.load(ordering: .relaxed) == 2)
    }

    @Test("a run starting at a later chunk index opens only at that index")
    func runAtOffset() throws {
        let file = try TestFile()
        let plaintext = pattern(3 * 4096, seed: 5)
        var body = [UInt8](repeating: 0, count: 3 * (4096 + 28))
        try plaintext.withUnsafeBytes { p in
            try body.withUnsafeMutableBytes { c in
                _ = try ChunkPipeline.seal(file.cipher, first: ChunkIndex(10), plaintext: p, into: c)
            }
        }
        var back = [UInt8](repeating: 0, count: plaintext.count)
        let wrongIndex = cipherError {
            _ = try body.withUnsafeBytes { c in try back.withUnsafeMutableBytes { p in
                try ChunkPipeline.open(file.cipher, first: ChunkIndex(0), sealed: c, into: p) } }
        }
        #expect(wrongIndex == .integrityFailure(.chunk(ChunkIndex(0))))
        try body.withUnsafeBytes { c in try back.withUnsafeMutableBytes { p in
            _ = try ChunkPipeline.open(file.cipher, first: ChunkIndex(10), sealed: c, into: p) } }
        #expect(back == plaintext)
    }

    @Test("sealing the same chunk twice gives different bytes (fresh nonces)")
    func freshNonces() throws {
        let file = try TestFile()
        let plaintext = pattern(100, seed: 1)
        #expect(try file.seal(plaintext) != file.seal(plaintext))
    }
}

@Suite struct ChunkLayoutTests {
    @Test("plaintext and ciphertext sizes are inverse", arguments: [4096, 65536])
    func sizesInvert(chunkSize: Int) throws {
        let layout = try ChunkLayout(chunkSize: chunkSize)
        for size in [0, 1, 100, chunkSize - 1, chunkSize, chunkSize + 1, 10 * chunkSize + 5] {
            #expect(try layout.plaintextSize(ciphertextSize: layout.ciphertextSize(plaintextSize: size)) == size)
        }
    }

    @Test("sizes that cut a header or a chunk's overhead are malformed")
    func impossibleSizes() throws {
        let layout = try ChunkLayout(chunkSize: 4096)
        for size in [0, 383, 384 + 1, 384 + 28, 384 + 4124 + 28] {
            #expect(throws: CipherError.self) { try layout.plaintextSize(ciphertextSize: size) }
        }
    }

    @Test("chunk sizes must be powers of two within 4 KiB...1 MiB")
    func chunkSizeBounds() {
        for bad in [0, 2048, 5000, 2 << 20] {
            #expect(throws: CipherError.self) { try ChunkLayout(chunkSize: bad) }
        }
    }

    @Test("chunks covering a byte range")
    func covering() throws {
        let layout = try ChunkLayout(chunkSize: 4096)
        #expect(layout.chunks(covering: 0..<1) == ChunkIndex(0)..<ChunkIndex(1))
        #expect(layout.chunks(covering: 4095..<4097) == ChunkIndex(0)..<ChunkIndex(2))
        #expect(layout.chunks(covering: 8192..<12288) == ChunkIndex(2)..<ChunkIndex(3))
        #expect(layout.chunks(covering: 5..<5).isEmpty)
    }
}
