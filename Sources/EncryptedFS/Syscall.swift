import CLinux
import FUSEBridge
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The one funnel for the *at() system calls swift-system does not wrap:
/// each retries EINTR and throws the `Errno` it failed with.
enum Syscall {
    @discardableResult
    static func call<T: BinaryInteger>(_ body: () -> T) throws(Errno) -> T {
        while true {
            let result = body()
            if result != -1 { return result }
            let error = errno
            if error != EINTR { throw Errno(rawValue: error) }
        }
    }

    static func openat(_ dir: Int32, _ name: String, _ flags: Int32, _ mode: mode_t = 0) throws(Errno) -> Int32 {
        try call { Glibc.openat(dir, name, flags | O_CLOEXEC, mode) }
    }

    static func openat(_ dir: Int32, _ name: FileName, _ flags: Int32, _ mode: mode_t = 0) throws(Errno) -> Int32 {
        try name.withCString { (c) throws(Errno) in try call { Glibc.openat(dir, c, flags | O_CLOEXEC, mode) } }
    }

    static func fstatat(_ dir: Int32, _ name: String, flags: Int32 = AT_SYMLINK_NOFOLLOW) throws(Errno) -> stat {
        var st = stat()
        try call { Glibc.fstatat(dir, name, &st, flags) }
        return st
    }

    static func fstatat(_ dir: Int32, _ name: FileName, flags: Int32 = AT_SYMLINK_NOFOLLOW) throws(Errno) -> stat {
        var st = stat()
        try name.withCString { (c) throws(Errno) in _ = try call { Glibc.fstatat(dir, c, &st, flags) } }
        return st
    }

    /// Calls `body` with the C strings of two names.
    static func withNames<R>(_ a: FileName, _ b: FileName, _ body: (UnsafePointer<CChar>, UnsafePointer<CChar>) throws(Errno) -> R) throws(Errno) -> R {
        try a.withCString { (ca) throws(Errno) in try b.withCString { (cb) throws(Errno) in try body(ca, cb) } }
    }

    static func unlinkat(_ dir: Int32, _ name: FileName, _ flags: Int32 = 0) throws(Errno) {
        try name.withCString { (c) throws(Errno) in _ = try call { Glibc.unlinkat(dir, c, flags) } }
    }

    /// unlinkat whose failure does not matter (clean-up of what may not be there).
    static func unlinkQuietly(_ dir: Int32, _ name: FileName, _ flags: Int32 = 0) {
        _ = name.withCString { Glibc.unlinkat(dir, $0, flags) }
    }

    static func fstat(_ fd: Int32) throws(Errno) -> stat {
        var st = stat()
        try call { Glibc.fstat(fd, &st) }
        return st
    }

    /// Reads exactly `buffer.count` bytes unless the file ends first; returns the count read.
    static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) -> Int {
        var done = 0
        while done < buffer.count {
            let n = try call { Glibc.pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done)) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes all of `buffer` at `offset`.
    static func pwrite(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {
        var done = 0
        while done < buffer.count {
            let n = try call { Glibc.pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done)) }
            done += n
        }
    }

    /// Writes an array at `offset`.
    static func pwrite(_ fd: Int32, _ bytes: [UInt8], at offset: Int) throws(Errno) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 16)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: bytes)
        try pwrite(fd, UnsafeRawBufferPointer(rebasing: buffer[0..<bytes.count]), at: offset)
    }

    /// Reads up to `count` bytes at `offset` (fewer at the end of the file).
    static func pread(_ fd: Int32, count: Int, at offset: Int) throws(Errno) -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, count), alignment: 16)
        defer { buffer.deallocate() }
        let n = try pread(fd, UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count]), at: offset)
        return Array(buffer[0..<n])
    }

    /// A symlink's content, byte for byte.
    static func readlinkat(_ dir: Int32, _ name: FileName) throws(Errno) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = try name.withCString { (c) throws(Errno) in
            try buffer.withUnsafeMutableBufferPointer { (b) throws(Errno) in
                try b.withMemoryRebound(to: CChar.self) { (p) throws(Errno) in try call { Glibc.readlinkat(dir, c, p.baseAddress!, p.count - 1) } }
            }
        }
        buffer.removeLast(buffer.count - n)
        return buffer
    }

    /// The names in a directory (without "." and ".."), with their d_type.
    static func listDirectory(_ dirFD: Int32) throws(Errno) -> [(name: FileName, type: UInt8, inode: UInt64)] {
        let opened = try open(dirFD, ".", O_RDONLY | O_DIRECTORY)
        guard let dir = fdopendir(opened.raw) else { throw Errno(rawValue: errno) }
        _ = opened.take()  // the DIR now owns it
        defer { closedir(dir) }
        var out: [(FileName, UInt8, UInt64)] = []
        while true {
            errno = 0
            guard let entry = Glibc.readdir(dir) else {
                if errno != 0 { throw Errno(rawValue: errno) }
                break
            }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                FileName(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            if name.isDotOrDotDot { continue }
            out.append((name, entry.pointee.d_type, UInt64(entry.pointee.d_ino)))
        }
        return out
    }
}

/// A descriptor this value owns: closed when the value's life ends, on every
/// path, error paths included, unless handed on with `take()` — instead of
/// a `close` paired by hand with each `openat` and "on failure the
/// descriptor is closed" contracts.
public struct Descriptor: ~Copyable, Sendable {
    public let raw: Int32
    public init(adopting raw: Int32) { self.raw = raw }
    deinit { close(raw) }
    /// Hands the descriptor on; whoever takes it closes it.
    public consuming func take() -> Int32 {
        let raw = self.raw
        discard self
        return raw
    }
}

/// A descriptor that several values refer to (a node and the open file that
/// shares its descriptor; a rekey candidate copied into a batch and handed
/// to a worker): closed when the last one lets go, so no path has to
/// remember to close it.
final class SharedDescriptor: Sendable {
    private let descriptor: Descriptor
    var raw: Int32 { descriptor.raw }
    init(_ descriptor: consuming Descriptor) { self.descriptor = descriptor }
}

extension Syscall {
    static func open(_ dir: Int32, _ name: FileName, _ flags: Int32, _ mode: mode_t = 0) throws(Errno) -> Descriptor {
        Descriptor(adopting: try openat(dir, name, flags, mode))
    }

    static func open(_ dir: Int32, _ name: String, _ flags: Int32, _ mode: mode_t = 0) throws(Errno) -> Descriptor {
        Descriptor(adopting: try openat(dir, name, flags, mode))
    }
}
