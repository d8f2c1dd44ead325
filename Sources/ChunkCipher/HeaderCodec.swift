/// Constants of on-disk format v1 (docs/FORMAT.md is the byte-level spec).
public enum FormatV1 {
    /// The format version this build writes and reads.
    public static let version: UInt16 = 1
    /// "KMFS".
    public static let magic: [UInt8] = [0x4B, 0x4D, 0x46, 0x53]
    /// Fixed header size, so chunk offsets are simple arithmetic.
    public static let headerSize = 384
    /// Room for a wrapped data key (a local AES-GCM wrap is 60 bytes; an
    /// external KMS ciphertext blob fits too).
    public static let maxWrappedKeySize = 256

    /// The format version a header claims (nil if it is not a kmsfs header),
    /// read without decoding the rest: a newer version still reports its number.
    public static func version<Bytes: RandomAccessCollection>(ofHeader raw: Bytes) -> UInt16? where Bytes.Element == UInt8, Bytes.Index == Int {
        let b = Array(raw.prefix(versionOffset + 2))
        guard b.count == versionOffset + 2, Array(b[0..<4]) == magic else { return nil }
        return UInt16(b.bigEndian(at: versionOffset, width: 2))
    }

    static let versionOffset = 4
    static let chunkLog2Offset = 6
    static let flagsOffset = 7
    static let fileIDOffset = 8
    static let keyIDOffset = 24
    static let keyVersionOffset = 40
    static let wrappedLengthOffset = 44
    static let wrappedKeyOffset = 46
    static let commitmentOffset = 302
    static let commitmentSize = 32
    static let reservedOffset = 334
    /// The length seal starts here; everything before it is its additional data.
    static let lengthSealOffset = 348
    static let lengthSealSize = ChunkLayout.nonceSize + 8 + ChunkLayout.tagSize
}

/// The fixed-size header at the start of every encrypted file.
public struct FileHeader: Hashable, Sendable {
    /// log2 of the filesystem's chunk size.
    public var chunkSizeLog2: UInt8
    /// The file's permanent id, bound into every chunk.
    public var fileID: FileID
    /// The master key that wraps this file's data key.
    public var keyID: KeyID
    /// Which version of that master key.
    public var keyVersion: KeyVersion
    /// The data key as wrapped by the key provider (opaque here).
    public var wrappedKey: [UInt8]
    /// HMAC-SHA256(DEK, label ‖ file id): tells a wrong key from tampering.
    public var keyCommitment: [UInt8]
    /// nonce ‖ GCM(plaintext length) ‖ tag, authenticating every byte above.
    public var lengthSeal: [UInt8]

    /// A header not yet sealed (commitment and length seal are set by `FileCipher`).
    public init(chunkSizeLog2: UInt8, fileID: FileID, keyID: KeyID, keyVersion: KeyVersion, wrappedKey: [UInt8]) {
        self.chunkSizeLog2 = chunkSizeLog2
        self.fileID = fileID
        self.keyID = keyID
        self.keyVersion = keyVersion
        self.wrappedKey = wrappedKey
        self.keyCommitment = [UInt8](repeating: 0, count: FormatV1.commitmentSize)
        self.lengthSeal = [UInt8](repeating: 0, count: FormatV1.lengthSealSize)
    }

    /// The 384 header bytes.
    public func encoded() throws(CipherError) -> [UInt8] {
        guard (1...FormatV1.maxWrappedKeySize).contains(wrappedKey.count) else {
            throw .invalidArgument("wrapped key of \(wrappedKey.count) bytes does not fit the header")
        }
        var out = [UInt8](repeating: 0, count: FormatV1.headerSize)
        out.replaceSubrange(0..<4, with: FormatV1.magic)
        out.putBigEndian(UInt64(FormatV1.version), at: FormatV1.versionOffset, width: 2)
        out[FormatV1.chunkLog2Offset] = chunkSizeLog2
        out.replaceSubrange(FormatV1.fileIDOffset..<FormatV1.fileIDOffset + 16, with: fileID.rawValue.bytes)
        out.replaceSubrange(FormatV1.keyIDOffset..<FormatV1.keyIDOffset + 16, with: keyID.rawValue.bytes)
        out.putBigEndian(UInt64(keyVersion.rawValue), at: FormatV1.keyVersionOffset, width: 4)
        out.putBigEndian(UInt64(wrappedKey.count), at: FormatV1.wrappedLengthOffset, width: 2)
        out.replaceSubrange(FormatV1.wrappedKeyOffset..<FormatV1.wrappedKeyOffset + wrappedKey.count, with: wrappedKey)
        out.replaceSubrange(FormatV1.commitmentOffset..<FormatV1.commitmentOffset + FormatV1.commitmentSize, with: keyCommitment)
        out.replaceSubrange(FormatV1.lengthSealOffset..<FormatV1.headerSize, with: lengthSeal)
        return out
    }

    /// Parses a header; checks shape only (authenticity needs the key: see
    /// `FileCipher.verify(header:)`).
    public init<Bytes: RandomAccessCollection>(decoding raw: Bytes) throws(CipherError) where Bytes.Element == UInt8, Bytes.Index == Int {
        let b = Array(raw)
        guard b.count >= FormatV1.headerSize else {
            throw .malformed("header of \(b.count) bytes, expected \(FormatV1.headerSize)")
        }
        guard Array(b[0..<4]) == FormatV1.magic else { throw .malformed("bad magic: not a kmsfs file") }
        let version = UInt16(b.bigEndian(at: FormatV1.versionOffset, width: 2))
        guard version == FormatV1.version else { throw .unsupportedFormatVersion(version) }
        guard b[FormatV1.flagsOffset] == 0 else { throw .malformed("unknown header flags \(b[FormatV1.flagsOffset])") }
        let log2 = b[FormatV1.chunkLog2Offset]
        _ = try ChunkLayout(chunkSizeLog2: log2)
        let wrappedLength = Int(b.bigEndian(at: FormatV1.wrappedLengthOffset, width: 2))
        guard (1...FormatV1.maxWrappedKeySize).contains(wrappedLength) else {
            throw .malformed("wrapped key length \(wrappedLength) out of range")
        }
        let padding = b[(FormatV1.wrappedKeyOffset + wrappedLength)..<FormatV1.commitmentOffset]
        let reserved = b[FormatV1.reservedOffset..<FormatV1.lengthSealOffset]
        guard padding.allSatisfy({ $0 == 0 }), reserved.allSatisfy({ $0 == 0 }) else {
            throw .malformed("reserved header bytes are not zero")
        }
        self.chunkSizeLog2 = log2
        self.fileID = FileID(rawValue: ID128(bytes: b[FormatV1.fileIDOffset..<FormatV1.fileIDOffset + 16])!)
        self.keyID = KeyID(rawValue: ID128(bytes: b[FormatV1.keyIDOffset..<FormatV1.keyIDOffset + 16])!)
        self.keyVersion = KeyVersion(rawValue: UInt32(b.bigEndian(at: FormatV1.keyVersionOffset, width: 4)))
        self.wrappedKey = Array(b[FormatV1.wrappedKeyOffset..<FormatV1.wrappedKeyOffset + wrappedLength])
        self.keyCommitment = Array(b[FormatV1.commitmentOffset..<FormatV1.commitmentOffset + FormatV1.commitmentSize])
        self.lengthSeal = Array(b[FormatV1.lengthSealOffset..<FormatV1.headerSize])
    }

}

extension Array where Element == UInt8 {
    mutating func putBigEndian(_ value: UInt64, at offset: Int, width: Int) {
        for i in 0..<width {
            self[offset + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - i)))
        }
    }

    func bigEndian(at offset: Int, width: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in 0..<width { value = value << 8 | UInt64(self[offset + i]) }
        return value
    }
}
