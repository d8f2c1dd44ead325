import ChunkCipher
import Foundation
import CLinux
import FUSEBridge
import KeyManager
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// One damaged thing `kmsfs fsck` found.
public struct FsckProblem: Codable, Sendable {
    /// The plaintext path, as far as names could be decrypted.
    public var path: String
    /// The entry under CIPHERDIR.
    public var backing: String
    public var object: String?
    /// header, chunk, truncated, key, name, directory, symlink, device.
    public var kind: String
    public var detail: String
    /// Where `--repair` moved it, relative to CIPHERDIR.
    public var quarantined: String?
}

/// A file or directory that is intact as far as fsck can tell but cannot be
/// read now because its key is in a state that refuses it (Disabled,
/// PendingDeletion): a state, not damage — never quarantined, and kept in
/// the usage index so the deletion guard still sees it.
public struct FsckLocked: Codable, Sendable {
    public var path: String
    public var backing: String
    public var object: String?
    public var detail: String
}

public struct FsckReport: Codable, Sendable {
    public var files = 0
    public var directories = 0
    /// Block and character devices (their records authenticated).
    public var deviceNodes = 0
    public var bytes = 0
    public var problems: [FsckProblem] = []
    public var locked: [FsckLocked] = []
    public var usage: UsageRebuild?
    public var clean: Bool { problems.isEmpty }
}

/// `kmsfs fsck`: repairs what an interrupted rekey left, then authenticates
/// every directory's keys, every name, every symlink target, and every
/// header, length and chunk of every file; rebuilds the usage index from the
/// headers; and with `repair`, moves each damaged entry to
/// `.kmsfs/quarantine/` so the rest mounts and reads cleanly. Offline only.
public final class FilesystemCheck {
    let fs: EncryptedFileSystem
    let principal: Principal
    let repair: Bool
    let logger = Logger(label: "kmsfs.fsck")
    static let quarantineDirectory = ".kmsfs/quarantine"
    private var report = FsckReport()
    private var usage: [(object: ID128, kind: ObjectKind, key: KeyID, version: KeyVersion)] = []
    private var seen = Set<InodeKey>()
    /// Out-of-line symlink targets some symlink refers to.
    private var referencedTargets = Set<ID128>()
    /// Called after each file with the files and bytes checked so far and the totals a quick count found first.
    public var progress: ((_ files: Int, _ totalFiles: Int, _ bytes: Int) -> Void)?
    private var totalFiles = 0

    public init(filesystem: EncryptedFileSystem, principal: Principal, repair: Bool) {
        self.fs = filesystem
        self.principal = principal
        self.repair = repair
    }

    public func run() throws(KeyManagerError) -> FsckReport {
        for failure in try Rekeyer(filesystem: fs).recover() {
            report.problems.append(FsckProblem(path: "?", backing: failure.path, object: failure.object.hex, kind: "rekey",
                                               detail: failure.description, quarantined: nil))
        }
        if progress != nil { totalFiles = Self.countFiles(fs.nodes.rootFD) }
        checkDirectory(fs.nodes.rootFD, backing: "", plain: "/", parentFD: nil, stored: nil, volume: nil)
        checkLongTargets()
        // Quarantined entries still exist and still need their keys.
        if let quarantined = try? Syscall.open(fs.nodes.rootFD, Self.quarantineDirectory, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) {
            collectUsage(quarantined.raw)
        }
        report.usage = try fs.keyManager.replaceUsageIndex(usage)
        return report
    }

    /// Regular files in the tree below backing directory `dirFD` (a count
    /// for the progress bar; no file is opened), by the walk's own rules.
    static func countFiles(_ dirFD: Int32) -> Int {
        var count = 0
        for entry in (try? CipherTree.list(dirFD)) ?? [] where entry.kind == .entry {
            if entry.type == UInt8(DT_DIR) {
                guard let child = try? Syscall.open(dirFD, entry.name, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) else { continue }
                count += countFiles(child.raw)
            } else if entry.type == UInt8(DT_REG) {
                count += 1
            }
        }
        return count
    }

    private func problem(_ plain: String, _ backing: String, _ object: ID128?, _ kind: String, _ detail: String,
                         parentFD: Int32?, stored: FileName?) {
        var p = FsckProblem(path: plain, backing: backing, object: object?.hex, kind: kind, detail: detail)
        if repair, let parentFD, let stored { p.quarantined = quarantine(parentFD, stored, object) }
        logger.warning("fsck found damage", metadata: ["path": .string(plain), "kind": .string(kind)])
        report.problems.append(p)
    }

    /// Moves `stored` (and a long name's sidecar) out of the tree.
    private func quarantine(_ parentFD: Int32, _ stored: FileName, _ object: ID128?) -> String? {
        mkdir(fs.cipherdir + "/" + Self.quarantineDirectory, 0o700)
        let name = (object?.hex ?? ID128.random().hex) + "-" + String(stored.description.prefix(64))
        guard stored.withCString({ renameat(parentFD, $0, AT_FDCWD, fs.cipherdir + "/" + Self.quarantineDirectory + "/" + name) }) == 0 else { return nil }
        if stored.isHashedLongName { Syscall.unlinkQuietly(parentFD, stored.appending(LongName.sidecarSuffix)) }
        return Self.quarantineDirectory + "/" + name
    }

    /// Out-of-line symlink targets no symlink refers to (left by a crash
    /// between writing one and making its symlink, or between removing the
    /// last link and the target): reported, and quarantined with `repair`.
    /// Only when the whole tree was read: a symlink in a directory fsck
    /// could not open may still refer to one.
    private func checkLongTargets() {
        guard !fs.plaintextNames, report.problems.isEmpty,
              let dir = try? Syscall.open(fs.nodes.rootFD, LongSymlinkTarget.directory, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) else { return }
        for entry in (try? Syscall.listDirectory(dir.raw)) ?? [] {
            guard let id = ID128(hex: entry.name.description), !referencedTargets.contains(id) else { continue }
            var p = FsckProblem(path: "?", backing: LongSymlinkTarget.path(id), object: nil, kind: "symlink",
                                detail: "an out-of-line symlink target no symlink refers to")
            if repair { p.quarantined = quarantine(dir.raw, entry.name, nil) }
            report.problems.append(p)
        }
    }

    /// Why `key`'s state refuses to unwrap data keys (Disabled,
    /// PendingDeletion, Destroyed), or nil: a state, not damage.
    func lockedState(_ key: KeyID) -> String? {
        guard let refusal = fs.keyManager.unwrapRefusal(key) else { return nil }
        return refusal
    }

    /// The usage of every header below `dirFD`, without authenticating names,
    /// keys or chunks: for what fsck cannot read (a name that does not
    /// decrypt, a directory whose keys do not open, the quarantine), so the
    /// keys those files need stay referenced and are never destroyed.
    private func collectUsage(_ dirFD: Int32) {
        for entry in (try? CipherTree.list(dirFD)) ?? [] where entry.kind == .entry { collectUsage(of: entry, in: dirFD) }
    }

    /// The usage of one entry of `dirFD`: a directory's keys and everything below it, or a file's header.
    private func collectUsage(of entry: CipherTree.Listed, in dirFD: Int32) {
        switch entry.type {
        case UInt8(DT_DIR):
            guard let child = try? Syscall.open(dirFD, entry.name, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) else { return }
            if let keys = try? Syscall.open(child.raw, DirectoryKeys.fileName, O_RDONLY | O_NOFOLLOW),
               let h = EncryptedFileSystem.header(of: keys.raw) {
                usage.append((h.fileID.rawValue, .directory, h.keyID, h.keyVersion))
            }
            collectUsage(child.raw)
        case UInt8(DT_REG):
            guard let fd = try? Syscall.open(dirFD, entry.name, O_RDONLY | O_NOFOLLOW),
                  let st = try? Syscall.fstat(fd.raw), seen.insert(InodeKey(st)).inserted,
                  let h = EncryptedFileSystem.header(of: fd.raw) else { return }
            usage.append((h.fileID.rawValue, .file, h.keyID, h.keyVersion))
        default:
            return
        }
    }

    private func checkDirectory(_ dirFD: Int32, backing: String, plain: String, parentFD: Int32?, stored: FileName?, volume: VolumeKeys?) {
        report.directories += 1
        let keys: DirectoryKeys?
        if fs.plaintextNames {
            keys = nil
        } else {
            var directoryKey: KeyID?
            if let fd = try? Syscall.open(dirFD, DirectoryKeys.fileName, O_RDONLY), let h = EncryptedFileSystem.header(of: fd.raw) {
                usage.append((h.fileID.rawValue, .directory, h.keyID, h.keyVersion))
                directoryKey = h.keyID
            }
            do throws(Errno) {
                keys = try DirectoryKeys.load(from: dirFD, keyManager: fs.keyManager, principal: principal, layout: fs.layout,
                                              isRoot: parentFD == nil, logger: logger)
            } catch {
                if let key = directoryKey, let state = lockedState(key) {
                    report.locked.append(FsckLocked(path: plain, backing: backing, object: nil, detail: "unreadable while \(state)"))
                } else {
                    problem(plain, backing, nil, "directory", "its keys (.kmsfs.dir) do not open: \(error)", parentFD: parentFD, stored: stored)
                }
                collectUsage(dirFD)
                return
            }
        }
        let volume = volume ?? keys?.volume
        guard let entries = try? CipherTree.list(dirFD) else { return }
        for entry in entries where entry.kind == .entry {
            let name = entry.name
            let backingPath = backing.isEmpty ? name.description : backing + "/" + name.description
            let decoded = fs.names.decode(name, inDirectory: dirFD, keys: keys)
            if case .internalEntry = decoded { continue }
            guard case .name(let plainName) = decoded else {
                // Its usage first: quarantined or not, the entry still exists and needs its keys.
                collectUsage(of: entry, in: dirFD)
                problem((plain == "/" ? "" : plain) + "/?", backingPath, nil, "name", "the name does not decrypt under its directory's key", parentFD: dirFD, stored: name)
                continue
            }
            let plainPath = (plain == "/" ? "/" : plain + "/") + plainName.description
            switch entry.type {
            case UInt8(DT_DIR):
                guard let child = try? Syscall.open(dirFD, name, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) else { continue }
                checkDirectory(child.raw, backing: backingPath, plain: plainPath, parentFD: dirFD, stored: name, volume: volume)
            case UInt8(DT_LNK):
                guard !fs.plaintextNames, let volume, let target = try? Syscall.readlinkat(dirFD, name) else { continue }
                do throws(CipherError) {
                    if let id = LongSymlinkTarget.reference(in: target) {
                        referencedTargets.insert(id)
                        guard let text = try? fs.longTargetText(id) else { throw CipherError.malformed("its out-of-line target \(id.hex) is missing") }
                        _ = try volume.symlinks.openEncoded(text, context: LongSymlinkTarget.context(id))
                    } else {
                        _ = try volume.symlinks.openEncoded(String(decoding: target, as: UTF8.self))
                    }
                } catch {
                    problem(plainPath, backingPath, nil, "symlink", "the target does not authenticate: \(error)", parentFD: dirFD, stored: name)
                }
            case UInt8(DT_REG):
                checkFile(dirFD, name, backing: backingPath, plain: plainPath, volume: volume)
            default:
                continue
            }
        }
    }

    private func checkFile(_ dirFD: Int32, _ stored: FileName, backing: String, plain: String, volume: VolumeKeys?) {
        guard let fd = try? Syscall.open(dirFD, stored, O_RDONLY | O_NOFOLLOW) else { return }
        guard let st = try? Syscall.fstat(fd.raw), seen.insert(InodeKey(st)).inserted else { return }
        if DeviceNode.mayBeRecord(st), let raw = try? Syscall.pread(fd.raw, count: ChunkLayout.headerSize, at: 0), raw.starts(with: DeviceNode.magic) {
            report.deviceNodes += 1
            guard let volume else { return }
            do throws(CipherError) {
                guard try DeviceNode.open(raw, with: volume.deviceNodes) != nil else { throw .malformed("a device-node record of \(raw.count) bytes") }
            } catch {
                problem(plain, backing, nil, "device", "the device-node record does not authenticate: \(error)", parentFD: dirFD, stored: stored)
            }
            return
        }
        report.files += 1
        defer { progress?(report.files, max(totalFiles, report.files), report.bytes) }
        guard let header = EncryptedFileSystem.header(of: fd.raw) else {
            problem(plain, backing, nil, "header", "the header does not parse", parentFD: dirFD, stored: stored)
            return
        }
        let object = header.fileID.rawValue
        usage.append((object, .file, header.keyID, header.keyVersion))
        let cipher: FileCipher
        do {
            let dek = try fs.keyManager.decryptDataKey(header.wrappedKey, for: object, key: header.keyID, version: header.keyVersion,
                                                       principal: principal)
            cipher = try FileCipher(key: dek, fileID: header.fileID, layout: fs.layout)
        } catch {
            if let state = lockedState(header.keyID) {
                report.locked.append(FsckLocked(path: plain, backing: backing, object: object.hex, detail: "unreadable while \(state)"))
            } else {
                problem(plain, backing, object, "key", "its data key does not unwrap: \(error)", parentFD: dirFD, stored: stored)
            }
            return
        }
        let size: Int
        do throws(CipherError) {
            let sealed = try cipher.verify(header: header)
            size = try cipher.checkLength(ciphertextSize: Int(st.st_size), sealedLength: sealed)
        } catch {
            let kind: String
            if case .truncated = error { kind = "truncated" } else { kind = "header" }
            problem(plain, backing, object, kind, "\(error)", parentFD: dirFD, stored: stored)
            return
        }
        report.bytes += size
        // Every chunk, a megabyte at a time.
        let layout = fs.layout
        let step = max(layout.chunkSize, 1 << 20)
        let sealedStep = ChunkPipeline.ciphertextBytes(layout, plaintextSize: step)
        let sealed = UnsafeMutableRawBufferPointer.allocate(byteCount: sealedStep, alignment: 16)
        let plainBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: step, alignment: 16)
        defer {
            sealed.deallocate()
            plainBuffer.deallocate()
        }
        var offset = 0
        while offset < size {
            let n = min(step, size - offset)
            let first = ChunkIndex(offset / layout.chunkSize)
            let count = ChunkPipeline.ciphertextBytes(layout, plaintextSize: n)
            do throws(CipherError) {
                let got = (try? Syscall.pread(fd.raw, UnsafeMutableRawBufferPointer(rebasing: sealed[0..<count]), at: layout.ciphertextOffset(of: first))) ?? 0
                guard got == count else { throw .truncated(expectedPlaintextSize: size, actualPlaintextSize: offset) }
                try ChunkPipeline.open(cipher, first: first, sealed: UnsafeRawBufferPointer(rebasing: sealed[0..<count]),
                                       into: UnsafeMutableRawBufferPointer(rebasing: plainBuffer[0..<n]))
            } catch {
                let kind: String
                if case .integrityFailure(.chunk) = error { kind = "chunk" } else { kind = "truncated" }
                problem(plain, backing, object, kind, "\(error)", parentFD: dirFD, stored: stored)
                return
            }
            offset += n
        }
    }
}
