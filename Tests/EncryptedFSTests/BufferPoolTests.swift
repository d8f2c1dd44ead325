import Testing
@testable import EncryptedFS

@Suite("the write path's buffer pool: reused, bounded, never shared")
struct BufferPoolTests {
    @Test("a returned buffer serves the next request of its size or less; at most `keep` wait; oversized ones are not kept")
    func reuseAndBounds() {
        let pool = BufferPool(keep: 2, largest: 1 << 20)
        let first = pool.withBuffer(100_000) { $0.baseAddress! }
        #expect(pool.waiting == 1)
        // A smaller request gets the same memory; a larger one a new buffer.
        #expect(pool.withBuffer(70_000) { $0.baseAddress! } == first)
        let (a, b, c) = pool.withBuffer(100_000) { x in
            pool.withBuffer(100_000) { y in
                pool.withBuffer(100_000) { z in (x.baseAddress!, y.baseAddress!, z.baseAddress!) }
            }
        }
        // Buffers in use at the same time are distinct, and only two stay.
        #expect(Set([a, b, c]).count == 3)
        #expect(pool.waiting == 2)
        _ = pool.withBuffer(3 << 20) { $0.count }
        #expect(pool.waiting == 2)
        #expect(pool.withBuffer(3 << 20) { $0.count } == 3 << 20)
        // The body sees exactly the bytes it asked for.
        #expect(pool.withBuffer(12_345) { $0.count } == 12_345)
    }

    @Test("a body that throws still returns its buffer")
    func throwingBody() {
        struct Boom: Error {}
        let pool = BufferPool(keep: 4, largest: 1 << 20)
        #expect(throws: Boom.self) { try pool.withBuffer(4096) { _ throws(Boom) in throw Boom() } }
        #expect(pool.waiting == 1)
    }
}
