import ChunkCipher
import FUSEBridge
import KeyManager
import Logging
import CLinux
import SystemPackage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Extended attributes: `user.*` names and values sealed under the volume keys.
extension EncryptedFileSystem {
    static let xattrPrefix = "user.kmsfs."

    /// Attributes whose encrypted name would pass the backing filesystem's
    /// 255 bytes (a plaintext name of more than ~170 bytes) are stored as
    /// this prefix and a hash of the encrypted name; the encrypted name
    /// itself leads the stored value (2-byte length, then the name), so
    /// listxattr can still return it. Never a prefix of "user.kmsfs." and
    /// base64url, which has no '.'.
    static let xattrHashedPrefix = "user.kmsfs.H."

    /// The backing name of attribute `name`, and for a hashed one the encrypted name its value must lead with.
    func backingXattrName(_ name: FileName, _ context: RequestContext) throws(Errno) -> (name: FileName, leading: [UInt8]?) {
        guard name.hasPrefix("user.") else { throw .notSupported }
        guard name.count <= 255 else { throw .outOfRange }
        if plaintextNames { return (name, nil) }
        let volume = try volumeKeys(context)
        let encoded: String
        do throws(CipherError) { encoded = try volume.xattrNames.encrypt(name.bytes) } catch { throw .invalidArgument }
        guard Self.xattrPrefix.utf8.count + encoded.utf8.count > 255 else { return (FileName(Self.xattrPrefix + encoded), nil) }
        let hashed = FileName(Self.xattrHashedPrefix + Base64URL.encode(KeyDerivation.sha256(Array(encoded.utf8))))
        return (hashed, [UInt8(encoded.utf8.count >> 8), UInt8(encoded.utf8.count & 0xFF)] + Array(encoded.utf8))
    }

    /// The raw value of backing attribute `backing`.
    func backingXattr(_ node: Node, _ backing: FileName) throws(Errno) -> [UInt8] {
        let path = try node.procPath
        let size = try Syscall.call { backing.withCString { CLinux.getxattr(path, $0, nil, 0) } }
        var raw = [UInt8](repeating: 0, count: size)
        let n = try Syscall.call { backing.withCString { CLinux.getxattr(path, $0, &raw, raw.count) } }
        raw.removeLast(raw.count - n)
        return raw
    }

    /// A hashed attribute's stored value split into its encrypted name and the sealed value.
    static func splitHashedXattr(_ raw: [UInt8]) -> (encoded: String, sealed: [UInt8])? {
        guard raw.count >= 2 else { return nil }
        let count = Int(raw[0]) << 8 | Int(raw[1])
        guard raw.count >= 2 + count else { return nil }
        return (String(decoding: raw[2..<(2 + count)], as: UTF8.self), Array(raw[(2 + count)...]))
    }

    /// The sealer of `node`'s extended-attribute values and the object id
    /// they are bound to: derived from the object's own key — a file's data
    /// key, a directory's name key — so the policy and state of the key that
    /// governs the object govern its attributes too (decrypt to read or
    /// list; encrypt as well to change). Only files and directories carry
    /// `user.` attributes, as on ext4.
    func xattrSealer(_ node: Node, modifying: Bool, _ context: RequestContext) throws(Errno) -> (sealer: StringSealer, object: ID128) {
        let who = principal(context)
        if node.isDirectory {
            let dir = try directoryKeys(node, context)
            if modifying { try checkDirectoryKey(node, .encrypt, context) }
            return (dir.xattrValues, dir.directoryID)
        }
        guard node.isRegular else { throw .notPermitted }
        let fd = try Syscall.open(AT_FDCWD, try node.procPath, O_RDONLY)
        let raw = try Syscall.pread(fd.raw, count: ChunkLayout.headerSize, at: 0)
        let header: FileHeader
        do throws(CipherError) { header = try FileHeader(decoding: raw) } catch {
            integrityFailure(error, object: nil, what: "file header", path: nodes.filePath(of: node), principal: who)
            throw .ioError
        }
        let object = header.fileID.rawValue
        let path = nodes.filePath(of: node)
        let dek = try keys { () throws(KeyManagerError) in
            try keyManager.decryptDataKey(header.wrappedKey, for: object, key: header.keyID, version: header.keyVersion, principal: who, path: path)
        }
        if modifying {
            try keys { () throws(KeyManagerError) in try keyManager.checkUse(who, .encrypt, key: header.keyID, object: object) { path } }
        }
        do throws(CipherError) { return (try StringSealer(key: dek, info: "kmsfs/v1/file-xattr-value"), object) } catch { throw .ioError }
    }

    /// What an attribute value is bound to: its object and its name.
    static func xattrContext(_ object: ID128, _ name: FileName) -> [UInt8] { object.bytes + name.bytes }

    public func setxattr(_ id: NodeID, _ name: FileName, value: UnsafeRawBufferPointer, flags: Int32, _ context: RequestContext) throws(Errno) {
        let node = try nodes.node(id)
        let (backing, leading) = try backingXattrName(name, context)
        var sealed = Array(value)
        if !plaintextNames {
            let (sealer, object) = try xattrSealer(node, modifying: true, context)
            do throws(CipherError) { sealed = try sealer.seal(sealed, context: Self.xattrContext(object, name)) } catch { throw .ioError }
        }
        if let leading { sealed = leading + sealed }
        let path = try node.procPath
        try Syscall.call { backing.withCString { CLinux.setxattr(path, $0, sealed, sealed.count, flags) } }
    }

    /// Only the `user.` namespace is kept (encrypted). Other namespaces are
    /// not supported, and say so (EOPNOTSUPP, as for setxattr) rather than
    /// "no such attribute": tools then stop asking — `ls -l` remembers per
    /// filesystem that there are no ACLs or security labels, instead of two
    /// requests per file — and the kernel's check for file capabilities on
    /// every write gets its answer at once.
    public func getxattr(_ id: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) -> [UInt8] {
        let node = try nodes.node(id)
        guard name.hasPrefix("user.") else { throw .notSupported }
        let (backing, leading) = try backingXattrName(name, context)
        var raw = try backingXattr(node, backing)
        if plaintextNames { return raw }
        if let leading {
            guard raw.starts(with: leading) else {
                integrityFailure(.integrityFailure(.name), object: nil, what: "extended attribute name", path: nodes.filePath(of: node), principal: principal(context))
                throw .ioError
            }
            raw.removeFirst(leading.count)
        }
        let (sealer, object) = try xattrSealer(node, modifying: false, context)
        if let value = try? sealer.open(raw, context: Self.xattrContext(object, name)) { return value }
        // A value written before values were sealed per object (policy was checked above).
        let volume = try volumeKeys(context)
        do throws(CipherError) { return try volume.xattrValues.open(raw, context: Array(name.bytes)) } catch {
            integrityFailure(error, object: nil, what: "extended attribute", path: nodes.filePath(of: node), principal: principal(context))
            throw .ioError
        }
    }

    public func listxattr(_ id: NodeID, _ context: RequestContext) throws(Errno) -> [FileName] {
        let node = try nodes.node(id)
        guard !node.isSymlink else { return [] }
        let path = try node.procPath
        let size = try Syscall.call { CLinux.listxattr(path, nil, 0) }
        var raw = [CChar](repeating: 0, count: size)
        let n = try Syscall.call { CLinux.listxattr(path, &raw, raw.count) }
        let names = raw[0..<n].split(separator: 0).map { FileName(bytes: $0.map { UInt8(bitPattern: $0) }) }
        if plaintextNames { return names.filter { $0.hasPrefix("user.") } }
        guard names.contains(where: { $0.hasPrefix(Self.xattrPrefix) }) else { return [] }
        _ = try xattrSealer(node, modifying: false, context)
        let volume = try volumeKeys(context)
        return names.compactMap { backing in
            let encoded: String
            if backing.hasPrefix(Self.xattrHashedPrefix) {
                guard let raw = try? backingXattr(node, backing), let split = Self.splitHashedXattr(raw),
                      FileName(Self.xattrHashedPrefix + Base64URL.encode(KeyDerivation.sha256(Array(split.encoded.utf8)))) == backing else { return nil }
                encoded = split.encoded
            } else if backing.hasPrefix(Self.xattrPrefix) {
                encoded = String(decoding: backing.bytes.dropFirst(Self.xattrPrefix.utf8.count), as: UTF8.self)
            } else {
                return nil
            }
            return (try? volume.xattrNames.decrypt(encoded)).map { FileName(bytes: $0) }
        }
    }

    public func removexattr(_ id: NodeID, _ name: FileName, _ context: RequestContext) throws(Errno) {
        let node = try nodes.node(id)
        guard name.hasPrefix("user.") else { throw .notSupported }
        let backing = try backingXattrName(name, context).name
        if !plaintextNames { _ = try xattrSealer(node, modifying: true, context) }
        let path = try node.procPath
        try Syscall.call { backing.withCString { CLinux.removexattr(path, $0) } }
    }
}
