import Foundation
import Testing
import FUSEBridge
import SystemPackage

/// A two-file read-only filesystem, to test the bridge alone.
final class GreetingFileSystem: FileSystem, @unchecked Sendable {
    let files: [String: [UInt8]] = ["hello.txt": Array("hello from FUSEBridge\n".utf8),
                                    "big.bin": (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }]
    let order: [FileName] = ["hello.txt", "big.bin"]
    var lastContext: RequestContext?

    func attributes(_ node: NodeID) -> stat {
        var st = stat()
        st.st_ino = ino_t(node.rawValue)
        if node == .root {
            st.st_mode = S_IFDIR | 0o755
            st.st_nlink = 2
        } else {
            st.st_mode = S_IFREG | 0o444
            st.st_nlink = 1
            st.st_size = off_t(files[order[Int(node.rawValue) - 2].description]!.count)
        }
        return st
    }

    func lookup(_ parent: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> EntryReply {
        guard parent == .root, let i = order.firstIndex(of: name) else { throw .noSuchFileOrDirectory }
        let node = NodeID(rawValue: UInt64(i + 2))
        return EntryReply(node: node, attributes: attributes(node), attributeTimeout: 1, entryTimeout: 1)
    }

    func getattr(_ node: NodeID, _ context: RequestContext) throws(Errno) -> (stat, Double) { (attributes(node), 1) }

    func open(_ node: NodeID, flags: Int32, _ context: RequestContext) throws(Errno) -> OpenReply {
        lastContext = context
        guard flags & O_ACCMODE == O_RDONLY else { throw .permissionDenied }
        return OpenReply(handle: HandleID(rawValue: node.rawValue))
    }

    func read(_ node: NodeID, handle: HandleID, size: Int, offset: Int64, _ context: RequestContext, _ reply: (UnsafeRawBufferPointer) -> Void) throws(Errno) {
        let data = files[order[Int(node.rawValue) - 2].description]!
        let start = min(Int(offset), data.count), end = min(start + size, data.count)
        data[start..<end].withUnsafeBytes { reply($0) }
    }

    func opendir(_ node: NodeID, _ context: RequestContext) throws(Errno) -> HandleID { HandleID(rawValue: 1) }

    func readdir(_ node: NodeID, handle: HandleID, offset: Int64, _ add: (DirectoryEntry) -> Bool) throws(Errno) {
        let entries: [FileName] = [".", ".."] + order
        var i = Int(offset)
        while i < entries.count, add(DirectoryEntry(name: entries[i], inode: UInt64(max(1, i)), type: i < 2 ? S_IFDIR : S_IFREG,
                                                    nextOffset: Int64(i + 1))) { i += 1 }
    }

    func statfs(_ node: NodeID) throws(Errno) -> statvfs { statvfs() }
}

@Suite(.serialized) struct FUSEBridgeTests {
    @Test("a filesystem written against the FileSystem protocol mounts, serves reads and listings, maps errors, and unmounts")
    func mountServeUnmount() throws {
        let mountpoint = FileManager.default.temporaryDirectory.appendingPathComponent("fusebridge-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: mountpoint) }
        let fs = GreetingFileSystem()
        let session = try FUSESession(fileSystem: fs, mountpoint: mountpoint, options: ["fsname=greeting", "subtype=test"])
        try session.mount()
        let loop = Thread { try? session.run(threads: 2) }
        loop.start()
        defer {
            _ = try? Process.run(URL(fileURLWithPath: "/bin/fusermount3"), arguments: ["-u", mountpoint]).waitUntilExit()
            while !loop.isFinished { usleep(1000) }
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: mountpoint) == ["hello.txt", "big.bin"])
        #expect(try String(contentsOfFile: mountpoint + "/hello.txt", encoding: .utf8) == "hello from FUSEBridge\n")
        #expect([UInt8](try Data(contentsOf: URL(fileURLWithPath: mountpoint + "/big.bin"))) == fs.files["big.bin"])
        #expect(fs.lastContext?.uid == getuid())
        // The kernel reports the calling thread's id: one of this process's tasks.
        #expect(FileManager.default.fileExists(atPath: "/proc/self/task/\(fs.lastContext?.pid ?? -1)"))
        #expect(!FileManager.default.fileExists(atPath: mountpoint + "/missing"))
        // Errno thrown by the filesystem reaches the caller: opening for writing is refused.
        #expect(open(mountpoint + "/hello.txt", O_WRONLY) == -1 && errno == EACCES)
        // An operation the filesystem does not implement answers ENOSYS, which the kernel maps as it wants; mkdir must fail.
        #expect(mkdir(mountpoint + "/dir", 0o755) == -1)
    }
}
