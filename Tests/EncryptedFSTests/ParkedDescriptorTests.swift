import Dispatch
import Foundation
import Synchronization
import Testing
import ChunkCipher
@testable import EncryptedFS
import FUSEBridge
import KeyManager
import SystemPackage
import CLinux

/// Nodes whose descriptors the relief parked (closed, the file handle kept)
/// reopen by handle for every operation, and the relief parks only what no
/// open file holds. Needs root (open_by_handle_at), as the mount that parks.
@Suite struct ParkedDescriptorTests {
    let root: String
    let fs: EncryptedFileSystem
    let context = RequestContext(uid: getuid(), gid: getgid(), pid: getpid())

    init() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-parked-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        let principal = Principal(uid: getuid(), gid: getgid())
        let manager = try KeyManager.create(in: root + "/.kmsfs", passphrase: SecretKey(copying: Array("parked passphrase".utf8)),
                                            options: FilesystemOptions(chunkSize: 4096, scrypt: ScryptParameters(logN: 10)), creator: principal)
        try EncryptedFileSystem.initializeRoot(cipherdir: root, keyManager: manager, principal: principal)
        fs = try EncryptedFileSystem(cipherdir: root, keyManager: manager, parkDescriptors: true)
    }

    /// Descriptors of this process on the test's cipherdir, outside the keystore.
    func backingDescriptors() -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.map { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + $0)) ?? "" }
            .filter { $0.hasPrefix(root + "/") && !$0.hasPrefix(root + "/.kmsfs/") }.count
    }

    /// Parks `id`'s descriptor (unless still parked: renames and unlinks
    /// need no descriptor of the node) and closes it after the grace
    /// period, as the relief does.
    func park(_ id: NodeID) throws {
        let node = try fs.nodes.node(id)
        guard node.holdsDescriptor else { return }
        var parked = node.park()
        #expect(parked != nil, "node \(id) was not parked")
        RequestGrace.shared.synchronize()
        parked = nil
        #expect(!node.holdsDescriptor)
    }

    func read(_ id: NodeID) throws -> [UInt8] {
        let h = try fs.open(id, flags: O_RDONLY, context)
        defer { fs.release(id, handle: h.handle) }
        var out = [UInt8]()
        try fs.read(id, handle: h.handle, size: 1 << 16, offset: 0, context) { out = Array($0) }
        return out
    }

    @Test("a parked file, symlink and hard-linked file reopen by handle for getattr, open/read/write, chmod, utimens, chown, xattrs, readlink, link and rename; a directory is never parked")
    func parkedNodesReopen() throws {
        #expect(fs.nodes.ledger.handles != nil, "file handles unavailable (needs root and a backing filesystem that gives them)")
        let data = Array("parked but not gone".utf8)
        let (file, opened) = try fs.create(.root, "f", mode: 0o644, flags: O_RDWR, context)
        _ = try data.withUnsafeBytes { try fs.write(file.node, handle: opened.handle, data: $0, offset: 0, context) }
        fs.release(file.node, handle: opened.handle)
        let link = try fs.symlink(target: Array("somewhere/else".utf8), .root, "s", context)
        let dir = try fs.mkdir(.root, "d", mode: 0o755, context)
        #expect(try fs.nodes.node(dir.node).park() == nil, "directories keep their descriptors")

        let before = backingDescriptors()
        try park(file.node)
        try park(link.node)
        #expect(backingDescriptors() == before - 2, "parked descriptors are closed")

        #expect(try fs.getattr(file.node, context).0.st_size == off_t(data.count))
        try park(file.node)
        #expect(try read(file.node) == data)
        try park(file.node)
        let h = try fs.open(file.node, flags: O_WRONLY | O_APPEND, context)
        _ = try Array("!".utf8).withUnsafeBytes { try fs.write(file.node, handle: h.handle, data: $0, offset: Int64(data.count), context) }
        fs.release(file.node, handle: h.handle)
        #expect(try read(file.node) == data + Array("!".utf8))

        try park(file.node)
        var changes = AttributeChanges()
        changes.mode = 0o600
        changes.modificationTime = .at(timespec(tv_sec: 1_000_000, tv_nsec: 0))
        changes.uid = 4321
        let after = try fs.setattr(file.node, changes, handle: nil, context).0
        #expect(after.st_mode & 0o7777 == 0o600 && after.st_mtim.tv_sec == 1_000_000 && after.st_uid == 4321)
        try park(file.node)
        try Array("v".utf8).withUnsafeBytes { try fs.setxattr(file.node, "user.k", value: $0, flags: 0, context) }
        try park(file.node)
        #expect(try fs.getxattr(file.node, "user.k", context) == Array("v".utf8))
        #expect(try fs.listxattr(file.node, context) == ["user.k"])

        try park(link.node)
        #expect(try fs.readlink(link.node, context) == Array("somewhere/else".utf8))
        #expect(try fs.getattr(link.node, context).0.st_mode & S_IFMT == S_IFLNK)

        // A second name, then the first removed: the handle names the inode, not a name.
        try park(file.node)
        let second = try fs.link(file.node, dir.node, "g", context)
        #expect(second.node == file.node && second.attributes.st_nlink == 2)
        try park(file.node)
        try fs.rename(.root, "f", .root, "f2", flags: 0, context)
        try park(file.node)
        try fs.unlink(.root, "f2", context)
        try park(file.node)
        #expect(try fs.getattr(file.node, context).0.st_nlink == 1)
        #expect(try read(file.node) == data + Array("!".utf8))
        #expect(fs.nodes.ledger.parked.load(ordering: .relaxed) == 9)
        #expect(fs.nodes.ledger.reopened.load(ordering: .relaxed) == 9)
    }

    @Test("the relief parks the oldest descriptors of nodes without open files down to its low-water mark; an open file keeps its node's descriptor; every file still reads back")
    func reliefParksOldestIdle() throws {
        // No mount: a kernel forget is only counted here (parking alone must bring the count down).
        final class Calls: Sendable { let count = Atomic<Int>(0) }
        let forgets = Calls()
        let relief = DescriptorRelief(filesystem: fs, limit: 100) { _, _ in forgets.count.add(1, ordering: .relaxed); return -1 }
        relief.start()
        defer { relief.stop() }
        let (kept, keptHandle) = try fs.create(.root, "kept", mode: 0o644, flags: O_RDWR, context)
        var made: [NodeID] = []
        for i in 0..<300 {
            let (entry, opened) = try fs.create(.root, FileName("f\(i)"), mode: 0o644, flags: O_RDWR, context)
            _ = try Array("\(i)".utf8).withUnsafeBytes { try fs.write(entry.node, handle: opened.handle, data: $0, offset: 0, context) }
            fs.release(entry.node, handle: opened.handle)
            made.append(entry.node)
        }
        // The relief runs on its own thread: wait (bounded) for its pass to bring the count under the mark.
        let deadline = Date().addingTimeInterval(10)
        while fs.nodes.ledger.held.load(ordering: .relaxed) > relief.highWater, Date() < deadline { usleep(1_000) }
        #expect(fs.nodes.ledger.held.load(ordering: .relaxed) <= relief.highWater)
        #expect(fs.nodes.count >= 302, "the nodes stay; only descriptors go")
        #expect(try fs.nodes.node(kept.node).holdsDescriptor, "an open file's node keeps its descriptor")
        #expect(try !fs.nodes.node(made[0]).holdsDescriptor, "the oldest went first")
        let asked = forgets.count.load(ordering: .relaxed)
        #expect(asked == 0, "the kernel was asked to forget \(asked) entries")
        for (i, id) in made.enumerated() { #expect(try read(id) == Array("\(i)".utf8)) }
        fs.release(kept.node, handle: keptHandle.handle)
    }

    @Test("at most 1,024 directories keep their keys loaded (~5 KiB of the secure heap each): 1,100 directories made, the oldest gave theirs up, and names in them still resolve (keys loaded again)")
    func loadedDirectoryKeysAreBounded() throws {
        var dirs: [NodeID] = []
        for i in 0..<1100 {
            let d = try fs.mkdir(.root, FileName("d\(i)"), mode: 0o755, context)
            let (e, o) = try fs.create(d.node, "f", mode: 0o644, flags: O_RDWR, context)
            fs.release(e.node, handle: o.handle)
            dirs.append(d.node)
        }
        #expect(fs.nodes.keyedDirectories == fs.nodes.keyedDirectoryLimit)
        #expect(try fs.nodes.node(dirs[0]).keys == nil, "the oldest gave its keys up")
        #expect(try fs.nodes.node(dirs[1099]).keys != nil)
        let found = try fs.lookup(dirs[0], "f", context)
        #expect(found.attributes.st_mode & S_IFMT == S_IFREG)
        #expect(try fs.nodes.node(dirs[0]).keys != nil, "loaded again")
        #expect(fs.nodes.keyedDirectories == fs.nodes.keyedDirectoryLimit)
        let listing = try fs.opendir(dirs[1], context)
        var names: [FileName] = []
        try fs.readdir(dirs[1], handle: listing, offset: 0) { names.append($0.name); return true }
        fs.releasedir(dirs[1], handle: listing)
        #expect(names == [".", "..", "f"])
        // Forgotten directories leave the count.
        for d in dirs { fs.forget(d, 1) }
        #expect(fs.nodes.keyedDirectories == 0)
    }

    @Test("without file handles (no root, --keep-descriptors) the ledger counts descriptors but keeps no parking queue")
    func noQueueWithoutHandles() {
        let ledger = DescriptorLedger(handles: nil)
        for i in 0..<5000 { ledger.took(NodeID(rawValue: UInt64(i + 2))) }
        #expect(ledger.held.load(ordering: .relaxed) == 5000)
        #expect(ledger.queued == 0)
    }

    @Test("RequestGrace: synchronize returns only after a request that entered before it has left")
    func graceWaitsForRequests() throws {
        let grace = RequestGrace()
        let token = grace.enter()
        final class Flag: Sendable { let value = Atomic<Bool>(false) }
        let done = Flag()
        let finished = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            grace.synchronize()
            done.value.store(true, ordering: .sequentiallyConsistent)
            finished.signal()
        }
        // Give the flipper ample time to (wrongly) return while the request is inside.
        let until = Date().addingTimeInterval(0.2)
        while Date() < until {
            let returned = done.value.load(ordering: .sequentiallyConsistent)
            #expect(!returned)
            usleep(10_000)
        }
        grace.leave(token)
        #expect(finished.wait(timeout: .now() + 5) == .success)
        let returned = done.value.load(ordering: .sequentiallyConsistent)
        #expect(returned)
        // Requests entering after the flip do not hold up the next synchronize once they leave.
        let later = grace.enter()
        grace.leave(later)
        grace.synchronize()
    }
}

