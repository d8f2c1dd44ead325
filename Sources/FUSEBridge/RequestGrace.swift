import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A grace period over the requests being served, in the manner of RCU: a
/// thread that takes a resource away from the filesystem's shared state (a
/// node's backing descriptor, closed to stay under the descriptor limit)
/// calls `synchronize` before it frees it, and that returns once every
/// request that could have picked the resource up has finished. Requests
/// pay two atomic adds and a load; they never wait.
///
/// Each request counts itself in the current phase's counter; `synchronize`
/// flips the phase and waits for the old phase's counter to drain. A
/// request that read the phase just before a flip sees the flip when it
/// checks again after counting itself, and counts itself anew in the new
/// phase (the orderings are sequentially consistent, so either the flipper
/// sees its count or it sees the flip). Written here because the Swift
/// toolchain offers no RCU; liburcu is not packaged for Swift.
public final class RequestGrace: Sendable {
    public static let shared = RequestGrace()

    private let phase = Atomic<Int>(0)
    private let inPhase0 = Atomic<Int>(0)
    private let inPhase1 = Atomic<Int>(0)
    /// One `synchronize` at a time.
    private let flipping = Mutex<Void>(())

    public init() {}

    /// Marks the calling thread as serving a request; returns the token for `leave`.
    @inline(__always)
    public func enter() -> Int {
        while true {
            let p = phase.load(ordering: .sequentiallyConsistent)
            if p == 0 { inPhase0.add(1, ordering: .sequentiallyConsistent) } else { inPhase1.add(1, ordering: .sequentiallyConsistent) }
            if phase.load(ordering: .sequentiallyConsistent) == p { return p }
            if p == 0 { inPhase0.subtract(1, ordering: .sequentiallyConsistent) } else { inPhase1.subtract(1, ordering: .sequentiallyConsistent) }
        }
    }

    @inline(__always)
    public func leave(_ token: Int) {
        if token == 0 { inPhase0.subtract(1, ordering: .releasing) } else { inPhase1.subtract(1, ordering: .releasing) }
    }

    /// Returns once every request that entered before the call has left.
    /// Never call it from inside a request (it would wait for itself).
    public func synchronize() {
        flipping.withLock { _ in
            let old = phase.load(ordering: .sequentiallyConsistent)
            phase.store(1 - old, ordering: .sequentiallyConsistent)
            var spins = 0
            while (old == 0 ? inPhase0.load(ordering: .sequentiallyConsistent) : inPhase1.load(ordering: .sequentiallyConsistent)) != 0 {
                spins += 1
                if spins < 100 { sched_yield() } else { usleep(200) }
            }
        }
    }
}
