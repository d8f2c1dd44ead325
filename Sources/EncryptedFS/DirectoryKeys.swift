import ChunkCipher
import FUSEBridge
import KeyManager
import Logging
import CLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The keys of one directory, kept in `.kmsfs.dir` inside its backing
/// directory: a format-v1 header whose object id is the directory id and
/// whose wrapped key is the directory's name key (sealed length 0).
final class DirectoryKeys: Sendable {
    static let fileName: FileName = ".kmsfs.dir"

    let directoryID: ID128
    let keyID: KeyID
    let version: KeyVersion
    let names: NameCipher
    /// Seals the directory's own extended-attribute values (its key's policy governs them).
    let xattrValues: StringSealer
    /// Derived from the root directory's name key only: symlink targets and
    /// extended attributes, which must not depend on where an entry lives.
    let volume: VolumeKeys?

    init(directoryID: ID128, keyID: KeyID, version: KeyVersion, nameKey: borrowing SecretKey, isRoot: Bool) throws(Errno) {
        self.directoryID = directoryID
        self.keyID = keyID
        self.version = version
        do throws(CipherError) {
            self.names = try NameCipher(nameKey: nameKey, directoryID: directoryID)
            self.xattrValues = try StringSealer(key: nameKey, info: "kmsfs/v1/directory-xattr-value")
            self.volume = isRoot ? try VolumeKeys(rootNameKey: nameKey) : nil
        } catch { throw .ioError }
    }

    /// Makes `.kmsfs.dir` for a new directory under `key`.
    static func create(in dirFD: Int32, key: KeyID, keyManager: KeyManager, principal: Principal,
                       layout: ChunkLayout, isRoot: Bool) throws(Errno) -> DirectoryKeys {
        let directoryID = ID128.random()
        let dataKey: DataKey
        do throws(KeyManagerError) {
            dataKey = try keyManager.generateDataKey(for: directoryID, kind: .directory, key: key, principal: principal)
        } catch { throw Errno(error) }
        var header = FileHeader(chunkSizeLog2: layout.chunkSizeLog2, fileID: FileID(rawValue: directoryID),
                                keyID: dataKey.keyID, keyVersion: dataKey.version, wrappedKey: dataKey.wrapped)
        let bytes: [UInt8]
        do throws(CipherError) {
            let cipher = try FileCipher(key: dataKey.key, fileID: FileID(rawValue: directoryID), layout: layout)
            try cipher.seal(header: &header, plaintextSize: 0)
            bytes = try header.encoded()
        } catch { throw .ioError }
        let fd = try Syscall.open(dirFD, fileName, O_WRONLY | O_CREAT | O_EXCL, 0o400)
        try Syscall.pwrite(fd.raw, bytes, at: 0)
        return try DirectoryKeys(directoryID: directoryID, keyID: dataKey.keyID, version: dataKey.version,
                                 nameKey: dataKey.key, isRoot: isRoot)
    }

    /// Reads and authenticates `.kmsfs.dir`, unwrapping the name key for `principal`.
    static func load(from dirFD: Int32, keyManager: KeyManager, principal: Principal, layout: ChunkLayout,
                     isRoot: Bool, logger: Logger) throws(Errno) -> DirectoryKeys {
        let fd = try Syscall.open(dirFD, fileName, O_RDONLY)
        let raw = try Syscall.pread(fd.raw, count: ChunkLayout.headerSize, at: 0)
        let header: FileHeader
        do throws(CipherError) { header = try FileHeader(decoding: raw) } catch {
            logger.error("directory header is damaged", metadata: ["error": "\(error)"])
            throw .ioError
        }
        let object = header.fileID.rawValue
        let nameKey: SecretKey
        do throws(KeyManagerError) {
            nameKey = try keyManager.decryptDataKey(header.wrappedKey, for: object, key: header.keyID,
                                                    version: header.keyVersion, principal: principal)
        } catch { throw Errno(error) }
        do throws(CipherError) {
            let cipher = try FileCipher(key: nameKey, fileID: header.fileID, layout: layout)
            _ = try cipher.verify(header: header)
        } catch {
            keyManager.audit(AuditEvent(.integrityFailure, outcome: .failure, key: header.keyID, version: header.keyVersion,
                                        principal: principal, object: object, error: "directory header: \(error)"))
            throw .ioError
        }
        return try DirectoryKeys(directoryID: object, keyID: header.keyID, version: header.keyVersion, nameKey: nameKey, isRoot: isRoot)
    }
}

/// Keys derived from the root directory's name key for what must not depend
/// on an entry's location (a symlink or a file can move between directories):
/// symlink targets, extended-attribute names and device-node records. Extended-attribute values
/// written by earlier builds were sealed here too and still open; new ones
/// are sealed under their object's own key. Who may use them is decided by
/// the governing key's policy, not by the root's (EncryptedFileSystem).
final class VolumeKeys: Sendable {
    let symlinks: StringSealer
    let xattrValues: StringSealer
    let xattrNames: NameCipher
    /// Seals the records of block and character device nodes (`DeviceNode`).
    let deviceNodes: StringSealer

    init(rootNameKey: borrowing SecretKey) throws(CipherError) {
        symlinks = try StringSealer(key: rootNameKey, info: "kmsfs/v1/symlink-target")
        deviceNodes = try StringSealer(key: rootNameKey, info: "kmsfs/v1/device-node")
        xattrValues = try StringSealer(key: rootNameKey, info: "kmsfs/v1/xattr-value")
        let nameKey = try KeyDerivation.hkdfSHA256(key: rootNameKey, info: "kmsfs/v1/xattr-name", count: 32)
        xattrNames = try NameCipher(nameKey: nameKey, directoryID: ID128(high: 0, low: 0))
    }
}
