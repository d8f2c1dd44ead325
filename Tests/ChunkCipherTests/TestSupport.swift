import Testing
import ChunkCipher

/// Bytes from a hex string (test vectors).
func hex(_ s: String) -> [UInt8] {
    var out = [UInt8]()
    var it = s.makeIterator()
    while let a = it.next(), let b = it.next() { out.append(UInt8(String([a, b]), radix: 16)!) }
    return out
}

/// A key from known bytes.
func key(_ bytes: [UInt8]) -> SecretKey {
    SecretKey(copying: bytes)
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    return (0..<count).map { _ in
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        return UInt8(truncatingIfNeeded: x)
    }
}

/// A file id, cipher and header for in-memory file tests.
struct TestFile {
    let fileID: FileID
    let cipher: FileCipher
    let header: FileHeader

    init(chunkSize: Int = 4096, keyBytes: [UInt8]? = nil, fileID: FileID = .random()) throws {
        let layout = try ChunkLayout(chunkSize: chunkSize)
        let k = keyBytes.map { key($0) } ?? SecretKey.random()
        self.fileID = fileID
        self.cipher = try FileCipher(key: k, fileID: fileID, layout: layout)
        self.header = FileHeader(chunkSizeLog2: layout.chunkSizeLog2, fileID: fileID,
                                 keyID: KeyID(rawValue: ID128(high: 7, low: 9)), keyVersion: KeyVersion(rawValue: 3),
                                 wrappedKey: pattern(60, seed: 42))
    }

    func seal(_ plaintext: [UInt8]) throws -> [UInt8] {
        try SealedFile.seal(plaintext, header: header, cipher: cipher)
    }

    func open(_ file: [UInt8]) throws(CipherError) -> [UInt8] {
        try SealedFile.open(file, cipher: cipher)
    }
}

/// The error `body` throws, or nil.
func cipherError(_ body: () throws -> Void) -> CipherError? {
    do { try body(); return nil } catch let error as CipherError { return error } catch {
        Issue.record("not a CipherError: \(error)")
        return nil
    }
}
