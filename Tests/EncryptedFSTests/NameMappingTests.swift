import Foundation
import Testing
import ChunkCipher
import FUSEBridge
import SystemPackage
@testable import EncryptedFS

/// Stored names without a filesystem: encryption both ways, long names and
/// their sidecars, kmsfs's reserved names, damage.
final class NameMappingTests {
    let directory: String
    let dirFD: Int32
    let keys: DirectoryKeys

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("kmsfs-names-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        dirFD = open(directory, O_RDONLY | O_DIRECTORY)
        keys = try DirectoryKeys(directoryID: .random(), keyID: .random(), version: KeyVersion(rawValue: 1), nameKey: .random(), isRoot: false)
    }

    /// The directory's keys, as the filesystem hands them over.
    func given() throws(Errno) -> DirectoryKeys { keys }

    /// Keys that must not be asked for: recorded as an issue if they are.
    static func neverLoaded() throws(Errno) -> DirectoryKeys {
        Issue.record("the directory's keys were loaded")
        throw .ioError
    }

    deinit {
        close(dirFD)
        try? FileManager.default.removeItem(atPath: directory)
    }

    @Test("encrypted names: stored names are not the plaintext, decode back, are cached both ways, and refuse what no directory holds")
    func encrypted() throws {
        let mapping = NameMapping(plaintextNames: false)
        let cache = NameCache()
        let name = FileName(bytes: Array("report \u{00e9}\u{0001}.txt".utf8) + [0xff])
        let stored = try mapping.stored(for: name, cache: cache, keys: given)
        #expect(stored != name && !stored.hasPrefix(NameMapping.reservedPrefix))
        guard case .name(let back) = mapping.decode(stored, inDirectory: dirFD, keys: keys) else { Issue.record("not decoded"); return }
        #expect(back == name)
        #expect(cache.stored(for: name) == stored && cache.plaintext(for: stored) == name)
        // An invalid name fails as invalid before any key is loaded (a caller the keys refuse gets EINVAL, not EACCES).
        #expect(throws: Errno.fileNameTooLong) { try mapping.stored(for: FileName(String(repeating: "a", count: 256)), cache: nil, keys: Self.neverLoaded) }
        #expect(throws: Errno.invalidArgument) { try mapping.stored(for: "..", cache: nil, keys: Self.neverLoaded) }
        // Keys that refuse the caller refuse even a name the cache knows.
        #expect(throws: Errno.permissionDenied) { try mapping.stored(for: name, cache: cache) { () throws(Errno) in throw .permissionDenied } }
        // A name that does not authenticate under these keys is damage, not a name.
        let other = try DirectoryKeys(directoryID: .random(), keyID: .random(), version: KeyVersion(rawValue: 1), nameKey: .random(), isRoot: false)
        guard case .damaged = mapping.decode(stored, inDirectory: dirFD, keys: other) else { Issue.record("foreign name accepted"); return }
        guard case .damaged = mapping.decode(FileName(bytes: [0xc3, 0x28]), inDirectory: dirFD, keys: keys) else { Issue.record("non-ASCII accepted"); return }
        guard case .internalEntry = mapping.decode(".kmsfs.dir", inDirectory: dirFD, keys: keys) else { Issue.record(".kmsfs.dir listed"); return }
    }

    @Test("a 255-byte name is stored hashed with a sidecar holding its encoded name; without the sidecar, or with another one, it is damage")
    func longNames() throws {
        let mapping = NameMapping(plaintextNames: false)
        let name = FileName(String(repeating: "n", count: 255))
        let stored = try mapping.stored(for: name, cache: nil, keys: given)
        #expect(stored.isHashedLongName && stored.count <= 255)
        guard case .damaged = mapping.decode(stored, inDirectory: dirFD, keys: keys) else { Issue.record("decoded without a sidecar"); return }
        try mapping.writeSidecar(stored, plaintext: name, keys: keys, inDirectory: dirFD)
        guard case .name(let back) = mapping.decode(stored, inDirectory: dirFD, keys: keys) else { Issue.record("sidecar not read"); return }
        #expect(back == name)
        guard case .internalEntry = mapping.decode(stored.appending(LongName.sidecarSuffix), inDirectory: dirFD, keys: keys) else {
            Issue.record("the sidecar itself is listed"); return
        }
        // Another long name's sidecar under this hash does not pass.
        let otherName = FileName(String(repeating: "m", count: 255))
        try mapping.writeSidecar(stored, plaintext: otherName, keys: keys, inDirectory: dirFD)
        guard case .damaged = mapping.decode(stored, inDirectory: dirFD, keys: keys) else { Issue.record("mismatched sidecar accepted"); return }
        mapping.removeSidecar(stored, inDirectory: dirFD)
        #expect(!FileManager.default.fileExists(atPath: directory + "/" + stored.appending(LongName.sidecarSuffix).description))
    }

    @Test("plaintext names: stored as given, but kmsfs's reserved prefix is refused")
    func plaintext() throws {
        let mapping = NameMapping(plaintextNames: true)
        #expect(try mapping.stored(for: "notes", cache: nil, keys: Self.neverLoaded) == "notes")
        #expect(throws: Errno.notPermitted) { try mapping.stored(for: ".kmsfs-mine", cache: nil, keys: Self.neverLoaded) }
        guard case .name(let same) = mapping.decode("notes", inDirectory: dirFD, keys: nil), same == "notes" else { Issue.record("not as given"); return }
    }
}
