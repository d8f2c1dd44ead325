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
            try sealChunk(i, of: cipher, first: first, plaintext: plaintext, into: output)
        }
        return total
    }

    /// Seals chunk `i` of a run (`seal`'s and `sealInOrder`'s unit of work).
    private static func sealChunk(_ i: Int, of cipher: FileCipher, first: ChunkIndex, plaintext: UnsafeRawBufferPointer,
                                  into output: UnsafeMutableRawBufferPointer) throws(CipherError) {
        let layout = cipher.layout
        let p = i * layout.chunkSize
        let n = min(layout.chunkSize, plaintext.count - p)
        let c = i * layout.sealedChunkSize
        try cipher.sealChunk(first.advanced(by: i), plaintext: UnsafeRawBufferPointer(rebasing: plaintext[p..<(p + n)]),
                             into: UnsafeMutableRawBufferPointer(rebasing: output[c..<(c + n + ChunkLayout.overhead)]))
    }

    /// Seals like `seal`, handing the output to `emit` in order, a piece of
    /// about `pieceBytes` at a time (its byte range in `output`), as soon as that
    /// piece is sealed: while one core writes a piece out, the other seals
    /// the next, so a large write costs about its write-out, not its sealing
    /// plus its write-out. `emit` returning false stops the run (pieces after
    /// it are neither emitted nor, once noticed, sealed). Runs below the
    /// parallel threshold are sealed whole and emitted once.
    public static func sealInOrder(_ cipher: FileCipher, first: ChunkIndex, plaintext: UnsafeRawBufferPointer,
                                   into output: UnsafeMutableRawBufferPointer, workers: Int? = nil,
                                   emit: (Range<Int>) -> Bool) throws(CipherError) {
        let layout = cipher.layout
        let count = layout.chunkCount(plaintextSize: plaintext.count)
        let total = ciphertextBytes(layout, plaintextSize: plaintext.count)
        guard output.count >= total else { throw .invalidArgument("output of \(output.count) bytes for \(total)") }
        let perPiece = max(1, pieceBytes / layout.chunkSize)
        let pieces = (count + perPiece - 1) / perPiece
        let cores = workers ?? ProcessInfoLite.activeProcessorCount
        if plaintext.count < parallelThreshold || cores < 2 || pieces < 2 {
            try seal(cipher, first: first, plaintext: plaintext, into: output, workers: 1)
            _ = emit(0..<total)
            return
        }
        // Pieces touch disjoint slices of the caller's buffers.
        nonisolated(unsafe) let sealPiece = { (piece: Int) throws(CipherError) in
            for i in (piece * perPiece)..<min(count, (piece + 1) * perPiece) {
                try sealChunk(i, of: cipher, first: first, plaintext: plaintext, into: output)
            }
        }
        let board = PieceBoard(pieces)
        let writerTaken = Atomic<Bool>(false)
        withoutActuallyEscaping(emit) { escapable in
            // Lanes seal disjoint pieces of the caller's buffers; one of them
            // (whichever starts first) also emits, in order, sealing a piece
            // itself only when no lane has claimed it. Both ways below
            // return only when every lane is done.
            nonisolated(unsafe) let emit = escapable
            nonisolated(unsafe) let lane = { () in
                let writes = writerTaken.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
                if !writes {
                    while let piece = board.claim() { board.finish(piece, sealing: { () throws(CipherError) in try sealPiece(piece) }) }
                    return
                }
                for piece in 0..<pieces {
                    // Not sealed yet: seal it here if no lane has claimed it,
                    // else wait the few microseconds the lane sealing it needs.
                    // (Sealing a later piece meanwhile, as this did before,
                    // kept the writer from writing: profiles showed it doing
                    // half the sealing, serially with its writes.)
                    while case let state = board.state(of: piece), state != .sealed {
                        if state == .failed { board.stop(); return }
                        if let next = board.claim(through: piece) {
                            board.finish(next, sealing: { () throws(CipherError) in try sealPiece(next) })
                        } else {
                            sched_yield()
                        }
                    }
                    let start = piece * perPiece * layout.sealedChunkSize
                    let end = min(total, (piece + 1) * perPiece * layout.sealedChunkSize)
                    guard emit(start..<end) else { board.stop(); return }
                }
            }
            let lanes = min(cores, pieces)
            if lanes == 2, HotLane.shared.run(lane, alongside: lane) { return }
            DispatchQueue.concurrentPerform(iterations: lanes) { _ in lane() }
        }
        if let error = board.error { throw error }
    }

    /// The target size of the pieces `sealInOrder` emits (one chunk at the
    /// default chunk size: an A/B against 32 KiB was ~2% faster, within noise).
    static let pieceBytes = 16 * 1024

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

/// Which pieces of a `sealInOrder` run are claimed, sealed or failed.
final class PieceBoard: Sendable {
    enum State { case pending, sealed, failed }
    private struct Board: ~Copyable {
        var next = 0
        var stopped = false
        var states: [State]
    }
    private let board: Mutex<Board>
    private let errors = ErrorSlot()
    init(_ pieces: Int) { board = Mutex(Board(states: Array(repeating: .pending, count: pieces))) }

    /// The next piece nobody has claimed, unless the run stopped; with
    /// `through`, only if that piece is not past `through`.
    func claim(through last: Int = .max) -> Int? {
        board.withLock { b in
            guard !b.stopped, b.next < b.states.count, b.next <= last else { return nil }
            defer { b.next += 1 }
            return b.next
        }
    }

    func finish(_ piece: Int, sealing: () throws(CipherError) -> Void) {
        var state = State.sealed
        do throws(CipherError) { try sealing() } catch {
            errors.record(error, at: piece)
            state = .failed
        }
        board.withLock { $0.states[piece] = state }
    }

    func state(of piece: Int) -> State { board.withLock { $0.states[piece] } }
    func stop() { board.withLock { $0.stopped = true } }
    var error: CipherError? { errors.error }
}

/// One helper thread that stays awake for a moment after each job, so that
/// the second lane of a streaming write starts sealing at once: a Dispatch
/// worker woken per request started late enough that the writing thread
/// sealed half the pieces itself, serially with its writes (profiles of
/// 128 KiB writes on two cores). Dispatch has no way to keep a worker
/// spinning, so this thread is ours. It spins (yielding the core) for
/// `spinWindow` after a job, then sleeps until the next one; one job at a
/// time, and a caller that finds it busy uses Dispatch instead.
final class HotLane: @unchecked Sendable {
    static let shared = HotLane()
    /// How long the thread keeps polling after a job: a little more than one
    /// 128 KiB write request plus the gap before the next.
    /// (A/B of 128 KiB writes, 5 runs each: no spinning 698 MB/s, 30 µs 752,
    /// 80 µs 742, 200 µs 789.)
    static let spinWindow: UInt64 = 200_000

    /// A caller's lane, valid until `run` returns (which waits for it).
    private struct Job: @unchecked Sendable { let body: () -> Void }
    private struct Slot {
        var job: Job?
        var jobID: UInt64 = 0
        var running = false
        /// The id of the last job the thread finished.
        var finished: UInt64 = 0
        var sleeping = false
    }
    private let slot = Mutex(Slot())
    private let wake = DispatchSemaphore(value: 0)

    private init() {
        // A plain pthread (ChunkCipher does without Foundation); it lives
        // as long as the process, as `shared` does.
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { context in
            Unmanaged<HotLane>.fromOpaque(context!).takeUnretainedValue().loop()
            return nil
        }, Unmanaged.passRetained(self).toOpaque())
        precondition(created == 0, "cannot start the sealing thread: \(created)")
        pthread_detach(thread)
    }

    /// Runs `helper` on the hot thread and `caller` on this one; returns
    /// false (having run nothing) if the thread is busy with another job.
    /// Returns only when both are done (or `helper` was never started).
    func run(_ helper: () -> Void, alongside caller: () -> Void) -> Bool {
        withoutActuallyEscaping(helper) { escapable -> Bool in
            let job = Job(body: escapable)
            let posted: UInt64? = slot.withLock { s in
                guard s.job == nil, !s.running else { return nil }
                s.job = job
                s.jobID &+= 1
                if s.sleeping {
                    s.sleeping = false
                    wake.signal()
                }
                return s.jobID
            }
            guard let posted else { return false }
            caller()
            // Take the job back if the thread never started it, else wait for it.
            let retracted = slot.withLock { s -> Bool in
                guard s.job != nil, s.jobID == posted else { return false }
                s.job = nil
                return true
            }
            if !retracted {
                // Ids only grow, and the thread may already have finished a
                // later caller's job too: wait for "at least", not "equal".
                while slot.withLock({ $0.finished }) < posted { sched_yield() }
            }
            return true
        }
    }

    private func loop() {
        var idleSince = DispatchTime.now().uptimeNanoseconds
        while true {
            var taken: (job: Job, id: UInt64)? = slot.withLock { s in
                guard let job = s.job else { return nil }
                s.job = nil
                s.running = true
                return (job, s.jobID)
            }
            if let id = taken?.id {
                taken?.job.body()
                taken = nil  // the caller's closure is released before the caller is told
                slot.withLock { s in
                    s.running = false
                    s.finished = id
                }
                idleSince = DispatchTime.now().uptimeNanoseconds
                continue
            }
            if DispatchTime.now().uptimeNanoseconds - idleSince < Self.spinWindow {
                sched_yield()
                continue
            }
            let sleeps = slot.withLock { s -> Bool in
                guard s.job == nil else { return false }
                s.sleeping = true
                return true
            }
            if sleeps {
                wake.wait()
                idleSince = DispatchTime.now().uptimeNanoseconds
            }
        }
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
