import Foundation
import Testing
import ChunkCipher
import EncryptedFS
import FUSEBridge
import KeyManager
import SystemPackage

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
}
