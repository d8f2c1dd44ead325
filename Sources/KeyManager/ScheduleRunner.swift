import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch

/// Runs a mounted keystore's schedules — automatic rotation, the end of
/// deletion windows, the rotation-overdue alert — from inside the daemon:
/// every `period` seconds, and at once when the key manager's clock jumps
/// against the monotonic clock (a suspended machine waking, an NTP step),
/// so a long-lived mount rotates on time without any command being run.
///
/// It ticks once a second on a thread of its own (not a Dispatch queue: a
/// busy daemon's pool must not starve it); a tick only compares two clocks
/// unless a run is due. A run that fails is retried 5 s later.
/// (@unchecked: the thread is set up in `start` and only stopped after.)
public final class ScheduleRunner: @unchecked Sendable {
    public static let period = 60.0
    /// A wall-clock move this much larger or smaller than the monotonic one is a jump.
    public static let jumpTolerance = 5.0

    private let manager: KeyManager
    private let stopping = DispatchSemaphore(value: 0)
    private let stopped = DispatchSemaphore(value: 0)
    private var running = false
    static let retryDelay = 5.0
    private let state = Mutex(State())
    private let logger = Logger(label: "kmsfs.schedules")
    private let report: @Sendable (ScheduleReport) -> Void

    struct State {
        var lastRunWall = -Double.infinity
        var lastTickWall = 0.0
        var lastTickMonotonic = 0.0
        /// When external keys' states were last read (monotonic).
        var lastExternalPoll = 0.0
    }

    public init(manager: KeyManager, report: @escaping @Sendable (ScheduleReport) -> Void = { _ in }) {
        self.manager = manager
        self.report = report
    }

    public func start() {
        let now = manager.clock()
        state.withLock { $0 = State(lastRunWall: now, lastTickWall: now, lastTickMonotonic: Self.monotonic()) }
        running = true
        var thread = pthread_t()
        let box = Unmanaged.passRetained(self).toOpaque()
        let made = pthread_create(&thread, nil, { raw in
            let runner = Unmanaged<ScheduleRunner>.fromOpaque(raw!).takeRetainedValue()
            // Wakes each second until stop() signals.
            while runner.stopping.wait(timeout: .now() + 1) == .timedOut { runner.tick() }
            runner.stopped.signal()
            return nil
        }, box)
        if made == 0 {
            pthread_detach(thread)
        } else {
            Unmanaged<ScheduleRunner>.fromOpaque(box).release()
            running = false
            logger.error("cannot start the schedule thread; schedules run when commands open the keystore", metadata: ["errno": "\(made)"])
        }
    }

    public func stop() {
        guard running else { return }
        stopping.signal()
        stopped.wait()
        running = false
    }

    static func monotonic() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    private func tick() {
        let wall = manager.clock()
        let mono = Self.monotonic()
        // Keys held in AWS KMS: a state changed there (disabled, deletion
        // scheduled) takes effect here within one poll interval, audited.
        let pollExternal = state.withLock { s -> Bool in
            guard mono - s.lastExternalPoll >= KeyManager.externalPollInterval else { return false }
            s.lastExternalPoll = mono
            return true
        }
        if pollExternal { manager.refreshExternalKeyStates() }
        let due = state.withLock { s -> Bool in
            let jumped = abs((wall - s.lastTickWall) - (mono - s.lastTickMonotonic)) > Self.jumpTolerance
            s.lastTickWall = wall
            s.lastTickMonotonic = mono
            guard jumped || wall - s.lastRunWall >= Self.period || wall < s.lastRunWall else { return false }
            s.lastRunWall = wall
            return true
        }
        guard due else { return }
        do {
            let done = try manager.runSchedules()
            if done != ScheduleReport() { report(done) }
        } catch {
            logger.error("scheduled key work failed; retrying in 5 s", metadata: ["error": .string("\(error)")])
            state.withLock { $0.lastRunWall = wall - Self.period + Self.retryDelay }
        }
    }
}
