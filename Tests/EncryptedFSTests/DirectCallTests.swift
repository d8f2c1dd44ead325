import Foundation
import Testing
import ChunkCipher
@testable import EncryptedFS
import FUSEBridge
import KeyManager
import SystemPackage
import CLinux

/// EncryptedFS driven by direct calls to its `FileSystem` operations, without a mount.
@Suite struct DirectCallTests {
    let root: String
    let fs: EncryptedFileSystem
    let context = RequestContext(uid: getuid(), gid: getgid(), pid: getpid())

    init() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-direct-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        let principal = Principal(uid: getuid(), gid: getgid())
        let manager = try KeyManager.create(in: root + "/.kmsfs", passphrase: SecretKey(copying: Array("direct passphrase".utf8)),
                                            options: FilesystemOptions(chunkSize: 4096, scrypt: ScryptParameters(logN: 10)), creator: principal)
        try EncryptedFileSystem.initializeRoot(cipherdir: root, keyManager: manager, principal: principal)
        fs = try EncryptedFileSystem(cipherdir: root, keyManager: manager)
    }

    func read(_ node: NodeID, _ handle: HandleID, _ size: Int, at offset: Int64) throws -> [UInt8] {
        var out = [UInt8]()
        try fs.read(node, handle: handle, size: size, offset: offset, RequestContext(uid: getuid(), gid: getgid(), pid: getpid())) { out = Array($0) }
        return out
    }

    @Test("create, write across chunks, read back, list, rename and unlink without a mount")
    func roundTrip() throws {
        let (entry, opened) = try fs.create(.root, "notes.txt", mode: 0o644, flags: O_RDWR, context)
        let data = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 * 31) }
        let written = try data.withUnsafeBytes { try fs.write(entry.node, handle: opened.handle, data: $0, offset: 0, context) }
        #expect(written == data.count)
        #expect(try read(entry.node, opened.handle, 20_000, at: 0) == data)
        #expect(try read(entry.node, opened.handle, 100, at: 4090) == Array(data[4090..<4190]))
        fs.release(entry.node, handle: opened.handle)
        #expect(try fs.getattr(entry.node, context).0.st_size == 10_000)

        let dir = try fs.opendir(.root, context)
        var names: [FileName] = []
        try fs.readdir(.root, handle: dir, offset: 0) { names.append($0.name); return true }
        fs.releasedir(.root, handle: dir)
        #expect(names == [".", "..", "notes.txt"])
        let stored = try FileManager.default.contentsOfDirectory(atPath: root).filter { !$0.hasPrefix(".kmsfs") }
        #expect(stored.count == 1 && stored[0] != "notes.txt")

        try fs.rename(.root, "notes.txt", .root, "renamed.txt", flags: 0, context)
        #expect(throws: Errno.noSuchFileOrDirectory) { try fs.lookup(.root, "notes.txt", context) }
        let again = try fs.lookup(.root, "renamed.txt", context)
        let h = try fs.open(again.node, flags: O_RDONLY, context)
        #expect(try read(again.node, h.handle, 10_000, at: 0) == data)
        fs.release(again.node, handle: h.handle)
        try fs.unlink(.root, "renamed.txt", context)
        #expect(throws: Errno.noSuchFileOrDirectory) { try fs.lookup(.root, "renamed.txt", context) }
        #expect(try fs.keyManager.usage(of: "alias/default").values.reduce(0, +) == 1, "only the root directory's key remains")
    }

    @Test("a caller outside the key policy is refused with EACCES")
    func policy() throws {
        let stranger = RequestContext(uid: 4242, gid: 4242, pid: 1)
        #expect(throws: Errno.permissionDenied) { try fs.create(.root, "x", mode: 0o644, flags: O_RDWR, stranger) }
    }

    /// Descriptors this process holds now on this test's cipherdir (other
    /// tests run in the same process at the same time: theirs are elsewhere),
    /// leaving out the keystore's: SQLite opens a reader connection per
    /// concurrent reader (the rekey's workers) and keeps it in its pool.
    func openDescriptors() -> Int { openPaths().count }

    /// What those descriptors point at (to name a leak).
    func openPaths() -> [String] {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.map { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + $0)) ?? "" }
            .filter { $0.hasPrefix(root + "/") && !$0.hasPrefix(root + "/.kmsfs/") }.sorted()
    }

    @Test("descriptors are owned: lookups, forgets, a reencrypt of every file (batched candidates) and rekey recovery leave none behind")
    func noDescriptorLeaks() throws {
        let dir = try fs.mkdir(.root, "d", mode: 0o755, context)
        for i in 0..<40 {
            let (entry, opened) = try fs.create(dir.node, FileName("f\(i)"), mode: 0o644, flags: O_RDWR, context)
            _ = try Array(repeating: UInt8(i), count: 5000).withUnsafeBytes { try fs.write(entry.node, handle: opened.handle, data: $0, offset: 0, context) }
            fs.release(entry.node, handle: opened.handle)
            fs.forget(entry.node, 1)
        }
        let before = openDescriptors()
        // Lookups of the same names twice, then forgotten as often: the second finds the node.
        var found: [NodeID] = []
        for i in 0..<40 { found.append(try fs.lookup(dir.node, FileName("f\(i)"), context).node) }
        for i in 0..<40 { #expect(try fs.lookup(dir.node, FileName("f\(i)"), context).node == found[i]) }
        #expect(openDescriptors() == before + 40, "one descriptor per node")
        for node in found { fs.forget(node, 2) }
        #expect(openDescriptors() == before)

        let principal = Principal(uid: getuid(), gid: getgid())
        _ = try fs.keyManager.rotate("alias/default", by: principal)
        let job = try fs.keyManager.createRekeyJob(source: "alias/default", mode: .reencrypt, by: principal)
        let done = try Rekeyer(filesystem: fs).run(job.id)
        #expect(done.state == .done && done.filesDone >= 40, "\(done.state) \(done.filesDone)")
        _ = try Rekeyer(filesystem: fs).recover()
        #expect(openDescriptors() == before, "the walk's kept descriptors all closed: \(openPaths())")
        let again = try fs.lookup(dir.node, "f7", context)
        let h = try fs.open(again.node, flags: O_RDONLY, context)
        #expect(try read(again.node, h.handle, 5000, at: 0) == Array(repeating: 7, count: 5000))
        fs.release(again.node, handle: h.handle)
    }

    @Test("a file's path (for audit records) follows renames of the directories above it; binding paths stop at a name that is not UTF-8")
    func pathsFollowDirectoryRenames() throws {
        let a = try fs.mkdir(.root, "a", mode: 0o755, context)
        let b = try fs.mkdir(a.node, "b", mode: 0o755, context)
        let (entry, opened) = try fs.create(b.node, "f", mode: 0o644, flags: O_RDWR, context)
        fs.release(entry.node, handle: opened.handle)
        let file = try fs.nodes.node(entry.node)
        #expect(fs.nodes.filePath(of: file) == "/a/b/f")
        try fs.rename(.root, "a", .root, "c", flags: 0, context)
        #expect(fs.nodes.filePath(of: file) == "/c/b/f")
        try fs.rename(b.node, "f", .root, "g", flags: 0, context)
        #expect(fs.nodes.filePath(of: file) == "/g")
        try fs.rename(a.node, "b", .root, "b2", flags: 0, context)
        #expect(fs.nodes.directoryPath(of: b.node).description == "/b2")
        #expect(fs.nodes.directoryPath(of: .root).description == "/")
        let odd = try fs.mkdir(b.node, FileName(bytes: [0x66, 0xFF]), mode: 0o755, context)
        let below = try fs.mkdir(odd.node, "x", mode: 0o755, context)
        #expect(fs.nodes.directoryPath(of: below.node).binding == "/b2", "a binding path ends before the first name that is not UTF-8")
        #expect(fs.nodes.directoryPath(of: below.node).description == "/b2/f\u{FFFD}/x")
    }

    @Test("an open file shares its node's descriptor: 30 files created and 30 looked up and opened, each by two handles, hold 60 descriptors, and none once released and forgotten")
    func oneDescriptorPerOpenFile() throws {
        let before = openDescriptors()
        var created: [(NodeID, HandleID)] = []
        for i in 0..<30 {
            let (entry, opened) = try fs.create(.root, FileName("new\(i)"), mode: 0o644, flags: O_RDWR, context)
            created.append((entry.node, opened.handle))
        }
        var older: [(NodeID, HandleID, HandleID)] = []
        for i in 0..<30 {
            let (entry, opened) = try fs.create(.root, FileName("old\(i)"), mode: 0o644, flags: O_RDWR, context)
            _ = try Array(repeating: UInt8(i), count: 100).withUnsafeBytes { try fs.write(entry.node, handle: opened.handle, data: $0, offset: 0, context) }
            fs.release(entry.node, handle: opened.handle)
            fs.forget(entry.node, 1)
        }
        #expect(openDescriptors() == before + 30)
        for i in 0..<30 {
            let node = try fs.lookup(.root, FileName("old\(i)"), context).node
            let reader = try fs.open(node, flags: O_RDONLY, context).handle
            let writer = try fs.open(node, flags: O_WRONLY, context).handle
            older.append((node, reader, writer))
        }
        #expect(openDescriptors() == before + 60, "one descriptor per file, not per node and open file: \(openDescriptors() - before)")
        for (i, (node, reader, writer)) in older.enumerated() {
            _ = try [UInt8(200)].withUnsafeBytes { try fs.write(node, handle: writer, data: $0, offset: 100, context) }
            #expect(try read(node, reader, 200, at: 0) == Array(repeating: UInt8(i), count: 100) + [200])
            fs.release(node, handle: reader)
            fs.release(node, handle: writer)
            fs.forget(node, 1)
        }
        for (node, handle) in created {
            fs.release(node, handle: handle)
            fs.forget(node, 1)
        }
        #expect(openDescriptors() == before, "\(openPaths())")
    }

    @Test("closing a read-only handle needs no FLUSH (FOPEN_NOFLUSH); a handle that may write still gets one")
    func readOnlyHandlesSkipFlush() throws {
        let (entry, opened) = try fs.create(.root, "flushed", mode: 0o644, flags: O_WRONLY, context)
        #expect(!opened.noFlush, "a create's handle writes: its close must seal the length")
        fs.release(entry.node, handle: opened.handle)
        for (flags, skips) in [(O_RDONLY, true), (O_WRONLY, false), (O_RDWR, false), (O_RDONLY | O_APPEND, true)] {
            let reply = try fs.open(entry.node, flags: flags, context)
            #expect(reply.noFlush == skips, "flags \(flags)")
            fs.release(entry.node, handle: reply.handle)
        }
    }

    @Test("chmod and utimens reach the backing entry of a file (through its read-write descriptor) and of a directory (through /proc)")
    func setattrThroughDescriptors() throws {
        let (file, opened) = try fs.create(.root, "attrs", mode: 0o600, flags: O_RDWR, context)
        fs.release(file.node, handle: opened.handle)
        let dir = try fs.mkdir(.root, "attrs.d", mode: 0o700, context)
        #expect(try fs.nodes.node(file.node).readWrite)
        #expect(try !fs.nodes.node(dir.node).readWrite)
        for (node, mode) in [(file.node, mode_t(0o4751)), (dir.node, mode_t(0o1750))] {
            var changes = AttributeChanges()
            changes.mode = mode
            changes.accessTime = .at(timespec(tv_sec: 1_000_000, tv_nsec: 5))
            changes.modificationTime = .at(timespec(tv_sec: 2_000_000, tv_nsec: 7))
            let (st, _) = try fs.setattr(node, changes, handle: nil, context)
            let backing = try Syscall.fstatat(try fs.nodes.node(node).fd, "", flags: KMSFS_AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
            for seen in [st, backing] {
                #expect(seen.st_mode & 0o7777 == mode)
                #expect(seen.st_atim.tv_sec == 1_000_000 && seen.st_atim.tv_nsec == 5)
                #expect(seen.st_mtim.tv_sec == 2_000_000 && seen.st_mtim.tv_nsec == 7)
            }
        }
    }

    @Test("a new directory's node keeps the keys mkdir made: no reload, and names created in it list and read back after a fresh start")
    func mkdirKeepsItsKeys() throws {
        let dir = try fs.mkdir(.root, "made", mode: 0o755, context)
        let keys = try #require(try fs.nodes.node(dir.node).keys, "mkdir left the node without keys")
        let (entry, opened) = try fs.create(dir.node, "inside", mode: 0o644, flags: O_RDWR, context)
        _ = try [UInt8]([1, 2, 3]).withUnsafeBytes { try fs.write(entry.node, handle: opened.handle, data: $0, offset: 0, context) }
        fs.release(entry.node, handle: opened.handle)
        #expect(try fs.nodes.node(dir.node).keys === keys)
        // Another filesystem over the same directory loads the keys from disk: the same ones.
        let other = try EncryptedFileSystem(cipherdir: root, keyManager: fs.keyManager)
        let again = try other.lookup(.root, "made", context)
        let found = try other.lookup(again.node, "inside", context)
        let handle = try other.open(found.node, flags: O_RDONLY, context).handle
        var out = [UInt8]()
        try other.read(found.node, handle: handle, size: 10, offset: 0, context) { out = Array($0) }
        #expect(out == [1, 2, 3])
        other.release(found.node, handle: handle)
        _ = try other.directoryKeys(try other.nodes.node(again.node), context)
        #expect(try other.nodes.node(again.node).keys?.directoryID == keys.directoryID)
    }
}
