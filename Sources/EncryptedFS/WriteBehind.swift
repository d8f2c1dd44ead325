import FUSEBridge
import SystemPackage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Streaming appends answered before their ciphertext reaches the backing
/// file: the request seals its chunks into a buffer of its own, reserves
/// the space they need (`fallocate`, so a full disk still fails the write
/// itself), hands the buffer to this one writer thread and replies. The
/// writer's `pwrite` then overlaps the application's next `write(2)` and
/// the daemon's copy of it out of /dev/fuse instead of following them.
///
/// Nothing observes a file before its writes land: every other use of an
/// open file (reads, other writes, truncation, the length seal, flush,
/// fsync, release, rekeying) and every attribute reply of its inode first
/// waits for the file's writes in flight (`Ledger.settle`). A write the
/// writer could not complete (an I/O error: the space was reserved) is
/// reported to the next use, which cuts the file back to the last byte
/// before it (docs/FILESYSTEM.md, "Write-behind").
///
/// Hand-written: a bounded FIFO with one consumer thread; Dispatch's
/// workers woke too late for the request path (see `HotLane`).
final class WriteBehind: @unchecked Sendable {
    static let shared = WriteBehind()

    /// Bytes queued at most; a request that would pass it waits for room.
    static let queueLimit = 2 << 20
    /// The smallest append handed over: smaller ones are written in the
    /// request (their sealing and write are short; the hand-off is not free).
    static let minimum = 64 << 10
    /// The writer reserves space ahead of a stream as far as the file is
    /// long, up to this (so a short file does not get megabytes it gives back).
    static let reservationStep = 4 << 20
    /// Off with KMSFS_WRITE_BEHIND=0 (for comparisons).
    static let enabled = getenv("KMSFS_WRITE_BEHIND").map { String(cString: $0) != "0" } ?? true

    /// One open file's writes in flight and the first that failed.
    /// Guarded by the writer's mutex.
    final class Ledger: @unchecked Sendable {
        fileprivate var inFlight = 0
        /// The plaintext offset the first failed write started at, and its error.
        fileprivate var failure: (offset: Int, error: Errno)?
        fileprivate var reservedTo = 0
        /// Whether the file's store can give back space reserved past its
        /// end (`CiphertextStore.reservesAhead`); nil until its first append is handed over.
        fileprivate var ahead: Bool?
        fileprivate unowned(unsafe) let writer: WriteBehind

        init(_ writer: WriteBehind = .shared) { self.writer = writer }

        /// Asks `store` once whether space may be reserved ahead of this file's appends.
        func learnReservation(from store: any CiphertextStore) {
            guard writer.locked({ ahead == nil }) else { return }
            let answer = store.reservesAhead
            writer.locked { ahead = answer }
        }

        /// Writes in flight or a failure unreported; under the writer's mutex.
        fileprivate var isBusy: Bool { inFlight > 0 || failure != nil }

        /// True while writes are in flight or a failure is unreported (a
        /// racy read: callers settle under their file's lock). No lock is
        /// taken while no file at all is busy: reads ask this every time.
        var busy: Bool { writer.active && writer.locked { isBusy } }

        /// Under the writer's mutex: waits until none of this file's writes is in flight.
        fileprivate func waitInFlight() {
            while inFlight > 0 { pthread_cond_wait(writer.landed, writer.mutex) }
        }

        /// Waits until none of this file's writes is in flight; true if one
        /// failed and was not reported yet (kept for `settle`).
        func waitLanded() -> Bool {
            writer.locked {
                waitInFlight()
                return failure != nil
            }
        }

        /// The ciphertext offset up to which space is reserved past the
        /// file's end (0: none). Set to 0 by the file (under its write
        /// lock, nothing in flight) when it gives the space back.
        var reservedEnd: Int {
            get { writer.locked { reservedTo } }
            set { writer.locked { reservedTo = newValue } }
        }

        /// Notes space reserved up to `end`.
        func reserved(through end: Int) { writer.locked { reservedTo = max(reservedTo, end) } }

        /// True if a write failed and was not reported yet.
        var failed: Bool { writer.active && writer.locked { failure != nil } }

        /// Waits until none of this file's writes is in flight; returns (and
        /// clears) the first failure since the last call.
        func settle() -> (offset: Int, error: Errno)? {
            writer.locked {
                waitInFlight()
                guard let reported = failure else { return nil }
                writer.changing(self) { failure = nil }
                return reported
            }
        }
    }

    /// A sealed run of chunks: `count` bytes of `buffer` go to `offset` of
    /// `store`; `plaintextOffset` is where its plaintext starts.
    struct Job: @unchecked Sendable {
        let store: any CiphertextStore
        let ledger: Ledger
        let buffer: BufferPool.Lease
        let count: Int
        let offset: Int
        let plaintextOffset: Int
    }

    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    /// Signalled when a job is queued (the writer waits on it).
    private let queued = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// Broadcast when a job has landed (settlers and submitters wait on it).
    private let landed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var jobs: [Job] = []
    private var head = 0
    private var queuedBytes = 0
    /// Files with writes in flight or a failure unreported (`Ledger.isBusy`),
    /// for a check without the mutex that nothing is pending.
    private let busyFiles = Atomic<Int>(0)
    /// Appends handed over (for statistics and tests).
    let handedOver = Atomic<Int>(0)

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(queued, nil)
        pthread_cond_init(landed, nil)
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { context in
            Unmanaged<WriteBehind>.fromOpaque(context!).takeUnretainedValue().loop()
            return nil
        }, Unmanaged.passRetained(self).toOpaque())
        precondition(created == 0, "cannot start the write-behind thread: \(created)")
        pthread_detach(thread)
    }

    /// True if some file may have writes in flight or a failure unreported.
    var active: Bool { busyFiles.load(ordering: .acquiring) > 0 }

    /// Under the mutex: runs `body` on `ledger`'s state and keeps `busyFiles` counting it.
    private func changing(_ ledger: Ledger, _ body: () -> Void) {
        let was = ledger.isBusy
        body()
        if was != ledger.isBusy { busyFiles.add(was ? -1 : 1, ordering: .releasing) }
    }

    private func locked<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Queues `job`, waiting while the queue is full.
    func submit(_ job: Job) {
        locked {
            while queuedBytes > 0 && queuedBytes + job.count > Self.queueLimit { pthread_cond_wait(landed, mutex) }
            changing(job.ledger) { job.ledger.inFlight += 1 }
            jobs.append(job)
            queuedBytes += job.count
            pthread_cond_signal(queued)
        }
        handedOver.add(1, ordering: .relaxed)
    }

    /// Reserves space past `job`'s end for the stream's next appends (as
    /// far as the file is long, up to `reservationStep`) when less than half
    /// that is left, so that requests rarely reserve it themselves. A
    /// failure is left to the request that needs the space.
    private func reserveAhead(of job: Job) {
        let end = job.offset + job.count
        let ahead = min(Self.reservationStep, max(job.count, end))
        guard let have = locked({ job.ledger.ahead == true ? job.ledger.reservedTo : nil }) else { return }
        guard have - end < ahead / 2 else { return }
        let from = max(have, end)
        do throws(Errno) {
            try job.store.reserve(at: from, count: end + ahead - from)
            job.ledger.reserved(through: end + ahead)
        } catch {}
    }

    private func loop() {
        while true {
            let job: Job = locked {
                while head == jobs.count { pthread_cond_wait(queued, mutex) }
                defer {
                    head += 1
                    if head == jobs.count { jobs.removeAll(keepingCapacity: true); head = 0 }
                }
                return jobs[head]
            }
            var error: Errno?
            do throws(Errno) {
                try job.store.write(UnsafeRawBufferPointer(rebasing: job.buffer.memory[0..<job.count]), at: job.offset)
            } catch let e { error = e }
            job.buffer.give()
            if error == nil { reserveAhead(of: job) }
            locked {
                changing(job.ledger) {
                    if let error, job.ledger.failure == nil { job.ledger.failure = (job.plaintextOffset, error) }
                    job.ledger.inFlight -= 1
                }
                queuedBytes -= job.count
                pthread_cond_broadcast(landed)
            }
        }
    }
}
