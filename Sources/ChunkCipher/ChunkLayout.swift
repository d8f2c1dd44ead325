/// Offset arithmetic of format v1: a fixed-size header followed by chunks of
/// `nonce ‖ ciphertext ‖ tag`. Every chunk but the last holds `chunkSize`
/// plaintext bytes. Pure maths, no I/O.
public struct ChunkLayout: Hashable, Sendable {
    /// Size of the file header in bytes.
    public static let headerSize = FormatV1.headerSize
    /// GCM nonce bytes at the start of each chunk.
    public static let nonceSize = 12
    /// GCM tag bytes at the end of each chunk.
    public static let tagSize = 16
    /// Ciphertext bytes added to every chunk.
    public static let overhead = nonceSize + tagSize
    /// Smallest and largest chunk sizes a filesystem may choose.
    public static let allowedChunkSizes = 4096...(1 << 20)

    /// Plaintext bytes per chunk; a power of two.
    public let chunkSize: Int

    /// A layout for a power-of-two chunk size from 4 KiB to 1 MiB.
    public init(chunkSize: Int) throws(CipherError) {
        guard Self.allowedChunkSizes.contains(chunkSize), chunkSize & (chunkSize - 1) == 0 else {
            throw .invalidArgument("chunk size \(chunkSize) is not a power of two from 4 KiB to 1 MiB")
        }
        self.chunkSize = chunkSize
    }

    /// A layout from the log2 chunk size stored in headers.
    public init(chunkSizeLog2: UInt8) throws(CipherError) {
        guard chunkSizeLog2 >= 12, chunkSizeLog2 <= 20 else {
            throw .malformed("chunk size 2^\(chunkSizeLog2) is outside 4 KiB...1 MiB")
        }
        try self.init(chunkSize: 1 << Int(chunkSizeLog2))
    }

    /// log2 of the chunk size, as stored in headers.
    public var chunkSizeLog2: UInt8 { UInt8(chunkSize.trailingZeroBitCount) }

    /// Bytes one full chunk occupies on disk.
    public var sealedChunkSize: Int { chunkSize + Self.overhead }

    /// Number of chunks holding `plaintextSize` bytes.
    public func chunkCount(plaintextSize: Int) -> Int {
        (plaintextSize + chunkSize - 1) / chunkSize
    }

    /// Size on disk of a file holding `plaintextSize` bytes.
    public func ciphertextSize(plaintextSize: Int) -> Int {
        let full = plaintextSize / chunkSize
        let rest = plaintextSize % chunkSize
        return Self.headerSize + full * sealedChunkSize + (rest > 0 ? rest + Self.overhead : 0)
    }

    /// Plaintext size of a ciphertext file of `ciphertextSize` bytes; throws
    /// when no plaintext size maps to it (cut inside a header or a chunk's
    /// overhead).
    public func plaintextSize(ciphertextSize: Int) throws(CipherError) -> Int {
        guard ciphertextSize >= Self.headerSize else {
            throw .malformed("file of \(ciphertextSize) bytes is shorter than the \(Self.headerSize)-byte header")
        }
        let body = ciphertextSize - Self.headerSize
        let full = body / sealedChunkSize
        let rest = body % sealedChunkSize
        if rest == 0 { return full * chunkSize }
        guard rest > Self.overhead else {
            throw .malformed("last chunk of \(rest) bytes is too short to hold a nonce, data and tag")
        }
        return full * chunkSize + rest - Self.overhead
    }

    /// Offset on disk of chunk `index`.
    public func ciphertextOffset(of index: ChunkIndex) -> Int {
        Self.headerSize + Int(index.rawValue) * sealedChunkSize
    }

    /// Plaintext offset at which chunk `index` starts.
    public func plaintextOffset(of index: ChunkIndex) -> Int {
        Int(index.rawValue) * chunkSize
    }

    /// The chunks that hold plaintext bytes `range` (empty range → no chunks).
    public func chunks(covering range: Range<Int>) -> Range<ChunkIndex> {
        guard !range.isEmpty else {
            let at = ChunkIndex(range.lowerBound / chunkSize)
            return at..<at
        }
        return ChunkIndex(range.lowerBound / chunkSize)..<ChunkIndex((range.upperBound - 1) / chunkSize + 1)
    }

    /// Plaintext bytes held by chunk `index` of a file of `plaintextSize` bytes.
    public func plaintextCount(of index: ChunkIndex, plaintextSize: Int) -> Int {
        max(0, min(chunkSize, plaintextSize - plaintextOffset(of: index)))
    }
}
