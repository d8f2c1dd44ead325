/// A 128-bit identifier stored as two big-endian words; the common shape of
/// file, directory and key ids.
public struct ID128: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// A fresh id from the OpenSSL CSPRNG.
    public static func random() -> ID128 {
        var words: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &words) { SecureRandom.fill($0) }
        return ID128(high: words.0, low: words.1)
    }

    /// Reads 16 bytes; nil when the buffer has another length.
    @inlinable
    public init?<Bytes: Collection>(bytes: Bytes) where Bytes.Element == UInt8 {
        guard bytes.count == 16 else { return nil }
        if let read = bytes.withContiguousStorageIfAvailable({ ID128(raw: UnsafeRawBufferPointer($0)) }) {
            self = read
            return
        }
        self = Array(bytes).withUnsafeBytes { ID128(raw: $0) }
    }

    /// The id in 16 big-endian bytes at `raw`.
    @usableFromInline
    init(raw: UnsafeRawBufferPointer) {
        self.init(high: UInt64(bigEndian: raw.loadUnaligned(as: UInt64.self)),
                  low: UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
    }

    /// Parses 32 lowercase or uppercase hex digits.
    public init?(hex: String) {
        guard hex.utf8.count == 32, let high = UInt64(hex.prefix(16), radix: 16),
              let low = UInt64(hex.suffix(16), radix: 16) else { return nil }
        self.init(high: high, low: low)
    }

    /// The 16 big-endian bytes.
    public var bytes: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(16)
        for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: high >> UInt64(shift))) }
        for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: low >> UInt64(shift))) }
        return out
    }

    /// 32 lowercase hex digits.
    /// (Written straight into the string's storage: ids are formatted for
    /// every audit record and usage-index row, on the file-create path.)
    public var hex: String {
        String(unsafeUninitializedCapacity: 32) { out in
            for i in 0..<32 {
                let word = i < 16 ? high : low
                let nibble = UInt8(truncatingIfNeeded: word >> UInt64(60 - 4 * (i % 16))) & 0x0F
                out[i] = nibble < 10 ? 0x30 + nibble : 0x57 + nibble
            }
            return 32
        }
    }

    public var description: String { hex }

    public static func < (a: ID128, b: ID128) -> Bool { (a.high, a.low) < (b.high, b.low) }
}

/// Identifies one encrypted file for its whole life; bound into every chunk.
public struct FileID: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: ID128
    public init(rawValue: ID128) { self.rawValue = rawValue }
    /// A fresh random file id.
    public static func random() -> FileID { FileID(rawValue: .random()) }
    public var description: String { rawValue.hex }
}

/// Identifies a customer-managed master key (CMK).
public struct KeyID: RawRepresentable, Hashable, Sendable, Comparable, CustomStringConvertible {
    public var rawValue: ID128
    public init(rawValue: ID128) { self.rawValue = rawValue }
    /// A fresh random key id.
    public static func random() -> KeyID { KeyID(rawValue: .random()) }
    /// Parses the 32-hex-digit form used by the CLI and the keystore.
    public init?(hex: String) {
        guard let raw = ID128(hex: hex) else { return nil }
        self.rawValue = raw
    }
    public var description: String { rawValue.hex }
    public static func < (a: KeyID, b: KeyID) -> Bool { a.rawValue < b.rawValue }
}

/// A version of a master key; 1 is the version created with the key.
public struct KeyVersion: RawRepresentable, Hashable, Sendable, Comparable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public var description: String { String(rawValue) }
    public static func < (a: KeyVersion, b: KeyVersion) -> Bool { a.rawValue < b.rawValue }
}

/// The position of a chunk within a file, counted from 0.
public struct ChunkIndex: RawRepresentable, Hashable, Sendable, Comparable, Strideable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: Int) { self.rawValue = UInt64(value) }
    public var description: String { String(rawValue) }
    public static func < (a: ChunkIndex, b: ChunkIndex) -> Bool { a.rawValue < b.rawValue }
    public func distance(to other: ChunkIndex) -> Int { Int(other.rawValue) - Int(rawValue) }
    public func advanced(by n: Int) -> ChunkIndex { ChunkIndex(rawValue: UInt64(Int(rawValue) + n)) }
}
