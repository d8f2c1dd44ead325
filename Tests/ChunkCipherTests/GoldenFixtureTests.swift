import Testing
import Foundation
import ChunkCipher

/// Frozen ciphertext of format v1. If these fail, the bytes on disk changed:
/// bump the format version, update docs/FORMAT.md, and add a new fixture
/// beside this one instead of regenerating it.
@Suite struct GoldenFixtureTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")
    static let fileID = FileID(rawValue: ID128(hex: "00112233445566778899aabbccddeeff")!)
    static let dataKey = pattern(32, seed: 2026)
    static let nameKey = pattern(32, seed: 2027)
    static let directoryID = ID128(hex: "0f0e0d0c0b0a09080706050403020100")!
    static let plaintext = Array(String(repeating: "kmsfs golden fixture, format v1.\n", count: 300).utf8) // 9900 bytes, 3 chunks

    func cipher() throws -> FileCipher {
        try FileCipher(key: key(Self.dataKey), fileID: Self.fileID, layout: ChunkLayout(chunkSize: 4096))
    }

    @Test("the committed v1 file decodes to its known plaintext and header fields")
    func fileFixture() throws {
        let bytes = [UInt8](try Data(contentsOf: Self.fixtures.appendingPathComponent("v1-file.bin")))
        let header = try FileHeader(decoding: bytes.prefix(ChunkLayout.headerSize))
        #expect(header.fileID == Self.fileID)
        #expect(header.keyID == KeyID(hex: "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"))
        #expect(header.keyVersion == KeyVersion(rawValue: 4))
        #expect(header.wrappedKey == pattern(60, seed: 60))
        #expect(header.chunkSizeLog2 == 12)
        #expect(try SealedFile.open(bytes, cipher: cipher()) == Self.plaintext)
    }

    @Test("the committed v1 name decodes, and encryption still produces it")
    func nameFixture() throws {
        let stored = try String(contentsOf: Self.fixtures.appendingPathComponent("v1-name.txt"), encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let names = try NameCipher(nameKey: key(Self.nameKey), directoryID: Self.directoryID)
        #expect(try names.decrypt(stored) == Array("Quarterly Report (final).xlsx".utf8))
        #expect(try names.encrypt("Quarterly Report (final).xlsx") == stored)
    }

    /// Writes the fixtures; run once per format version with KMSFS_WRITE_FIXTURES=1.
    @Test("fixture writer", .enabled(if: ProcessInfo.processInfo.environment["KMSFS_WRITE_FIXTURES"] == "1"))
    func writeFixtures() throws {
        let header = FileHeader(chunkSizeLog2: 12, fileID: Self.fileID, keyID: KeyID(hex: "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")!,
                                keyVersion: KeyVersion(rawValue: 4), wrappedKey: pattern(60, seed: 60))
        let sealed = try SealedFile.seal(Self.plaintext, header: header, cipher: cipher())
        try FileManager.default.createDirectory(at: Self.fixtures, withIntermediateDirectories: true)
        try Data(sealed).write(to: Self.fixtures.appendingPathComponent("v1-file.bin"))
        let names = try NameCipher(nameKey: key(Self.nameKey), directoryID: Self.directoryID)
        try (names.encrypt("Quarterly Report (final).xlsx") + "\n")
            .write(to: Self.fixtures.appendingPathComponent("v1-name.txt"), atomically: true, encoding: .utf8)
    }
}
