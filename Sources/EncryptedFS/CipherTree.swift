import ChunkCipher
import FUSEBridge
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The backing tree as the walks over it (fsck, re-keying, crash recovery,
/// counting for progress) see it: one place decides what a name in a
/// backing directory is, so no walk filters kmsfs's own names its own way.
enum CipherTree {
    /// What a name in a backing directory is.
    enum Kind: Equatable {
        /// A user's file, directory, symlink or device record: an encrypted
        /// name, a hashed long name (`.kmsfs.L.…`), or a plaintext name.
        case entry
        /// The directory's keys, `.kmsfs.dir`.
        case directoryKeys
        /// kmsfs's own: the keystore directory at the root, long names'
        /// sidecars, the device-node marker, an rmdir's set-aside keys,
        /// temporary files. Users' names never start with `.kmsfs` (encrypted
        /// names are base64url; plaintext ones starting so are refused).
        case own
    }

    static func kind(of name: FileName) -> Kind {
        if name == DirectoryKeys.fileName { return .directoryKeys }
        guard name.hasPrefix(NameMapping.reservedPrefix) else { return .entry }
        return name.isHashedLongName ? .entry : .own
    }

    /// One name in a backing directory, with its d_type.
    struct Listed {
        var name: FileName
        var type: UInt8
        var kind: Kind
    }

    /// The names in backing directory `dirFD`, sorted by name (a walk in a
    /// fixed order: a resumed rekey pass and a second fsck see the same
    /// sequence), kmsfs's own names left out.
    static func list(_ dirFD: Int32) throws(Errno) -> [Listed] {
        try Syscall.listDirectory(dirFD)
            .map { Listed(name: $0.name, type: $0.type, kind: kind(of: $0.name)) }
            .filter { $0.kind != .own }
            .sorted { $0.name < $1.name }
    }
}
