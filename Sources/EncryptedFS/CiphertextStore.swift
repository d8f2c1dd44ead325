import CLinux
import FUSEBridge
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Where an open file's ciphertext lives: its backing file, through a
/// descriptor the store owns, or (in tests) memory, so that `OpenFile`'s
/// read-modify-write, tail and full-disk logic can be exercised without a
/// mount. Offsets and sizes are in ciphertext bytes.
protocol CiphertextStore: AnyObject, Sendable {
    /// The backing file's attributes (identity and size).
    func attributes() throws(Errno) -> stat
    /// Reads up to `buffer.count` bytes at `offset`; fewer only at the end.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) -> Int
    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno)
    func truncate(to size: Int) throws(Errno)
    /// Sets the modification and change times to now (a truncate to the same size).
    func touch() throws(Errno)
    func sync(dataOnly: Bool) throws(Errno)
    /// Reserves space for `count` bytes at `offset`, past the end, without
    /// changing the size (so that writing them later cannot meet a full disk).
    func reserve(at offset: Int, count: Int) throws(Errno)
    /// Gives back space reserved past the end, from `offset` on.
    func unreserve(from offset: Int, count: Int)
    /// True if `unreserve` frees space (tmpfs): only then is space reserved
    /// ahead of a stream. ext4, for one, punches nothing past the end of a
    /// file, and only a truncate (which sets the times) would free it.
    var reservesAhead: Bool { get }
}

extension CiphertextStore {
    func write(_ bytes: [UInt8], at offset: Int) throws(Errno) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 16)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: bytes)
        try write(UnsafeRawBufferPointer(rebasing: buffer[0..<bytes.count]), at: offset)
    }

    func read(count: Int, at offset: Int) throws(Errno) -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, count), alignment: 16)
        defer { buffer.deallocate() }
        let n = try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count]), at: offset)
        return Array(buffer[0..<n])
    }
}

/// The backing file of a mount: a descriptor (the file's node's, shared),
/// closed when the store and the node both let go.
final class DescriptorStore: CiphertextStore {
    private let descriptor: SharedDescriptor
    var fd: Int32 { descriptor.raw }

    init(_ descriptor: SharedDescriptor) { self.descriptor = descriptor }

    func attributes() throws(Errno) -> stat { try Syscall.fstat(fd) }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) -> Int { try Syscall.pread(fd, buffer, at: offset) }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno) { try Syscall.pwrite(fd, buffer, at: offset) }
    func truncate(to size: Int) throws(Errno) {
        let fd = self.fd
        try Syscall.call { ftruncate(fd, off_t(size)) }
    }
    func touch() throws(Errno) {
        var times = [timespec(tv_sec: 0, tv_nsec: Int(KMSFS_UTIME_OMIT)), timespec(tv_sec: 0, tv_nsec: Int(KMSFS_UTIME_NOW))]
        let fd = self.fd
        try Syscall.call { futimens(fd, &times) }
    }
    func sync(dataOnly: Bool) throws(Errno) {
        let fd = self.fd
        try Syscall.call { dataOnly ? fdatasync(fd) : fsync(fd) }
    }
    func reserve(at offset: Int, count: Int) throws(Errno) {
        let fd = self.fd
        try Syscall.call { kmsfs_reserve(fd, Int64(offset), Int64(count), 0) }
    }
    func unreserve(from offset: Int, count: Int) {
        _ = kmsfs_reserve(fd, Int64(offset), Int64(count), 1)
    }
    var reservesAhead: Bool {
        kmsfs_filesystem_type(fd) == 0x0102_1994  // TMPFS_MAGIC
    }
}
