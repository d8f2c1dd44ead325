import CLinux
import Dispatch
import Foundation
import FUSEBridge
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Keeps the daemon under its descriptor limit however many inodes the
/// kernel caches. Each node holds a descriptor of its backing entry (as in
/// libfuse's passthrough_ll), and the kernel forgets inodes only under
/// memory pressure, so a tree of many files (an untar of 25,000 on a host
/// whose limit is 20,000) ran the daemon out of descriptors: EMFILE for the
/// next create. When the descriptors pass a high-water mark, a thread of its
/// own brings them down to a low-water mark:
/// - where the daemon may reopen entries by file handle (`BackingHandles`:
///   a mount by root on a filesystem with handles), it *parks* the oldest
///   descriptors of nodes that are not directories and have no open file —
///   the node keeps the entry's handle, and the descriptor is closed once
///   no request can still be using it (`RequestGrace`). The kernel keeps its
///   cached entries, so a `stat` of a million files stays a cache hit;
/// - otherwise, or if directories alone stay above the mark, it asks the
///   kernel to drop the least recently looked-up entries
///   (`fuse_lowlevel_notify_inval_entry`); the kernel then sends FORGET for
///   each inode no one uses, and its descriptor closes. Entries in use (open
///   files, working directories) stay; they are asked again only after many
///   more lookups. That runs on this thread because the notification waits
///   for the directory's lock, which a request being served may hold.
public final class DescriptorRelief: Sendable {
    let nodes: NodeTable
    let openFiles: OpenFileTable
    let invalidate: @Sendable (NodeID, FileName) -> Int32
    public let highWater: Int
    public let lowWater: Int
    private let wake = DispatchSemaphore(value: 0)
    private let stopped = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)
    /// Entries the kernel was asked to drop so far.
    public let evictions = Atomic<Int>(0)
    let logger = Logger(label: "kmsfs.relief")

    /// `limit`: the process's descriptor limit. Past 70% of it in nodes the
    /// kernel is asked to forget down to 50%: the rest is headroom for open
    /// files, the keystore and sockets, and for lookups made while the
    /// kernel's FORGETs are on their way (requests are held back meanwhile,
    /// see `throttle`).
    public init(filesystem: EncryptedFileSystem, limit: Int, invalidate: @escaping @Sendable (NodeID, FileName) -> Int32) {
        nodes = filesystem.nodes
        openFiles = filesystem.openFiles
        self.invalidate = invalidate
        highWater = max(64, limit * 70 / 100)
        lowWater = max(32, limit * 50 / 100)
    }

    public func start() {
        nodes.ledger.highWater.store(highWater, ordering: .relaxed)
        nodes.ledger.pressure = { [wake] in wake.signal() }
        let thread = Thread { [self] in
            while !stopped.load(ordering: .relaxed) {
                _ = wake.wait(timeout: .now() + 1)
                relieve()
            }
            done.signal()
        }
        thread.name = "kmsfs-relief"
        thread.start()
    }

    public func stop() {
        nodes.ledger.pressure = nil
        nodes.ledger.highWater.store(Int.max, ordering: .relaxed)
        stopped.store(true, ordering: .relaxed)
        wake.signal()
        done.wait()
    }

    /// Back-pressure, on a request's thread after its reply (the kernel
    /// no longer holds the directory's lock): while the descriptors are
    /// above the high-water mark, the thread waits (at most 20 ms) so the
    /// relief's invalidations get the lock between lookups instead of being
    /// outrun. (Parking needs no lock of the kernel's and brings the count
    /// down at once.)
    public func throttle() {
        var waited = 0
        while nodes.ledger.held.load(ordering: .relaxed) > highWater, waited < 20, !stopped.load(ordering: .relaxed) {
            if waited == 0 { wake.signal() }
            usleep(1_000)
            waited += 1
        }
    }

    func relieve() {
        let ledger = nodes.ledger
        if ledger.handles != nil {
            ledger.compact { id in nodes.existing(id)?.holdsDescriptor == true }
            park()
        }
        let count = ledger.held.load(ordering: .relaxed)
        guard count > highWater else { return }
        // Not the same entries again before this many more lookups: the kernel keeps the ones in use.
        let victims = nodes.evictionCandidates(count - lowWater, notAskedSince: UInt64(highWater))
        var asked = 0, missing = 0
        for victim in victims where !stopped.load(ordering: .relaxed) {
            let rc = invalidate(victim.parent, victim.name)
            if rc == 0 { asked += 1 } else { missing += 1 }
        }
        logger.debug("relief pass", metadata: ["before": .stringConvertible(count), "asked": .stringConvertible(asked),
                                               "not cached": .stringConvertible(missing), "after": .stringConvertible(ledger.held.load(ordering: .relaxed))])
        evictions.add(asked, ordering: .relaxed)
    }

    /// Parks the oldest descriptors of nodes without open files down to the
    /// low-water mark (one sweep of the queue at most), then closes them
    /// after a grace period.
    private func park() {
        let ledger = nodes.ledger
        guard ledger.held.load(ordering: .relaxed) > highWater else { return }
        let open = openFiles.openInodes
        var limbo: [SharedDescriptor] = []
        var kept: [NodeID] = []
        var budget = ledger.queued
        while ledger.held.load(ordering: .relaxed) > lowWater, budget > 0, !stopped.load(ordering: .relaxed) {
            // A whole batch is handled (ids taken off the queue are not put back).
            let ids = ledger.oldest(min(1024, budget))
            guard !ids.isEmpty else { break }
            budget -= ids.count
            for id in ids {
                guard let node = nodes.existing(id), node.holdsDescriptor, !node.isDirectory else { continue }
                if open.contains(node.key) {
                    kept.append(id)
                } else if let descriptor = node.park() {
                    limbo.append(descriptor)
                }
            }
        }
        ledger.requeue(kept)
        guard !limbo.isEmpty else { return }
        // A request that read one of these descriptors before it was parked
        // may still be using it: close them only after every such request ended.
        RequestGrace.shared.synchronize()
        limbo.removeAll()
    }
}
