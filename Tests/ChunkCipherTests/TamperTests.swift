import Testing
import ChunkCipher

/// Every kind of change a storage attacker can make is detected, each with its
/// specific error (DESIGN.md §2).
@Suite struct TamperTests {
    let file: TestFile
    let plaintext: [UInt8]
    let sealed: [UInt8]
    let layout: ChunkLayout

    init() throws {
        file = try TestFile(chunkSize: 4096)
        plaintext = pattern(3 * 4096 + 1000, seed: 77)
        sealed = try file.seal(plaintext)
        layout = file.cipher.layout
    }

    func chunkRange(_ i: Int) -> Range<Int> {
        let start = layout.ciphertextOffset(of: ChunkIndex(i))
        return start..<min(sealed.count, start + layout.sealedChunkSize)
    }

    /// What a flipped bit at `byte` of the header must produce.
    func expectedHeaderError(byte: Int, flipped: [UInt8]) -> CipherError {
        switch byte {
        case 0..<4: return .malformed("bad magic: not a kmsfs file")
        case 4..<6: return .unsupportedFormatVersion(UInt16(flipped[4]) << 8 | UInt16(flipped[5]))
        case 6: return .malformed("")          // chunk size: out of range, or not the filesystem's
        case 7: return .malformed("unknown header flags \(flipped[7])")
        case 8..<24: return .integrityFailure(.header)   // file id
        case 24..<44: return .integrityFailure(.header)  // key id, key version
        case 44..<46:                                    // wrapped key length
            let length = Int(flipped[44]) << 8 | Int(flipped[45])
            // Shorter: the cut-off key bytes are non-zero padding. Longer but
            // in range: the seal no longer matches. Beyond 256: out of range.
            return length > 60 && length <= 256 ? .integrityFailure(.header) : .malformed("")
        case 46..<106: return .integrityFailure(.header) // wrapped key bytes
        case 106..<302: return .malformed("reserved header bytes are not zero")
        case 302..<334: return .wrongKey                 // key commitment
        case 334..<348: return .malformed("reserved header bytes are not zero")
        default: return .integrityFailure(.header)       // the length seal itself
        }
    }

    @Test("every single flipped bit in the header is detected with its specific error")
    func headerBitFlips() throws {
        for byte in 0..<ChunkLayout.headerSize {
            for bit in 0..<8 {
                var damaged = sealed
                damaged[byte] ^= UInt8(1 << bit)
                let error = cipherError { _ = try file.open(damaged) }
                let expected = expectedHeaderError(byte: byte, flipped: damaged)
                if case .malformed(let why) = expected, why.isEmpty {
                    guard case .malformed = error else {
                        Issue.record("byte \(byte) bit \(bit): \(String(describing: error))"); return
                    }
                } else if error != expected {
                    Issue.record("byte \(byte) bit \(bit): got \(String(describing: error)), expected \(expected)"); return
                }
            }
        }
    }

    @Test("every single flipped bit in a chunk fails that chunk's authentication")
    func chunkBitFlips() throws {
        for chunk in [0, 3] {
            let range = chunkRange(chunk)
            let step = chunk == 0 ? 1 : 7 // all bits of chunk 0, a spread of the last
            for bitIndex in stride(from: 0, to: range.count * 8, by: step) {
                var damaged = sealed
                damaged[range.lowerBound + bitIndex / 8] ^= UInt8(1 << (bitIndex % 8))
                let error = cipherError { _ = try file.open(damaged) }
                if error != .integrityFailure(.chunk(ChunkIndex(chunk))) {
                    Issue.record("chunk \(chunk) bit \(bitIndex): \(String(describing: error))"); return
                }
            }
        }
    }

    @Test("two swapped chunks are detected")
    func swappedChunks() {
        var damaged = sealed
        let a = chunkRange(0), b = chunkRange(1)
        damaged.replaceSubrange(a, with: sealed[b])
        damaged.replaceSubrange(b, with: sealed[a])
        #expect(cipherError { _ = try file.open(damaged) } == .integrityFailure(.chunk(ChunkIndex(0))))
    }

    @Test("a chunk copied from another file at the same index is detected")
    func chunkFromAnotherFile() throws {
        let other = try TestFile(chunkSize: 4096)
        let otherSealed = try other.seal(pattern(plaintext.count, seed: 99))
        var damaged = sealed
        damaged.replaceSubrange(chunkRange(1), with: otherSealed[chunkRange(1)])
        #expect(cipherError { _ = try file.open(damaged) } == .integrityFailure(.chunk(ChunkIndex(1))))
    }

    @Test("a chunk copied from another file under the same key is detected")
    func chunkFromSiblingUnderSameKey() throws {
        let keyBytes = pattern(32, seed: 3)
        let a = try TestFile(keyBytes: keyBytes)
        let b = try TestFile(keyBytes: keyBytes)
        let aSealed = try a.seal(plaintext)
        let bSealed = try b.seal(plaintext)
        var damaged = aSealed
        damaged.replaceSubrange(chunkRange(2), with: bSealed[chunkRange(2)])
        #expect(cipherError { _ = try a.open(damaged) } == .integrityFailure(.chunk(ChunkIndex(2))))
    }

    @Test("another file's header is detected")
    func headerFromAnotherFile() throws {
        let other = try TestFile(chunkSize: 4096)
        let otherSealed = try other.seal(plaintext)
        var damaged = sealed
        damaged.replaceSubrange(0..<ChunkLayout.headerSize, with: otherSealed[0..<ChunkLayout.headerSize])
        // Under our key the foreign header is refused...
        #expect(cipherError { _ = try file.open(damaged) } == .integrityFailure(.header))
        // ...and under the foreign header's own key our chunks are refused.
        #expect(cipherError { _ = try other.open(damaged) } == .integrityFailure(.chunk(ChunkIndex(0))))
    }

    @Test("truncation at a chunk boundary is detected")
    func truncatedAtBoundary() {
        let damaged = Array(sealed[..<chunkRange(2).lowerBound])
        #expect(cipherError { _ = try file.open(damaged) }
                == .truncated(expectedPlaintextSize: plaintext.count, actualPlaintextSize: 2 * 4096))
    }

    @Test("truncation to the bare header is detected")
    func truncatedToHeader() {
        let damaged = Array(sealed[..<ChunkLayout.headerSize])
        #expect(cipherError { _ = try file.open(damaged) }
                == .truncated(expectedPlaintextSize: plaintext.count, actualPlaintextSize: 0))
    }

    @Test("truncation inside a chunk is detected")
    func truncatedMidChunk() {
        let damaged = Array(sealed[..<(chunkRange(1).lowerBound + 1000)])
        #expect(cipherError { _ = try file.open(damaged) }
                == .truncated(expectedPlaintextSize: plaintext.count, actualPlaintextSize: 4096 + 1000 - 28))
        let intoOverhead = Array(sealed[..<(chunkRange(1).lowerBound + 20)])
        guard case .malformed = cipherError({ _ = try file.open(intoOverhead) }) else {
            Issue.record("a cut inside the nonce must be malformed"); return
        }
    }

    @Test("a chunk of zeros is not a hole: it fails authentication")
    func zeroChunk() {
        var damaged = sealed
        damaged.replaceSubrange(chunkRange(1), with: repeatElement(0, count: chunkRange(1).count))
        #expect(cipherError { _ = try file.open(damaged) } == .integrityFailure(.chunk(ChunkIndex(1))))
    }

    @Test("an extra chunk appended is detected")
    func appendedChunk() {
        // A copy of chunk 0 appended after the (partial) last chunk.
        var damaged = sealed
        damaged.append(contentsOf: sealed[chunkRange(0)])
        let error = cipherError { _ = try file.open(damaged) }
        #expect(error == .integrityFailure(.chunk(ChunkIndex(3))) || error == .integrityFailure(.chunk(ChunkIndex(4))))
    }

    @Test("the wrong data key is reported as such, not as tampering")
    func wrongKey() throws {
        let impostor = try FileCipher(key: .random(), fileID: file.fileID, layout: layout)
        #expect(cipherError { _ = try SealedFile.open(sealed, cipher: impostor) } == .wrongKey)
    }

    @Test("a header of a newer format version is refused by version")
    func newerVersion() {
        var damaged = sealed
        damaged[5] = 2
        #expect(cipherError { _ = try file.open(damaged) } == .unsupportedFormatVersion(2))
        // Its number can still be read (kmsfs status reports it), and a non-kmsfs header has none.
        #expect(FormatV1.version(ofHeader: sealed) == FormatV1.version)
        #expect(FormatV1.version(ofHeader: damaged) == 2)
        var foreign = sealed
        foreign[0] = 0
        #expect(FormatV1.version(ofHeader: foreign) == nil)
        #expect(FormatV1.version(ofHeader: Array(sealed.prefix(5))) == nil)
    }
}
