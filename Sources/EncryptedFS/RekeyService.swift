import ChunkCipher
import CLinux
import Dispatch
import Foundation
import FUSEBridge
import KeyManager
import Logging
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The mount daemon's rekey worker: one background thread that runs the
/// keystore's queued or running job (resuming one a crash or an unmount
/// left), sleeps while none is runnable, and wakes when an admin command
/// starts or resumes one.
public final class RekeyService: Sendable {
    public let rekeyer: Rekeyer
    private let wakeup = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    private let running = DispatchGroup()
    private let logger = Logger(label: "kmsfs.rekey")

    public init(filesystem: EncryptedFileSystem) {
        rekeyer = Rekeyer(filesystem: filesystem)
    }

    /// After a pause or cancel was recorded: stops the running job before
    /// its next file and returns once no file is being moved any more.
    public func interruptAndWait() {
        rekeyer.interrupted.store(true, ordering: .relaxed)
        _ = running.wait(timeout: .now() + 60)
        rekeyer.interrupted.store(false, ordering: .relaxed)
    }

    public func start() {
        let thread = Thread { [self] in
            loop()
            finished.signal()
        }
        thread.name = "kmsfs-rekey"
        thread.start()
    }

    /// Asks the worker to look for a runnable job now.
    public func wake() { wakeup.signal() }

    /// Stops before the next file (the job stays resumable) and waits for the worker.
    public func stop() {
        rekeyer.stopRequested.store(true, ordering: .relaxed)
        wakeup.signal()
        finished.wait()
    }

    private func loop() {
        while !rekeyer.stopRequested.load(ordering: .relaxed) {
            if let job = try? rekeyer.keyManager.activeRekeyJob(), job.state != .paused {
                running.enter()
                var after: RekeyJob?
                if !rekeyer.interrupted.load(ordering: .relaxed) {
                    do throws(KeyManagerError) { after = try rekeyer.run(job.id) } catch {
                        logger.error("rekey job stopped", metadata: ["job": "\(job.id)", "error": .string(error.description)])
                        try? rekeyer.keyManager.setRekeyState(job.id, .failed, error: error.description, by: nil)
                    }
                }
                running.leave()
                // Still running means it was stopped or interrupted: look again shortly, not in a spin.
                if after == nil || after?.state == .running { _ = wakeup.wait(timeout: .now() + 1) }
                continue
            }
            _ = wakeup.wait(timeout: .now() + 5)
        }
    }
}
