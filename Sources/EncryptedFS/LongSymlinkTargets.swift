import ChunkCipher
import FUSEBridge
import CLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Symlink targets too long to keep sealed in the backing symlink itself.
///
/// A target is sealed (AES-256-GCM: 28 bytes more) and base64url-encoded
/// (a third more), so a target of more than about 3,040 bytes does not fit
/// in a backing symlink (PATH_MAX 4,096 with its NUL) although the mount
/// must accept targets up to 4,095 bytes, as ext4 does. Those are kept out
/// of line: the backing symlink holds only a reference,
///
///     .kmsfs.T.<32 hex digits: a random id>
///
/// (never base64url output, which has no '.'), and the sealed target lives
/// in `CIPHERDIR/.kmsfs/targets/<id>`, sealed with the id as additional
/// data so a reference cannot be pointed at another target. Hard links of
/// the symlink share the reference; the target file goes with the last
/// link (unlink, or a rename over it). fsck authenticates each one and
/// reports target files no symlink refers to.
enum LongSymlinkTarget {
    static let prefix = ".kmsfs.T."
    static let directory = ".kmsfs/targets"
    /// The length of a reference (what `lstat` says of a backing symlink holding one).
    static let referenceLength = prefix.utf8.count + 32

    /// Whether the sealed text of a target needs to go out of line.
    static func needed(sealedCount: Int) -> Bool { sealedCount >= Int(PATH_MAX) }

    /// The id in a backing symlink's content, if it is a reference.
    static func reference(in content: [UInt8]) -> ID128? {
        guard content.count == referenceLength, content.starts(with: Array(prefix.utf8)) else { return nil }
        return ID128(hex: String(decoding: content[prefix.utf8.count...], as: UTF8.self))
    }

    /// Whether a backing entry may be a symlink holding a reference (to be read to make sure).
    static func mayBeReference(_ st: stat) -> Bool {
        st.st_mode & S_IFMT == S_IFLNK && Int(st.st_size) == referenceLength
    }

    static func path(_ id: ID128) -> String { directory + "/" + id.hex }
    static func context(_ id: ID128) -> [UInt8] { Array("long-target".utf8) + id.bytes }
}

extension EncryptedFileSystem {
    /// Writes the sealed target `text` out of line and returns the reference for the backing symlink.
    func storeLongTarget(_ target: [UInt8], volume: VolumeKeys) throws(Errno) -> [UInt8] {
        let id = ID128.random()
        let sealed: String
        do throws(CipherError) { sealed = try volume.symlinks.sealEncoded(target, context: LongSymlinkTarget.context(id)) } catch { throw .ioError }
        if mkdirat(nodes.rootFD, LongSymlinkTarget.directory, 0o700) != 0, errno != EEXIST { throw Errno(rawValue: errno) }
        let fd = try Syscall.open(nodes.rootFD, LongSymlinkTarget.path(id), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o400)
        do throws(Errno) { try Syscall.pwrite(fd.raw, Array(sealed.utf8), at: 0) } catch {
            unlinkat(nodes.rootFD, LongSymlinkTarget.path(id), 0)
            throw error
        }
        return Array((LongSymlinkTarget.prefix + id.hex).utf8)
    }

    /// The sealed text of the out-of-line target `id`.
    func longTargetText(_ id: ID128) throws(Errno) -> String {
        let fd = try Syscall.open(nodes.rootFD, LongSymlinkTarget.path(id), O_RDONLY | O_NOFOLLOW)
        return String(decoding: try Syscall.pread(fd.raw, count: 2 * Int(PATH_MAX) + 64, at: 0), as: UTF8.self)
    }

    /// The out-of-line target a backing symlink `stored` in `dirFD` refers
    /// to when it is the last link (so removing the link must remove it too).
    func lastLongTarget(in dirFD: Int32, stored: FileName, _ st: stat) -> ID128? {
        guard LongSymlinkTarget.mayBeReference(st), st.st_nlink == 1,
              let content = try? Syscall.readlinkat(dirFD, stored) else { return nil }
        return LongSymlinkTarget.reference(in: content)
    }

    func removeLongTarget(_ id: ID128?) {
        guard let id else { return }
        unlinkat(nodes.rootFD, LongSymlinkTarget.path(id), 0)
    }
}
