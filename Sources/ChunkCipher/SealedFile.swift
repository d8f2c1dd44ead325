/// Whole-file conveniences on top of `FileCipher` and `ChunkPipeline`, for
/// small files, fsck and tests. They allocate; the mount's hot path uses the
/// buffer-taking APIs instead.
public enum SealedFile {
    /// Header and chunks of a file holding `plaintext`, as on disk.
    public static func seal(_ plaintext: [UInt8], header: FileHeader, cipher: FileCipher) throws(CipherError) -> [UInt8] {
        var sealedHeader = header
        try cipher.seal(header: &sealedHeader, plaintextSize: plaintext.count)
        var out = try sealedHeader.encoded()
        let body = ChunkPipeline.ciphertextBytes(cipher.layout, plaintextSize: plaintext.count)
        out.append(contentsOf: repeatElement(0, count: body))
        try keepingCipherError {
            try plaintext.withUnsafeBytes { plain in
                try out.withUnsafeMutableBytes { raw in
                    _ = try ChunkPipeline.seal(cipher, first: ChunkIndex(0), plaintext: plain,
                                               into: UnsafeMutableRawBufferPointer(rebasing: raw[ChunkLayout.headerSize...]))
                }
            }
        }
        return out
    }

    /// Authenticates the header, the length and every chunk of `file` and
    /// returns its plaintext.
    public static func open(_ file: [UInt8], cipher: FileCipher) throws(CipherError) -> [UInt8] {
        let header = try FileHeader(decoding: file.prefix(ChunkLayout.headerSize))
        let sealedLength = try cipher.verify(header: header)
        let size = try cipher.checkLength(ciphertextSize: file.count, sealedLength: sealedLength)
        var plain = [UInt8](repeating: 0, count: size)
        try keepingCipherError {
            try file.withUnsafeBytes { raw in
                try plain.withUnsafeMutableBytes { out in
                    _ = try ChunkPipeline.open(cipher, first: ChunkIndex(0),
                                               sealed: UnsafeRawBufferPointer(rebasing: raw[ChunkLayout.headerSize...]), into: out)
                }
            }
        }
        return plain
    }
}
