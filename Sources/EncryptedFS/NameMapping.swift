import ChunkCipher
import FUSEBridge
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// How plaintext names map to the names stored in CIPHERDIR, and back:
/// each name encrypted under its directory's name key (AES-SIV, base64url),
/// a name too long to store kept as a hash with the full encoded name in a
/// sidecar file, and names beginning with `.kmsfs` reserved for kmsfs's own
/// entries. With `--plaintext-names` names are stored as given (the prefix
/// still reserved). No policy here: callers pass the directory keys they
/// were allowed to load. The filesystem, fsck and rekey all read names through this.
struct NameMapping: Sendable {
    /// Names in CIPHERDIR beginning with this belong to kmsfs, never to the user.
    static let reservedPrefix = ".kmsfs"

    let plaintextNames: Bool

    /// What a backing entry's name is to the mount.
    enum Decoded {
        case name(FileName)
        /// kmsfs's own (`.kmsfs.dir`, a long name's sidecar, `.kmsfs`).
        case internalEntry
        /// A name that does not authenticate (or a long name whose sidecar is missing or does not match).
        case damaged
    }

    /// The stored name of plaintext `name` in a directory, through its name
    /// cache. `keys` loads the directory's name keys (checking the caller
    /// may use them); it runs only for a valid name with encrypted names, so
    /// an invalid name fails as invalid whoever asks.
    func stored(for name: FileName, cache: NameCache?, keys: () throws(Errno) -> DirectoryKeys) throws(Errno) -> FileName {
        guard !name.isEmpty, !name.isDotOrDotDot else { throw .invalidArgument }
        guard name.count <= 255 else { throw .fileNameTooLong }
        if plaintextNames {
            guard !name.hasPrefix(Self.reservedPrefix) else { throw .notPermitted }
            return name
        }
        let keys = try keys()
        if let known = cache?.stored(for: name) { return known }
        let stored: FileName
        do throws(CipherError) { stored = FileName(LongName.storedName(for: try keys.names.encrypt(name.bytes))) } catch { throw .invalidArgument }
        cache?.remember(name, stored: stored)
        return stored
    }

    /// For a hashed long name, writes the sidecar (in directory `dirFD`) holding the full encoded name.
    func writeSidecar(_ stored: FileName, plaintext name: FileName, keys: DirectoryKeys?, inDirectory dirFD: Int32) throws(Errno) {
        guard !plaintextNames, stored.isHashedLongName, let keys else { return }
        let encoded: String
        do throws(CipherError) { encoded = try keys.names.encrypt(name.bytes) } catch { throw .ioError }
        let fd = try Syscall.open(dirFD, stored.appending(LongName.sidecarSuffix), O_WRONLY | O_CREAT | O_TRUNC, 0o400)
        try Syscall.pwrite(fd.raw, Array(encoded.utf8), at: 0)
    }

    func removeSidecar(_ stored: FileName, inDirectory dirFD: Int32) {
        guard stored.isHashedLongName else { return }
        Syscall.unlinkQuietly(dirFD, stored.appending(LongName.sidecarSuffix))
    }

    /// The plaintext of stored name `stored` in directory `dirFD` (whose name keys are `keys`).
    func decode(_ stored: FileName, inDirectory dirFD: Int32, keys: DirectoryKeys?) -> Decoded {
        if stored.hasPrefix(Self.reservedPrefix) {
            guard stored.isHashedLongName else { return .internalEntry }
            guard let keys else { return plaintextNames ? .internalEntry : .damaged }
            guard let fd = try? Syscall.open(dirFD, stored.appending(LongName.sidecarSuffix), O_RDONLY) else { return .damaged }
            let encoded = String(decoding: (try? Syscall.pread(fd.raw, count: 4096, at: 0)) ?? [], as: UTF8.self)
            guard LongName.storedName(for: encoded) == stored.description, let name = try? keys.names.decrypt(encoded) else { return .damaged }
            return .name(FileName(bytes: name))
        }
        if plaintextNames { return .name(stored) }
        // Encrypted names are base64url: one that is not even ASCII is damage.
        guard let keys, let encoded = stored.text else { return .damaged }
        do throws(CipherError) { return .name(FileName(bytes: try keys.names.decrypt(encoded))) } catch { return .damaged }
    }

    /// `decode`, answered from the directory's name cache when seen before.
    func listed(_ stored: FileName, inDirectory dirFD: Int32, keys: DirectoryKeys?, cache: NameCache?) -> Decoded {
        guard !plaintextNames, keys != nil, let cache else { return decode(stored, inDirectory: dirFD, keys: keys) }
        if let known = cache.plaintext(for: stored) { return .name(known) }
        let decoded = decode(stored, inDirectory: dirFD, keys: keys)
        if case .name(let name) = decoded { cache.remember(name, stored: stored) }
        return decoded
    }
}
