import Foundation
import Testing
import ChunkCipher
import FUSEBridge
import SystemPackage
@testable import EncryptedFS

/// Ciphertext in memory, with a capacity past which writes fail as on a
/// full disk (the part that fits is written, then ENOSPC).
final class MemoryStore: CiphertextStore, @unchecked Sendable {
    let lock = NSLock()
    private var bytes: [UInt8] = []
    var capacity: Int

    init(capacity: Int = .max) { self.capacity = capacity }

    var contents: [UInt8] { lock.withLock { bytes } }

    func attributes() throws(Errno) -> stat {
        var st = stat()
        st.st_dev = 1
        st.st_ino = 1
        st.st_size = off_t(lock.withLock { bytes.count })
        return st
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) -> Int {
        lock.withLock {
            let n = max(0, min(buffer.count, bytes.count - offset))
            if n > 0 { bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + offset, byteCount: n) } }
            return n
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {
        if lock.withLock({ failWrites }) { throw .ioError }
        let full: Bool = lock.withLock {
            let fits = max(0, min(buffer.count, capacity - offset))
            if offset + fits > bytes.count { bytes += [UInt8](repeating: 0, count: offset + fits - bytes.count) }
            for i in 0..<fits { bytes[offset + i] = buffer[i] }
            return fits < buffer.count
        }
        if full { throw .noSpace }
    }

    func truncate(to size: Int) throws(Errno) {
        lock.lock()
        defer { lock.unlock() }
        if size < bytes.count { bytes.removeLast(bytes.count - size) } else {
            guard size <= capacity else { throw .noSpace }
            bytes += [UInt8](repeating: 0, count: size - bytes.count)
        }
    }

    func touch() throws(Errno) {}
    func sync(dataOnly: Bool) throws(Errno) {}

    /// Space reserved past the end (counted against the capacity, as a
    /// disk would), and writes that fail although their space was reserved.
    var reservedTo = 0
    var failWrites = false

    func reserve(at offset: Int, count: Int) throws(Errno) {
        lock.lock()
        defer { lock.unlock() }
        guard offset + count <= capacity else { throw .noSpace }
        reservedTo = max(reservedTo, offset + count)
    }

    func unreserve(from offset: Int, count: Int) {
        lock.withLock { reservedTo = min(reservedTo, offset) }
    }
    var reservesAhead: Bool { true }
}

/// OpenFile against a reference model, without a mount: every write,
/// truncate and read through the chunk pipeline, the cached tail and the
/// length seal, checked byte for byte.
struct OpenFileTests {
    static let layout = try! ChunkLayout(chunkSize: 4096)

    /// A new empty file in `store`, as create makes one; also its cipher, to open it again.
    static func create(in store: MemoryStore) throws -> (OpenFile, FileCipher, FileHeader) {
        let key = SecretKey.random()
        let fileID = FileID.random()
        var header = FileHeader(chunkSizeLog2: layout.chunkSizeLog2, fileID: fileID, keyID: .random(), keyVersion: KeyVersion(rawValue: 1),
                                wrappedKey: [UInt8](repeating: 7, count: 60))
        let cipher = try FileCipher(key: key, fileID: fileID, layout: layout)
        try cipher.seal(header: &header, plaintextSize: 0)
        try store.write(try header.encoded(), at: 0)
        let file = try OpenFile(store: store, writable: true, header: header, cipher: cipher, sealedHere: 0, onIntegrityFailure: { _, _ in })
        return (file, cipher, header)
    }

    static func readAll(_ file: OpenFile, size: Int) throws -> [UInt8] {
        var out: [UInt8] = []
        try file.read(offset: 0, count: size + 100) { out = Array($0) }
        return out
    }

    @Test("random writes, appends in pieces, truncates and sparse extensions read back exactly as a byte array would hold them, and again after reopening from the sealed header")
    func matchesAReferenceModel() throws {
        let store = MemoryStore()
        let (file, cipher, _) = try Self.create(in: store)
        var model: [UInt8] = []
        var rng = SystemRandomNumberGenerator()
        var seeded = SplitMix(seed: 20261204)
        for step in 0..<600 {
            let op = Int.random(in: 0..<10, using: &seeded)
            switch op {
            case 0..<6:  // write somewhere up to a little past the end (a gap is zeros)
                let offset = Int.random(in: 0...(model.count + 5000), using: &seeded)
                let count = Int.random(in: 1...9000, using: &seeded)
                let data = (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
                #expect(try data.withUnsafeBytes { try file.write($0, at: offset) } == count)
                if offset > model.count { model += [UInt8](repeating: 0, count: offset - model.count) }
                if offset + count > model.count { model += [UInt8](repeating: 0, count: offset + count - model.count) }
                model.replaceSubrange(offset..<(offset + count), with: data)
            case 6..<8:  // small appends, as a log writer does
                for _ in 0..<Int.random(in: 1...20, using: &seeded) {
                    let data = (0..<Int.random(in: 1...300, using: &seeded)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                    _ = try data.withUnsafeBytes { try file.write($0, at: model.count) }
                    model += data
                }
            case 8:
                let size = Int.random(in: 0...(model.count + 3000), using: &seeded)
                try file.truncate(to: size)
                if size < model.count { model.removeLast(model.count - size) } else { model += [UInt8](repeating: 0, count: size - model.count) }
            default:
                try file.sealLength()
            }
            let offset = Int.random(in: 0...max(0, model.count), using: &seeded)
            let count = Int.random(in: 0...10000, using: &seeded)
            var got: [UInt8] = []
            try file.read(offset: offset, count: count) { got = Array($0) }
            let want = offset < model.count ? Array(model[offset..<min(model.count, offset + count)]) : []
            #expect(got == want, "step \(step): read \(count) at \(offset) of \(model.count)")
            if got != want { return }
        }
        try file.sealLength()
        // The store now holds a sealed file: opening it again authenticates the header and length.
        let header = try FileHeader(decoding: try store.read(count: ChunkLayout.headerSize, at: 0))
        let again = try OpenFile(store: store, writable: false, header: header, cipher: cipher, onIntegrityFailure: { _, _ in })
        #expect(try Self.readAll(again, size: model.count) == model)
    }

    @Test("a full disk: a growing write fails with ENOSPC and the file keeps its old length and bytes (the chunk the old end falls in sealed again); an overwrite within the file still succeeds")
    func fullDiskKeepsTheFile() throws {
        let store = MemoryStore()
        let (file, _, _) = try Self.create(in: store)
        let first = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        _ = try first.withUnsafeBytes { try file.write($0, at: 0) }
        try file.sealLength()
        store.capacity = store.contents.count + 1000  // room for less than the next write
        let more = [UInt8](repeating: 0xAB, count: 20_000)
        #expect(throws: Errno.noSpace) { _ = try more.withUnsafeBytes { try file.write($0, at: 6000) } }
        #expect(try Self.readAll(file, size: 10_000).count == 10_000)
        #expect(try Self.readAll(file, size: 10_000)[..<6000] == first[..<6000])
        // Bytes before the old end the failed write changed keep their new values, as after a short write.
        let tail = try Self.readAll(file, size: 10_000)[6000...]
        #expect(tail.allSatisfy { $0 == 0xAB } || Array(tail) == Array(first[6000...]), "the cut chunk reads as either version, never garbage")
        let patch = [UInt8](repeating: 0x11, count: 100)
        _ = try patch.withUnsafeBytes { try file.write($0, at: 50) }
        #expect(try Self.readAll(file, size: 10_000)[50..<150].allSatisfy { $0 == 0x11 })
    }

    @Test("a full disk under a large write (sealed and written piece by piece, in parallel): ENOSPC, the old length and bytes kept, and the file still writable")
    func fullDiskUnderALargeWrite() throws {
        let store = MemoryStore()
        let (file, _, _) = try Self.create(in: store)
        let first = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        _ = try first.withUnsafeBytes { try file.write($0, at: 0) }
        try file.sealLength()
        store.capacity = store.contents.count + 70_000  // room for part of the next write only
        let more = [UInt8](repeating: 0xCD, count: 1 << 20)
        #expect(throws: Errno.noSpace) { _ = try more.withUnsafeBytes { try file.write($0, at: 90_000) } }
        let back = try Self.readAll(file, size: 100_000)
        #expect(back.count == 100_000)
        #expect(back[..<90_000] == first[..<90_000])
        store.capacity = .max
        _ = try more.withUnsafeBytes { try file.write($0, at: 90_000) }
        let grown = try Self.readAll(file, size: 90_000 + (1 << 20))
        #expect(grown[..<90_000] == first[..<90_000])
        #expect(grown[90_000...].allSatisfy { $0 == 0xCD })
    }
}

/// Streaming appends handed to the write-behind thread, against the memory store.
@Suite(.serialized) struct WriteBehindUnitTests {
    static func piece(_ n: Int, _ seed: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ seed) } }

    @Test("64 KiB appends are handed over and read back at once, byte for byte, with reads and a small write between them; the length seal and a reopen see them all; reserved space goes back")
    func appendsHandedOver() throws {
        let store = MemoryStore()
        let (file, cipher, _) = try OpenFileTests.create(in: store)
        let before = WriteBehind.shared.handedOver.load(ordering: .relaxed)
        var model: [UInt8] = []
        for i in 0..<40 {
            let data = Self.piece(65536 + (i % 3 == 0 ? 4096 : 0), i)  // some end a chunk past 64 KiB
            #expect(try data.withUnsafeBytes { try file.write($0, at: model.count) } == data.count)
            model += data
            #expect(file.size == model.count)
            var got: [UInt8] = []
            let from = max(0, model.count - 70_000)
            try file.read(offset: from, count: 70_000) { got = Array($0) }
            #expect(got == Array(model[from...]), "append \(i)")
            if i == 20 {
                // Not an append at a chunk boundary: written in the request, after the ones in flight land.
                let patch = [UInt8](repeating: 0x5A, count: 100)
                _ = try patch.withUnsafeBytes { try file.write($0, at: 1000) }
                model.replaceSubrange(1000..<1100, with: patch)
            }
        }
        #expect(WriteBehind.shared.handedOver.load(ordering: .relaxed) - before >= 39)
        try file.sealLength()
        #expect(store.reservedTo <= store.contents.count, "space reserved ahead went back at the seal")
        let header = try FileHeader(decoding: try store.read(count: ChunkLayout.headerSize, at: 0))
        let again = try OpenFile(store: store, writable: false, header: header, cipher: cipher, onIntegrityFailure: { _, _ in })
        #expect(try OpenFileTests.readAll(again, size: model.count) == model)
    }

    @Test("a write that fails after its reply (an I/O error, its space reserved): the next use reports EIO once, the file is cut back to where that write began, and it stays usable")
    func failureAfterTheReply() throws {
        let store = MemoryStore()
        let (file, cipher, _) = try OpenFileTests.create(in: store)
        var model: [UInt8] = []
        for i in 0..<3 {
            let data = Self.piece(65536, i)
            _ = try data.withUnsafeBytes { try file.write($0, at: model.count) }
            model += data
        }
        try file.sealLength()
        store.lock.withLock { store.failWrites = true }
        let lost = Self.piece(65536, 9)
        // Accepted: its space is reserved, the failure comes later.
        #expect(try lost.withUnsafeBytes { try file.write($0, at: model.count) } == lost.count)
        #expect(throws: Errno.ioError) { try file.sealLength() }
        store.lock.withLock { store.failWrites = false }
        #expect(file.size == model.count)
        #expect(try OpenFileTests.readAll(file, size: model.count) == model)
        try file.sealLength()  // reported once
        let more = Self.piece(65536, 11)
        _ = try more.withUnsafeBytes { try file.write($0, at: model.count) }
        model += more
        try file.sealLength()
        let header = try FileHeader(decoding: try store.read(count: ChunkLayout.headerSize, at: 0))
        let again = try OpenFile(store: store, writable: false, header: header, cipher: cipher, onIntegrityFailure: { _, _ in })
        #expect(try OpenFileTests.readAll(again, size: model.count) == model)
    }

    @Test("a full disk under 64 KiB appends: ENOSPC from the write that does not fit, every accepted byte kept")
    func fullDisk() throws {
        let store = MemoryStore()
        let (file, _, _) = try OpenFileTests.create(in: store)
        store.capacity = store.contents.count + 1_000_000
        var model: [UInt8] = []
        var refused = false
        for i in 0..<40 {
            let data = Self.piece(65536, i)
            do {
                _ = try data.withUnsafeBytes { try file.write($0, at: model.count) }
                model += data
            } catch let error as Errno {
                #expect(error == .noSpace)
                refused = true
                break
            }
        }
        #expect(refused)
        #expect(model.count >= 900_000)
        try file.sealLength()
        #expect(try OpenFileTests.readAll(file, size: model.count) == model)
    }
}

/// A small seeded generator, so a failing sequence can be replayed.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }
}
