/// Seals and opens the chunks and the header of one file under its data key.
///
/// Chunk additional data is `file id ‖ chunk index` (24 bytes), so a chunk
/// moved to another position or another file fails authentication. The
/// header's length seal authenticates every header byte and the plaintext
/// length, so truncation at a chunk boundary is detected.
public final class FileCipher: Sendable {
    /// The file this cipher belongs to.
    public let fileID: FileID
    /// The filesystem's chunk layout.
    public let layout: ChunkLayout
    private let aead: AESGCM
    private let fileIDBytes: [UInt8]
    /// HMAC-SHA256(DEK, "kmsfs/v1/key-commitment" ‖ file id).
    public let keyCommitment: [UInt8]

    static let commitmentLabel = Array("kmsfs/v1/key-commitment".utf8)
    static let lengthSealLabel = Array("kmsfs/v1/length".utf8)

    /// A cipher for `fileID` under its 32-byte data key.
    public init(key: borrowing SecretKey, fileID: FileID, layout: ChunkLayout) throws(CipherError) {
        self.fileID = fileID
        self.layout = layout
        self.aead = try AESGCM(key: key)
        self.fileIDBytes = fileID.rawValue.bytes
        self.keyCommitment = KeyDerivation.hmacSHA256(key: key, message: Self.commitmentLabel + fileIDBytes)
    }

    // MARK: Chunks

    /// Seals chunk `index` of `plaintext` (1...chunkSize bytes) into `output`,
    /// which must hold `plaintext.count + 28` bytes, under a fresh random nonce.
    public func sealChunk(_ index: ChunkIndex, plaintext: UnsafeRawBufferPointer,
                          into output: UnsafeMutableRawBufferPointer) throws(CipherError) {
        guard plaintext.count > 0, plaintext.count <= layout.chunkSize,
              output.count >= plaintext.count + ChunkLayout.overhead else {
            throw .invalidArgument("chunk of \(plaintext.count) bytes into \(output.count)")
        }
        try withChunkAdditionalData(index) { (ad) throws(CipherError) in
            try aead.sealBox(plaintext, additionalData: ad,
                             into: UnsafeMutableRawBufferPointer(rebasing: output[0..<(plaintext.count + ChunkLayout.overhead)]))
        }
    }

    /// Opens sealed chunk `index` (29...chunkSize+28 bytes) into `output`;
    /// returns the plaintext byte count. Throws `integrityFailure` when the
    /// chunk was modified, moved, or belongs to another file.
    @discardableResult
    public func openChunk(_ index: ChunkIndex, sealed: UnsafeRawBufferPointer,
                          into output: UnsafeMutableRawBufferPointer) throws(CipherError) -> Int {
        let count = sealed.count - ChunkLayout.overhead
        guard count > 0, count <= layout.chunkSize else {
            throw .malformed("chunk \(index) has \(sealed.count) bytes on disk")
        }
        guard output.count >= count else { throw .invalidArgument("output of \(output.count) bytes for \(count)") }
        let authentic = try withChunkAdditionalData(index) { (ad) throws(CipherError) in
            try aead.openBox(sealed, additionalData: ad, into: output)
        }
        guard authentic else { throw .integrityFailure(.chunk(index)) }
        return count
    }

    private func withChunkAdditionalData<R>(_ index: ChunkIndex,
                                            _ body: (UnsafeRawBufferPointer) throws(CipherError) -> R) throws(CipherError) -> R {
        // 16-byte file id ‖ 8-byte big-endian chunk index, on the stack.
        var ad: (UInt64, UInt64, UInt64) = (0, 0, index.rawValue.bigEndian)
        return try withUnsafeMutableBytes(of: &ad) { (raw) throws(CipherError) -> R in
            fileIDBytes.withUnsafeBytes { raw.copyMemory(from: $0) }
            return try body(UnsafeRawBufferPointer(raw))
        }
    }

    // MARK: Header

    /// Stamps the key commitment and seals `plaintextSize` into `header`,
    /// authenticating every header byte before the seal.
    public func seal(header: inout FileHeader, plaintextSize: Int) throws(CipherError) {
        guard header.fileID == fileID else { throw .invalidArgument("header of file \(header.fileID) given to cipher of \(fileID)") }
        guard plaintextSize >= 0 else { throw .invalidArgument("negative size") }
        header.chunkSizeLog2 = layout.chunkSizeLog2
        header.keyCommitment = keyCommitment
        var encoded = try header.encoded()
        var seal = [UInt8](repeating: 0, count: FormatV1.lengthSealSize)
        var size = [UInt8](repeating: 0, count: 8)
        size.putBigEndian(UInt64(plaintextSize), at: 0, width: 8)
        let ad = Self.lengthSealLabel + encoded[0..<FormatV1.lengthSealOffset]
        try keepingCipherError {
            try seal.withUnsafeMutableBytes { box in
                try size.withUnsafeBytes { plain in
                    try ad.withUnsafeBytes { adBytes in try aead.sealBox(plain, additionalData: adBytes, into: box) }
                }
            }
        }
        header.lengthSeal = seal
        encoded.removeAll()
    }

    /// Authenticates `header` under this key and returns the sealed
    /// plaintext length. `wrongKey` when the key is not the header's;
    /// `integrityFailure(.header)` when a header byte was changed.
    public func verify(header: FileHeader) throws(CipherError) -> Int {
        // A header of another file (or a changed file id) is tampering; a
        // commitment that does not match this key is a wrong key (a changed
        // commitment byte cannot be told apart from one, and reads as such).
        guard header.fileID == fileID else { throw .integrityFailure(.header) }
        guard header.keyCommitment == keyCommitment else { throw .wrongKey }
        guard header.chunkSizeLog2 == layout.chunkSizeLog2 else {
            throw .malformed("header declares chunk size 2^\(header.chunkSizeLog2), filesystem uses \(layout.chunkSize)")
        }
        let encoded = try header.encoded()
        let ad = Self.lengthSealLabel + encoded[0..<FormatV1.lengthSealOffset]
        var size = [UInt8](repeating: 0, count: 8)
        let seal = header.lengthSeal
        let authentic = try keepingCipherError {
            try seal.withUnsafeBytes { box -> Bool in
                try ad.withUnsafeBytes { adBytes -> Bool in
                    try size.withUnsafeMutableBytes { plain -> Bool in try aead.openBox(box, additionalData: adBytes, into: plain) }
                }
            }
        }
        guard authentic else { throw .integrityFailure(.header) }
        let length = size.bigEndian(at: 0, width: 8)
        guard length <= UInt64(Int.max) else { throw .integrityFailure(.header) }
        return Int(length)
    }

    /// Checks a file's size on disk against its authenticated length: a file
    /// shorter than the seal was truncated. A longer file is the trace of a
    /// crash between writing chunks and resealing the length; its extra
    /// chunks must still authenticate when read. Returns the plaintext size.
    public func checkLength(ciphertextSize: Int, sealedLength: Int) throws(CipherError) -> Int {
        let actual = try layout.plaintextSize(ciphertextSize: ciphertextSize)
        guard actual >= sealedLength else {
            throw .truncated(expectedPlaintextSize: sealedLength, actualPlaintextSize: actual)
        }
        return actual
    }
}
