#if canImport(Glibc)
import Glibc
#endif

/// One entry name as the kernel gives it: bytes, not text. Linux names are
/// any bytes but `/` and NUL, so a name that is not UTF-8 must keep every
/// byte — decoding it to `String` would turn invalid sequences into U+FFFD
/// and make different names collide. Like swift-system's
/// `FilePath.Component`, it is a value over the exact bytes; `description`
/// decodes lossily, for people only (logs, audit paths, reports).
///
/// The bytes are kept with a trailing NUL, so handing a name to a system
/// call (`withCString`) copies nothing.
public struct FileName: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
    /// The name's bytes followed by one NUL.
    private let storage: [UInt8]

    /// A name from its bytes (which must not contain NUL; the kernel never sends one).
    public init<Bytes: Sequence<UInt8>>(bytes: Bytes) {
        var storage = Array(bytes)
        storage.append(0)
        self.storage = storage
    }

    /// A name from a NUL-terminated C string (a request's name, a `dirent`'s `d_name`).
    public init(cString: UnsafePointer<CChar>) {
        self.init(bytes: UnsafeRawBufferPointer(start: cString, count: strlen(cString)))
    }

    /// A name from text (its UTF-8).
    public init(_ text: String) { self.init(bytes: text.utf8) }

    public init(stringLiteral value: String) { self.init(value) }

    /// The number of bytes (without the terminating NUL).
    public var count: Int { storage.count - 1 }
    public var isEmpty: Bool { storage.count == 1 }

    /// The name's bytes.
    public var bytes: ArraySlice<UInt8> { storage[0..<(storage.count - 1)] }

    /// Calls `body` with the bytes (without the NUL).
    public func withBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        let count = self.count
        return try storage.withUnsafeBufferPointer { (raw: UnsafeBufferPointer<UInt8>) throws(E) -> R in
            try body(UnsafeRawBufferPointer(start: raw.baseAddress, count: count))
        }
    }

    /// Calls `body` with the name as a NUL-terminated C string (no copy).
    public func withCString<R, E: Error>(_ body: (UnsafePointer<CChar>) throws(E) -> R) throws(E) -> R {
        try storage.withUnsafeBufferPointer { (raw: UnsafeBufferPointer<UInt8>) throws(E) -> R in
            try raw.withMemoryRebound(to: CChar.self) { (c: UnsafeBufferPointer<CChar>) throws(E) -> R in try body(c.baseAddress!) }
        }
    }

    /// Whether the name's bytes are exactly the UTF-8 of `text`.
    public static func == (name: FileName, text: String) -> Bool { name.bytes.elementsEqual(text.utf8) }

    /// Byte-wise order (as `ls` sorts in the C locale).
    public static func < (a: FileName, b: FileName) -> Bool { a.bytes.lexicographicallyPrecedes(b.bytes) }

    /// "." or "..".
    public var isDotOrDotDot: Bool {
        (storage.count == 2 && storage[0] == 0x2E) || (storage.count == 3 && storage[0] == 0x2E && storage[1] == 0x2E)
    }

    /// Whether the name begins with the bytes of `prefix`.
    public func hasPrefix(_ prefix: String) -> Bool {
        var i = 0
        for byte in prefix.utf8 {
            guard i < count, storage[i] == byte else { return false }
            i += 1
        }
        return true
    }

    /// Whether the name ends with the bytes of `suffix`.
    public func hasSuffix(_ suffix: String) -> Bool {
        let tail = Array(suffix.utf8)
        guard tail.count <= count else { return false }
        return storage[(count - tail.count)..<count].elementsEqual(tail)
    }

    /// This name followed by the bytes of `suffix`.
    public func appending(_ suffix: String) -> FileName {
        FileName(bytes: bytes + Array(suffix.utf8))
    }

    /// The name as text if it is valid UTF-8, else nil.
    public var text: String? { String(validating: bytes, as: UTF8.self) }

    /// The name for people: invalid UTF-8 shown as U+FFFD. Never use it to find a file.
    public var description: String { String(decoding: bytes, as: UTF8.self) }
}
