import ChunkCipher
import CLinux
import Dispatch
import Foundation
import FUSEBridge
import KeyManager
import Logging
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Finding what a job moves: the walk of the cipher tree in a fixed order.
extension Rekeyer {
    /// Visits the files and directories under the job's path whose headers
    /// `selects` picks, in walk order, until `visit` returns false.
    func walk(_ job: RekeyJob, selects: (FileHeader) -> Bool, keepOpen: Bool = false,
              visit: (Candidate) -> Bool) throws(Errno) {
        let start = try startDirectory(job.path)
        let fd = try Syscall.open(fs.nodes.rootFD, start.isEmpty ? "." : start, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
        var seen = Set<InodeKey>()
        _ = walk(start.description, fd: fd.raw, seen: &seen, keepOpen: keepOpen, selects: selects, visit: visit)
    }

    /// Visits every backing file and `.kmsfs.dir` under `directory` (sorted,
    /// depth first) that `selects` picks; false once `visit` said stop.
    func walk(_ directory: String, fd: Int32, seen: inout Set<InodeKey>, keepOpen: Bool,
              selects: (FileHeader) -> Bool, visit: (Candidate) -> Bool) -> Bool {
        guard let entries = try? CipherTree.list(fd) else { return true }
        for entry in entries {
            let isKeys = entry.kind == .directoryKeys
            // Stored names are base64url (or, with plaintext names, what the
            // user gave: the path is then only a hint, and recovery finds a
            // file by its object id when the hint does not lead to it).
            let path = directory.isEmpty ? entry.name.description : directory + "/" + entry.name.description
            if entry.type == DT_DIR {
                guard let child = try? Syscall.open(fd, entry.name, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW) else { continue }
                if !walk(path, fd: child.raw, seen: &seen, keepOpen: keepOpen, selects: selects, visit: visit) { return false }
                continue
            }
            guard entry.type == DT_REG || entry.type == DT_UNKNOWN else { continue }
            guard let file = try? Syscall.open(fd, entry.name, O_RDONLY | O_NOFOLLOW) else { continue }
            guard let st = try? Syscall.fstat(file.raw), st.st_mode & S_IFMT == S_IFREG, seen.insert(InodeKey(st)).inserted,
                  let header = EncryptedFileSystem.header(of: file.raw), selects(header) else { continue }
            // The candidate keeps the file (a directory's keys: the directory) open for whoever moves it.
            var kept: SharedDescriptor?
            if keepOpen {
                if isKeys {
                    guard let directory = try? Syscall.call({ dup(fd) }) else { continue }
                    kept = SharedDescriptor(Descriptor(adopting: directory))
                } else {
                    kept = SharedDescriptor(file)
                }
            }
            let candidate = Candidate(directory: directory, name: entry.name.description, kind: isKeys ? .directory : .file,
                                      object: header.fileID.rawValue, bytes: isKeys ? 0 : Int(st.st_size), opened: kept)
            if !visit(candidate) { return false }
        }
        return true
    }

    /// The backing directory (relative to CIPHERDIR) of plaintext directory `path`.
    func startDirectory(_ path: String?) throws(Errno) -> FileName {
        guard let path, path != "/" else { return FileName(bytes: []) }
        var stored: [FileName] = []
        var node = try fs.nodes.node(.root)
        let context = RequestContext(uid: 0, gid: 0, pid: getpid())
        for component in path.split(separator: "/").map(String.init) where !component.isEmpty {
            let name = try fs.storedName(FileName(component), in: node, context)
            let opened = try Syscall.open(node.fd, name, KMSFS_O_PATH | O_DIRECTORY | O_NOFOLLOW)
            let st = try Syscall.fstat(opened.raw)
            node = Node(id: NodeID(rawValue: 0), descriptor: opened, key: InodeKey(st), type: S_IFDIR, parent: nil, name: FileName(component))
            stored.append(name)
        }
        return FileName(bytes: Array(stored.map { Array($0.bytes) }.joined(separator: [UInt8(ascii: "/")])))
    }
}
