import ChunkCipher
import FUSEBridge
import KeyManager
import CLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A block or character device node as the mount shows it. In CIPHERDIR it
/// is not a device node at all but a small regular file (the "record"):
///
///     "KMSN" ‖ 0x01 ‖ seal("b"|"c" ‖ rdev as UInt64 LE)
///
/// sealed with AES-256-GCM under a subkey of the volume (the root name key,
/// HKDF info "kmsfs/v1/device-node"; the magic and version are the
/// additional data), so nobody who can write CIPHERDIR but lacks the key can
/// forge one, and no usable device node ever exists on the host outside the
/// mount — unlike gocryptfs, which calls mknod in the backing directory. The
/// backing file carries the node's mode bits, owner and times, so chmod,
/// chown, utimens, rename, link and unlink act on it as on any entry.
///
/// A record is told from an encrypted file by its size alone (from the stat
/// a lookup makes anyway): every encrypted file is at least a 384-byte
/// header, a record is 42 bytes. A directory that has held a record since
/// it was created carries an empty `.kmsfs.nodes` marker, so listings check
/// the size of regular entries only there (d_type must say "block device").
struct DeviceNode: Equatable {
    /// The marker of a backing directory that may hold records.
    static let marker: FileName = ".kmsfs.nodes"
    static let magic: [UInt8] = Array("KMSN".utf8) + [1]
    static let recordSize = magic.count + 1 + 8 + AESGCM.boxOverhead

    /// S_IFBLK or S_IFCHR.
    var type: mode_t
    var device: dev_t

    /// Whether a backing entry's attributes fit a record (to be confirmed by opening it).
    static func mayBeRecord(_ st: stat) -> Bool {
        st.st_mode & S_IFMT == S_IFREG && st.st_size > 0 && Int(st.st_size) < ChunkLayout.headerSize
    }

    static func isDevice(_ mode: mode_t) -> Bool { mode & S_IFMT == S_IFBLK || mode & S_IFMT == S_IFCHR }

    /// The record's bytes.
    func sealed(with sealer: StringSealer) throws(CipherError) -> [UInt8] {
        var payload: [UInt8] = [type == S_IFBLK ? UInt8(ascii: "b") : UInt8(ascii: "c")]
        withUnsafeBytes(of: UInt64(device).littleEndian) { payload.append(contentsOf: $0) }
        return Self.magic + (try sealer.seal(payload, context: Self.magic))
    }

    /// The node a record holds; nil if `raw` is not a record at all,
    /// `integrityFailure` if it is one that does not authenticate.
    static func open(_ raw: [UInt8], with sealer: StringSealer) throws(CipherError) -> DeviceNode? {
        guard raw.count == recordSize, raw.starts(with: magic) else { return nil }
        let payload = try sealer.open(Array(raw[magic.count...]), context: magic)
        guard payload.count == 9, payload[0] == UInt8(ascii: "b") || payload[0] == UInt8(ascii: "c") else { throw .integrityFailure(.name) }
        var device: UInt64 = 0
        for (i, byte) in payload[1...].enumerated() { device |= UInt64(byte) << (8 * UInt64(i)) }
        return DeviceNode(type: payload[0] == UInt8(ascii: "b") ? S_IFBLK : S_IFCHR, device: dev_t(device))
    }
}

extension EncryptedFileSystem {
    /// The device node whose record is `stored` in `dirFD`, or nil if that
    /// entry is no record (then it is shown as the regular file it is, whose
    /// header will not parse: reads answer EIO). A record that does not
    /// authenticate is audited as an integrity failure.
    func deviceNode(in dirFD: Int32, stored: FileName, path: @autoclosure () -> String?, _ context: RequestContext) -> DeviceNode? {
        guard let fd = try? Syscall.open(dirFD, stored, O_RDONLY | O_NOFOLLOW) else { return nil }
        guard let raw = try? Syscall.pread(fd.raw, count: DeviceNode.recordSize + 1, at: 0),
              raw.starts(with: DeviceNode.magic), let volume = try? volumeKeys(context) else { return nil }
        do throws(CipherError) { return try DeviceNode.open(raw, with: volume.deviceNodes) } catch {
            integrityFailure(error, object: nil, what: "device node", path: path(), principal: principal(context))
            return nil
        }
    }

    /// Creates a block or character device node `name` in `dir` (the kernel
    /// has checked the caller's CAP_MKNOD).
    func makeDeviceNode(_ dir: Node, _ parent: NodeID, _ name: FileName, mode: mode_t, device: dev_t,
                        _ context: RequestContext) throws(Errno) -> EntryReply {
        let stored = try storedName(name, in: dir, context)
        try checkDirectoryKey(dir, .encrypt, context)
        let volume = try volumeKeys(context)
        let record: [UInt8]
        do throws(CipherError) {
            record = try DeviceNode(type: mode & S_IFMT, device: device).sealed(with: volume.deviceNodes)
        } catch { throw .ioError }
        try markHoldsDeviceNodes(dir.dirFD)
        try writeSidecar(stored, plaintext: name, in: dir, context)
        let fd = try Syscall.open(dir.dirFD, stored, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode & 0o7777)
        do throws(Errno) {
            try Syscall.pwrite(fd.raw, record, at: 0)
        } catch {
            Syscall.unlinkQuietly(dir.dirFD, stored)
            removeSidecar(stored, in: dir)
            throw error
        }
        adopt(dir, stored, context)
        return try lookup(parent, name, context)
    }

    /// Puts the marker in backing directory `dirFD` if it is not there.
    func markHoldsDeviceNodes(_ dirFD: Int32) throws(Errno) {
        if (try? Syscall.fstatat(dirFD, DeviceNode.marker)) != nil { return }
        do throws(Errno) {
            _ = try Syscall.open(dirFD, DeviceNode.marker, O_WRONLY | O_CREAT | O_NOFOLLOW, 0o400)
        } catch {
            if error != .fileExists { throw error }
        }
    }
}
