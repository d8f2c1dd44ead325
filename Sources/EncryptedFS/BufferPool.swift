import Synchronization

/// Scratch buffers for the read and write paths, reused instead of
/// allocated per request: every read and write needs one for its sealed
/// chunks and an unaligned write one more for the whole chunks it touches — up to `max_write` plus
/// the chunks' overhead each, sizes at which malloc may map and unmap fresh
/// pages every time. At most `keep` buffers of at most `largest` bytes wait
/// here; a larger request gets its own allocation. (Buffers hold the
/// daemon's own plaintext and ciphertext, which never leave the process:
/// core dumps are off.)
final class BufferPool: Sendable {
    static let shared = BufferPool(keep: 8, largest: 2 << 20)

    /// An allocation that moves between threads only through the pool's lock.
    private struct Buffer: @unchecked Sendable {
        let memory: UnsafeMutableRawBufferPointer
    }

    private let free = Mutex<[Buffer]>([])
    let keep: Int
    let largest: Int

    init(keep: Int, largest: Int) {
        self.keep = keep
        self.largest = largest
    }

    deinit {
        free.withLock { $0.forEach { $0.memory.deallocate() } }
    }

    /// Runs `body` with `count` bytes (uninitialised, 16-byte aligned).
    func withBuffer<R, E: Error>(_ count: Int, _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        let buffer = take(count)
        defer { give(buffer) }
        return try body(UnsafeMutableRawBufferPointer(rebasing: buffer.memory[0..<count]))
    }

    /// A buffer of at least the asked size that outlives a scope (a write
    /// handed to `WriteBehind`); `give` returns it to the pool, once.
    struct Lease: @unchecked Sendable {
        let memory: UnsafeMutableRawBufferPointer
        fileprivate let pool: BufferPool
        func give() { pool.give(Buffer(memory: memory)) }
    }

    func lease(_ count: Int) -> Lease { Lease(memory: take(count).memory, pool: self) }

    /// Buffers waiting for reuse (for tests).
    var waiting: Int { free.withLock { $0.count } }

    private func take(_ count: Int) -> Buffer {
        if count <= largest, let buffer = free.withLock({ list -> Buffer? in
            guard let i = list.firstIndex(where: { $0.memory.count >= count }) else { return nil }
            return list.remove(at: i)
        }) {
            return buffer
        }
        // Round up so nearby sizes share buffers (a 128 KiB write and its sealed chunks).
        let size = count <= largest ? min(largest, max(64 << 10, (count + (64 << 10) - 1) & ~((64 << 10) - 1))) : count
        return Buffer(memory: .allocate(byteCount: size, alignment: 16))
    }

    private func give(_ buffer: Buffer) {
        let kept = buffer.memory.count <= largest && free.withLock { list -> Bool in
            guard list.count < keep else { return false }
            list.append(buffer)
            return true
        }
        if !kept { buffer.memory.deallocate() }
    }
}
