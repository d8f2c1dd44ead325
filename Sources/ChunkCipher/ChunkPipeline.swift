import Dispatch
import Synchronization

/// Seals or opens a run of consecutive chunks (a whole FUSE read or write, a
/// rekey batch), spread over the cores with `concurrentPerform` when the run
/// is large enough to pay for the hand-off.
public enum ChunkPipeline {
    /// Runs smaller than this many bytes stay on the calling thread.
    public static let parallelThreshold = 64 * 1024

    /// Seals `plaintext`, whose first byte starts chunk `first`, into
    /// `output` (laid out as on disk). The last chunk may be partial.
    /// Returns the ciphertext byte count.
    @discardableResult
    public static func seal(_ cipher: FileCipher, first: ChunkIndex, plaintext: UnsafeRawBufferPointer,
                            into output: UnsafeMutableRawBufferPointer, workers: Int? = nil) throws(CipherError) -> Int {
        let layout = cipher.layout
        let count = layout.chunkCount(plaintextSize: plaintext.count)
        let total = ciphertextBytes(layout, plaintextSize: plaintext.count)
        guard output.count >= total else { throw .invalidArgument("output of \(output.count) bytes for \(total)") }
        try run(chunks: count, bytes: plaintext.count, workers: workers) { (i) throws(CipherError) in
            let p = i * layout.chunkSize
            let n = min(layout.chunkSize, plaintext.count - p)
            let c = i * layout.sealedChunkSize
            try cipher.sealChunk(first.advanced(by: i), plaintext: UnsafeRawBufferPointer(rebasing: plaintext[p..<(p + n)]),
                                 into: UnsafeMutableRawBufferPointer(rebasing: output[c..<(c + n + ChunkLayout.overhead)]))
        }
        return total
    }

    /// Opens `sealed` (consecutive chunks as on disk, the first being chunk
    /// `first`) into `output`. Returns the plaintext byte count. The first
    /// failing chunk's error is thrown.
    @discardableResult
    public static func open(_ cipher: FileCipher, first: ChunkIndex, sealed: UnsafeRawBufferPointer,
                            into output: UnsafeMutableRawBufferPointer, workers: Int? = nil) throws(CipherError) -> Int {
        let layout = cipher.layout
        let full = sealed.count / layout.sealedChunkSize
        let rest = sealed.count % layout.sealedChunkSize
        if rest > 0 && rest <= ChunkLayout.overhead {
            throw .malformed("trailing \(rest) bytes cannot hold a chunk")
        }
        let count = full + (rest > 0 ? 1 : 0)
        let plainTotal = full * layout.chunkSize + (rest > 0 ? rest - ChunkLayout.overhead : 0)
        guard output.count >= plainTotal else { throw .invalidArgument("output of \(output.count) bytes for \(plainTotal)") }
        try run(chunks: count, bytes: plainTotal, workers: workers) { (i) throws(CipherError) in
            let c = i * layout.sealedChunkSize
            let n = min(layout.sealedChunkSize, sealed.count - c)
            let p = i * layout.chunkSize
            try cipher.openChunk(first.advanced(by: i), sealed: UnsafeRawBufferPointer(rebasing: sealed[c..<(c + n)]),
                                 into: UnsafeMutableRawBufferPointer(rebasing: output[p..<(p + n - ChunkLayout.overhead)]))
        }
        return plainTotal
    }

    /// Bytes that `plaintextSize` bytes occupy as consecutive sealed chunks.
    public static func ciphertextBytes(_ layout: ChunkLayout, plaintextSize: Int) -> Int {
        layout.ciphertextSize(plaintextSize: plaintextSize) - ChunkLayout.headerSize
    }

    private static func run(chunks count: Int, bytes: Int, workers: Int?,
                            _ body: (Int) throws(CipherError) -> Void) throws(CipherError) {
        let cores = workers ?? ProcessInfoLite.activeProcessorCount
        let lanes = bytes < parallelThreshold ? 1 : min(cores, count)
        if lanes <= 1 {
            for i in 0..<count { try body(i) }
            return
        }
        // Each lane takes a contiguous slice: one hand-off per lane, not per chunk.
        let firstError = ErrorSlot()
        withoutActuallyEscaping(body) { escapable in
            // The lanes touch disjoint slices of the caller's buffers and
            // concurrentPerform returns only when all are done.
            nonisolated(unsafe) let body = escapable
            DispatchQueue.concurrentPerform(iterations: lanes) { lane in
                let start = count * lane / lanes
                let end = count * (lane + 1) / lanes
                for i in start..<end {
                    do throws(CipherError) { try body(i) } catch {
                        firstError.record(error, at: i)
                        return
                    }
                }
            }
        }
        if let error = firstError.error { throw error }
    }
}

/// The lowest-indexed error of a parallel run, so the result does not depend
/// on thread timing.
final class ErrorSlot: Sendable {
    private let stored = Mutex<(index: Int, error: CipherError)?>(nil)
    func record(_ error: CipherError, at index: Int) {
        stored.withLock { slot in
            if slot == nil || index < slot!.index { slot = (index, error) }
        }
    }
    var error: CipherError? { stored.withLock { $0?.error } }
}

/// The online core count without pulling in Foundation's ProcessInfo.
enum ProcessInfoLite {
    static let activeProcessorCount: Int = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
}

#if canImport(Glibc)
import Glibc
#endif
