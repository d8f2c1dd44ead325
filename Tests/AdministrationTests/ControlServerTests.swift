import Foundation
import Synchronization
import Testing
@testable import Administration
@testable import EncryptedFS
import ChunkCipher
import KeyManager

@Suite("the control socket serves requests side by side")
struct ControlServerTests {
    @Test("while one request is still being carried out, another (a key disable) is answered")
    func concurrentRequests() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-control-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let seen = Mutex<[String]>([])
        let server = try ControlServer(directory: directory, status: {
            MountStatus(cipherdir: directory, mountpoint: "/", pid: getpid(), startedAt: 0,
                        statistics: FilesystemStatistics(openFiles: 0, nodes: 0, bytesRead: 0, bytesWritten: 0, integrityFailures: 0, deniedRequests: 0),
                        keysInUse: [])
        }, admit: { _ in .administrator }, execute: { request, _ throws(AdminFailure) in
            switch request {
            case .rotateKey:
                // The slow one: held until the test has its other answer.
                entered.signal()
                release.wait()
                seen.withLock { $0.append("rotate") }
                return .rotated(version: KeyVersion(rawValue: 2))
            case .disableKey(let key):
                seen.withLock { $0.append("disable") }
                return key == "alias/prod" ? .done : .keys([])
            default:
                throw AdminFailure("unexpected")
            }
        })
        server.start()
        defer { server.stop() }

        let slow = DispatchGroup()
        let slowReply = Mutex<AdminReply?>(nil)
        DispatchQueue.global().async(group: slow) {
            let reply = try? ControlServer.perform(.rotateKey(key: "alias/prod"), directory: directory)
            slowReply.withLock { $0 = reply ?? nil }
        }
        entered.wait()
        // The rotate is inside `execute` now; a disable must not queue behind it.
        let fast = DispatchGroup()
        let fastReply = Mutex<AdminReply?>(nil)
        DispatchQueue.global().async(group: fast) {
            let reply = try? ControlServer.perform(.disableKey(key: "alias/prod"), directory: directory)
            fastReply.withLock { $0 = reply ?? nil }
        }
        let answered = fast.wait(timeout: .now() + 20) == .success
        release.signal()
        #expect(answered, "the disable waited for the rotate")
        #expect(slow.wait(timeout: .now() + 20) == .success)
        if case .done? = fastReply.withLock({ $0 }) {} else { Issue.record("disable: \(String(describing: fastReply.withLock { $0 }))") }
        if case .rotated(let version)? = slowReply.withLock({ $0 }) { #expect(version.rawValue == 2) } else { Issue.record("rotate did not answer") }
        #expect(seen.withLock { $0 } == ["disable", "rotate"])
    }
}
