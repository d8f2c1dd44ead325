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
/// It ticks once a second; a tick only compares two clocks unless a run is due.
/// (@unchecked: the timer is set up in `start` and only cancelled after.)
public final class ScheduleRunner: @unchecked Sendable {
    public static let period = 60.0
    /// A wall-clock move this much larger or smaller than the monotonic one is a jump.
    public static let jumpTolerance = 5.0

    private let manager: KeyManager
    private let timer: DispatchSourceTimer
    private let state = Mutex(State())
    private let logger = Logger(label: "kmsfs.schedules")
    private let report: @Sendable (ScheduleReport) -> Void

    struct State {
        var lastRunWall = -Double.infinity
        var lastTickWall = 0.0
        var lastTickMonotonic = 0.0
    }

    public init(manager: KeyManager, report: @escaping @Sendable (ScheduleReport) -> Void = { _ in }) {
        self.manager = manager
        self.report = report
        timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "kmsfs.schedules", qos: .utility))
    }

    public func start() {
        let now = manager.clock()
        state.withLock { $0 = State(lastRunWall: now, lastTickWall: now, lastTickMonotonic: Self.monotonic()) }
        timer.schedule(deadline: .now() + 1, repeating: 1)
        timer.setEventHandler { [self] in tick() }
        timer.resume()
    }

    public func stop() {
        timer.cancel()
    }

    static func monotonic() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    private func tick() {
        let wall = manager.clock()
        let mono = Self.monotonic()
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
            logger.error("scheduled key work failed", metadata: ["error": .string("\(error)")])
        }
    }
}
